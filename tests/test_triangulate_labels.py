"""Stage triangulate_labels: ground-truth recovery, outputs, counts, real data."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipeline.stages import triangulate_labels
from tests.conftest import dataset_cli_args


def run_stage(data_args: list[str], out, *extra: str) -> tuple[int, dict]:
    paths = {
        "points": out / "labels_3d.csv",
        "outliers": out / "outliers.csv",
        "summary": out / "summary.json",
    }
    argv = [*data_args, *extra]
    for key, path in paths.items():
        argv += [f"--{key}", str(path)]
    return triangulate_labels.main(argv), paths


def test_recovers_ground_truth(example_dir, tmp_path):
    code, paths = run_stage(dataset_cli_args(example_dir), tmp_path)
    assert code == 0
    truth = np.load(example_dir / "ground_truth.npz")
    table = pd.read_csv(paths["points"])
    names = [str(k) for k in truth["keypoint_names"]]
    xyz = np.stack(
        [table[[f"{k}_x", f"{k}_y", f"{k}_z"]].to_numpy() for k in names], axis=1
    )  # (frames, keypoints, 3)
    seen = truth["visible"].sum(axis=0) >= 2
    assert seen.mean() > 0.8
    assert np.isfinite(xyz[seen]).all() and np.isnan(xyz[~seen]).all()
    scale = np.ptp(truth["points_3d"][seen], axis=0).max()
    assert np.abs(xyz[seen] - truth["points_3d"][seen]).max() / scale < 1e-6
    ncams = np.stack([table[f"{k}_ncams"].to_numpy() for k in names], axis=1)
    np.testing.assert_array_equal(ncams[seen], truth["visible"].sum(axis=0)[seen])
    summary = json.loads(paths["summary"].read_text())
    assert summary["triangulated"] == int(seen.sum())
    counts = truth["visible"].sum(axis=0)
    assert summary["too_few_views"] == int((counts == 1).sum())
    assert summary["unlabelled"] == int((counts == 0).sum())
    assert summary["median_reprojection_px"] < 1e-6
    assert summary["labels_outside_image"]["count"] == 0
    assert pd.read_csv(paths["outliers"]).empty


def test_outliers_flag_a_moved_label(example_dir, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(example_dir, data)
    views = [str(v) for v in np.load(data / "ground_truth.npz")["view_names"]]
    csv = data / f"CollectedData_{views[1]}.csv"
    lines = csv.read_text().splitlines()
    cells = lines[5].split(",")
    column = next(i for i, c in enumerate(cells[1:], 1) if c)
    cells[column] = str(float(cells[column]) + 25.0)  # a wrong click, 25 px off
    lines[5] = ",".join(cells)
    csv.write_text("\n".join(lines) + "\n")
    code, paths = run_stage(dataset_cli_args(data), tmp_path, "--outlier-threshold-px", "5")
    assert code == 0
    outliers = pd.read_csv(paths["outliers"])
    assert len(outliers) >= 1
    assert outliers.iloc[0]["view"] == views[1]
    assert outliers["reprojection_px"].is_monotonic_decreasing


def test_real_mouse_median_reprojection(mouse_dir, tmp_path):
    views = ["back", "mid", "side", "top"]
    args = ["--data-dir", str(mouse_dir), "--view-names", *views,
            "--csv-files", *[f"CollectedData_{v}.csv" for v in views]]
    code, paths = run_stage(args, tmp_path)
    assert code == 0
    summary = json.loads(paths["summary"].read_text())
    assert summary["median_reprojection_px"] == pytest.approx(6.09, abs=0.3)
    assert summary["frames"] == 80
