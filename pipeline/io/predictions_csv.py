"""Readers and writers of the prediction tables (README.md, stages predict_labeled and
predict_video).

- `predictions_<view>.csv`: DLC/LP 3-header-row CSV (scorer / bodyparts / coords), coords
  x, y, likelihood per keypoint, index = frame key (labelled frames) or frame number (videos),
  optional trailing `set` column (header cells `set`, ``, ``). Readable with
  `pandas.read_csv(path, header=[0, 1, 2], index_col=0)`.
- `predictions_<view>_pixel_error.csv`: one header row; index = frame key, one column per
  keypoint (frame px), optional `set`.
- pose-3d CSV (anipose layout): per keypoint `<kp>_x, _y, _z, _error, _ncams, _score`, then
  `M_00..M_22` (identity), `center_0..2` (zeros), `fnum`, then any extra columns
  (`frame`, `set` for labelled frames).

Every writer is atomic (temporary sibling, then rename). NaN is written as an empty cell.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core.atomic import atomic_path
from pipeline.core.errors import ParallaxError
from pipeline.io.labels_csv import LabelTable, read_label_csv, write_label_csv

POSE_3D_FIELDS = ("x", "y", "z", "error", "ncams", "score")


def write_predictions_2d(path: str | Path, index: Sequence, keypoint_names: Sequence[str],
                         points: np.ndarray, confidence: np.ndarray, scorer: str,
                         sets: Sequence[str] | None = None,
                         variance: np.ndarray | None = None) -> None:
    """One view's predictions: points (N, K, 2) frame px, confidence (N, K) in [0, 1] and, for
    an ensemble, the members' variance (N, K, 2) px² (coords x_var, y_var)."""
    extra = {"likelihood": np.asarray(confidence, float)}
    if variance is not None:
        extra.update(x_var=np.asarray(variance)[..., 0], y_var=np.asarray(variance)[..., 1])
    write_label_csv(path, [str(i) for i in index], list(keypoint_names), points,
                    scorer=scorer, extra=extra,
                    extra_columns=None if sets is None else {"set": list(sets)})


def read_predictions_table(path: str | Path) -> LabelTable:
    """A predictions CSV (its `likelihood` checked), with the variance if it has one."""
    table = read_label_csv(path)
    if table.likelihood is None:
        raise ParallaxError(f"{path}: a predictions CSV needs a 'likelihood' coord per keypoint")
    return table


def read_predictions_2d(path: str | Path) -> tuple[list[str], list[str], np.ndarray, np.ndarray,
                                                   np.ndarray | None]:
    """(index, keypoint_names, points (N, K, 2), confidence (N, K), sets (N,) or None)."""
    table = read_predictions_table(path)
    sets = table.extra_columns.get("set")
    return (list(table.index), list(table.keypoint_names), table.points, table.likelihood,
            None if sets is None else np.asarray(sets, dtype=object))


def write_pixel_error(path: str | Path, index: Sequence, keypoint_names: Sequence[str],
                      errors: np.ndarray, sets: Sequence[str] | None = None) -> None:
    """Per-keypoint pixel errors (N, K) (NaN where not labelled), LP layout."""
    errors = np.asarray(errors, float)
    if errors.shape != (len(index), len(keypoint_names)):
        raise ValueError(f"errors shape {errors.shape} != ({len(index)}, {len(keypoint_names)})")
    table = pd.DataFrame(errors, index=pd.Index([str(i) for i in index]),
                         columns=list(keypoint_names))
    if sets is not None:
        table["set"] = list(sets)
    with atomic_path(path) as tmp:
        table.to_csv(tmp)


def read_pixel_error(path: str | Path) -> tuple[list[str], list[str], np.ndarray,
                                                np.ndarray | None]:
    """(index, keypoint_names, errors (N, K), sets (N,) or None)."""
    try:
        table = pd.read_csv(path, index_col=0)
    except (OSError, ValueError) as err:
        raise ParallaxError(f"{path}: cannot read pixel-error CSV: {err}") from None
    sets = table.pop("set").to_numpy(dtype=object) if "set" in table.columns else None
    try:
        errors = table.to_numpy(float)
    except ValueError as err:
        raise ParallaxError(f"{path}: non-numeric pixel errors: {err}") from None
    return [str(i) for i in table.index], [str(c) for c in table.columns], errors, sets


