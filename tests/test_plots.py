"""Evaluation figures: each writes a PNG of its documented size that shows the data given (the
matplotlib objects of the saved figure carry the values; one bar chart is checked on the
PNG's pixels too); empty states; the overlay shows the worst frames first."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgb
from PIL import Image

from pipeline.evaluation import plots
from pipeline.evaluation.metrics import worst_frames


@pytest.fixture
def figures(monkeypatch) -> list:
    """Every Figure a plot function saves, in order (the PNG is still written)."""
    saved = []
    original = plots._save

    def record(fig, path):
        original(fig, path)
        saved.append(fig)

    monkeypatch.setattr(plots, "_save", record)
    return saved


def bar_heights(container) -> list[float]:
    return [patch.get_height() for patch in container.patches]


def bar_centres(container) -> list[float]:
    return [patch.get_x() + patch.get_width() / 2 for patch in container.patches]


def pixel(image: np.ndarray, ax, x: float, y: float, dy_px: float = 0.0) -> np.ndarray:
    """RGB (0..1) of the PNG pixel at data point (x, y) of `ax`, `dy_px` pixels up."""
    col, row = ax.transData.transform((x, y))
    return image[int(round(image.shape[0] - row - dy_px)), int(round(col)), :3] / 255.0


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


def test_error_bars_show_each_set_mean_and_median(tmp_path, figures):
    table = _error_table("keypoint", ["a", "b", "c"])  # mean 1 + i (+1 test), median 0.5 + i
    plots.error_bars(table, "keypoint", tmp_path / "e.png", "errors")
    (fig,) = figures
    (ax,) = fig.axes
    assert ax.get_title() == "errors"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]
    train, test = ax.containers  # one bar group per set, in SET_COLOURS order
    assert (train.get_label(), test.get_label()) == ("train", "test")
    assert bar_heights(train) == [1.0, 2.0, 3.0] and bar_heights(test) == [2.0, 3.0, 4.0]
    for container, name in ((train, "train"), (test, "test")):
        assert all(p.get_facecolor()[:3] == pytest.approx(to_rgb(plots.SET_COLOURS[name]))
                   for p in container.patches)
    for i, (left, right) in enumerate(zip(bar_centres(train), bar_centres(test), strict=True)):
        assert i - 0.4 < left < right < i + 0.4  # side by side at their keypoint
    ticks = [line for line in ax.lines if line.get_marker() == "_"]
    assert len(ticks) == 2
    for line, container in zip(ticks, (train, test), strict=True):
        assert list(line.get_xdata()) == pytest.approx(bar_centres(container))
        assert list(line.get_ydata()) == [0.5, 1.5, 2.5]
    # on the PNG: the bar's colour just under each top (between median tick and top), the
    # background just above it
    with Image.open(tmp_path / "e.png") as png:
        image = np.asarray(png.convert("RGB"), dtype=float)
    for container, name in ((train, "train"), (test, "test")):
        for x, height in zip(bar_centres(container), bar_heights(container), strict=True):
            inside = pixel(image, ax, x, height, dy_px=-4)
            assert inside == pytest.approx(to_rgb(plots.SET_COLOURS[name]), abs=0.02), (x, name)
            assert pixel(image, ax, x, height, dy_px=4) == pytest.approx((1, 1, 1), abs=0.02)


def test_error_bars_keep_group_order_with_missing_sets(tmp_path, figures):
    table = pd.DataFrame([{"set": "val", "view": "top", "mean_px": 5.0, "median_px": 4.0},
                          {"set": "test", "view": "side", "mean_px": 2.0, "median_px": 1.0},
                          {"set": "val", "view": "side", "mean_px": 3.0, "median_px": 2.0}])
    plots.error_bars(table, "view", tmp_path / "e.png", "t")
    (ax,) = figures[0].axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["top", "side"]
    val, test = ax.containers
    assert (val.get_label(), test.get_label()) == ("val", "test")
    assert bar_heights(val) == [5.0, 3.0]
    assert bar_heights(test)[1] == 2.0 and np.isnan(bar_heights(test)[0])  # no test "top"


def test_pck_curves_one_line_per_view(tmp_path, figures):
    thresholds = np.arange(51)
    curves = np.stack([1 - np.exp(-thresholds / s) for s in (3.0, 6.0, 12.0)])
    plots.pck_curves(curves, thresholds, ["back", "side", "top"], tmp_path / "p.png", "pck")
    (ax,) = figures[0].axes
    assert [line.get_label() for line in ax.lines] == ["back", "side", "top"]
    for line, curve in zip(ax.lines, curves, strict=True):
        np.testing.assert_array_equal(line.get_xdata(), thresholds)
        np.testing.assert_array_equal(line.get_ydata(), curve)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["back", "side", "top"]


def test_view_dropout_bars(tmp_path, figures):
    summary = pd.DataFrame({"blanked_view": ["v0", "v1"], "mean_px_blanked_view": [9.0, 8.0],
                            "mean_px_blanked_view_intact": [2.0, 2.5],
                            "mean_px_other_views": [3.0, 3.1],
                            "mean_px_other_views_intact": [2.0, 2.1]})
    plots.view_dropout(summary, tmp_path / "d.png", "t")
    (ax,) = figures[0].axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["v0", "v1"]
    columns = ("mean_px_blanked_view_intact", "mean_px_blanked_view",
               "mean_px_other_views_intact", "mean_px_other_views")
    assert len(ax.containers) == 4
    for container, column in zip(ax.containers, columns, strict=True):
        assert bar_heights(container) == summary[column].tolist(), column
    assert [c.get_label() for c in ax.containers][1] == "blanked view, blanked"
    for view in range(2):  # the four bars of a view stand side by side at its tick
        centres = [bar_centres(c)[view] for c in ax.containers]
        assert centres == sorted(centres) and view - 0.4 < centres[0] < centres[-1] < view + 0.4


def test_training_curves_plot_the_values(tmp_path, figures):
    table = pd.DataFrame({"step": [1, 2, 3, 4], "epoch": 0, "lr": 0.1,
                          "loss": [4.0, 3.0, 2.0, 1.0], "val_loss": [np.nan, 2.5, np.nan, 1.5],
                          "heatmap_mse": [0.4, 0.3, 0.2, 0.1],
                          "mask_ratio": [0.0, 0.1, 0.2, 0.3]})
    plots.training_curves(table, tmp_path / "t.png")
    axes = figures[0].axes
    assert [ax.get_title() for ax in axes] == ["loss", "heatmap_mse", "mask_ratio"]
    loss, heatmap, mask = axes
    train, val = loss.lines
    assert (train.get_label(), val.get_label()) == ("train", "val")
    assert list(train.get_xdata()) == [1, 2, 3, 4] and list(train.get_ydata()) == [4, 3, 2, 1]
    assert list(val.get_xdata()) == [2, 4] and list(val.get_ydata()) == [2.5, 1.5]
    assert len(heatmap.lines) == 1 and list(heatmap.lines[0].get_ydata()) == [0.4, 0.3, 0.2, 0.1]
    assert list(mask.lines[0].get_ydata()) == [0.0, 0.1, 0.2, 0.3]


def test_overlays_draw_labels_and_predictions_per_frame_and_view(tmp_path, figures):
    rng = np.random.default_rng(0)
    views, frames, kps = 2, 2, 3
    images = [[rng.integers(0, 255, (40, 60, 3), dtype=np.uint8) for _ in range(views)]
              for _ in range(frames)]
    images[1][1] = None
    labels = rng.uniform(0, 40, (views, frames, kps, 2))
    labels[0, 0, 1] = np.nan
    preds = labels + 2
    plots.overlays(images, labels, preds, ["a", "b"], ["worst", "next"], tmp_path / "o.png")
    axes = figures[0].axes
    assert len(axes) == frames * views
    for f in range(frames):
        for v in range(views):
            ax = axes[f * views + v]
            assert ax.get_title() == ["a", "b"][v]
            assert len(ax.images) == (0 if (f, v) == (1, 1) else 1)
            circles, crosses = ax.collections
            np.testing.assert_allclose(circles.get_offsets(), labels[v, f])
            np.testing.assert_allclose(crosses.get_offsets(), preds[v, f])
            # one line per keypoint with both a label and a prediction
            assert len(ax.lines) == int(np.isfinite(labels[v, f]).all(-1).sum())
    assert [axes[0].get_ylabel(), axes[views].get_ylabel()] == ["worst", "next"]


def test_skeleton_and_comparison_panels(tmp_path, figures):
    truth = np.random.default_rng(1).normal(size=(2, 4, 3))
    plots.skeleton_3d(truth + 0.1, truth, [(0, 1), (1, 2)], ["f0", "f1"], tmp_path / "s.png")
    axes = figures[0].axes
    assert [ax.get_title() for ax in axes] == ["f0", "f1"] and axes[0].name == "3d"
    assert len(axes[0].lines) == 4  # two edges, truth and prediction
    table = pd.DataFrame({"model": ["m1", "m2", "m3"], "mean_px": [4.0, 5.0, 9.0],
                          "pck": [0.9, 0.8, 0.5]})
    plots.model_comparison(table, ["mean_px", "missing", "pck"], tmp_path / "c.png")
    axes = figures[1].axes
    assert [ax.get_title() for ax in axes] == ["mean_px", "pck"]
    assert bar_heights(axes[0].containers[0]) == [4.0, 5.0, 9.0]
    assert bar_heights(axes[1].containers[0]) == [0.9, 0.8, 0.5]
    assert [t.get_text() for t in axes[1].get_xticklabels()] == ["m1", "m2", "m3"]


def test_video_traces_plot_mean_confidence_and_distances(tmp_path, figures):
    # 3 keypoints with skewed values, so that a mean and a median differ
    skewed = np.array([[0.0, 0.1, 0.8], [0.2, 0.3, 1.0], [0.0, 0.0, 0.9], [0.5, 0.5, 0.2],
                       [0.1, 0.2, 0.9]])
    confidence = np.stack([np.full((5, 3), 0.9), skewed])
    points = np.zeros((5, 3, 3))
    points[:, 1, 0] = np.arange(5.0) * 2  # keypoint 1 moves along x
    points[:, 2, 0] = 6.0  # keypoint 2 stays at x = 6; keypoint 0 at the origin
    plots.video_traces(confidence, points, ["a", "b"], ["k0", "k1", "k2"], 10.0,
                       tmp_path / "v.png", "s")
    top, bottom = figures[0].axes
    assert [line.get_label() for line in top.lines] == ["a", "b"]
    np.testing.assert_allclose(top.lines[0].get_ydata(), 0.9)
    np.testing.assert_allclose(top.lines[1].get_ydata(),
                               [0.3, 0.5, 0.3, 0.4, 0.4])  # per-frame means, by hand
    np.testing.assert_allclose(top.lines[0].get_xdata(), np.arange(5) / 10.0)
    centroid_x = (np.arange(5.0) * 2 + 6.0) / 3  # mean of x = 0, 2t, 6
    expected = np.abs(np.stack([0.0 * centroid_x, np.arange(5.0) * 2, np.full(5, 6.0)], 1)
                      - centroid_x[:, None])
    for k in range(3):
        np.testing.assert_allclose(bottom.lines[k].get_ydata(), expected[:, k])
    assert _size(tmp_path / "v.png") == (1000, 600)
