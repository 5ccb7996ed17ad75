"""Tables of the 3D smoother (stage smooth_video); its inputs, per-view predictions with
optional ensemble variances (x_var, y_var), are read by `predictions_csv.read_predictions_table`.

- smoothed pose-3d: the anipose table of `predictions_csv.pose_3d_table` plus a `<kp>_std`
  column after each `<kp>_score` (posterior standard deviation, calibration units: the root of
  the posterior variances summed over x, y, z, i.e. the expected 3D error). `read_pose_3d` reads
  it (the `_std` columns come back among the other columns).
- labelled 3D (`labels_3d.csv` of triangulate_labels): `<kp>_x, _y, _z` per keypoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core.atomic import atomic_path
from pipeline.core.errors import ParallaxError
from pipeline.io.predictions_csv import pose_3d_table


def smoothed_pose_3d_table(keypoint_names: Sequence[str], points_3d: np.ndarray,
                           std: np.ndarray, reproj_error: np.ndarray, n_views: np.ndarray,
                           score: np.ndarray) -> pd.DataFrame:
    """`pose_3d_table` with a `<kp>_std` column (std (N, K)) after each `<kp>_score`."""
    table = pose_3d_table(keypoint_names, points_3d, reproj_error, n_views, score)
    std = np.asarray(std, float)
    if std.shape != np.shape(score):
        raise ValueError(f"std shape {std.shape} != {np.shape(score)}")
    order: list[str] = []
    for column in table.columns:
        order.append(column)
        if column.endswith("_score") and column[:-6] in keypoint_names:
            order.append(f"{column[:-6]}_std")
    extra = {f"{kp}_std": std[:, k] for k, kp in enumerate(keypoint_names)}
    return pd.concat([table, pd.DataFrame(extra)], axis=1)[order]


def write_smoothed_3d(path: str | Path, keypoint_names: Sequence[str], points_3d: np.ndarray,
                      std: np.ndarray, reproj_error: np.ndarray, n_views: np.ndarray,
                      score: np.ndarray) -> None:
    """Write `smoothed_pose_3d_table(...)` atomically (NaN = empty cell)."""
    table = smoothed_pose_3d_table(keypoint_names, points_3d, std, reproj_error, n_views, score)
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)


def read_labelled_3d(path: str | Path, keypoint_names: Sequence[str]) -> np.ndarray:
    """(frames, K, 3) from a table with `<kp>_x, _y, _z` columns (labels_3d.csv)."""
    try:
        table = pd.read_csv(path)
    except FileNotFoundError:
        raise ParallaxError(f"{path}: labelled 3D CSV not found") from None
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise ParallaxError(f"{path}: cannot read labelled 3D CSV: {err}") from None
    columns = [f"{kp}_{axis}" for kp in keypoint_names for axis in "xyz"]
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ParallaxError(f"{path}: missing column(s) {missing[:3]} (expected <kp>_x, _y, _z "
                            "for the predicted keypoints)")
    try:
        return table[columns].to_numpy(float).reshape(len(table), len(keypoint_names), 3)
    except ValueError as err:
        raise ParallaxError(f"{path}: non-numeric 3D coordinates: {err}") from None


__all__ = ["read_labelled_3d",
           "smoothed_pose_3d_table", "write_smoothed_3d"]
