"""Evaluation figures: each writes a non-empty PNG of its documented size; empty states; the
overlay shows the worst frames first."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.evaluation import plots
from pipeline.evaluation.metrics import worst_frames


def _size(path) -> tuple[int, int]:
    assert path.stat().st_size > 0
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def _error_table(group: str, names: list[str]) -> pd.DataFrame:
    rows = [{"set": s, group: n, "mean_px": 1.0 + i + j, "median_px": 0.5 + i}
            for i, n in enumerate(names) for j, s in enumerate(("train", "test"))]
    return pd.DataFrame(rows)


def test_error_bars_pck_and_dropout_sizes(tmp_path):
    plots.error_bars(_error_table("keypoint", ["a", "b", "c"]), "keypoint", tmp_path / "e.png",
                     "t")
    assert _size(tmp_path / "e.png") == (1000, 450)
    curves = np.linspace(0, 1, 2 * 51).reshape(2, 51)
    plots.pck_curves(curves, np.arange(51), ["v0", "v1"], tmp_path / "p.png", "t")
    assert _size(tmp_path / "p.png") == (700, 450)
    summary = pd.DataFrame({"blanked_view": ["v0", "v1"], "mean_px_blanked_view": [9.0, 8.0],
                            "mean_px_blanked_view_intact": [2.0, 2.5],
                            "mean_px_other_views": [3.0, 3.1],
                            "mean_px_other_views_intact": [2.0, 2.1]})
    plots.view_dropout(summary, tmp_path / "d.png", "t")
    assert _size(tmp_path / "d.png") == (800, 450)


@pytest.mark.parametrize("n_terms", [1, 4])
def test_training_curves_one_panel_per_term(tmp_path, n_terms):
    table = pd.DataFrame({"step": np.arange(1, 6), "epoch": 0, "lr": 0.1,
                          "mask_ratio": np.linspace(0, 0.3, 5)})
    for i in range(n_terms):
        table[f"term{i}"] = np.arange(5.0)
        table[f"val_term{i}"] = [np.nan, 1.0, np.nan, 0.5, np.nan]
    plots.training_curves(table, tmp_path / "t.png")
    panels = n_terms + 1  # + mask_ratio; step, epoch, lr are not plotted
    assert _size(tmp_path / "t.png") == (1200, 300 * int(np.ceil(panels / 3)))


def test_overlays_and_skeleton_sizes(tmp_path):
    rng = np.random.default_rng(0)
    views, frames, kps = 3, 2, 4
    images = [[rng.integers(0, 255, (40, 60, 3), dtype=np.uint8) for _ in range(views)]
              for _ in range(frames)]
    images[1][2] = None  # unreadable image: the panel is drawn without it
    labels = rng.uniform(0, 40, (views, frames, kps, 2))
    labels[0, 0, 1] = np.nan
    plots.overlays(images, labels, labels + 2, ["a", "b", "c"], ["f0", "f1"], tmp_path / "o.png")
    assert _size(tmp_path / "o.png") == (320 * views, 300 * frames)
    truth = rng.normal(size=(2, kps, 3))
    plots.skeleton_3d(truth + 0.1, truth, [(0, 1), (1, 2)], ["x", "y"], tmp_path / "s.png")
    assert _size(tmp_path / "s.png") == (800, 420)


def test_empty_states_still_write_a_figure(tmp_path):
    empty = pd.DataFrame(columns=["set", "view", "mean_px", "median_px"])
    plots.error_bars(empty, "view", tmp_path / "e.png", "t")
    assert _size(tmp_path / "e.png") == (1000, 450)
    plots.overlays([], np.zeros((2, 0, 3, 2)), np.zeros((2, 0, 3, 2)), ["a", "b"], [],
                   tmp_path / "o.png")
    assert _size(tmp_path / "o.png") == (640, 300)
    plots.training_curves(pd.DataFrame(columns=["step"]), tmp_path / "t.png")
    assert _size(tmp_path / "t.png") == (1200, 300)
    plots.skeleton_3d(np.zeros((0, 3, 3)), np.zeros((0, 3, 3)), [], [], tmp_path / "s.png")
    assert _size(tmp_path / "s.png") == (640, 300)
    plots.view_dropout(pd.DataFrame(), tmp_path / "d.png", "t")
    assert _size(tmp_path / "d.png") == (800, 450)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.png", "e.png", "o.png", "s.png",
                                                          "t.png"]  # no temporaries left


def test_worst_frames_first():
    errors = np.full((2, 5, 3), np.nan)
    errors[:, 0] = 1.0
    errors[0, 1, 0] = 9.0  # mean 9 over its only finite value
    errors[:, 2] = 4.0
    errors[1, 3, :] = [2.0, 4.0, 6.0]  # mean 4: ties with frame 2, comes after it
    order, score = worst_frames(errors, np.arange(5), 3)  # frame 4 has no finite error
    assert order.tolist() == [1, 2, 3]
    np.testing.assert_allclose(score, [9.0, 4.0, 4.0])
    order, _ = worst_frames(errors, np.array([0, 3, 4]), 10)
    assert order.tolist() == [3, 0]
