"""Stage `evaluate`: metrics on known arrays, end to end on synthetic predictions of the example
dataset (no model), bad inputs, and `compare_models`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.core.errors import ParallaxError
from pipeline.data.project import frame_keys, load_labels
from pipeline.data.splits import make_splits
from pipeline.data.triangulate import load_calibrations, points_table, triangulate_labels
from pipeline.evaluation import metrics as M
from pipeline.evaluation.drawing import parse_skeleton
from pipeline.geometry.cameras import Camera, CameraGroup
from pipeline.io.predictions_csv import write_pixel_error, write_pose_3d, write_predictions_2d
from pipeline.stages.evaluate import OUTPUTS
from pipeline.stages.evaluate import main as evaluate_main
from tests.conftest import dataset_cli_args

# ----------------------------------------------------------------------------- metric functions


def test_pck_and_means_ignore_nan():
    errors = np.array([1.0, 4.0, np.nan, 6.0, 12.0])
    assert M.pck(errors, 5) == pytest.approx(2 / 4)
    assert M.pck(errors, 12) == 1.0
    assert np.isnan(M.pck(np.array([np.nan]), 5))
    curves = M.pck_curves(errors.reshape(1, 1, 5), np.array([0.0, 5.0, 100.0]))
    np.testing.assert_allclose(curves, [[0.0, 0.5, 1.0]])
    frame = pd.DataFrame({"g": ["a", "a", "a", "b", "b"], "error": errors,
                          "bbox_threshold": [2.0, 2.0, 2.0, np.nan, 20.0]})
    stats = M.error_stats(frame, ["g"], "error", [5.0], 0.1).set_index("g")
    assert stats.loc["a", "n"] == 2 and stats.loc["b", "n"] == 2
    assert stats.loc["a", "mean"] == pytest.approx(2.5)
    assert stats.loc["b", "median"] == pytest.approx(9.0)
    assert stats.loc["a", "pck_5px"] == 1.0 and stats.loc["b", "pck_5px"] == 0.0
    # bbox PCK: a: 1 <= 2 yes, 4 <= 2 no; b: only 12 <= 20 counts (NaN threshold left out)
    assert stats.loc["a", "pck_bbox_0.1"] == 0.5 and stats.loc["b", "pck_bbox_0.1"] == 1.0


def test_bbox_diagonal_needs_two_labelled_keypoints():
    pts = np.full((1, 3, 3, 2), np.nan)
    pts[0, 0, :2] = [[0, 0], [3, 4]]
    pts[0, 1, 0] = [5, 5]
    pts[0, 2, :] = [[1, 1], [1, 1], [1, 1]]  # zero diagonal
    diag = M.bbox_diagonals(pts)
    assert diag[0, 0] == pytest.approx(5.0)
    assert np.isnan(diag[0, 1]) and np.isnan(diag[0, 2])


def _camera(name: str, x: float) -> Camera:
    return Camera(name=name, size=(200, 100), matrix=[[100, 0, 100], [0, 100, 50], [0, 0, 1]],
                  dist=[0, 0, 0, 0], rvec=[0, 0, 0], tvec=[x, 0, 10])


def test_project_frames_exact_pinhole_and_in_view():
    group = CameraGroup(cameras=(_camera("a", 0.0), _camera("b", 1.0)))
    points = np.array([[[0.0, 0.0, 0.0], [50.0, 0.0, 0.0], [0.0, 0.0, -20.0]],
                       [[np.nan] * 3, [0.1, 0.2, 0.0], [0.0, 0.0, 0.0]]])
    files = np.array(["cal.toml", ""], dtype=object)
    uv, inside = M.project_frames(points, files, {"cal.toml": group}, 2)
    # pinhole: u = 100 * (X + tx) / (Z + 10) + 100, v = 100 * Y / (Z + 10) + 50
    np.testing.assert_allclose(uv[0, 0, 0], [100, 50])
    np.testing.assert_allclose(uv[1, 0, 0], [110, 50])
    assert inside[:, 0, 0].all()
    assert not inside[:, 0, 1].any()  # u = 600: outside the 200 px wide image
    assert not inside[:, 0, 2].any()  # behind the camera
    assert np.isnan(uv[:, 1]).all() and not inside[:, 1].any()  # frame without calibration


def test_dropout_summary_weights_by_n():
    rows = [("none", "a", "k", "test", 2, 1.0), ("none", "b", "k", "test", 2, 3.0),
            ("a", "a", "k", "test", 1, 10.0), ("a", "b", "k", "test", 3, 5.0)]
    table = pd.DataFrame(rows, columns=["blanked_view", "view", "keypoint", "set", "n",
                                        "mean_px"]).assign(median_px=0.0)
    out = M.dropout_summary(table).set_index("blanked_view")
    assert list(out.index) == ["a"]
    assert out.loc["a", "mean_px_blanked_view"] == 10.0
    assert out.loc["a", "mean_px_blanked_view_intact"] == 1.0
    assert out.loc["a", "mean_px_other_views"] == 5.0
    assert out.loc["a", "mean_px_other_views_intact"] == 3.0
    assert out.loc["a", "n_blanked_view"] == 1 and out.loc["a", "n_other_views"] == 3


def test_parse_skeleton_with_hyphenated_names():
    names = ["nose", "left-ear", "tail", "left"]
    assert parse_skeleton(["nose", "left-ear", "tail", "nose"], names).tolist() == \
        [[0, 1], [2, 0]]
    with pytest.raises(ParallaxError, match=r"unknown keypoint\(s\) \['paw'\]"):
        parse_skeleton(["nose", "paw"], names)
    with pytest.raises(ParallaxError, match="in pairs"):
        parse_skeleton(["nose", "tail", "left"], names)


# ----------------------------------------------------------------------------- end to end


def _views(data_dir: Path) -> list[str]:
    return [str(v) for v in np.load(data_dir / "ground_truth.npz")["view_names"]]


def write_fake_predictions(data_dir: Path, root: Path, seed: int = 0) -> dict:
    """Synthetic predictions of the example dataset: the ground-truth 3D moved by ~1 mm,
    projected, plus 1.5 px noise, in the shared formats; also labels_3d, splits, metrics.csv."""
    rng = np.random.default_rng(seed)
    views = _views(data_dir)
    labels = load_labels(data_dir, views, [f"CollectedData_{v}.csv" for v in views])
    groups = load_calibrations(labels)
    tri = triangulate_labels(labels, groups)
    labels_3d = root / "labels_3d.csv"
    points_table(labels, tri).to_csv(labels_3d, index=False)
    splits = make_splits(frame_keys(labels), labels.sessions, train_prob=0.5, val_prob=0.2,
                         seed=seed)
    splits_csv = root / "splits.csv"
    splits.to_csv(splits_csv, index=False)
    sets = splits["set"].to_numpy(object)
    pred_3d = tri.points_3d + rng.normal(0, 1.0, tri.points_3d.shape)
    proj, _ = M.project_frames(pred_3d, labels.calibration_files, groups, labels.n_views)
    pred_2d = proj + rng.normal(0, 1.5, proj.shape)
    pred_2d = np.where(np.isfinite(pred_2d), pred_2d, 5.0)  # no 3D: a far-off guess
    raw_2d = pred_2d + rng.normal(0, 4.0, pred_2d.shape)  # the "network's own" predictions
    pred_dir = root / "predictions"
    pred_dir.mkdir()
    for v, view in enumerate(views):
        for kind, points in (("", pred_2d[v]), ("_raw", raw_2d[v])):
            write_predictions_2d(pred_dir / f"predictions_{view}{kind}.csv",
                                 labels.image_paths[v], labels.keypoint_names, points,
                                 np.full(pred_2d.shape[1:3], 0.9), "fake", sets)
            err = np.linalg.norm(points - labels.points_2d[v], axis=-1)
            write_pixel_error(pred_dir / f"predictions_{view}{kind}_pixel_error.csv",
                              labels.image_paths[v], labels.keypoint_names, err, sets)
    n_frames, n_kp = pred_3d.shape[:2]
    write_pose_3d(pred_dir / "predictions_3d.csv", labels.keypoint_names, pred_3d,
                  np.zeros((n_frames, n_kp)), np.full((n_frames, n_kp), 3),
                  np.ones((n_frames, n_kp)),
                  {"frame": list(labels.image_paths[0]), "set": list(sets)})
    e3 = np.linalg.norm(pred_3d - tri.points_3d, axis=-1)
    f, k = np.indices((n_frames, n_kp)).reshape(2, -1)
    pd.DataFrame({"frame": labels.image_paths[0][f], "set": sets[f],
                  "keypoint": np.array(labels.keypoint_names)[k], "error_3d": e3[f, k],
                  "reprojection_error_px": 0.0, "n_views": 3}).to_csv(pred_dir / "error_3d.csv",
                                                                       index=False)
    dropout = [(kind, b, v, kp, "test", 4, 2.0 + gap * (b == v), 2.0)
               for kind, gap in (("final", 8.0), ("raw", 50.0)) for b in ["none", *views]
               for v in views for kp in labels.keypoint_names]
    pd.DataFrame(dropout, columns=["predictions", "blanked_view", "view", "keypoint", "set", "n",
                                   "mean_px", "median_px"]).to_csv(pred_dir / "view_dropout.csv",
                                                                   index=False)
    metrics_csv = root / "metrics.csv"
    pd.DataFrame({"step": [1, 2, 3], "epoch": [0, 0, 1], "heatmap_mse": [3.0, 2.0, 1.0],
                  "loss": [3.0, 2.0, 1.0], "mask_ratio": [0.0, 0.1, 0.2],
                  "val_loss": [np.nan, 2.5, 1.5]}).to_csv(metrics_csv, index=False)
    return {"labels": labels, "groups": groups, "gt_3d": tri.points_3d, "pred_3d": pred_3d,
            "pred_2d": pred_2d, "raw_2d": raw_2d, "sets": sets, "pred_dir": pred_dir,
            "labels_3d": labels_3d,
            "splits": splits_csv, "metrics_csv": metrics_csv}


def _args(data_dir: Path, fake: dict, out_dir: Path) -> list[str]:
    return ["--predictions-dir", str(fake["pred_dir"]), *dataset_cli_args(data_dir),
            "--labels-3d", str(fake["labels_3d"]), "--splits", str(fake["splits"]),
            "--metrics-csv", str(fake["metrics_csv"]), "--out-dir", str(out_dir),
            "--model-name", "fake", "--n-overlay-frames", "2", "--skeleton"]


@pytest.fixture(scope="module")
def evaluated(example_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    fake = write_fake_predictions(example_dir, root)
    out_dir = root / "evaluation"
    assert evaluate_main(_args(example_dir, fake, out_dir)) == 0
    return fake, out_dir, root


def test_evaluate_writes_every_output(evaluated):
    _, out_dir, _ = evaluated
    for name in OUTPUTS:
        assert (out_dir / name).stat().st_size > 0, name
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(OUTPUTS)  # no temporaries left


def test_evaluate_numbers_match_independent_computation(evaluated):
    fake, out_dir, _ = evaluated
    labels, sets = fake["labels"], fake["sets"]
    summary = json.loads((out_dir / "metrics.json").read_text())
    test = sets == "test"
    err = np.linalg.norm(fake["pred_2d"][:, test] - labels.points_2d[:, test], axis=-1)
    finite = err[np.isfinite(err)]
    got = summary["sets"]["test"]
    assert got["n"] == finite.size and got["n_frames"] == int(test.sum())
    assert got["mean_px"] == pytest.approx(finite.mean())
    assert got["median_px"] == pytest.approx(np.median(finite))
    assert got["pck_10px"] == pytest.approx(np.mean(finite <= 10))
    e3 = np.linalg.norm(fake["pred_3d"][test] - fake["gt_3d"][test], axis=-1)
    assert got["error_3d_mean"] == pytest.approx(np.nanmean(e3))
    # occluded keypoints: camera by camera, frame by frame (independent of project_frames)
    occluded = []
    for f in np.flatnonzero(test):
        group = fake["groups"][labels.calibration_files[f]]
        for v, cam in enumerate(group.cameras):
            for k in range(labels.n_keypoints):
                point = fake["gt_3d"][f, k]
                if np.isfinite(labels.points_2d[v, f, k]).all() or not np.isfinite(point).all():
                    continue
                uv = cam.project(point)
                if (cam.R @ point + cam.tvec)[2] > 0 and 0 <= uv[0] <= cam.size[0] - 1 \
                        and 0 <= uv[1] <= cam.size[1] - 1:
                    occluded.append(np.linalg.norm(fake["pred_2d"][v, f, k] - uv))
    assert got["occluded_n"] == len(occluded) > 5
    assert got["occluded_mean_px"] == pytest.approx(np.mean(occluded))
    assert got["labelled_mean_px"] == pytest.approx(finite.mean())
    assert got["dropped_view_mean_px"] == pytest.approx(10.0)
    assert got["dropped_view_intact_mean_px"] == pytest.approx(2.0)
    # the reprojection error: the 3D prediction projected back vs the 2D prediction, computed
    # here camera by camera
    reproj = []
    for f in np.flatnonzero(test):
        group = fake["groups"][labels.calibration_files[f]]
        for v, cam in enumerate(group.cameras):
            for k in range(labels.n_keypoints):
                point = fake["pred_3d"][f, k]
                if np.isfinite(point).all():
                    reproj.append(np.linalg.norm(cam.project(point) - fake["pred_2d"][v, f, k]))
    assert got["reprojection_mean_px"] == pytest.approx(np.mean(reproj))
    # the raw network output is evaluated beside the final predictions
    raw = np.linalg.norm(fake["raw_2d"][:, test] - labels.points_2d[:, test], axis=-1)
    assert got["raw_median_px"] == pytest.approx(np.nanmedian(raw))
    assert got["raw_median_px"] > got["median_px"] + 1.0
    assert got["raw_dropped_view_mean_px"] == pytest.approx(52.0)
    per_kp = pd.read_csv(out_dir / "per_keypoint.csv")
    v, k = 1, 2
    row = per_kp[(per_kp["set"] == "test") & (per_kp["view"] == labels.view_names[v])
                 & (per_kp["keypoint"] == labels.keypoint_names[k])]
    assert row["n"].item() == np.isfinite(err[v, :, k]).sum()
    assert row["mean_px"].item() == pytest.approx(np.nanmean(err[v, :, k]))
    per_view = pd.read_csv(out_dir / "per_view.csv")
    row = per_view[(per_view["set"] == "test") & (per_view["view"] == labels.view_names[v])]
    assert row["median_px"].item() == pytest.approx(np.nanmedian(err[v]))
    assert set(pd.read_csv(out_dir / "occlusion.csv")["category"]) <= {"labelled", "occluded"}
    assert "<table>" in (out_dir / "tables.html").read_text()


def _fails_cleanly(example_dir, fake, tmp_path, capsys, needle: str) -> None:
    out_dir = tmp_path / "evaluation"
    assert evaluate_main(_args(example_dir, fake, out_dir)) == 2
    err = [line for line in capsys.readouterr().err.splitlines()
           if line.startswith("parallax error:")]
    assert len(err) == 1 and needle in err[0], err
    assert not out_dir.exists() or not any(out_dir.iterdir())


def _copy_fake(evaluated, tmp_path) -> dict:
    fake, _, root = evaluated
    pred_dir = tmp_path / "predictions"
    shutil.copytree(fake["pred_dir"], pred_dir)
    return {**fake, "pred_dir": pred_dir}


def test_missing_view_predictions_is_one_error(example_dir, evaluated, tmp_path, capsys):
    fake = _copy_fake(evaluated, tmp_path)
    view = fake["labels"].view_names[1]
    (fake["pred_dir"] / f"predictions_{view}.csv").unlink()
    _fails_cleanly(example_dir, fake, tmp_path, capsys, f"predictions_{view}.csv")


def test_wrong_keypoint_names_is_one_error(example_dir, evaluated, tmp_path, capsys):
    fake = _copy_fake(evaluated, tmp_path)
    view = fake["labels"].view_names[0]
    path = fake["pred_dir"] / f"predictions_{view}.csv"
    first = fake["labels"].keypoint_names[0]
    lines = path.read_text().splitlines(keepends=True)
    lines[1] = lines[1].replace(first, "not_a_keypoint")
    path.write_text("".join(lines))
    _fails_cleanly(example_dir, fake, tmp_path, capsys, f"predictions_{view}.csv")


def test_missing_frame_is_one_error(example_dir, evaluated, tmp_path, capsys):
    fake = _copy_fake(evaluated, tmp_path)
    path = fake["pred_dir"] / "predictions_3d.csv"
    pd.read_csv(path).iloc[1:].to_csv(path, index=False)
    _fails_cleanly(example_dir, fake, tmp_path, capsys, "predictions_3d.csv")


def test_no_test_frames_still_writes_everything(example_dir, evaluated, tmp_path):
    fake = _copy_fake(evaluated, tmp_path)
    splits = pd.read_csv(fake["splits"])
    splits["set"] = "train"
    fake["splits"] = tmp_path / "splits.csv"
    splits.to_csv(fake["splits"], index=False)
    for path in fake["pred_dir"].glob("predictions_*.csv"):  # their `set` must agree
        text = path.read_text().replace(",test\n", ",train\n").replace(",val\n", ",train\n")
        path.write_text(text)
    out_dir = tmp_path / "evaluation"
    assert evaluate_main(_args(example_dir, fake, out_dir)) == 0
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(OUTPUTS)
    summary = json.loads((out_dir / "metrics.json").read_text())
    assert summary["sets"]["test"]["n_frames"] == 0 and summary["sets"]["test"]["mean_px"] is None
    assert summary["headline_set"] == "train"
    assert any("no test frames" in note for note in summary["notes"])


# ----------------------------------------------------------------------------- compare_models


def _fake_summary(path: Path, mean: float, dropped: float | None, headline: str = "test"):
    entry = {"n_frames": 3, "n": 30, "mean_px": mean, "median_px": mean / 2, "pck_5px": 0.5,
             "pck_10px": 0.7, "pck_20px": 0.9, "pck_bbox_0.1": 0.6, "error_3d_mean": 2.0,
             "reprojection_mean_px": 1.0, "occluded_median_px": 3 * mean,
             "dropped_view_mean_px": dropped, "raw_occluded_median_px": 5 * mean}
    sets = {"train": {**entry, "mean_px": 0.1}, "val": entry, "test": entry}
    path.write_text(json.dumps({"headline_set": headline, "sets": sets}))


def test_compare_models_table_and_plot(tmp_path):
    from pipeline.stages.compare_models import main as compare_main

    _fake_summary(tmp_path / "a.json", 4.0, 9.0)
    _fake_summary(tmp_path / "b.json", 2.0, None)
    out = [tmp_path / "cmp.csv", tmp_path / "cmp.png", tmp_path / "cmp.html"]
    assert compare_main(["--metrics", f"mvt={tmp_path / 'a.json'}",
                         f"singleview={tmp_path / 'b.json'}", "--out-csv", str(out[0]),
                         "--out-png", str(out[1]), "--out-html", str(out[2])]) == 0
    table = pd.read_csv(out[0])
    assert table["model"].tolist() == ["mvt", "singleview"]
    assert table["set"].tolist() == ["test", "test"]
    assert table["mean_px"].tolist() == [4.0, 2.0]
    assert table["occluded_median_px"].tolist() == [12.0, 6.0]
    assert table["raw_occluded_median_px"].tolist() == [20.0, 10.0]
    assert table.loc[0, "dropped_view_mean_px"] == 9.0
    assert np.isnan(table.loc[1, "dropped_view_mean_px"])
    assert list(table.columns[6:10]) == ["pck_5px", "pck_10px", "pck_20px", "pck_bbox_0.1"]
    assert out[1].stat().st_size > 0 and "singleview" in out[2].read_text()
    assert compare_main(["--metrics", f"a={tmp_path / 'a.json'}", "--set", "train",
                         "--out-csv", str(out[0]), "--out-png", str(out[1])]) == 0
    assert pd.read_csv(out[0])["mean_px"].tolist() == [0.1]


def test_compare_models_bad_input_names_the_file(tmp_path, capsys):
    from pipeline.stages.compare_models import main as compare_main

    _fake_summary(tmp_path / "a.json", 4.0, 9.0)
    (tmp_path / "bad.json").write_text("{not json")
    out = ["--out-csv", str(tmp_path / "c.csv"), "--out-png", str(tmp_path / "c.png")]
    assert compare_main(["--metrics", f"a={tmp_path / 'a.json'}",
                         f"b={tmp_path / 'bad.json'}", *out]) == 2
    assert "bad.json" in capsys.readouterr().err
    assert compare_main(["--metrics", f"a={tmp_path / 'missing.json'}", *out]) == 2
    assert "missing.json" in capsys.readouterr().err
    assert compare_main(["--metrics", "no-equals-sign", *out]) == 2
    assert not (tmp_path / "c.csv").exists() and not (tmp_path / "c.png").exists()
