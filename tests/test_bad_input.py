"""Bad input that must never pass silently (issue 11): every image checked, EXIF orientation,
paths that reach a shell, stale caches, killed and orphaned stages, non-finite numbers, labels
far outside the image, and command lines that point at the real culprit."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.core.errors import ParallaxError
from pipeline.core.hashing import images_digest
from pipeline.data.images import read_image
from pipeline.data.project import image_size, load_labels
from pipeline.io.labels_csv import read_label_csv, write_label_csv
from pipeline.stages import train, triangulate_labels, validate_calibration
from tests.conftest import REPO, dataset_cli_args
from tests.test_faults import (
    assert_one_error,
    run_chain,
    stage_outputs,
    views,
)


@pytest.fixture
def data(example_dir, tmp_path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(example_dir, copy)
    return copy


def wait_for(path: Path, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"no {path} after {seconds} s"
        time.sleep(0.05)


# ---------------------------------------------------------------------------- 6. EXIF orientation
def exif_jpeg(path: Path, bgr: np.ndarray, orientation: int | None) -> None:
    """Write `bgr` as a JPEG (stored grid as given), with an EXIF Orientation tag if asked."""
    image = Image.fromarray(np.ascontiguousarray(bgr[..., ::-1]))
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation  # Orientation: 6 = display rotated 90 degrees clockwise
    image.save(path, quality=95, exif=exif.tobytes())


def to_jpeg(data: Path, orientation: int | None) -> None:
    """Every image of the dataset as a JPEG (labels unchanged: in the stored pixel grid)."""
    for png in sorted((data / "labeled-data").rglob("*.png")):
        exif_jpeg(png.with_suffix(".jpg"), cv2.imread(str(png)), orientation)
        png.unlink()
    for view in views(data):
        csv = data / f"CollectedData_{view}.csv"
        csv.write_text(csv.read_text().replace(".png", ".jpg"))


def test_read_image_ignores_exif_orientation(tmp_path):
    stored = np.zeros((30, 40, 3), np.uint8)
    stored[2, 35] = 255  # a mark near the top-right corner of the stored grid
    path = tmp_path / "rotated.jpg"
    exif_jpeg(path, stored, orientation=6)
    image = read_image(path)
    assert image.shape == (30, 40, 3)  # cv2.imread's default would rotate it to 40 x 30
    assert image_size(path) == (40, 30)  # PIL's header size: the stored grid too
    assert np.unravel_index(image.sum(-1).argmax(), image.shape[:2]) == (2, 35)


def test_exif_rotated_images_give_the_same_cache_and_overlays(data, tmp_path, capsys):
    """Labels are in the stored grid: a dataset of EXIF-rotated JPEGs caches exactly like the
    same JPEGs without the tag, and the evaluation overlays show the stored grid."""
    import h5py

    plain = tmp_path / "plain"
    shutil.copytree(data, plain)
    to_jpeg(plain, None)
    to_jpeg(data, 6)
    images = {}
    for name, folder in (("plain", plain), ("exif", data)):
        out = tmp_path / f"out_{name}"
        assert run_chain(folder, out, until="cache_augmentations") == (None, 0), \
            capsys.readouterr().err
        with h5py.File(out / "cache" / "train.h5") as h5:
            images[name] = h5["images"][...]
    np.testing.assert_array_equal(images["exif"], images["plain"])

    from types import SimpleNamespace

    from pipeline.evaluation.summary import overlay_inputs

    labels = load_labels(data, views(data), [f"CollectedData_{v}.csv" for v in views(data)])
    inp = SimpleNamespace(labels=labels, pred_2d=labels.points_2d)
    errors = np.ones(labels.points_2d.shape[:3])
    shown, *_ = overlay_inputs(inp, errors, np.arange(labels.n_frames), 2)
    assert all(image.shape == (128, 160, 3) for row in shown for image in row)


# ---------------------------------------------------------------------------- 7, 8. Snakemake
WEIRD = "it's a \"data\" $HOME $(touch pwned) `touch pwned2` dir"


@pytest.fixture(scope="module")
def weird_run(tmp_path_factory, example_dir):
    """The example copied into a folder whose name holds a quote, spaces, `$`, `$(...)` and
    backticks, run by Snakemake up to the cache (a layered config, no example generation)."""
    from tests.test_workflow import snakemake, write_config

    root = tmp_path_factory.mktemp("weird")
    data = root / WEIRD / "data"
    shutil.copytree(example_dir, data)
    view_names = views(data)
    config = write_config(root / "c.yaml", example={"generate": False},
                          data={"data_dir": str(data), "view_names": view_names,
                                "csv_file": [f"CollectedData_{v}.csv" for v in view_names]})
    result = snakemake(root, config, "--until", "cache_augmentations")
    return root, data, config, result


def test_shell_safe_paths(weird_run):
    root, data, config, result = weird_run
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("calibration/summary.json", "triangulation/labels_3d.csv", "cache/train.h5"):
        assert (root / "results" / name).is_file(), name
    executed = [*root.rglob("pwned*"), *REPO.glob("pwned*"), *Path.cwd().glob("pwned*")]
    assert not executed, "a path was executed by a shell"


def test_edited_image_reruns_the_cache_and_a_stale_cache_is_refused(weird_run, capsys):
    from tests.test_workflow import snakemake

    root, data, config, result = weird_run
    assert result.returncode == 0, result.stdout + result.stderr
    again = snakemake(root, config, "-n", "--until", "cache_augmentations")
    assert again.returncode == 0 and "rule " not in again.stdout, again.stdout
    image = sorted((data / "labeled-data").rglob("*.png"))[7]
    stat = image.stat()
    pixels = cv2.imread(str(image))
    pixels[5, 5] = 255 - pixels[5, 5]  # one pixel edited, the mtime kept
    cv2.imwrite(str(image), pixels)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    plan = snakemake(root, config, "-n", "--until", "cache_augmentations")
    assert plan.returncode == 0, plan.stderr
    assert "rule cache_augmentations:" in plan.stdout, plan.stdout
    assert "rule validate_calibration:" not in plan.stdout

    labelled = [p for v in views(data) for p in read_label_csv(
        data / f"CollectedData_{v}.csv").index]
    out = root / "model"
    code = train.main([
        "--train-h5", str(root / "results/cache/train.h5"),
        "--eval-h5", str(root / "results/cache/eval.h5"),
        "--config-json", json.dumps({"model": {"backbone": "vit_tiny_test"}}),
        "--images-hash", images_digest(data, labelled), "--out-dir", str(out)])
    assert code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("parallax error: ") and "train.h5: built from other images" in line
    assert "rerun cache_augmentations" in line
    assert not out.exists() or not list(out.iterdir())


def test_cache_reader_checks_the_images_digest(tmp_path, example_dir, capsys):
    from pipeline.data.cache.torch_dataset import CacheDataset

    out = tmp_path / "out"
    assert run_chain(example_dir, out, until="cache_augmentations") == (None, 0)
    labelled = [p for v in views(example_dir) for p in read_label_csv(
        example_dir / f"CollectedData_{v}.csv").index]
    digest = images_digest(example_dir, labelled)
    CacheDataset(out / "cache" / "train.h5", expected_images_hash=digest)
    with pytest.raises(ParallaxError, match=r"eval.h5: built from other images .*rerun "
                                            "cache_augmentations"):
        CacheDataset(out / "cache" / "eval.h5", expected_images_hash="0123456789abcdef")


# ---------------------------------------------------------------------------- 9. killed, orphaned
HOLD = """
import sys, time
from pathlib import Path
from pipeline.core.atomic import atomic_paths
paths = [Path(p) for p in sys.argv[2:]]
with atomic_paths(*paths) as tmps:
    for tmp in tmps:
        tmp.write_text("partial")
    Path(sys.argv[1]).write_text("ready")
    time.sleep(600)
