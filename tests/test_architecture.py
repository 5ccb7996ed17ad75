"""The package's house rules: one stage module per rule, the import contract, rerun triggers.

The import contract lives in pyproject.toml (`[tool.importlinter]`); `make lint` checks it too.
The rerun test runs a tiny workflow in a temporary copy of the repository, then edits every
module in turn and asks Snakemake which rules its dry run would rerun because their own params
changed (`snakemake --list-changes params`): exactly the stages that import the module (found
independently, by importing each stage and reading sys.modules).
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


def snakemake(root: Path, *args: str) -> str:
    result = subprocess.run([str(BIN / "snakemake"), *args, "--cores", "1", "--configfile",
                             "tiny.yaml"], cwd=root, capture_output=True, text=True,
                            env={"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(root)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def ancestors(root: Path) -> dict[str, set[str]]:
    """rule -> every rule upstream of it (`snakemake --rulegraph`)."""
    dot = snakemake(root, "--rulegraph")
    names = dict(re.findall(r"(\d+)\[label = \"(\w+)\"", dot))
    parents: dict[str, set[str]] = {name: set() for name in names.values()}
    for a, b in re.findall(r"(\d+) -> (\d+)", dot):
        parents[names[b]].add(names[a])
    closure = {}
    for rule in parents:
        seen, todo = set(), list(parents[rule])
        while todo:
            up = todo.pop()
            if up not in seen:
                seen.add(up)
                todo.extend(parents[up])
        closure[rule] = seen
    return closure


def params_changed(root: Path) -> set[str]:
    """Rules the dry run would rerun because their own params changed (`reason: Params have
    changed`); a rule below one of them is scheduled anyway, its reason is then its input."""
    out = snakemake(root, "-n", "--rerun-triggers", "params")
    changed = set()
    for block in re.split(r"\n(?=rule \w+:)", out):
        match = re.match(r"rule (\w+):", block)
        if match and re.search(r"reason:.*Params have changed", block):
            changed.add(match.group(1))
    return changed


@pytest.mark.slow
def test_editing_a_module_reruns_exactly_the_stages_that_import_it(tmp_path):
    """Every module is edited in turn: the stages whose code digest changes must be exactly
    those that import it (sys.modules after importing each stage: the independent reference).
    For one module of every distinct set of importing stages (the dry run depends on nothing
    else; about 15 sets, ~5 s each), Snakemake's dry run must rerun, by the params trigger,
    exactly the topmost of those stages (the others are downstream of one and rerun anyway:
    their inputs change)."""
    root = tmp_path / "repo"
    for name in ("pipeline", "workflow", "envs"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("Snakefile", "config.yaml", "pyproject.toml"):
        shutil.copy(REPO / name, root)
    (root / "tiny.yaml").write_text(TINY_CONFIG)
    snakemake(root)  # the whole tiny workflow, so that every rule has recorded params
    assert params_changed(root) == set()
    upstream = ancestors(root)
    stages = sorted(stage_modules(root))
    assert set(stages) <= set(upstream)
    imports = {stage: runtime_imports(root, stage) for stage in stages}
    modules = sorted((root / "pipeline").rglob("*.py"))
    assert len(modules) > 50
    misses, dry_runs = [], set()
    before = {stage: code_digest(f"pipeline.stages.{stage}", root) for stage in stages}
    for path in modules:
        name = module_name(path, root)
        expected = frozenset(stage for stage in stages if name in imports[stage])
        original = path.read_bytes()
        path.write_bytes(original + b"\n# an edit\n")
        try:
            digests = {stage for stage in stages
                       if code_digest(f"pipeline.stages.{stage}", root) != before[stage]}
            changed = None
            if expected not in dry_runs:
                dry_runs.add(expected)
                changed = params_changed(root)
        finally:
            path.write_bytes(original)
        topmost = {stage for stage in expected if not upstream[stage] & expected}
        if digests != expected or changed not in (None, topmost):
            misses.append(f"{name}: imported by {sorted(expected)}; digest changes for "
                          f"{sorted(digests)}; dry run reruns {changed} (expected the "
                          f"topmost {sorted(topmost)})")
    assert not misses, "\n".join(misses)
    assert len(dry_runs) > 8
