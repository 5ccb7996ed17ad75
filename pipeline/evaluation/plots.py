"""Evaluation figures (PNG, matplotlib Agg, no pyplot state). Each function takes arrays or
DataFrames, writes one PNG atomically and returns nothing. Sizes are fixed by the inputs'
counts (DPI 100, no tight bbox), given in each docstring. With nothing to show a figure still
appears, saying why (`empty_figure`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

from pipeline.geometry.cameras import CameraGroup

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from pipeline.core.atomic import atomic_path  # noqa: E402

DPI = 100
SET_COLOURS = {"train": "tab:blue", "val": "tab:orange", "test": "tab:green"}
#: columns of metrics.csv that are not loss terms
NOT_LOSSES = {"step", "epoch", "mask_ratio", "anneal_weight", "lr", "lr_backbone", "data_time",
              "step_time"}


def _save(fig: Figure, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)


def empty_figure(path: str | Path, message: str, size_px: tuple[int, int] = (640, 300)) -> None:
    """A figure of `size_px` (width, height) that only says `message`."""
    fig = Figure(figsize=(size_px[0] / DPI, size_px[1] / DPI))
    fig.text(0.5, 0.5, message, ha="center", va="center", fontsize=13, wrap=True)
    _save(fig, path)


def error_bars(table: pd.DataFrame, group: str, path: str | Path, title: str) -> None:
    """Bars of `mean_px` per `group` value (x) and set (colour), median as a black tick.

    table: rows with columns set, `group`, mean_px, median_px. Size 1000 x 450 px.
    """
    size = (1000, 450)
    if table.empty or not table["mean_px"].notna().any():
        return empty_figure(path, f"{title}: no labelled frames", size)
    groups = list(dict.fromkeys(table[group].astype(str)))
    sets = [s for s in SET_COLOURS if s in set(table["set"])]
    fig = Figure(figsize=(size[0] / DPI, size[1] / DPI), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / max(len(sets), 1)
    x = np.arange(len(groups))
    for i, name in enumerate(sets):
        rows = table[table["set"] == name]
        rows = rows.set_index(rows[group].astype(str)).reindex(groups)
        pos = x - 0.4 + width * (i + 0.5)
        ax.bar(pos, rows["mean_px"].to_numpy(float), width, color=SET_COLOURS[name], label=name)
        ax.plot(pos, rows["median_px"].to_numpy(float), "k_", markersize=10)
    ax.set_xticks(x, groups, rotation=45 if len(groups) > 6 else 0, ha="right"
                  if len(groups) > 6 else "center")
    ax.set_ylabel("error (frame px): bar mean, tick median")
    ax.set_title(title)
    ax.legend()
    _save(fig, path)


def pck_curves(curves: np.ndarray, thresholds: np.ndarray, view_names: Sequence[str],
               path: str | Path, title: str) -> None:
    """curves (views, T): fraction of keypoints within each threshold (px). Size 700 x 450 px."""
    size = (700, 450)
    if curves.size == 0 or not np.isfinite(curves).any():
        return empty_figure(path, f"{title}: no labelled keypoints", size)
    fig = Figure(figsize=(size[0] / DPI, size[1] / DPI), layout="constrained")
    ax = fig.add_subplot()
    for view, curve in zip(view_names, curves, strict=True):
        ax.plot(thresholds, curve, label=view)
    ax.set_xlabel("threshold (frame px)")
    ax.set_ylabel("fraction of keypoints within threshold")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend()
    _save(fig, path)


def training_curves(metrics: pd.DataFrame, path: str | Path) -> None:
    """One panel per loss term of metrics.csv (train and `val_` against step) plus mask_ratio.

    Panels in 3 columns; size 1200 x (300 x rows) px, rows = ceil(panels / 3).
    """
    terms = [c for c in metrics.columns
             if c not in NOT_LOSSES and not c.startswith("val_")
             and pd.api.types.is_numeric_dtype(metrics[c]) and metrics[c].notna().any()]
    terms += [c[4:] for c in metrics.columns if c.startswith("val_") and c[4:] not in terms
              and c[4:] not in NOT_LOSSES and metrics[c].notna().any()]
    panels = terms + (["mask_ratio"] if "mask_ratio" in metrics.columns else [])
    if metrics.empty or not panels:
        return empty_figure(path, "no training metrics recorded", (1200, 300))
    rows = math.ceil(len(panels) / 3)
    fig = Figure(figsize=(12, 3 * rows), layout="constrained")
    step = metrics["step"].to_numpy(float)
    for i, name in enumerate(panels):
        ax = fig.add_subplot(rows, 3, i + 1)
        for column, label in ((name, "train"), (f"val_{name}", "val")):
            if column in metrics.columns and metrics[column].notna().any():
                keep = metrics[column].notna().to_numpy()
                style = "-" if label == "train" else "o-"
                ax.plot(step[keep], metrics[column].to_numpy(float)[keep], style, label=label,
                        markersize=3)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if name != "mask_ratio":
            ax.legend(fontsize=8)
    _save(fig, path)


def overlays(images: Sequence[Sequence[np.ndarray | None]], labels: np.ndarray,
             preds: np.ndarray, view_names: Sequence[str], row_titles: Sequence[str],
             path: str | Path) -> None:
    """Frames as rows (in the given order), views as columns: labels as circles, predictions as
    crosses, a line from each label to its prediction.

    images: [frame][view] RGB arrays (None = unreadable); labels, preds: (views, frames,
    keypoints, 2) in the images' pixels. Size (320 x views) x (300 x frames) px.
    """
    n_views, n_frames = labels.shape[:2]
    if n_frames == 0:
        return empty_figure(path, "no test frames", (640, 300))
    fig = Figure(figsize=(3.2 * n_views, 3.0 * n_frames), layout="constrained")
    axes = fig.subplots(n_frames, n_views, squeeze=False)
    colours = matplotlib.colormaps["tab10"](np.arange(labels.shape[2]) % 10)
    for f in range(n_frames):
        for v in range(n_views):
            ax = axes[f, v]
            image = images[f][v]
            if image is not None:
                ax.imshow(image)
            lab, pred = labels[v, f], preds[v, f]
            both = np.isfinite(lab).all(-1) & np.isfinite(pred).all(-1)
            segments = np.stack([lab[both], pred[both]], axis=1)  # (n, 2 ends, 2)
            ax.plot(segments[..., 0].T, segments[..., 1].T, "-", color="yellow", linewidth=0.8)
            ax.scatter(lab[:, 0], lab[:, 1], s=36, facecolors="none", edgecolors=colours,
                       linewidths=1.2)
            ax.scatter(pred[:, 0], pred[:, 1], s=36, marker="x", c=colours, linewidths=1.2)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{view_names[v]}", fontsize=9)
            if v == 0:
                ax.set_ylabel(row_titles[f], fontsize=8)
    fig.suptitle("labels o, predictions x (worst frames first)")
    _save(fig, path)


def skeleton_3d(pred: np.ndarray, truth: np.ndarray, edges: Sequence[tuple[int, int]],
                titles: Sequence[str], path: str | Path) -> None:
    """pred, truth (frames, keypoints, 3): ground truth in black, prediction in red, skeleton
    lines for `edges` (keypoint index pairs). Size (400 x frames) x 420 px."""
    n = len(pred)
    if n == 0:
        return empty_figure(path, "no test frames with 3D ground truth and prediction")
    fig = Figure(figsize=(4.0 * n, 4.2), layout="constrained")
    for i in range(n):
        ax = fig.add_subplot(1, n, i + 1, projection="3d")
        for points, colour, label in ((truth[i], "k", "ground truth"),
                                      (pred[i], "r", "predicted")):
            ax.scatter(*points.T, c=colour, s=10, label=label)
            for a, b in edges:
                ax.plot(*points[[a, b]].T, color=colour, linewidth=1)
        ax.set_aspect("equal")
        ax.set_title(titles[i], fontsize=8)
        if i == 0:
            ax.legend(fontsize=8)
    _save(fig, path)


def view_dropout(summary: pd.DataFrame, path: str | Path, title: str) -> None:
    """Per blanked view: mean error in that view with its image blanked vs intact, and in the
    other views. summary: view_dropout_summary rows of one set. Size 800 x 450 px."""
    size = (800, 450)
    if summary.empty:
        return empty_figure(path, f"{title}: no view-dropout results", size)
    fig = Figure(figsize=(size[0] / DPI, size[1] / DPI), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(summary))
    bars = (("mean_px_blanked_view_intact", "blanked view, intact run", "tab:green"),
            ("mean_px_blanked_view", "blanked view, blanked", "tab:red"),
            ("mean_px_other_views_intact", "other views, intact run", "tab:cyan"),
            ("mean_px_other_views", "other views, one blanked", "tab:blue"))
    for i, (column, label, colour) in enumerate(bars):
        ax.bar(x - 0.4 + 0.2 * (i + 0.5), summary[column].to_numpy(float), 0.2, label=label,
               color=colour)
    ax.set_xticks(x, summary["blanked_view"].astype(str))
    ax.set_xlabel("blanked view")
    ax.set_ylabel("mean error (frame px)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    _save(fig, path)


def model_comparison(table: pd.DataFrame, columns: Sequence[str], path: str | Path) -> None:
    """Grouped bars: one panel per metric column, one bar per model. Size 1200 x (350 x rows)
    px, 3 panels per row."""
    columns = [c for c in columns if c in table.columns]
    if table.empty or not columns:
        return empty_figure(path, "no models to compare", (1200, 350))
    rows = math.ceil(len(columns) / 3)
    fig = Figure(figsize=(12, 3.5 * rows), layout="constrained")
    names = table["model"].astype(str).tolist()
    colours = matplotlib.colormaps["tab10"](np.arange(len(names)) % 10)
    for i, column in enumerate(columns):
        ax = fig.add_subplot(rows, 3, i + 1)
        ax.bar(np.arange(len(names)), table[column].to_numpy(float), color=colours)
        ax.set_xticks(np.arange(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(column, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    _save(fig, path)


def video_traces(confidence: np.ndarray, points_3d: np.ndarray | None,
                 view_names: Sequence[str], keypoint_names: Sequence[str], fps: float,
                 path: str | Path, title: str) -> None:
    """One session's predictions over time, 1000 x 600 px: mean confidence per view
    (confidence: (views, frames, keypoints)) and, with a calibration, each keypoint's 3D
    distance from the pose centroid (points_3d: (frames, keypoints, 3), NaN = not
    triangulated), so jumps and dropouts stand out."""
    frames = confidence.shape[1]
    if frames == 0:
        empty_figure(path, f"{title}: the videos have no frames", (1000, 600))
        return
    seconds = np.arange(frames) / (fps if fps > 0 else 1.0)
    fig = Figure(figsize=(10, 6))
    top, bottom = fig.subplots(2, 1, sharex=True)
    for v, view in enumerate(view_names):
        top.plot(seconds, confidence[v].mean(axis=-1), label=view, lw=1)
    top.set(ylabel="mean confidence", ylim=(0, 1.05), title=title)
    top.legend(loc="lower right", ncol=min(len(view_names), 8), fontsize=8)
    if points_3d is None:
        bottom.text(0.5, 0.5, "no calibration: no 3D", ha="center", va="center",
                    transform=bottom.transAxes)
    else:
        with np.errstate(invalid="ignore"):
            centroid = np.nanmean(points_3d, axis=1, keepdims=True) \
                if np.isfinite(points_3d).any() else np.zeros_like(points_3d[:, :1])
        distance = np.linalg.norm(points_3d - centroid, axis=-1)  # (frames, keypoints)
        for k, name in enumerate(keypoint_names):
            bottom.plot(seconds, distance[:, k], label=name, lw=0.8)
        bottom.set(ylabel="3D distance from centroid")
        if len(keypoint_names) <= 16:
            bottom.legend(loc="upper right", ncol=4, fontsize=7)
    bottom.set_xlabel("time (s)" if fps > 0 else "frame")
    fig.tight_layout()
    _save(fig, path)


def plot_errors(path: Path, tables: dict[str, tuple[CameraGroup, np.ndarray, np.ndarray]],
                max_px: float) -> None:
    """Box plots of per-camera reprojection errors (in and left out), one panel per file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(tables), figsize=(4 + 2.5 * len(tables), 4), squeeze=False, sharey=True
    )
    for ax, (name, (group, errors_in, errors_out)) in zip(axes[0], tables.items(), strict=True):
        data, ticks = [], []
        for view, cam in enumerate(group.cameras):
            for label, errors in (("in", errors_in[view]), ("out", errors_out[view])):
                finite = errors[np.isfinite(errors)]
                data.append(np.maximum(finite, 1e-3) if finite.size else [np.nan])
                ticks.append(f"{cam.name}\n{label}")
        ax.boxplot(data, showfliers=True, flierprops={"markersize": 2})
        ax.set_xticks(range(1, len(ticks) + 1), ticks, fontsize=7)
        ax.axhline(max_px, color="tab:red", lw=1, ls="--", label="max median")
        ax.set_yscale("log")
        ax.set_title(Path(name).name, fontsize=9)
    axes[0, 0].set_ylabel("reprojection error (px)")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)