"""


def test_kill_9_leaves_no_temporary_file_after_the_next_run(example_dir, tmp_path):
    outputs = stage_outputs(tmp_path / "out")["triangulate_labels"]
    ready = tmp_path / "ready"
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(ready),
                                *map(str, outputs.values())], cwd=REPO)
    try:
        wait_for(ready)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    folder = outputs["points"].parent
    assert len(list(folder.glob(".*tmp*"))) == 3  # what kill -9 leaves behind
    argv = [*dataset_cli_args(example_dir)]
    for key, path in outputs.items():
        argv += [f"--{key}", str(path)]
    assert triangulate_labels.main(argv) == 0
    assert not list(folder.glob(".*tmp*"))
    assert all(path.is_file() for path in outputs.values())


ORPHAN = """
import os, sys, time
from pathlib import Path
from pipeline.core.atomic import atomic_path
from pipeline.core.errors import run_main

def body(argv):
    ready, output = map(Path, argv)
    parent = os.getppid()
    with atomic_path(output) as tmp:
        tmp.write_text("late")
        ready.write_text("ready")
        deadline = time.monotonic() + 60
        while os.getppid() == parent and time.monotonic() < deadline:
            time.sleep(0.05)

try:
    sys.exit(run_main(body, sys.argv[1:3]))
