"""The package's house rules: one stage module per rule, the import contract, rerun triggers.

The import contract lives in pyproject.toml (`[tool.importlinter]`); `make lint` checks it too.
The rerun test edits every module of a temporary copy of the repository in turn and asks
Snakemake which rules it would rerun because their params changed: exactly the stages that
import the module (found independently, by importing each stage and reading sys.modules).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core.digest import code_digest, module_closure

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RULE = re.compile(r"^\s*rule (\w+):", re.M)


def rules() -> set[str]:
    found = set()
    for path in (REPO / "workflow" / "rules").glob("*.smk"):
        found |= set(RULE.findall(path.read_text()))
    return found


def stage_modules(root: Path = REPO) -> set[str]:
    return {p.stem for p in (root / "pipeline" / "stages").glob("*.py") if p.stem != "__init__"}


def test_one_stage_module_per_rule():
    assert stage_modules() == rules()


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "lint-imports"), "--no-cache"], cwd=root,
                          capture_output=True, text=True,
                          env={"PYTHONPATH": str(root), "PATH": str(BIN)})


def copy_package(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    shutil.copytree(REPO / "pipeline", root / "pipeline",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", root)
    return root


def test_import_contract_holds():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(("module", "statement", "contract"), [
    ("core/errors.py", "from pipeline.geometry import cameras", "layers import downwards"),
    ("data/splits.py", "from pipeline.stages import train", "layers import downwards"),
    ("training/trainer.py", "from pipeline.inference import predictor", "layers import"),
    ("models/model.py", "from pipeline.data import images", "layers import downwards"),
    ("stages/evaluate.py", "from pipeline.stages import train", "no stage imports another"),
    ("data/project.py", "from pipeline.data.cache import build", "no import cycles"),
])
def test_import_contract_catches_a_wrong_import(tmp_path, module, statement, contract):
    root = copy_package(tmp_path)
    path = root / "pipeline" / module
    path.write_text(path.read_text() + f"\n{statement}  # deliberately wrong\n")
    result = lint_imports(root)
    assert result.returncode != 0
    broken = result.stdout.split("Broken contracts")[-1]
    assert contract in broken, result.stdout


def test_digest_follows_every_import_form(tmp_path):
    root = copy_package(tmp_path)
    pkg = root / "pipeline"
    (pkg / "core" / "zz_a.py").write_text("from . import zz_b\n")
    (pkg / "core" / "zz_b.py").write_text("def f():\n    from ..io import zz_c\n")
    (pkg / "io" / "zz_c.py").write_text("import pipeline.geometry.zz_d\n")
    (pkg / "geometry" / "zz_d.py").write_text("from pipeline import synthetic\n"
                                              "from pipeline.models import zz_e\n")
    (pkg / "models" / "zz_e.py").write_text("X = 1\n")
    closure = module_closure("pipeline.core.zz_a", root)
    for name in ("pipeline", "pipeline.core", "pipeline.core.zz_b", "pipeline.io",
                 "pipeline.io.zz_c", "pipeline.geometry", "pipeline.geometry.zz_d",
                 "pipeline.synthetic", "pipeline.models", "pipeline.models.zz_e"):
        assert name in closure
    before = code_digest("pipeline.core.zz_a", root)
    (pkg / "models" / "zz_e.py").write_text("X = 2\n")
    assert code_digest("pipeline.core.zz_a", root) != before


def runtime_imports(root: Path, stage: str) -> set[str]:
    """The pipeline modules loaded by importing a stage, seen by the interpreter itself."""
    code = (f"import sys, json; import pipeline.stages.{stage}; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'pipeline')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         check=True, env={"PYTHONPATH": str(root), "PATH": str(BIN)})
    return set(json.loads(out.stdout))


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


TINY_CONFIG = """
example: {generate: true, sessions: 1, frames_per_session: 6, video_frames: 3, width: 64,
          height: 48, views: 3}
data: {view_names: [cam0, cam1, cam2],
       csv_file: [CollectedData_cam0.csv, CollectedData_cam1.csv, CollectedData_cam2.csv],
       image_resize_dims: {height: 32, width: 32}}
training: {max_epochs: 1, train_batch_size: 2, check_val_every_n_epoch: 1}
models: {singleview: false, mvt_pm: false, mvt_pm_3d: false}
augmentation: {copies_per_frame: 1}
"""


def params_changed(root: Path) -> set[str]:
    """Rules Snakemake would rerun because their params changed (not because an input did)."""
    result = subprocess.run(
        [str(BIN / "snakemake"), "-n", "--cores", "1", "--rerun-triggers", "params",
         "--configfile", "tiny.yaml"], cwd=root, capture_output=True, text=True,
        env={"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(root)})
    assert result.returncode == 0, result.stdout + result.stderr
    changed = set()
    for block in re.split(r"\n(?=rule \w+:)", result.stdout):
        match = re.match(r"rule (\w+):", block)
        if match and re.search(r"reason:.*Params have changed", block):
            changed.add(match.group(1))
    return changed


@pytest.mark.slow
def test_editing_a_module_reruns_exactly_the_stages_that_import_it(tmp_path):
    root = tmp_path / "repo"
    for name in ("pipeline", "workflow"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("Snakefile", "config.yaml", "pyproject.toml"):
        shutil.copy(REPO / name, root)
    (root / "tiny.yaml").write_text(TINY_CONFIG)
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(root)}
    run = subprocess.run([str(BIN / "snakemake"), "--cores", "2", "--configfile", "tiny.yaml"],
                         cwd=root, capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert params_changed(root) == set()
    stages = sorted(stage_modules(root))
    imports = {stage: runtime_imports(root, stage) for stage in stages}
    modules = sorted((root / "pipeline").rglob("*.py"))
    assert len(modules) > 50
    misses = []
    for path in modules:
        name = module_name(path, root)
        original = path.read_bytes()
        path.write_bytes(original + b"\n# an edit\n")
        try:
            changed = params_changed(root)
        finally:
            path.write_bytes(original)
        expected = {stage for stage in stages if name in imports[stage]}
        if changed != expected:
            misses.append(f"{name}: reruns {sorted(changed)}, imported by {sorted(expected)}")
    assert not misses, "\n".join(misses)
