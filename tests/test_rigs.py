"""Real rigs as they come (issue 11): tiny synthetic twins of public multi-view datasets, each run
through validate_calibration -> triangulate_labels -> cache_augmentations by the stage CLIs.

- view names with underscores (`camera_0`, `cam_A`, `Camera_left`) and sessions with them too;
- a near-orthographic camera (f ~ 16,000 px) whose principal point lies just outside the image:
  a warning, the labels' reprojection (2-3 px) decides;
- a camera with no labels at all (DeepFly3D): a warning, triangulation and the cache go on.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.core.errors import ParallaxError
from pipeline.core.views import split_view, view_name_clashes
from pipeline.geometry.cameras import Camera, CameraGroup
from pipeline.io.calibration_toml import read_calibration, write_calibration
from pipeline.io.labels_csv import read_label_csv, write_label_csv
from tests.test_faults import blank_rows, run_chain, stage_outputs

UNDERSCORE_VIEWS = ("camera_0", "cam_A", "Camera_left")
UNDERSCORE_SESSIONS = {"session0": "day_1", "session1": "day_2"}


def _save_truth(data: Path, **changes) -> None:
    truth = dict(np.load(data / "ground_truth.npz"))
    truth.update(changes)
    np.savez(data / "ground_truth.npz", **truth)


def rename_rig(data: Path, views: dict[str, str], sessions: dict[str, str]) -> None:
    """Rename views and sessions of a generated example in place: image folders, label CSVs
    (file names and rows), calibration files and camera names, videos, ground_truth.npz."""
    def new_folder(folder: str) -> str:
        for old_s, new_s in sessions.items():
            for old_v, new_v in views.items():
                if folder == f"{old_s}_{old_v}":
                    return f"{new_s}_{new_v}"
        return folder

    for folder in sorted((data / "labeled-data").iterdir()):
        folder.rename(folder.with_name(new_folder(folder.name)))
    for old_v, new_v in views.items():
        table = read_label_csv(data / f"CollectedData_{old_v}.csv")
        index = [f"labeled-data/{new_folder(Path(p).parent.name)}/{Path(p).name}"
                 for p in table.index]
        write_label_csv(data / f"CollectedData_{new_v}.csv", index, table.keypoint_names,
                        table.points)
        (data / f"CollectedData_{old_v}.csv").unlink()
    for old_s, new_s in sessions.items():
        toml = data / "calibrations" / f"{old_s}.toml"
        group = read_calibration(toml)
        cams = [Camera(name=views.get(c.name, c.name), size=c.size, matrix=c.matrix,
                       dist=c.dist, rvec=c.rvec, tvec=c.tvec, fisheye=c.fisheye)
                for c in group.cameras]
        write_calibration(CameraGroup(cameras=tuple(cams), metadata=group.metadata),
                          data / "calibrations" / f"{new_s}.toml")
        toml.unlink()
        for old_v, new_v in views.items():
            video = data / "videos" / f"{old_s}_{old_v}.mp4"
            if video.exists():
                video.rename(video.with_name(f"{new_s}_{new_v}.mp4"))
    truth = np.load(data / "ground_truth.npz")
    _save_truth(data, view_names=np.array([views.get(str(v), str(v))
                                           for v in truth["view_names"]]),
                sessions=np.array([sessions.get(str(s), str(s)) for s in truth["sessions"]]))


@pytest.fixture
def data(example_dir, tmp_path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(example_dir, copy)
    return copy


def summaries(out: Path) -> tuple[dict, dict]:
    paths = stage_outputs(out)
    return (json.loads(paths["validate_calibration"]["summary"].read_text()),
            json.loads(paths["triangulate_labels"]["summary"].read_text()))


# ---------------------------------------------------------------------------- 1. underscores
def test_view_and_session_names_with_underscores(data, tmp_path, capsys):
    old = [str(v) for v in np.load(data / "ground_truth.npz")["view_names"]]
    rename_rig(data, dict(zip(old, UNDERSCORE_VIEWS, strict=True)), UNDERSCORE_SESSIONS)
    out = tmp_path / "out"
    assert run_chain(data, out, until="cache_augmentations") == (None, 0), \
        capsys.readouterr().err
    calibration, triangulation = summaries(out)
    assert calibration["warnings"] == []
    assert set(calibration["calibrations"]) == {"calibrations/day_1.toml",
                                                "calibrations/day_2.toml"}
    assert triangulation["views"] == list(UNDERSCORE_VIEWS)
    assert triangulation["median_reprojection_px"] < 1e-6
    with h5py.File(out / "cache" / "train.h5") as h5:
        images = {s.decode().split("/")[1] for s in h5["image"][...]}
        assert [str(v) for v in h5.attrs["view_names"]] == list(UNDERSCORE_VIEWS)
    assert images == {"day_1", "day_2"}  # frame keys labeled-data/<session>/<file>


def test_views_are_resolved_by_name_not_by_underscore():
    views = ["cam_A", "cam_B", "Camera_left"]
    assert split_view("day_1_cam_A", views) == ("day_1", "cam_A")
    assert split_view("x_Camera_left", views) == ("x", "Camera_left")
    assert split_view("cam_A", views) is None  # no session before the view
    assert split_view("day_1_cam_C", views) is None
    assert view_name_clashes(views) == []
    assert view_name_clashes(["top", "cam_top", "side"]) != []
    (clash,) = view_name_clashes(["a", "b_a"])
    assert "'b_a' ends with '_a'" in clash and "'x_b'" in clash


def test_ambiguous_view_names_are_refused(data, tmp_path, capsys):
    from pipeline.data.project import load_labels
    from pipeline.io.video import find_sessions

    with pytest.raises(ParallaxError, match=r"data.view_names .*'b_a' ends with '_a'"):
        load_labels(data, ["a", "b_a", "c"], ["x.csv", "y.csv", "z.csv"])
    with pytest.raises(ParallaxError, match=r"ambiguous view names"):
        find_sessions(data, ["a", "b_a"])


def test_videos_with_underscores(tmp_path):
    from pipeline.inference.video import check_videos
    from pipeline.io.video import find_sessions

    views = list(UNDERSCORE_VIEWS)
    for session in ("day_1", "day_2"):
        for view in views:
            (tmp_path / f"{session}_{view}.mp4").write_bytes(b"")
    found = find_sessions(tmp_path, views)
    assert list(found) == ["day_1", "day_2"]
    assert [p.name for p in found["day_1"]] == [f"day_1_{v}.mp4" for v in views]
    check_videos(found["day_2"], views, "day_2")
    swapped = [found["day_2"][1], found["day_2"][0], found["day_2"][2]]
    with pytest.raises(ParallaxError, match="day_2_cam_A.mp4: expected the video of session "
                                            "'day_2' view 'camera_0'"):
        check_videos(swapped, views, "day_2")


def test_workflow_takes_underscore_views_and_refuses_clashing_ones(data, tmp_path):
    """The config schema accepts `cam_A`; the workflow finds the video sessions by the view
    names; view names that clash stop it at start, naming both."""
    from tests.test_workflow import snakemake, write_config

    old = [str(v) for v in np.load(data / "ground_truth.npz")["view_names"]]
    (data / "videos").mkdir(exist_ok=True)
    for session in ("session0", "session1"):
        for view in old:
            (data / "videos" / f"{session}_{view}.mp4").write_bytes(b"")
    rename_rig(data, dict(zip(old, UNDERSCORE_VIEWS, strict=True)), UNDERSCORE_SESSIONS)
    views = list(UNDERSCORE_VIEWS)
    config = write_config(tmp_path / "c.yaml", example={"generate": False},
                          data={"data_dir": str(data), "view_names": views,
                                "csv_file": [f"CollectedData_{v}.csv" for v in views]},
                          prediction={"videos": True})
    plan = snakemake(tmp_path, config, "-n", "--until", "predict_video")
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert "videos/day_1_3d.csv" in plan.stdout and "videos/day_2_3d.csv" in plan.stdout
    clashing = write_config(tmp_path / "bad.yaml", example={"generate": False},
                            data={"data_dir": str(data), "view_names": ["a", "b_a", "c"],
                                  "csv_file": ["a.csv", "b.csv", "c.csv"]})
    refused = snakemake(tmp_path, clashing, "-n")
    assert refused.returncode != 0
    text = refused.stdout + refused.stderr
    assert "data.view_names" in text and "'b_a' ends with '_a'" in text, text


# ---------------------------------------------------------------------------- 2. near-orthographic
def telephoto(cam: Camera, factor: float, cx: float) -> Camera:
    """The same view of the arena from `factor` times further away with `factor` times the focal
    length (near-orthographic), no distortion, and the principal point moved to `cx`."""
    target = np.zeros(3)  # the arena centre the example's cameras look at
    distance = float(np.linalg.norm(cam.center - target)) * factor
    R = cam.R
    focal = cam.matrix[0, 0] * factor
    width, height = cam.size
    shift = (width / 2 - cx) * distance / focal  # keep the arena centre mid-image
    center = target - distance * R[2] - shift * R[0]
    matrix = np.array([[focal, 0, cx], [0, focal, height / 2], [0, 0, 1]])
    import cv2

    return Camera(name=cam.name, size=cam.size, matrix=matrix, dist=np.zeros(5),
                  rvec=cv2.Rodrigues(R)[0].ravel(), tvec=-R @ center)


def test_near_orthographic_camera_with_principal_point_outside(data, tmp_path, capsys):
    truth = np.load(data / "ground_truth.npz")
    views = [str(v) for v in truth["view_names"]]
    view = 1
    rng = np.random.default_rng(0)
    table = read_label_csv(data / f"CollectedData_{views[view]}.csv")
    points = table.points.copy()
    for session in ("session0", "session1"):
        toml = data / "calibrations" / f"{session}.toml"
        group = read_calibration(toml)
        cams = list(group.cameras)
        width = cams[view].size[0]
        cams[view] = telephoto(cams[view], factor=80.0, cx=width + 1.5)
        assert cams[view].matrix[0, 0] > 12_000
        write_calibration(CameraGroup(cameras=tuple(cams), metadata=group.metadata), toml)
        rows = np.flatnonzero(truth["sessions"] == session)
        projected = cams[view].project(truth["points_3d"][rows])
        projected += rng.normal(0.0, 2.0, projected.shape)  # labels 2-3 px off
        inside = ((projected >= 0) & (projected <= np.array(cams[view].size) - 1)).all(-1)
        keep = inside & truth["visible"][view, rows]
        points[rows] = np.where(keep[..., None], projected, np.nan)
    write_label_csv(table.path, table.index, table.keypoint_names, points)
    out = tmp_path / "out"
    assert run_chain(data, out, until="cache_augmentations") == (None, 0), \
        capsys.readouterr().err
    calibration, triangulation = summaries(out)
    (warning, *others) = calibration["warnings"]
    assert f"camera '{views[view]}' ([cam_{view}]) principal point (161.5, 64)" in warning
    assert "lies outside its 160x128 image" in warning
    assert len(others) == 1 and "calibrations/session1.toml" in others[0]
    medians = [entry["median_px"][views[view]] for entry in calibration["calibrations"].values()]
    assert all(1.0 < m < 4.0 for m in medians), medians
    assert "principal point" in capsys.readouterr().err  # and in the log


# ---------------------------------------------------------------------------- 3. unlabelled view
def test_view_without_any_label(data, tmp_path, capsys):
    views = [str(v) for v in np.load(data / "ground_truth.npz")["view_names"]]
    blank_rows(data / f"CollectedData_{views[2]}.csv", slice(None))
    out = tmp_path / "out"
    assert run_chain(data, out, until="cache_augmentations") == (None, 0), \
        capsys.readouterr().err
    calibration, triangulation = summaries(out)
    assert len(calibration["warnings"]) == 2  # one per calibration file (session)
    for warning, toml in zip(calibration["warnings"], ("session0", "session1"), strict=True):
        assert warning.startswith(f"calibrations/{toml}.toml: camera '{views[2]}' has no labels")
        assert "cannot be checked from labels" in warning
    assert triangulation["median_reprojection_px_per_view"][views[2]] is None
    assert triangulation["triangulated"] > 0
    with h5py.File(out / "cache" / "train.h5") as h5:
        source = h5["label_source"][:, 2]  # the unlabelled view: projected targets only
    assert (source != 1).all() and (source == 2).sum() > 0


def test_unlabelled_view_is_reported_apart_in_evaluation(example_dir):
    """per_view.csv: the unlabelled view's row is its error against the projected ground truth,
    marked truth = projected_3d; the 'all' row covers the labelled views only."""
    from dataclasses import replace
    from types import SimpleNamespace

    import pandas as pd

    from pipeline.data.project import load_labels
    from pipeline.data.triangulate import load_calibrations, triangulate_labels
    from pipeline.evaluation import summary

    views = [str(v) for v in np.load(example_dir / "ground_truth.npz")["view_names"]]
    labels = load_labels(example_dir, views, [f"CollectedData_{v}.csv" for v in views])
    groups = load_calibrations(labels)
    gt_3d = triangulate_labels(labels, groups).points_3d
    projected = np.stack([groups[c].project(gt_3d[f])
                          for f, c in enumerate(labels.calibration_files)], axis=1)
    truth = np.where(np.isfinite(labels.points_2d), labels.points_2d, projected)
    pred = truth + [3.0, 0.0]  # every prediction 3 px right of the truth
    blank = labels.points_2d.copy()
    blank[2] = np.nan  # view 2 has no labels at all
    n, k = labels.n_frames, labels.n_keypoints
    inp = SimpleNamespace(
        labels=replace(labels, points_2d=blank), sets=np.array(["test"] * n, dtype=object),
        pred_2d=pred, pixel_error_file=np.full(pred.shape[:3], np.nan), pred_3d=gt_3d,
        gt_3d=gt_3d, error_3d_file=np.zeros((n, k)), groups=groups,
        view_dropout=pd.DataFrame(columns=["blanked_view", "view", "keypoint", "set", "n",
                                           "mean_px", "median_px"]))
    ev = summary.compute(inp, (5.0,), 0.05)
    rows = ev.per_view.set_index("view")
    assert rows.loc[views[2], "truth"] == "projected_3d"
    assert rows.loc[views[2], "n"] > 0
    assert rows.loc[views[2], "mean_px"] == pytest.approx(3.0, abs=0.01)
    assert rows.loc[views[0], "truth"] == "labels"
    assert rows.loc["all", "n"] == rows.loc[views[0], "n"] + rows.loc[views[1], "n"]
    assert any(views[2] in note and "projected_3d" in note for note in ev.notes)
    assert "truth" not in ev.summary["sets"]["test"]
