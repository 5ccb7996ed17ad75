"""The synthetic example generator: layout, truth, determinism, markers, occlusion, CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from pipeline.core.errors import ParallaxError
from pipeline.data.project import load_labels
from pipeline.io.calibration_toml import read_calibration
from pipeline.synthetic.generate import generate_example
from pipeline.synthetic.render import KEYPOINT_COLOURS

SMALL = dict(seed=5, n_sessions=2, frames_per_session=8, n_views=3, image_size=(160, 128))
VIEWS = ("cam0", "cam1", "cam2")


def small(out: Path, **kwargs):
    return generate_example(out, **{**SMALL, **kwargs})


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("example") / "data"
    small(out)
    return out


def files_under(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def read_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, header=[0, 1, 2], index_col=0)


def test_layout(data):
    truth = np.load(data / "ground_truth.npz")
    assert tuple(truth["view_names"]) == VIEWS
    keypoints = [str(k) for k in truth["keypoint_names"]]
    assert len(keypoints) >= 8
    expected = {Path("ground_truth.npz"), Path("calibrations/session0.toml"),
                Path("calibrations/session1.toml")}
    for view in VIEWS:
        expected.add(Path(f"CollectedData_{view}.csv"))
        for session in ("session0", "session1"):
            expected |= {Path(f"labeled-data/{session}_{view}/img{f:08d}.png") for f in range(8)}
    assert set(files_under(data)) == expected
    image = cv2.imread(str(data / "labeled-data/session1_cam2/img00000007.png"))
    assert image.shape == (128, 160, 3)

    tables = [read_csv(data / f"CollectedData_{view}.csv") for view in VIEWS]
    for view, table in zip(VIEWS, tables, strict=True):
        assert set(table.columns.get_level_values(0)) == {"parallax-synthetic"}
        assert list(table.columns.get_level_values(1)[::2]) == keypoints
        assert list(table.columns.get_level_values(2)) == ["x", "y"] * len(keypoints)
        assert list(table.index) == [f"labeled-data/{s}_{view}/img{f:08d}.png"
                                     for s in ("session0", "session1") for f in range(8)]
    basenames = [[Path(key).name for key in table.index] for table in tables]
    assert basenames[0] == basenames[1] == basenames[2]
    assert list(truth["sessions"]) == ["session0"] * 8 + ["session1"] * 8
    assert truth["points_3d"].shape == (16, len(keypoints), 3)
    assert truth["points_2d"].shape == (3, 16, len(keypoints), 2)
    assert truth["visible"].shape == (3, 16, len(keypoints)) and truth["visible"].dtype == bool


def test_labels_are_the_truth_where_visible(data):
    truth = np.load(data / "ground_truth.npz")
    labels = np.stack([read_csv(data / f"CollectedData_{view}.csv").to_numpy().reshape(16, -1, 2)
                       for view in VIEWS])
    visible = truth["visible"]
    np.testing.assert_array_equal(np.isfinite(labels).all(-1), visible)
    assert np.isnan(labels[~visible]).all()  # both coordinates empty
    np.testing.assert_allclose(labels[visible], truth["points_2d"][visible], rtol=0, atol=1e-9)
    # the project's reader agrees
    read = load_labels(data, list(VIEWS), [f"CollectedData_{v}.csv" for v in VIEWS])
    np.testing.assert_array_equal(read.points_2d, labels)


def test_missing_means_occluded_or_outside(example_dir):
    """Points outside the image are never labelled; some inside ones are hidden; most
    keypoints are seen by >= 2 views."""
    truth = np.load(example_dir / "ground_truth.npz")
    p, visible = truth["points_2d"], truth["visible"]
    inside = ((p >= 0) & (p <= [159, 127])).all(-1)
    assert not (visible & ~inside).any()
    assert (inside & ~visible).any()  # occlusion happens
    assert 0.03 < 1 - visible.mean() < 0.3
    seen_twice = visible.sum(0) >= 2  # (frames, keypoints)
    assert seen_twice.mean() > 0.9


def test_single_view_keypoints_occur_at_default_size(tmp_path):
    summary = generate_example(tmp_path / "d", seed=0, n_sessions=1, frames_per_session=60,
                               image_size=(96, 80))
    assert summary.views == ("cam0", "cam1", "cam2", "cam3")
    assert summary.single_view_points >= 1
    assert 0.05 < summary.missing_fraction < 0.2


def test_calibrations_per_session(data):
    truth = np.load(data / "ground_truth.npz")
    groups = [read_calibration(data / "calibrations" / f"session{s}.toml") for s in (0, 1)]
    for group in groups:
        assert group.names == VIEWS
        for cam in group.cameras:
            width, height = cam.size
            assert cam.size == (160, 128)
            assert 0.7 * width < cam.matrix[0, 0] < 2.5 * width
            centre_offset = np.abs(cam.matrix[:2, 2] - [(width - 1) / 2, (height - 1) / 2])
            assert (centre_offset < 0.1 * width).all() and centre_offset.max() > 0.01
            assert -0.25 <= cam.dist[0] <= -0.1
            # cameras are above the floor, looking at the arena centre
            assert cam.center[2] > 100
            assert (cam.R @ [0.0, 0.0, 0.0] + cam.tvec)[2] > 0
    for a, b in zip(groups[0].cameras, groups[1].cameras, strict=True):
        np.testing.assert_array_equal(a.matrix, b.matrix)
        assert 0.5 < np.linalg.norm(a.center - b.center) < 50  # nudged, not moved
    # the truth is consistent with each session's own calibration, not the other's
    rows = truth["sessions"] == "session1"
    assert np.allclose(groups[1].project(truth["points_3d"][rows]), truth["points_2d"][:, rows])
    assert not np.allclose(groups[0].project(truth["points_3d"][rows]),
                           truth["points_2d"][:, rows], atol=0.05)


def test_triangulation_recovers_truth_per_session(example_dir):
    truth = np.load(example_dir / "ground_truth.npz")
    views = [str(v) for v in truth["view_names"]]
    labels = load_labels(example_dir, views, [f"CollectedData_{v}.csv" for v in views])
    checked = 0
    for session in ("session0", "session1"):
        rows = truth["sessions"] == session
        group = read_calibration(example_dir / "calibrations" / f"{session}.toml", views)
        result = group.triangulate(labels.points_2d[:, rows])
        seen = truth["visible"][:, rows].sum(0) >= 2
        scale = np.ptp(truth["points_3d"][rows][seen], axis=0).max()
        error = np.abs(result.points_3d[seen] - truth["points_3d"][rows][seen]).max()
        assert error / scale < 1e-6
        checked += seen.sum()
    assert checked > 100


def test_deterministic(tmp_path):
    small(tmp_path / "a", n_sessions=1, video_frames=10)
    small(tmp_path / "b", n_sessions=1, video_frames=10)
    small(tmp_path / "c", n_sessions=1, video_frames=10, seed=6)
    files = files_under(tmp_path / "a")
    assert files == files_under(tmp_path / "b") == files_under(tmp_path / "c")
    assert len(files) > 25
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    for rel in (Path("CollectedData_cam0.csv"), Path("calibrations/session0.toml"),
                Path("labeled-data/session0_cam1/img00000003.png")):
        assert (tmp_path / "a" / rel).read_bytes() != (tmp_path / "c" / rel).read_bytes(), rel


def test_label_noise_only_touches_the_csv(tmp_path, data):
    small(tmp_path / "n", label_noise_px=0.5)
    for rel in (Path("ground_truth.npz"), Path("labeled-data/session0_cam0/img00000002.png")):
        assert (tmp_path / "n" / rel).read_bytes() == (data / rel).read_bytes()
    clean = read_csv(data / "CollectedData_cam1.csv").to_numpy()
    noisy = read_csv(tmp_path / "n" / "CollectedData_cam1.csv").to_numpy()
    np.testing.assert_array_equal(np.isnan(clean), np.isnan(noisy))
    residual = (noisy - clean)[np.isfinite(clean)]
    assert 0.4 < residual.std() < 0.6 and abs(residual.mean()) < 0.1


def marker_centre(image: np.ndarray, colour: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Mean shift on the marker's colour: the weighted centroid of the pixels within 4 px,
    recentred until it stops moving (weight = the pixel's projection on the colour)."""
    weight_image = np.clip(image @ colour / (colour @ colour), 0, None)
    ys, xs = np.mgrid[0:image.shape[0], 0:image.shape[1]]
    centre = np.round(start).astype(float)
    for _ in range(20):
        near = (xs - centre[0]) ** 2 + (ys - centre[1]) ** 2 <= 16
        weight = weight_image * near
        new = np.array([(weight * xs).sum(), (weight * ys).sum()]) / weight.sum()
        if np.linalg.norm(new - centre) < 1e-4:
            break
        centre = new
    return new


