"""Stage predict_labeled end to end on the synthetic example with tiny trained models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.data.project import frame_keys, load_labels
from pipeline.io.predictions_csv import read_pixel_error, read_pose_3d, read_predictions_2d
from pipeline.stages import cache_augmentations, predict_labeled, triangulate_labels
from pipeline.training.config import TrainConfig
from pipeline.training.trainer import Trainer
from tests.conftest import dataset_cli_args

CACHE_CONFIG = {
    "data.image_resize_dims": {"height": 64, "width": 64},
    "augmentation": {"copies_per_frame": 0, "scale_range": [0.8, 1.2], "translate_frac": 0.25,
                     "rotate_deg": 0.0, "vertical_axis": [0.0, 0.0, 1.0]},
    "training.imgaug_3d": False, "training.train_prob": 0.6, "training.val_prob": 0.2,
    "training.rng_seed_data_pt": 0, "training.test_sessions": [],
}


def tiny_config(model_type: str) -> dict:
    return {
        "model": {"model_type": model_type, "backbone": "vit_tiny_test"},
        "data": {"image_resize_dims": {"height": 64, "width": 64}, "downsample_factor": 2},
        "training": {"max_epochs": 1, "max_steps": 3, "train_batch_size": 4,
                     "val_batch_size": 8, "learning_rate": 1e-3, "check_val_every_n_epoch": 1,
                     "ckpt_every_n_steps": 3, "rng_seed_model_pt": 0, "imgaug": "none"},
        "losses": {},
    }


def build_trained(example_dir: Path, root: Path) -> dict[str, Path]:
    """Triangulation, cache and a 3-step MVT and single-view model under `root` (built once
    per session: later calls find the files and reuse them)."""
    paths = {"labels_3d": root / "labels_3d.csv", "splits": root / "splits.csv",
             "train": root / "train.h5", "eval": root / "eval.h5",
             "mvt": root / "models" / "mvt" / "best.pt",
             "single": root / "models" / "single" / "best.pt"}
    if all(p.is_file() for p in paths.values()):
        return paths
    data = dataset_cli_args(example_dir)
    assert triangulate_labels.main([*data, "--points", str(paths["labels_3d"]), "--outliers",
                                    str(root / "o.csv"), "--summary", str(root / "s.json")]) == 0
    assert cache_augmentations.main([
        *data, "--labels-3d", str(paths["labels_3d"]), "--config-json", json.dumps(CACHE_CONFIG),
        "--splits", str(paths["splits"]), "--train", str(paths["train"]), "--eval",
        str(paths["eval"]), "--picture", str(root / "a.png")]) == 0
    torch.set_num_threads(1)
    for key, model_type in (("mvt", "heatmap_multiview_transformer"), ("single", "heatmap")):
        Trainer(TrainConfig.from_config(tiny_config(model_type)), paths["train"],
                paths["eval"], paths[key].parent).fit()
    return paths


@pytest.fixture(scope="session")
def trained(example_dir, tmp_path_factory) -> dict[str, Path]:
    return build_trained(example_dir, tmp_path_factory.getbasetemp() / "tiny_models")


def stage_argv(example_dir: Path, trained: dict[str, Path], checkpoint: Path,
               out: Path) -> list[str]:
    return [*dataset_cli_args(example_dir), "--checkpoint", str(checkpoint), "--splits",
            str(trained["splits"]), "--labels-3d", str(trained["labels_3d"]), "--out-dir",
            str(out), "--batch-size", "3"]


def errors_of(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines()
            if line.startswith("parallax error:")]


@pytest.fixture(scope="module")
def mvt_run(example_dir, trained, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("predict_mvt")
    assert predict_labeled.main(stage_argv(example_dir, trained, trained["mvt"], out)) == 0
    return out


def test_all_outputs_one_row_per_frame_and_view(example_dir, trained, mvt_run):
    views = [str(v) for v in np.load(example_dir / "ground_truth.npz")["view_names"]]
    labels = load_labels(example_dir, views, [f"CollectedData_{v}.csv" for v in views])
    expected = {p.name for p in predict_labeled.output_paths(mvt_run, views)}
    assert {p.name for p in mvt_run.iterdir()} == expected  # no temporaries left behind
    splits = pd.read_csv(trained["splits"])
    assert list(splits["image"]) == frame_keys(labels)
    for v, view in enumerate(views):
        index, keypoints, points, conf, sets = read_predictions_2d(
            mvt_run / f"predictions_{view}.csv")
        assert index == list(labels.image_paths[v])
        assert keypoints == list(labels.keypoint_names)
        assert points.shape == (labels.n_frames, labels.n_keypoints, 2)
        assert np.isfinite(points).all() and ((conf >= 0) & (conf <= 1)).all()
        assert list(sets) == list(splits["set"])
        # LP / DLC readers see a 3-level header with the scorer = the model folder name
        lp = pd.read_csv(mvt_run / f"predictions_{view}.csv", header=[0, 1, 2], index_col=0)
        assert lp.columns[0][0] == "mvt" and len(lp) == labels.n_frames
        # pixel error recomputed from the CSVs alone
        err_index, err_kps, errors, err_sets = read_pixel_error(
            mvt_run / f"predictions_{view}_pixel_error.csv")
        assert err_index == index and err_kps == keypoints and list(err_sets) == list(sets)
        label_csv = pd.read_csv(example_dir / f"CollectedData_{view}.csv", header=[0, 1, 2],
                                index_col=0)
        label_xy = label_csv.to_numpy(float).reshape(len(label_csv), -1, 2)
        dx = lp.xs("x", level=2, axis=1).to_numpy() - label_xy[..., 0]
        dy = lp.xs("y", level=2, axis=1).to_numpy() - label_xy[..., 1]
        expected_err = np.sqrt(dx**2 + dy**2)
        np.testing.assert_allclose(errors, expected_err, rtol=1e-9, equal_nan=True)
        assert np.isnan(errors).sum() == np.isnan(label_xy).any(-1).sum()


def test_3d_outputs(example_dir, trained, mvt_run):
    names, points, error, ncams, score, rest = read_pose_3d(mvt_run / "predictions_3d.csv")
    splits = pd.read_csv(trained["splits"])
    assert points.shape[0] == len(splits) and list(rest["set"]) == list(splits["set"])
    assert list(rest["fnum"]) == list(range(len(splits)))
    # every example frame is calibrated and every view predicted: a 3D point exists exactly
    # where at least min_views (2) views agree on it (pipeline/inference/consensus.py)
    finite = np.isfinite(points).all(-1)
    np.testing.assert_array_equal(finite, ncams >= 2)
    assert (np.isnan(points).all(-1) | finite).all() and finite.mean() > 0.25
    table = pd.read_csv(mvt_run / "error_3d.csv")
    assert list(table.columns) == ["frame", "set", "keypoint", "error_3d",
                                   "reprojection_error_px", "n_views"]
    assert len(table) == len(splits) * len(names)
    assert list(table["frame"]) == list(np.repeat(rest["frame"].to_numpy(), len(names)))
    assert list(table["keypoint"]) == names * len(splits)
    truth = pd.read_csv(trained["labels_3d"])
    gt = truth[[f"{k}_{a}" for k in names for a in "xyz"]].to_numpy().reshape(len(truth), -1, 3)
    np.testing.assert_allclose(table["error_3d"].to_numpy(),
                               np.linalg.norm(points - gt, axis=-1).ravel(), equal_nan=True)
    np.testing.assert_array_equal(table["n_views"].to_numpy(), ncams.ravel())


def test_view_dropout_table(example_dir, trained, mvt_run):
    views = [str(v) for v in np.load(example_dir / "ground_truth.npz")["view_names"]]
    both = pd.read_csv(mvt_run / "view_dropout.csv")
    assert list(both.columns) == ["predictions", "blanked_view", "view", "keypoint", "set", "n",
                                  "mean_px", "median_px"]
    assert list(dict.fromkeys(both["predictions"])) == ["final", "raw"]
    table = both[both["predictions"] == "final"]
    # the blanked view gets the reprojection of the other views' 3D point: far better than
    # the raw prediction of a blank image
    raw = both[both["predictions"] == "raw"]
    blanked = [(t["blanked_view"] == t["view"]) & (t["n"] > 0) for t in (table, raw)]
    assert table.loc[blanked[0], "mean_px"].mean() < raw.loc[blanked[1], "mean_px"].mean()
    assert list(dict.fromkeys(table["blanked_view"])) == ["none", *views]
    splits = pd.read_csv(trained["splits"])
    assert set(table["set"]) == {"test"} and (splits["set"] == "test").any()
    labelled = table["n"] > 0
    stats = table.loc[labelled, ["mean_px", "median_px"]].to_numpy()
    assert labelled.any() and np.isfinite(stats).all()
    # intact rows equal the pixel errors of the test frames in the per-view files
    _, keypoints, errors, sets = read_pixel_error(mvt_run / f"predictions_{views[0]}"
                                                  "_pixel_error.csv")
    intact = table[(table["blanked_view"] == "none") & (table["view"] == views[0])]
    test_errors = errors[sets == "test"]
    with np.errstate(all="ignore"):
        np.testing.assert_allclose(intact["mean_px"], np.nanmean(test_errors, axis=0),
                                   equal_nan=True)
    np.testing.assert_array_equal(intact["n"], np.isfinite(test_errors).sum(axis=0))


def test_single_view_model_and_no_dropout(example_dir, trained, tmp_path):
    argv = stage_argv(example_dir, trained, trained["single"], tmp_path)
    assert predict_labeled.main([*argv, "--no-view-dropout"]) == 0
    table = pd.read_csv(tmp_path / "view_dropout.csv")
    assert set(table["blanked_view"]) == {"none"}
    views = [str(v) for v in np.load(example_dir / "ground_truth.npz")["view_names"]]
    _, _, points, conf, _ = read_predictions_2d(tmp_path / f"predictions_{views[0]}.csv")
    assert np.isfinite(points).all() and ((conf >= 0) & (conf <= 1)).all()


def test_missing_checkpoint_exits_2_without_outputs(example_dir, trained, tmp_path, capsys):
    out = tmp_path / "out"
    argv = stage_argv(example_dir, trained, tmp_path / "nope" / "best.pt", out)
    assert predict_labeled.main(argv) == 2
    err = errors_of(capsys)
    assert len(err) == 1 and "best.pt" in err[0] and "not found" in err[0]
    assert not out.exists() or not any(out.iterdir())


def test_view_names_differ_exits_2_without_outputs(example_dir, trained, tmp_path, capsys):
    # the same dataset with its views listed in another order: the names differ by position
    views = [str(v) for v in np.load(example_dir / "ground_truth.npz")["view_names"]][::-1]
    out = tmp_path / "out"
    argv = ["--data-dir", str(example_dir), "--view-names", *views, "--csv-files",
            *[f"CollectedData_{v}.csv" for v in views], "--checkpoint", str(trained["mvt"]),
            "--splits", str(trained["splits"]), "--labels-3d", str(trained["labels_3d"]),
            "--out-dir", str(out)]
    assert predict_labeled.main(argv) == 2
    err = errors_of(capsys)
    assert len(err) == 1 and str(trained["mvt"]) in err[0] and "view names" in err[0]
    assert not out.exists() or not any(out.iterdir())


def test_corrupt_checkpoint_exits_2(example_dir, trained, tmp_path, capsys):
    bad = tmp_path / "m" / "best.pt"
    bad.parent.mkdir()
    bad.write_bytes(b"not a checkpoint")
    out = tmp_path / "out"
    assert predict_labeled.main(stage_argv(example_dir, trained, bad, out)) == 2
    err = errors_of(capsys)
    assert len(err) == 1 and str(bad) in err[0]
    assert not out.exists() or not any(out.iterdir())
