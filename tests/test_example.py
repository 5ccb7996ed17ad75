"""The synthetic example generator: layout, truth, determinism, markers, CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.cameras import CameraGroup
from pipeline.dataset import load_labels
from pipeline.example import KEYPOINT_COLOURS, generate_example


def small(out: Path, **kwargs):
    args = dict(seed=5, n_sessions=2, frames_per_session=6, n_views=3, image_size=(160, 128))
    return generate_example(out, **{**args, **kwargs})


def test_layout_and_labels_match_truth(example_dir):
    truth = np.load(example_dir / "ground_truth.npz")
    views = [str(v) for v in truth["view_names"]]
    labels = load_labels(example_dir, views, [f"CollectedData_{v}.csv" for v in views])
    assert labels.points_2d.shape == truth["points_2d"].shape
    assert set(labels.sessions) == {"session0", "session1"}
    assert sorted(p.name for p in (example_dir / "calibrations").iterdir()) == [
        "session0.toml", "session1.toml"]
    visible = truth["visible"]
    assert 0.75 < visible.mean() < 0.99  # some occlusion, mostly visible
    np.testing.assert_array_equal(np.isfinite(labels.points_2d).all(-1), visible)
    np.testing.assert_allclose(labels.points_2d[visible], truth["points_2d"][visible], atol=1e-9)


def test_triangulation_recovers_truth_per_session(example_dir):
    truth = np.load(example_dir / "ground_truth.npz")
    views = [str(v) for v in truth["view_names"]]
    for session in ("session0", "session1"):
        rows = truth["sessions"] == session
        group = CameraGroup.load(example_dir / "calibrations" / f"{session}.toml", views)
        seen_2d = truth["visible"][:, rows, :, None]
        observed = np.where(seen_2d, truth["points_2d"][:, rows], np.nan)
        result = group.triangulate(observed)
        seen = truth["visible"][:, rows].sum(0) >= 2
        scale = np.ptp(truth["points_3d"][rows][seen], axis=0).max()
        error = np.abs(result.points_3d[seen] - truth["points_3d"][rows][seen]).max()
        assert error / scale < 1e-6


def test_deterministic(tmp_path):
    small(tmp_path / "a")
    small(tmp_path / "b")
    small(tmp_path / "c", seed=6)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*")
                   if p.is_file())
    assert len(files) > 30
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert (tmp_path / "a" / "CollectedData_cam0.csv").read_bytes() != (
        tmp_path / "c" / "CollectedData_cam0.csv").read_bytes()


def test_markers_sit_on_the_labels(tmp_path):
    """The colour-weighted centroid of each isolated marker is its label, to 0.15 px."""
    small(tmp_path / "d", n_sessions=1, frames_per_session=4)
    truth = np.load(tmp_path / "d" / "ground_truth.npz")
    checked = 0
    for v, view in enumerate(truth["view_names"]):
        for f in range(truth["points_2d"].shape[1]):
            image = cv2.imread(str(tmp_path / "d" / f"labeled-data/session0_{view}/"
                                   f"img{f:08d}.png")).astype(float)
            points, shown = truth["points_2d"][v, f], truth["visible"][v, f]
            for k in np.flatnonzero(shown):
                others = np.delete(points, k, axis=0)
                if np.nanmin(np.linalg.norm(others - points[k], axis=1)) < 9:
                    continue  # overlapping markers
                cx, cy = np.round(points[k]).astype(int)
                if not (6 <= cx < image.shape[1] - 6 and 6 <= cy < image.shape[0] - 6):
                    continue
                win = image[cy - 5:cy + 6, cx - 5:cx + 6]
                # render the same window without the marker is unknown; use the colour distance
                # to the marker colour, which peaks at the centre and is symmetric around it
                target = KEYPOINT_COLOURS[k]
                weight = np.clip(1 - np.linalg.norm(win - target, axis=-1) / 120, 0, None) ** 4
                ys, xs = np.mgrid[cy - 5:cy + 6, cx - 5:cx + 6]
                centroid = np.array([(weight * xs).sum(), (weight * ys).sum()]) / weight.sum()
                assert np.linalg.norm(centroid - points[k]) < 0.35, (view, f, k)
                checked += 1
    assert checked >= 20


def test_cli_and_bad_views(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "pipeline.example", "--out", str(tmp_path / "e"),
                         "--sessions", "1", "--frames", "2", "--views", "2", "--width", "64",
                         "--height", "48"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "e" / "CollectedData_cam1.csv").is_file()
    bad = subprocess.run([sys.executable, "-m", "pipeline.example", "--out", str(tmp_path / "f"),
                          "--views", "1"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.count("parallax error:") == 1 and "views" in bad.stderr
    assert not (tmp_path / "f").exists()


@pytest.mark.slow
def test_videos_have_equal_frame_counts(tmp_path):
    small(tmp_path / "g", n_sessions=1, frames_per_session=3, video_frames=12)
    for view in ("cam0", "cam1", "cam2"):
        capture = cv2.VideoCapture(str(tmp_path / "g" / "videos" / f"session0_{view}.mp4"))
        count = 0
        while capture.read()[0]:
            count += 1
        assert count == 12