def test_markers_sit_on_the_labels(data):
    """Each isolated drawn marker's colour centroid is its label to 0.15 px; hidden keypoints
    have no marker."""
    truth = np.load(data / "ground_truth.npz")
    errors, hidden_checked = [], 0
    for v, view in enumerate(VIEWS):
        for f in range(8):
            image = cv2.imread(str(data / f"labeled-data/session0_{view}/img{f:08d}.png"))
            image = image.astype(float)
            points, shown = truth["points_2d"][v, f], truth["visible"][v, f]
            for k in range(len(points)):
                gaps = np.linalg.norm(points[shown] - points[k], axis=1)
                if np.sum(gaps < 8) > int(shown[k]):
                    continue  # another marker nearby
                x, y = points[k]
                if not (5 <= x < 155 and 5 <= y < 123):
                    continue
                if shown[k]:
                    found = marker_centre(image, KEYPOINT_COLOURS[k], points[k])
                    errors.append(np.linalg.norm(found - points[k]))
                else:
                    cx, cy = np.round(points[k]).astype(int)
                    patch = image[cy - 1:cy + 2, cx - 1:cx + 2]
                    assert np.linalg.norm(patch - KEYPOINT_COLOURS[k], axis=-1).min() > 60
                    hidden_checked += 1
    errors = np.array(errors)
    assert errors.size >= 30
    assert errors.max() < 0.15, errors.max()
    assert hidden_checked >= 1, hidden_checked


