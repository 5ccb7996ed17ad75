"""The Snakemake workflow as a user runs it: lint, dry run, full run, reruns, bad config."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import yaml

from pipeline.core.mappings import merge

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "example": {"generate": True, "seed": 1, "sessions": 2, "frames_per_session": 8,
                "views": 3, "width": 160, "height": 128, "label_noise_px": 0.3,
                "video_frames": 6},
    "data": {"data_dir": "results/example", "view_names": None, "csv_file": None,
             "image_resize_dims": {"height": 64, "width": 64}},
    # the four model variants of config.yaml, a few steps each
    "training": {"max_steps": 4, "train_batch_size": 4, "ckpt_every_n_steps": 2,
                 "check_val_every_n_epoch": 1},
}


def example_views(n: int) -> list[str]:
    from pipeline.synthetic.scene import view_names_for

    return list(view_names_for(n))


def write_config(path: Path, **overrides) -> Path:
    """The repository's config.yaml (its model variants too) shrunk by TINY, plus overrides
    (merged into each section): with --directory, Snakemake does not find config.yaml."""
    config = merge(yaml.safe_load((REPO / "config.yaml").read_text()), TINY)
    views = example_views(config["example"]["views"])
    config["data"]["view_names"] = views
    config["data"]["csv_file"] = [f"CollectedData_{v}.csv" for v in views]
    for section, values in overrides.items():
        config[section] = merge(config.get(section) or {}, values)
    path.write_text(yaml.safe_dump(config))
    return path


def snakemake(workdir: Path, config: Path | Sequence[Path], *extra: str
              ) -> subprocess.CompletedProcess:
    """Snakemake on the repository's Snakefile in `workdir`; several config files are layered,
    later ones on top (as `--configfile base.yaml mine.yaml`)."""
    configs = [config] if isinstance(config, str | Path) else list(config)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory",
           str(workdir), "--configfile", *map(str, configs), "--cores", "2", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=workdir)


def test_lint_is_clean(tmp_path):
    result = snakemake(tmp_path, write_config(tmp_path / "c.yaml"), "--lint")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Lints for" not in result.stdout + result.stderr


def test_default_config_dry_run(tmp_path):
    result = snakemake(tmp_path, REPO / "config.yaml", "-n")
    assert result.returncode == 0, result.stderr
    for rule in ("generate_example", "validate_calibration", "triangulate_labels",
                 "cache_augmentations"):
        assert rule in result.stdout


def test_unknown_config_key_is_rejected(tmp_path):
    config = write_config(tmp_path / "c.yaml", data={"view_nmaes": ["a", "b"]})
    result = snakemake(tmp_path, config, "-n")
    assert result.returncode != 0
    assert "view_nmaes" in result.stdout + result.stderr


def test_wrong_type_in_config(tmp_path):
    config = write_config(tmp_path / "c.yaml", triangulation={"min_views": "two"})
    result = snakemake(tmp_path, config, "-n")
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "min_views" in out and "two" in out


def test_csv_count_must_match_views(tmp_path):
    four = ["a.csv", "b.csv", "c.csv", "d.csv"]  # the example has 3 views
    config = write_config(tmp_path / "c.yaml", data={"csv_file": four})
    result = snakemake(tmp_path, config, "-n")
    assert result.returncode != 0
    assert "data.csv_file" in result.stdout + result.stderr


def test_env_files_exist_and_parse():
    referenced = set()
    for rule_file in (REPO / "workflow" / "rules").glob("*.smk"):
        for line in rule_file.read_text().splitlines():
            if "envs/" in line and line.strip().startswith('"'):
                referenced.add(line.strip().strip('",').split("envs/")[1])
    assert referenced
    for name in referenced:
        env = yaml.safe_load((REPO / "envs" / name).read_text())
        assert "dependencies" in env


#: the variants config.yaml trains (each one a train job, its predictions and a comparison row)
MODELS = tuple(yaml.safe_load((REPO / "config.yaml").read_text())["models"])
assert {"singleview", "mvt"} <= set(MODELS)  # the baseline and the multi-view model
#: every section of the HTML report (the categories of workflow/rules/*.smk)
REPORT_SECTIONS = ("Calibration", "Triangulation", "Augmentation", "Training", "Evaluation",
                   "Model comparison", "Videos")


@pytest.mark.slow
def test_full_run_rerun_report_and_single_stage(tmp_path):
    config = write_config(tmp_path / "c.yaml")
    first = snakemake(tmp_path, config)
    assert first.returncode == 0, first.stderr
    for out in ("results/calibration/summary.json", "results/calibration/per_camera.csv",
                "results/calibration/reprojection_errors.png",
                "results/triangulation/labels_3d.csv", "results/triangulation/outliers.csv",
                "results/triangulation/summary.json", "results/cache/splits.csv",
                "results/cache/train.h5", "results/cache/eval.h5", "results/cache/augment.png",
                "results/comparison/comparison.csv", "results/comparison/comparison.html"):
        assert (tmp_path / out).is_file(), out
    for model in MODELS:
        folder = tmp_path / "results" / "models" / model
        for out in ("best.pt", "last.pt", "metrics.csv", "predictions/predictions_3d.csv",
                    "evaluation/metrics.json", "evaluation/tables.html",
                    "evaluation/overlays.png", "videos/session0_3d.csv",
                    "videos/session1_cam0.csv", "videos/session0_trajectories.png"):
            assert (folder / out).is_file(), (model, out)
    comparison = (tmp_path / "results/comparison/comparison.csv").read_text()
    assert all(model in comparison for model in MODELS), comparison
    for log in ("validate_calibration", "triangulate_labels"):
        assert (tmp_path / "logs" / f"{log}.log").stat().st_size > 0

    report = snakemake(tmp_path, config, "--report", "results/report.html")
    assert report.returncode == 0, report.stderr
    html = (tmp_path / "results/report.html").read_text(errors="replace")
    for section in REPORT_SECTIONS:
        assert section in html, section
    for name in ("comparison.html", "tables.html", "training_curves.png", "pck.png",
                 "overlays.png", "skeleton_3d.png", "augment.png", "reprojection_errors.png",
                 "session0_trajectories.png"):
        assert name in html, name

    again = snakemake(tmp_path, config, "-n")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr

    # a config value only triangulate_labels uses reruns triangulate_labels and what follows
    changed = write_config(tmp_path / "c2.yaml", triangulation={"outlier_threshold_px": 3.0})
    plan = snakemake(tmp_path, changed, "-n")
    assert plan.returncode == 0, plan.stderr
    assert "triangulate_labels" in plan.stdout and "cache_augmentations" in plan.stdout
    assert "validate_calibration" not in plan.stdout
    assert "generate_example" not in plan.stdout

    # an augmentation setting reruns the cache and the models, not the triangulation
    changed = write_config(tmp_path / "c3.yaml", augmentation={"copies_per_frame": 1})
    plan = snakemake(tmp_path, changed, "-n")
    assert plan.returncode == 0, plan.stderr
    assert "cache_augmentations" in plan.stdout and "triangulate_labels" not in plan.stdout

    # a prediction setting reruns prediction and evaluation only
    changed = write_config(tmp_path / "c4.yaml", prediction={"consensus": {"min_confidence": 0.1}})
    plan = snakemake(tmp_path, changed, "-n")
    assert plan.returncode == 0, plan.stderr
    assert "predict_labeled" in plan.stdout and "rule train:" not in plan.stdout

    single = snakemake(tmp_path, config, "-R", "validate_calibration", "--until",
                       "validate_calibration")
    assert single.returncode == 0, single.stderr
    assert "validate_calibration" in single.stderr and "triangulate_labels" not in single.stderr


def test_slurm_profile_dry_run(tmp_path):
    pytest.importorskip("snakemake_executor_plugin_slurm")
    profile = REPO / "workflow" / "profiles" / "slurm"
    result = snakemake(tmp_path, write_config(tmp_path / "c.yaml"), "-n",
                       "--workflow-profile", str(profile))
    assert result.returncode == 0, result.stderr
    out = result.stdout + result.stderr
    assert "validate_calibration" in out and "slurm_partition=<your-partition>" in out
    jobs = out.split("\nrule ")  # each job's block: its rule name, then its resources
    train = [job for job in jobs if job.startswith("train:")]
    video = [job for job in jobs if job.startswith("predict_video:")]
    # one train job per variant; a predict_video job per variant and session (2)
    assert len(train) == len(MODELS) and len(video) == 2 * len(MODELS), out
    for job in train:
        assert "gpu=1" in job and "mem_mb=16000" in job and "runtime=720" in job, job
    assert all("gpu=1" in job and "mem_mb=8000" in job for job in video)
    cpu = write_config(tmp_path / "cpu.yaml", training={"device": "cpu"})
    result = snakemake(tmp_path, cpu, "-n", "--workflow-profile", str(profile))
    assert result.returncode == 0, result.stderr
    assert "gpu=1" not in result.stdout + result.stderr  # CPU training asks for no GPU


def test_train_target_dry_run(tmp_path):
    result = snakemake(tmp_path, write_config(tmp_path / "c.yaml"), "-n",
                       "results/models/mvt/best.pt")
    assert result.returncode == 0, result.stderr
    assert "train" in result.stdout and "cache_augmentations" in result.stdout


def train_jobs(dry_run_output: str) -> dict[str, tuple[int, str]]:
    """model -> (its `gpu` resource, its shell command) for every train job of a `-n -p` run."""
    jobs = {}
    for block in dry_run_output.split("\nrule ")[1:]:
        if not block.startswith("train:"):
            continue
        model = re.search(r"wildcards: model=([^,\s]+)", block)
        gpu = re.search(r"resources: .*\bgpu=(\d+)", block)
        command = re.search(r"^Shell command: (.*)$", block, re.MULTILINE)
        assert model and gpu and command, block
        jobs[model.group(1)] = (int(gpu.group(1)), command.group(1))
    return jobs


def test_multi_gpu_training_command_and_resources(tmp_path):
    """training.num_gpus > 1 (from a config layered on top, per variant too): the train job
    runs `torchrun --standalone --nproc_per_node N -m pipeline.stages.train` and asks for
    `gpu: N`; one GPU: plain python and gpu 1; training.device cpu: python and gpu 0."""
    base = write_config(tmp_path / "c.yaml")
    layer = tmp_path / "gpus.yaml"
    layer.write_text(yaml.safe_dump({
        "training": {"num_gpus": 2},
        "models": {"singleview": {"training": {"num_gpus": 1}},
                   "mvt_pm": {"training": {"num_gpus": 4}},
                   "mvt_pm_3d": {"training": {"device": "cpu"}}}}))
    result = snakemake(tmp_path, [base, layer], "-n", "-p")
    assert result.returncode == 0, result.stderr
    jobs = train_jobs(result.stdout)
    assert set(jobs) == set(MODELS), result.stdout
    expected = {"mvt": (2, "torchrun --standalone --nproc_per_node 2 -m pipeline.stages.train"),
                "mvt_pm": (4, "torchrun --standalone --nproc_per_node 4 -m pipeline.stages.train"),
                "singleview": (1, "python -m pipeline.stages.train"),
                "mvt_pm_3d": (0, "python -m pipeline.stages.train")}
    for model, (gpus, launcher) in expected.items():
        gpu, command = jobs[model]
        assert gpu == gpus, (model, gpu)
        assert command.startswith(f"{launcher} --train-h5 "), (model, command)
        assert "--resume" in command, command
    # the base config alone: one GPU per training job, no torchrun
    result = snakemake(tmp_path, base, "-n", "-p")
    assert result.returncode == 0, result.stderr
    jobs = train_jobs(result.stdout)
    assert {model: gpu for model, (gpu, _) in jobs.items()} == dict.fromkeys(MODELS, 1)
    assert not any("torchrun" in command for _, command in jobs.values())


def test_variant_cannot_override_cache_settings(tmp_path):
    """A variant setting a value that shapes the shared cache (a split or imgaug_3d key under
    its training section; the image size: variants have no data section) stops the dry run
    with an error naming the variant and the key(s); in the base section it is fine."""
    base = write_config(tmp_path / "c.yaml")
    layer = tmp_path / "variant.yaml"
    for override in ({"train_prob": 0.5}, {"imgaug_3d": False, "rng_seed_data_pt": 3}):
        layer.write_text(yaml.safe_dump({"models": {"mvt_pm": {"training": override}}}))
        result = snakemake(tmp_path, [base, layer], "-n")
        assert result.returncode != 0
        out = result.stdout + result.stderr
        keys = sorted(override)
        assert f"models.mvt_pm.training overrides {keys}" in out, out
    layer.write_text(yaml.safe_dump(
        {"models": {"mvt_pm": {"data": {"image_resize_dims": {"height": 32, "width": 32}}}}}))
    result = snakemake(tmp_path, [base, layer], "-n")
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "'data' was unexpected" in out and "['models']['mvt_pm']" in out, out
    layer.write_text(yaml.safe_dump({"training": {"train_prob": 0.5, "imgaug_3d": False}}))
    result = snakemake(tmp_path, [base, layer], "-n")
    assert result.returncode == 0, result.stderr