def pose_3d_table(keypoint_names: Sequence[str], points_3d: np.ndarray, reproj_error: np.ndarray,
                  n_views: np.ndarray, score: np.ndarray,
                  extra_columns: Mapping[str, Sequence] | None = None) -> pd.DataFrame:
    """The anipose pose-3d table: points_3d (N, K, 3), reproj_error, n_views, score (N, K)."""
    points_3d = np.asarray(points_3d, float)
    n, k = points_3d.shape[:2]
    if len(keypoint_names) != k:
        raise ValueError(f"{len(keypoint_names)} keypoint names for {k} keypoints")
    values = {"error": reproj_error, "ncams": n_views, "score": score}
    for name, value in values.items():
        if np.shape(value) != (n, k):
            raise ValueError(f"{name} shape {np.shape(value)} != ({n}, {k})")
    columns: dict[str, np.ndarray] = {}
    for j, kp in enumerate(keypoint_names):
        for axis, suffix in enumerate("xyz"):
            columns[f"{kp}_{suffix}"] = points_3d[:, j, axis]
        columns[f"{kp}_error"] = np.asarray(reproj_error, float)[:, j]
        columns[f"{kp}_ncams"] = np.asarray(n_views).astype(int)[:, j]
        columns[f"{kp}_score"] = np.asarray(score, float)[:, j]
    eye = np.eye(3)
    for r in range(3):
        for c in range(3):
            columns[f"M_{r}{c}"] = np.full(n, eye[r, c])
    for axis in range(3):
        columns[f"center_{axis}"] = np.zeros(n)
    columns["fnum"] = np.arange(n)
    for name, value in (extra_columns or {}).items():
        if len(value) != n:
            raise ValueError(f"extra column '{name}' has {len(value)} values for {n} rows")
        columns[name] = list(value)
    return pd.DataFrame(columns)


def write_pose_3d(path: str | Path, keypoint_names: Sequence[str], points_3d: np.ndarray,
                  reproj_error: np.ndarray, n_views: np.ndarray, score: np.ndarray,
                  extra_columns: Mapping[str, Sequence] | None = None) -> None:
    """Write `pose_3d_table(...)` atomically."""
    table = pose_3d_table(keypoint_names, points_3d, reproj_error, n_views, score,
                          extra_columns)
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)


def read_pose_3d(path: str | Path) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray,
                                            np.ndarray, pd.DataFrame]:
    """(keypoint_names, points_3d (N, K, 3), error, ncams, score (N, K), other columns).

    Keypoints are the `<kp>_x` columns (in order) that have all six fields; the other columns
    (M_*, center_*, fnum, frame, set, ...) come back as a DataFrame.
    """
    try:
        table = pd.read_csv(path)
    except (OSError, ValueError) as err:
        raise ParallaxError(f"{path}: cannot read pose-3d CSV: {err}") from None
    names = [c[:-2] for c in table.columns if c.endswith("_x")
             and all(f"{c[:-2]}_{f}" in table.columns for f in POSE_3D_FIELDS)]
    if not names:
        raise ParallaxError(f"{path}: no keypoint columns <kp>_x, _y, _z, _error, _ncams, _score")
    try:
        def field(name: str) -> np.ndarray:
            return table[[f"{kp}_{name}" for kp in names]].to_numpy(float)

        points = np.stack([field(axis) for axis in "xyz"], axis=-1)
        error, ncams, score = field("error"), field("ncams"), field("score")
    except ValueError as err:
        raise ParallaxError(f"{path}: non-numeric pose-3d values: {err}") from None
    used = {f"{kp}_{f}" for kp in names for f in POSE_3D_FIELDS}
    rest = table[[c for c in table.columns if c not in used]]
    return names, points, error, ncams.astype(int), score, rest


__all__ = ["pose_3d_table", "read_pixel_error", "read_pose_3d", "read_predictions_2d",
           "write_pixel_error", "write_pose_3d", "write_predictions_2d"]