def test_replaces_atomically(tmp_path, monkeypatch):
    out = tmp_path / "data"
    small(out, n_sessions=1, frames_per_session=2)
    (out / "stale.txt").write_text("old")

    def broken(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr("pipeline.synthetic.generate.render", broken)
    with pytest.raises(RuntimeError):
        small(out, n_sessions=1, frames_per_session=2)
    assert (out / "stale.txt").is_file()  # a failed run leaves the old dataset untouched
    monkeypatch.undo()
    small(out, n_sessions=1, frames_per_session=2)
    assert not (out / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # no temporary siblings left


@pytest.mark.parametrize("bad", [dict(n_views=1), dict(n_sessions=0),
                                 dict(frames_per_session=0), dict(image_size=(16, 16)),
                                 dict(label_noise_px=-1.0), dict(video_frames=-2)])
def test_bad_arguments(tmp_path, bad):
    with pytest.raises(ParallaxError):
        small(tmp_path / "x", **bad)
    assert not (tmp_path / "x").exists()


def test_videos(tmp_path):
    small(tmp_path / "g", n_sessions=1, frames_per_session=3, video_frames=12)
    for view in VIEWS:
        capture = cv2.VideoCapture(str(tmp_path / "g" / "videos" / f"session0_{view}.mp4"))
        frames = []
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            frames.append(frame)
        capture.release()
        assert len(frames) == 12
        assert frames[0].shape == (128, 160, 3)
        # video frame n is labelled image n (up to compression)
        labelled = cv2.imread(
            str(tmp_path / "g" / f"labeled-data/session0_{view}/img00000002.png"))
        assert np.abs(frames[2].astype(float) - labelled).mean() < 6
        assert np.abs(frames[11].astype(float) - labelled).mean() > np.abs(
            frames[2].astype(float) - labelled).mean()


def test_cli(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "pipeline.stages.generate_example",
                         "--out", str(tmp_path / "e"),
                         "--sessions", "1", "--frames", "2", "--views", "2", "--width", "64",
                         "--height", "48", "--seed", "1", "--noise", "0.5"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "2 frames x 2 views" in ok.stderr
    assert (tmp_path / "e" / "CollectedData_cam1.csv").is_file()
    bad = subprocess.run([sys.executable, "-m", "pipeline.stages.generate_example",
                          "--out", str(tmp_path / "f"),
                          "--views", "1"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.count("parallax error:") == 1
    message = bad.stderr.split("parallax error:")[1]
    assert "example views must be between 2 and 8" in message and "got 1" in message
    assert not (tmp_path / "f").exists()
