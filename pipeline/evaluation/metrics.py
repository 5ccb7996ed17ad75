"""Pure, vectorized evaluation metrics (numpy over views x frames x keypoints, pandas groupby).

Shapes: 2D arrays are (views, frames, keypoints, 2) in frame pixels, 3D (frames, keypoints, 3)
in calibration units; errors (views, frames, keypoints); NaN = missing, ignored by every
statistic (a statistic over no finite value is NaN, its count 0).

PCK definitions:
  - PCK@t px: the fraction of finite errors <= t (frame pixels).
  - PCK@bbox f: per view and frame, the threshold is f x the diagonal of the axis-aligned box
    around that view's *labelled* keypoints in that frame (frame pixels); a (view, frame) with
    fewer than 2 labelled keypoints (or a zero diagonal) has no threshold, so its errors are left
    out of that PCK (and only of it). The same threshold applies to the view's occluded keypoints.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from pipeline.geometry.cameras import CameraGroup

SETS = ("train", "val", "test")


def distances(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(..., D) and (..., D) -> (...) Euclidean distance, NaN where either is missing."""
    diff = np.asarray(pred, float) - np.asarray(target, float)
    return np.sqrt(np.einsum("...i,...i->...", diff, diff))


def bbox_diagonals(points_2d: np.ndarray) -> np.ndarray:
    """(views, frames, keypoints, 2) -> (views, frames) diagonal of the labelled keypoints' box,
    NaN with fewer than 2 labelled keypoints or a zero diagonal."""
    pts = np.asarray(points_2d, float)
    finite = np.isfinite(pts).all(-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices -> NaN
        extent = np.nanmax(pts, axis=2) - np.nanmin(pts, axis=2)
    diag = np.hypot(extent[..., 0], extent[..., 1])
    return np.where((finite.sum(axis=2) >= 2) & (diag > 0), diag, np.nan)


def hits(errors: np.ndarray, thresholds: np.ndarray | float) -> np.ndarray:
    """errors (...) vs thresholds broadcastable to them -> 1.0 within, 0.0 beyond, NaN where the
    error or the threshold is missing."""
    errors = np.asarray(errors, float)
    thresholds = np.asarray(thresholds, float)
    within = (errors <= thresholds).astype(float)
    return np.where(np.isnan(errors) | np.isnan(thresholds), np.nan, within)


def pck(errors: np.ndarray, threshold: float) -> float:
    """Fraction of the finite errors <= threshold (NaN without finite errors)."""
    errors = np.asarray(errors, float)
    finite = errors[np.isfinite(errors)]
    return float(np.mean(finite <= threshold)) if finite.size else float("nan")


def pck_curves(errors: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """errors (views, frames, keypoints), thresholds (T,) -> (views, T) fraction of each view's
    finite errors within each threshold (NaN for a view without finite errors)."""
    flat = np.asarray(errors, float).reshape(len(errors), -1)
    finite = np.isfinite(flat)
    counts = finite.sum(axis=1)
    within = (np.where(finite, flat, np.inf)[:, :, None] <= np.asarray(thresholds)[None, None])
    with np.errstate(invalid="ignore", divide="ignore"):
        return within.sum(axis=1) / np.where(counts > 0, counts, np.nan)[:, None]


def worst_frames(errors: np.ndarray, frames: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The `n` of `frames` with the largest mean error over views and keypoints (errors:
    (views, frames, keypoints)), worst first, ties in frame order; frames without any finite
    error are skipped. Returns (frame indices, their mean errors)."""
    frames = np.asarray(frames, dtype=int)
    per_frame = np.asarray(errors, float)[:, frames].transpose(1, 0, 2).reshape(len(frames), -1)
    finite = np.isfinite(per_frame)
    score = np.where(finite, per_frame, 0.0).sum(axis=1) / np.maximum(finite.sum(axis=1), 1)
    keep = np.flatnonzero(finite.any(axis=1))
    chosen = keep[np.argsort(-score[keep], kind="stable")][:n]
    return frames[chosen], score[chosen]


def project_frames(
    points_3d: np.ndarray, calibration_files: np.ndarray, groups: Mapping[str, CameraGroup],
    n_views: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Project (frames, keypoints, 3) with each frame's calibration.

    Returns (views, frames, keypoints, 2) frame pixels and (views, frames, keypoints) bool "in
    view": in front of the camera and inside its image (0 <= x <= width-1, 0 <= y <= height-1).
    Frames without a calibration (or with NaN 3D) give NaN and False.
    """
    pts = np.asarray(points_3d, float)
    n_frames, n_kp = pts.shape[:2]
    projected = np.full((n_views, n_frames, n_kp, 2), np.nan)
    inside = np.zeros((n_views, n_frames, n_kp), dtype=bool)
    for path, group in groups.items():  # one iteration per calibration file, not per frame
        frames = np.flatnonzero(calibration_files == path)
        if frames.size == 0:
            continue
        sub = pts[frames]
        uv = group.project(sub)
        rot = np.stack([cam.R for cam in group.cameras])  # (V, 3, 3)
        tvec = np.stack([cam.tvec for cam in group.cameras])  # (V, 3)
        depth = np.einsum("vj,fkj->vfk", rot[:, 2], sub) + tvec[:, 2, None, None]
        size = np.array([cam.size for cam in group.cameras], float)  # (V, 2) width, height
        in_image = ((uv >= 0) & (uv <= size[:, None, None] - 1)).all(-1)
        projected[:, frames] = uv
        inside[:, frames] = np.nan_to_num(depth, nan=-1.0) > 0
        inside[:, frames] &= in_image
    return projected, inside


def long_table(arrays: Mapping[str, np.ndarray], sets: np.ndarray, view_names: Sequence[str],
               keypoint_names: Sequence[str]) -> pd.DataFrame:
    """One row per (view, frame, keypoint): `set`, `view`, `keypoint`, `frame` and one column per
    (views, frames, keypoints) array (arrays of shape (frames, keypoints) are repeated per view).
    `set`, `view`, `keypoint` are ordered categoricals (SETS, view order, keypoint order)."""
    n_views, n_kp, n_frames = len(view_names), len(keypoint_names), len(sets)
    v, f, k = (i.ravel() for i in np.indices((n_views, n_frames, n_kp)))
    set_codes = np.array([SETS.index(s) if s in SETS else -1 for s in sets], dtype=int)
    columns: dict[str, object] = {
        "set": pd.Categorical.from_codes(set_codes[f], categories=list(SETS)),
        "view": pd.Categorical.from_codes(v, categories=list(view_names)),
        "keypoint": pd.Categorical.from_codes(k, categories=list(keypoint_names)),
        "frame": f,
    }
    for name, value in arrays.items():
        value = np.asarray(value)
        if value.shape == (n_frames, n_kp):
            value = np.broadcast_to(value, (n_views, n_frames, n_kp))
        if value.shape != (n_views, n_frames, n_kp):
            raise ValueError(f"'{name}' has shape {value.shape}, expected "
                             f"({n_views}, {n_frames}, {n_kp}) or ({n_frames}, {n_kp})")
        columns[name] = value.ravel()
    return pd.DataFrame(columns)


def pck_columns(thresholds: Sequence[float], bbox_fraction: float) -> list[str]:
    """Column names of the PCKs: `pck_<t>px` per threshold, then `pck_bbox_<fraction>`."""
    return [f"pck_{t:g}px" for t in thresholds] + [f"pck_bbox_{bbox_fraction:g}"]


def error_stats(frame: pd.DataFrame, by: Sequence[str], value: str,
                thresholds: Sequence[float] = (), bbox_fraction: float | None = None,
                prefix: str = "") -> pd.DataFrame:
    """Per group of `by`: n (finite values), mean, median of `value`, and, with thresholds,
    the PCKs (bbox PCK from the column `bbox_threshold` in px). Column names get `prefix`.
    Groups follow the categorical order; groups without rows are left out."""
    work = frame[list(by)].copy()
    work["_v"] = frame[value].to_numpy(float)
    aggs: dict[str, tuple[str, str]] = {
        f"{prefix}n": ("_v", "count"), f"{prefix}mean": ("_v", "mean"),
        f"{prefix}median": ("_v", "median"),
    }
    if bbox_fraction is not None:
        names = pck_columns(thresholds, bbox_fraction)
        limits = [*map(float, thresholds), None]
        for name, limit in zip(names, limits, strict=True):
            bound = frame["bbox_threshold"].to_numpy(float) if limit is None else limit
            work[name] = hits(work["_v"].to_numpy(), bound)
            aggs[f"{prefix}{name}"] = (name, "mean")
    if len(work) == 0:
        return pd.DataFrame(columns=[*by, *aggs])
    out = work.groupby(list(by), observed=True, sort=True).agg(**aggs).reset_index()
    out[f"{prefix}n"] = out[f"{prefix}n"].astype(int)
    for column in by:
        out[column] = out[column].astype(str)
    return out


def weighted_mean(values: np.ndarray, weights: np.ndarray) -> float:
    """Sum(w x v) / sum(w) over finite values with w > 0 (NaN if none): merges group means."""
    values, weights = np.asarray(values, float), np.asarray(weights, float)
    keep = np.isfinite(values) & (weights > 0)
    return float(np.sum(values[keep] * weights[keep]) / np.sum(weights[keep])) \
        if keep.any() else float("nan")


def dropout_summary(table: pd.DataFrame) -> pd.DataFrame:
    """view_dropout.csv (blanked_view, view, keypoint, set, n, mean_px, median_px) -> one row per
    (set, blanked_view): the n-weighted mean error in the blanked view and in the other views,
    each next to the same views' error in the intact run (`none`)."""
    columns = ["set", "blanked_view", "n_blanked_view", "mean_px_blanked_view",
               "mean_px_blanked_view_intact", "n_other_views", "mean_px_other_views",
               "mean_px_other_views_intact"]
    work = table.assign(_sum=table["mean_px"].astype(float) * table["n"].astype(float),
                        _n=table["n"].astype(float).where(table["mean_px"].notna(), 0.0))
    work["_sum"] = work["_sum"].fillna(0.0)
    keys = ["set", "view", "keypoint"]
    intact = work[work["blanked_view"] == "none"].groupby(keys)[["_sum", "_n"]].sum()
    blanked = work[work["blanked_view"] != "none"].copy()
    if blanked.empty:
        return pd.DataFrame(columns=columns)
    blanked["_same"] = blanked["view"] == blanked["blanked_view"]
    sums = blanked.groupby(["set", "blanked_view", "_same"])[["_sum", "_n"]].sum()
    joined = blanked.join(intact.add_suffix("_intact"), on=keys)
    ref = joined.groupby(["set", "blanked_view", "_same"])[["_sum_intact", "_n_intact"]].sum()
    both = sums.join(ref).reset_index()
    with np.errstate(invalid="ignore", divide="ignore"):
        both["mean"] = both["_sum"] / both["_n"].where(both["_n"] > 0)
        both["mean_intact"] = both["_sum_intact"] / both["_n_intact"].where(both["_n_intact"] > 0)
    wide = both.pivot(index=["set", "blanked_view"], columns="_same",
                      values=["_n", "mean", "mean_intact"])
    out = pd.DataFrame(index=wide.index)
    for same, label in ((True, "blanked_view"), (False, "other_views")):
        def get(key: str, same: bool = same) -> pd.Series:
            return wide[(key, same)] if (key, same) in wide.columns else np.nan

        out[f"n_{label}"] = get("_n")
        out[f"mean_px_{label}"] = get("mean")
        out[f"mean_px_{label}_intact"] = get("mean_intact")
    out = out.reset_index()
    for column in ("n_blanked_view", "n_other_views"):
        out[column] = out[column].fillna(0).astype(int)
    return out[columns]