finally:
    Path(sys.argv[3]).write_text("done")
"""
PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], *sys.argv[2:5]],
                         stderr=open(sys.argv[5], "w"))
time.sleep(600)
"""


def test_orphaned_stage_writes_no_output(tmp_path):
    """The parent (Snakemake) dies while the stage still runs: the stage is re-parented and
    must not rename its output into place."""
    ready, output, done, stderr = (tmp_path / n for n in ("ready", "out.csv", "done", "err"))
    parent = subprocess.Popen([sys.executable, "-c", PARENT, ORPHAN, str(ready), str(output),
                               str(done), str(stderr)], cwd=REPO)
    try:
        wait_for(ready)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    wait_for(done)
    assert not output.exists()
    assert not list(tmp_path.glob(".*tmp*"))
    text = stderr.read_text()
    assert "parallax error:" in text and "orphaned" in text, text


# ---------------------------------------------------------------------------- 10. numbers
def test_non_finite_config_values_are_rejected_at_start(tmp_path):
    from tests.test_workflow import snakemake

    config = tmp_path / "c.yaml"
    from tests.test_workflow import write_config

    write_config(config)
    text = config.read_text()
    text += "calibration: {max_median_reproj_px: .inf}\n"
    text += "augmentation: {translate_frac: .nan}\n"
    config.write_text(text)
    result = snakemake(tmp_path, config, "-n")
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert "calibration.max_median_reproj_px = inf" in out, out
    assert "augmentation.translate_frac = nan" in out, out


def test_min_views_above_the_view_count_is_named(tmp_path, example_dir, capsys):
    from tests.test_workflow import snakemake, write_config

    config = write_config(tmp_path / "c.yaml", triangulation={"min_views": 4})
    result = snakemake(tmp_path, config, "-n")
    assert result.returncode != 0
    assert "triangulation.min_views is 4" in result.stdout + result.stderr
    out = tmp_path / "out"
    paths = stage_outputs(out)["validate_calibration"]
    argv = [*dataset_cli_args(example_dir), "--min-views", "4"]
    for key, path in paths.items():
        argv += [f"--{key}", str(path)]
    assert validate_calibration.main(argv) == 2
    assert_one_error(capsys, "validate_calibration", out, ("triangulation.min_views", "is 4",
                                                           "3 views"))


def test_labels_far_outside_the_image(data, tmp_path, capsys):
    """Reported with a count and an example CSV line; left out of the 3D; no inf error."""
    view = views(data)[1]
    csv = data / f"CollectedData_{view}.csv"
    table = read_label_csv(csv)
    points = table.points.copy()
    rows, kps = np.nonzero(np.isfinite(points).all(-1))
    points[rows[0], kps[0]] = [1e200, 5.0]  # a sentinel / unit bug
    points[rows[1], kps[1]] = [-170.0, 20.0]  # just over one image width outside
    points[rows[2], kps[2]] = [161.0, 20.0]  # just outside: counted, still used
    write_label_csv(csv, table.index, table.keypoint_names, points)
    out = tmp_path / "out"
    assert run_chain(data, out, until="triangulate_labels") == (None, 0)
    paths = stage_outputs(out)["triangulate_labels"]
    labels_3d = pd.read_csv(paths["points"])
    errors = labels_3d[[c for c in labels_3d.columns if c.endswith("_error")]].to_numpy()
    assert np.isfinite(errors[np.isfinite(errors)]).all() and not np.isinf(errors).any()
    for row, kp in ((rows[0], kps[0]), (rows[1], kps[1])):  # far labels: left out of the 3D
        assert errors[row, kp] < 1e-6
    report = json.loads(paths["summary"].read_text())["labels_outside_image"]
    assert report["count"] == 3 and report["left_out_of_3d"] == 2
    line = table.line_of(int(rows[0]))
    assert report["example"].startswith(f"{csv.name} line {line}: view '{view}'")
    log = capsys.readouterr().err
    assert "3 labels lie outside their image" in log and f"{csv.name} line {line}" in log
    outliers = pd.read_csv(paths["outliers"])
    assert np.isfinite(outliers["reprojection_px"]).all() and len(outliers) >= 2


