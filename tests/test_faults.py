"""Fault and bad-input suite: a user's mistake, run through the stages in DAG order.

Each case damages a copy of the example dataset (or a built cache, or the config) and runs the
stages the way the workflow does, in order. The first stage to meet the damage must stop with
exit code 2 and exactly one `parallax error:` line naming the culprit (file, row, camera, key),
and leave none of its outputs (nor temporary files) behind. The README's "Bad input" table lists
what each kind of bad input produces.
"""

from __future__ import annotations

import errno
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from pipeline.io.calibration_toml import read_calibration, write_calibration
from pipeline.stages import cache_augmentations, train, triangulate_labels, validate_calibration
from tests.conftest import dataset_cli_args

CACHE_CONFIG = {
    "data.image_resize_dims": {"height": 64, "width": 64},
    "augmentation": {"copies_per_frame": 1, "scale_range": [0.9, 1.1], "translate_frac": 0.1,
                     "rotate_deg": 0.0, "vertical_axis": [0.0, 0.0, 1.0],
                     "image_compression": "gzip"},
    "training.imgaug_3d": True, "training.train_prob": 0.6, "training.val_prob": 0.2,
    "training.rng_seed_data_pt": 0, "training.test_sessions": [],
}
TRAIN_CONFIG = {
    "model": {"model_type": "heatmap_multiview_transformer", "backbone": "vit_tiny_test"},
    "data": {"image_resize_dims": {"height": 64, "width": 64}, "downsample_factor": 2},
    "training": {"max_steps": 1, "train_batch_size": 2, "check_val_every_n_epoch": 1,
                 "patch_mask": {"final_ratio": 0.0}},
    "losses": {"supervised_reprojection_heatmap_mse": {"log_weight": None}},
}


# ---------------------------------------------------------------------------- stage runners
def stage_outputs(out: Path) -> dict[str, dict[str, Path]]:
    return {
        "validate_calibration": {"summary": out / "calibration" / "summary.json",
                                 "table": out / "calibration" / "per_camera.csv",
                                 "plot": out / "calibration" / "errors.png"},
        "triangulate_labels": {"points": out / "triangulation" / "labels_3d.csv",
                               "outliers": out / "triangulation" / "outliers.csv",
                               "summary": out / "triangulation" / "summary.json"},
        "cache_augmentations": {"splits": out / "cache" / "splits.csv",
                                "train": out / "cache" / "train.h5",
                                "eval": out / "cache" / "eval.h5",
                                "picture": out / "cache" / "augment.png"},
        "train": {"best": out / "model" / "best.pt", "last": out / "model" / "last.pt",
                  "metrics": out / "model" / "metrics.csv",
                  "config": out / "model" / "config.yaml"},
    }


def run(stage: str, data: Path, out: Path, train_config: dict | None = None,
        cache_config: dict | None = None) -> int:
    """Run one stage's main() as its rule does; returns the exit code."""
    paths = stage_outputs(out)[stage]
    flags = [arg for key, path in paths.items() for arg in (f"--{key}", str(path))]
    dataset = dataset_cli_args(data)
    cache = out / "cache"
    if stage == "validate_calibration":
        return validate_calibration.main([*dataset, *flags])
    if stage == "triangulate_labels":
        return triangulate_labels.main([*dataset, "--points", str(paths["points"]),
                                        "--outliers", str(paths["outliers"]),
                                        "--summary", str(paths["summary"])])
    if stage == "cache_augmentations":
        return cache_augmentations.main([
            *dataset, "--labels-3d", str(out / "triangulation" / "labels_3d.csv"),
            "--config-json", json.dumps(CACHE_CONFIG), *flags])
    return train.main([
        "--train-h5", str(cache / "train.h5"), "--eval-h5", str(cache / "eval.h5"),
        "--config-json", json.dumps(train_config or TRAIN_CONFIG),
        "--cache-config-json", json.dumps(cache_config or CACHE_CONFIG),
        "--out-dir", str(out / "model"), "--threads", "1"])


STAGES = ("validate_calibration", "triangulate_labels", "cache_augmentations", "train")


def run_chain(data: Path, out: Path, until: str = "train", **kwargs) -> tuple[str | None, int]:
    """Run the stages in order up to `until`; (first failing stage or None, its exit code)."""
    for stage in STAGES[: STAGES.index(until) + 1]:
        code = run(stage, data, out, **kwargs)
        if code != 0:
            return stage, code
    return None, 0


def assert_one_error(capsys, stage: str, out: Path, needles: tuple[str, ...]) -> str:
    """Exit 2 already checked: one error line naming every needle, no outputs, no temp files."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("parallax error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    paths = stage_outputs(out)[stage].values()
    assert not [p for p in paths if p.exists()], lines[0]
    folder = next(iter(paths)).parent
    assert not list(folder.glob(".*tmp*")) if folder.exists() else True
    return lines[0]


# ---------------------------------------------------------------------------- damage
def views(data: Path) -> list[str]:
    return [str(v) for v in np.load(data / "ground_truth.npz")["view_names"]]


def csv_of(data: Path, view: int) -> Path:
    return data / f"CollectedData_{views(data)[view]}.csv"


def first_toml(data: Path) -> Path:
    return sorted((data / "calibrations").glob("*.toml"))[0]


def edit_lines(path: Path, edit: Callable[[list[str]], list[str]]) -> None:
    path.write_text("\n".join(edit(path.read_text().splitlines())) + "\n")


def blank_rows(path: Path, rows: slice) -> None:
    """Set every coordinate of the data rows in `rows` to empty (NaN)."""
    def edit(lines: list[str]) -> list[str]:
        head, body = lines[:3], lines[3:]
        for i in range(len(body))[rows]:
            key = body[i].split(",")[0]
            body[i] = key + "," * (body[i].count(","))
        return head + body
    edit_lines(path, edit)


def keep_labels(path: Path, keep: int) -> None:
    """Keep only the first `keep` labelled keypoints of the whole file (the others NaN)."""
    def edit(lines: list[str]) -> list[str]:
        out, left = lines[:3], keep
        for line in lines[3:]:
            cells = line.split(",")
            for i in range(1, len(cells) - 1, 2):
                if cells[i] and cells[i + 1] and left > 0:
                    left -= 1
                else:
                    cells[i] = cells[i + 1] = ""
            out.append(",".join(cells))
        return out
    edit_lines(path, edit)


def duplicate_camera(data: Path) -> str:

    toml = first_toml(data)
    group = read_calibration(toml)
    cams = list(group.cameras)
    text = toml.read_text().replace(f'name = "{cams[1].name}"', f'name = "{cams[0].name}"')
    toml.write_text(text)
    return cams[0].name


def reorder_cameras(data: Path) -> None:
    from pipeline.geometry.cameras import CameraGroup

    toml = first_toml(data)
    group = read_calibration(toml)
    write_calibration(CameraGroup(cameras=group.cameras[::-1], metadata=group.metadata), toml)
@dataclass
class Case:
    damage: Callable[[Path], object]
    stage: str  # the stage that must catch it
    needles: Callable[[Path], tuple[str, ...]]


def image(data: Path, n: int = 3) -> Path:
    return sorted((data / "labeled-data").rglob("*.png"))[n]


CASES: dict[str, Case] = {
    "malformed_toml": Case(
        lambda d: first_toml(d).write_text(first_toml(d).read_text().replace("]", "", 1)),
        "validate_calibration", lambda d: (first_toml(d).name, "not valid TOML")),
    "duplicated_camera": Case(
        duplicate_camera, "validate_calibration",
        lambda d: (first_toml(d).name, f"'{views(d)[0]}'", "[cam_0] and [cam_1]")),
    "camera_names_out_of_order": Case(
        reorder_cameras, "validate_calibration",
        lambda d: (first_toml(d).name, views(d)[0], views(d)[-1])),
    "camera_image_size_mismatch": Case(
        lambda d: first_toml(d).write_text(
            first_toml(d).read_text().replace("size = [160, 128]", "size = [640, 512]", 1)),
        "validate_calibration",
        lambda d: (first_toml(d).name, f"camera '{views(d)[0]}'", "[640, 512]", "160x128")),
    "all_frames_nan": Case(
        lambda d: [blank_rows(csv_of(d, v), slice(None)) for v in range(len(views(d)))],
        "validate_calibration", lambda d: (f"'{views(d)[0]}' (0)", "fewer than 3")),
    "view_with_two_labelled_keypoints": Case(
        lambda d: keep_labels(csv_of(d, 1), 2),
        "validate_calibration", lambda d: (f"'{views(d)[1]}' (2)", "fewer than 3")),
    "missing_image": Case(
        lambda d: image(d).unlink(), "validate_calibration",
        lambda d: (str(image(d)), f"{csv_of(d, 0).name} line 7", "image not found")),
    "corrupt_image": Case(  # the header is unreadable: the size check meets it first
        lambda d: image(d, 5).write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20),
        "validate_calibration", lambda d: (str(image(d, 5)), "cannot read image")),
    "corrupt_image_data": Case(  # a readable header, truncated pixel data
        lambda d: image(d, 5).write_bytes(image(d, 5).read_bytes()[:300]),
        "cache_augmentations", lambda d: (str(image(d, 5)), "cannot read image")),
    "view_with_fewer_rows": Case(
        lambda d: edit_lines(csv_of(d, 2), lambda lines: lines[:-1]),
        "validate_calibration", lambda d: (csv_of(d, 2).name, "19 rows", csv_of(d, 0).name)),
    "frame_keys_differ_across_views": Case(
        lambda d: edit_lines(csv_of(d, 1), lambda lines: lines[:4] + [
            lines[4].replace("img", "frame", 1)] + lines[5:]),
        "validate_calibration", lambda d: (csv_of(d, 1).name, "row 2 (line 5)", "frame0000")),
    "keypoint_names_differ": Case(
        lambda d: edit_lines(csv_of(d, 2), lambda lines: [lines[0], lines[1].replace(
            "nose", "snout"), *lines[2:]]),
        "validate_calibration", lambda d: (csv_of(d, 2).name, "keypoint 1 is 'snout'")),
    "two_header_rows": Case(
        lambda d: edit_lines(csv_of(d, 0), lambda lines: lines[1:]),
        "validate_calibration", lambda d: (csv_of(d, 0).name, "3 header rows")),
}


@pytest.fixture
def data(example_dir, tmp_path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(example_dir, copy)
    return copy


@pytest.mark.parametrize("name", list(CASES))
def test_bad_dataset(name, data, tmp_path, capsys):
    case = CASES[name]
    needles = case.needles(data)  # computed before the damage (names of things that go away)
    case.damage(data)
    out = tmp_path / "out"
    stage, code = run_chain(data, out, until="cache_augmentations")
    assert (stage, code) == (case.stage, 2), capsys.readouterr().err
    assert_one_error(capsys, stage, out, needles)


def test_nan_only_frames_are_skipped_and_counted(data, tmp_path, capsys):
    """Frames with no label in any view are not an error: they are counted in the log."""
    for view in range(len(views(data))):
        blank_rows(csv_of(data, view), slice(0, 2))
    out = tmp_path / "out"
    assert run_chain(data, out, until="triangulate_labels") == (None, 0)
    err = capsys.readouterr().err
    assert "2 frames have no label in any view" in err, err
    assert f"line 4 of {csv_of(data, 0).name}" in err

# ---------------------------------------------------------------------------- cache and training
@pytest.fixture(scope="module")
def built(tmp_path_factory, example_dir) -> Path:
    """A built cache (calibration, triangulation and cache stages run) for the training cases."""
    out = tmp_path_factory.mktemp("built")
    assert run_chain(example_dir, out, until="cache_augmentations") == (None, 0)
    return out


@pytest.fixture
def out(built, tmp_path) -> Path:
    copy = tmp_path / "out"
    shutil.copytree(built, copy)
    shutil.rmtree(copy / "model", ignore_errors=True)
    return copy


def test_truncated_cache(out, example_dir, capsys):
    train_h5 = out / "cache" / "train.h5"
    train_h5.write_bytes(train_h5.read_bytes()[: train_h5.stat().st_size // 2])
    assert run("train", example_dir, out) == 2
    assert_one_error(capsys, "train", out, ("train.h5",))


def test_cache_from_another_config(out, example_dir, capsys):
    other = {**CACHE_CONFIG, "training.rng_seed_data_pt": 7}
    assert run("train", example_dir, out, cache_config=other) == 2
    assert_one_error(capsys, "train", out, ("train.h5", "another configuration"))


@pytest.mark.parametrize("model, needles", [
    ({"backbone": "vit_hugee_patch16_224"}, ("vit_hugee_patch16_224",)),
    ({"backbone": "vits_dinov9"}, ("vits_dinov9",)),
])
def test_unknown_backbone(out, example_dir, capsys, model, needles):
    config = {**TRAIN_CONFIG, "model": {**TRAIN_CONFIG["model"], **model}}
    assert run("train", example_dir, out, train_config=config) == 2
    assert_one_error(capsys, "train", out, ("model.backbone", *needles))


def test_image_size_not_a_multiple_of_the_patch(out, example_dir, capsys):
    config = {**TRAIN_CONFIG, "data": {"image_resize_dims": {"height": 64, "width": 60},
                                       "downsample_factor": 2}}
    assert run("train", example_dir, out, train_config=config) == 2
    assert_one_error(capsys, "train", out, ("data.image_resize_dims", "64x60", "patch size"))


def test_disk_full_while_writing_the_cache(example_dir, tmp_path, capsys, monkeypatch):
    """ENOSPC in the middle of the HDF5 write: one message naming the file, nothing left."""
    import h5py

    out = tmp_path / "out"
    assert run_chain(example_dir, out, until="triangulate_labels") == (None, 0)
    real = h5py.Dataset.__setitem__
    calls = {"n": 0}

    def full(self, key, value):
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", full)
    assert run("cache_augmentations", example_dir, out) == 2
    assert calls["n"] > 5  # the failure happened mid-write, not before it
    line = assert_one_error(capsys, "cache_augmentations", out, ("train.h5",))
    assert "space" in line.lower()


def test_out_of_memory_batch_gives_a_hint(out, example_dir, capsys, monkeypatch):
    """An allocation failure inside a training step names the keys to lower; no outputs."""
    from pipeline.training import trainer

    def oom(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: "
                           "not enough memory: you tried to allocate 68719476736 bytes.")

    monkeypatch.setattr(trainer, "loss_terms", oom)
    assert run("train", example_dir, out) == 2
    line = assert_one_error(capsys, "train", out, ("out of memory", "training.train_batch_size",
                                                   "data.image_resize_dims"))
    assert "batch size 2" in line


def _wait_for(path: Path, process, watch: Path, stall_seconds: float = 300,
              total_seconds: float = 1800) -> None:
    """Wait until `path` exists. No deadline on the work itself (a loaded 2-core CI machine may
    be slow): only hang guards, failing when nothing under `watch` changed for
    `stall_seconds`, or after `total_seconds` in all."""
    import time

    from tests.test_ddp import _snapshot

    start = last_change = time.monotonic()
    state = None
    while not path.exists():
        assert process.poll() is None, "snakemake ended before the first checkpoint"
        now, current = time.monotonic(), _snapshot(watch)
        if current != state:
            state, last_change = current, now
        assert now - last_change < stall_seconds, f"no progress under {watch} for " \
            f"{stall_seconds:.0f} s and no {path}"
        assert now - start < total_seconds, f"no {path} after {total_seconds:.0f} s"
        time.sleep(0.5)


@pytest.mark.slow
def test_kill_9_during_training_then_rerun_incomplete_resumes(tmp_path):
    """kill -9 of the whole snakemake run mid-training: Snakemake marks the model incomplete,
    a plain rerun refuses, `--rerun-incomplete` deletes the declared outputs and the train
    stage resumes from the checkpoint kept in resume/ (not from step 0)."""
    import os
    import signal
    import subprocess
    import sys

    from tests.test_workflow import REPO, snakemake, write_config

    config = write_config(
        tmp_path / "c.yaml",
        training={"max_steps": 400, "ckpt_every_n_steps": 10, "check_val_every_n_epoch": 50},
        models={"singleview": False, "mvt_pm": False, "mvt_pm_3d": False})
    target = "results/models/mvt/best.pt"
    env = dict(os.environ,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory",
           str(tmp_path), "--configfile", str(config), "--cores", "2", target]
    process = subprocess.Popen(cmd, cwd=tmp_path, env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(tmp_path / "results/models/mvt/resume/last.pt", process, tmp_path)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # snakemake and the training job, no cleanup
        process.wait()
    metrics = tmp_path / "results/models/mvt/metrics.csv"
    assert not (tmp_path / "results/models/mvt/config.yaml").exists()  # written at the end

    unlock = snakemake(tmp_path, config, "--unlock")  # the killed run's lock
    assert unlock.returncode == 0, unlock.stderr
    plain = snakemake(tmp_path, config, target)
    assert plain.returncode != 0
    assert "incomplete" in (plain.stdout + plain.stderr).lower()

    again = snakemake(tmp_path, config, "--rerun-incomplete", target)
    assert again.returncode == 0, again.stderr
    log = (tmp_path / "logs/train/mvt/train.log").read_text()
    assert "resumed from" in log and "at step 0" not in log, log
    import pandas as pd

    steps = pd.read_csv(metrics)["step"].to_numpy()
    assert steps.tolist() == list(range(1, 401))  # one row per step, none lost or repeated