# ---------------------------------------------------------------------------- 11. command lines
STAGES = sorted(p.stem for p in (REPO / "pipeline" / "stages").glob("*.py")
                if p.stem != "__init__")


@pytest.mark.parametrize("stage", STAGES)
def test_bad_argument_is_one_line(stage, capsys):
    module = importlib.import_module(f"pipeline.stages.{stage}")
    assert module.main(["--no-such-flag", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("parallax error: ") and err.count("\n") == 1, err
    assert "usage:" not in err and "Traceback" not in err


def test_bad_value_names_the_argument(example_dir, tmp_path, capsys):
    code = validate_calibration.main([*dataset_cli_args(example_dir), "--min-views", "two",
                                      "--summary", "s", "--table", "t", "--plot", "p"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("parallax error:") == 1 and "--min-views" in err and "'two'" in err



@pytest.mark.parametrize("stage", ["predict_labeled", "predict_video"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_batch_size_below_one_is_named(stage, value, capsys):
    module = importlib.import_module(f"pipeline.stages.{stage}")
    assert module.main(["--batch-size", value]) == 2
    err = capsys.readouterr().err
    assert err.count("parallax error:") == 1 and "--batch-size" in err
    assert f"must be >= 1, got {value}" in err

def test_csv_files_in_another_order_than_the_views(data, tmp_path, capsys):
    names = views(data)
    order = [f"CollectedData_{v}.csv" for v in (names[1], names[0], names[2])]
    argv = ["--data-dir", str(data), "--view-names", *names, "--csv-files", *order]
    out = tmp_path / "out"
    paths = stage_outputs(out)["validate_calibration"]
    for key, path in paths.items():
        argv += [f"--{key}", str(path)]
    assert validate_calibration.main(argv) == 2
    assert_one_error(capsys, "validate_calibration", out,
                     ("data.csv_file entry 1", order[0], f"view '{names[0]}'",
                      f"says view '{names[1]}'"))
    for i, name in enumerate(order):  # names that say nothing: the image folders tell
        shutil.copy(data / name, data / f"labels{i}.csv")
    argv[argv.index(order[0]):argv.index(order[0]) + 3] = [f"labels{i}.csv" for i in range(3)]
    assert validate_calibration.main(argv) == 2
    assert_one_error(capsys, "validate_calibration", out,
                     ("labels0.csv", f"listed for view '{names[0]}'",
                      f"folders of view '{names[1]}'"))


def test_one_image_of_another_size_is_named(data, tmp_path, capsys):
    """Every image is checked against its camera's size, not only the first of each view."""
    image = data / "labeled-data" / f"session1_{views(data)[2]}" / "img00000006.png"
    cv2.imwrite(str(image), np.zeros((128, 150, 3), np.uint8))
    out = tmp_path / "out"
    assert run_chain(data, out, until="cache_augmentations") == ("validate_calibration", 2)
    assert_one_error(capsys, "validate_calibration", out,
                     (str(image), "is 150x128", f"camera '{views(data)[2]}'", "session1.toml",
                      f"CollectedData_{views(data)[2]}.csv line 20"))


def test_validation_reads_image_headers_only(example_dir, monkeypatch):
    """The size check must stay fast for thousands of images: no pixel is decoded."""
    from PIL import ImageFile

    from pipeline.data.calibration_check import image_size_problems
    from pipeline.data.triangulate import load_calibrations

    labels = load_labels(example_dir, views(example_dir),
                         [f"CollectedData_{v}.csv" for v in views(example_dir)])
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded"))
    monkeypatch.setattr(cv2, "imread", lambda *a, **k: pytest.fail("decoded"))
    for name, group in load_calibrations(labels).items():
        assert image_size_problems(name, group, labels) == []
