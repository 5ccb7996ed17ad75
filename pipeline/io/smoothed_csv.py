"""Tables of the 3D smoother (stage smooth_video): its inputs with ensemble variances and its
3D output.

- per-view predictions: the DLC 3-header-row CSV of `predictions_csv` (index = frame), coords
  x, y, likelihood per keypoint and optionally x_var, y_var (ensemble variance, px²; every
  keypoint or none). Trailing plain columns (e.g. `set`) are ignored.
- smoothed pose-3d: the anipose table of `predictions_csv.pose_3d_table` plus a `<kp>_std`
  column after each `<kp>_score` (posterior standard deviation, calibration units: the root of
  the posterior variances summed over x, y, z, i.e. the expected 3D error). `read_pose_3d` reads
  it (the `_std` columns come back among the other columns).
- labelled 3D (`labels_3d.csv` of triangulate_labels): `<kp>_x, _y, _z` per keypoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core.atomic import atomic_path
from pipeline.core.errors import ParallaxError
from pipeline.io.predictions_csv import pose_3d_table

PREDICTION_COORDS = ("x", "y", "likelihood", "x_var", "y_var")


@dataclass(frozen=True)
class ViewPredictions:
    """One view's predictions: points (N, K, 2) frame px, confidence (N, K), variance
    (N, K, 2) px² or None (no x_var / y_var columns)."""

    path: Path
    index: tuple[str, ...]
    keypoint_names: tuple[str, ...]
    points: np.ndarray
    confidence: np.ndarray
    variance: np.ndarray | None


def read_view_predictions(path: str | Path) -> ViewPredictions:
    """Read one view's predictions CSV; every problem is a ParallaxError naming the file."""
    path = Path(path)
    try:
        table = pd.read_csv(path, header=[0, 1, 2], index_col=0, dtype=str,
                            keep_default_na=False)
    except FileNotFoundError:
        raise ParallaxError(f"{path}: predictions CSV not found") from None
    except IsADirectoryError:
        raise ParallaxError(f"{path}: is a directory, expected a predictions CSV") from None
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as err:
        text = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ParallaxError(f"{path}: cannot read predictions CSV: {text}") from None
    if [str(n).strip() for n in table.columns.names] != ["scorer", "bodyparts", "coords"]:
        raise ParallaxError(f"{path}: expected 3 header rows starting 'scorer', 'bodyparts', "
                            f"'coords' (DLC layout), found {list(table.columns.names)}")
    columns: dict[str, dict[str, int]] = {}
    for col, (_, bodypart, coord) in enumerate(table.columns):
        bodypart, coord = str(bodypart).strip(), str(coord).strip()
        if coord.startswith("Unnamed") or not coord:
            continue  # a plain trailing column (e.g. `set`)
        if coord not in PREDICTION_COORDS or bodypart.startswith("Unnamed"):
            raise ParallaxError(f"{path}: column {col + 2} ({bodypart!r}, {coord!r}): expected "
                                f"a keypoint's {', '.join(PREDICTION_COORDS)}")
        if coord in columns.setdefault(bodypart, {}):
            raise ParallaxError(f"{path}: keypoint '{bodypart}' has two '{coord}' columns")
        columns[bodypart][coord] = col
    if not columns:
        raise ParallaxError(f"{path}: no keypoint columns in the header")
    for coords in (("x", "y", "likelihood"), ("x_var", "y_var")):
        have = [k for k, c in columns.items() if all(x in c for x in coords)]
        if coords[0] == "x" and len(have) < len(columns) or 0 < len(have) < len(columns):
            lacking = next(k for k in columns if k not in have)
            raise ParallaxError(f"{path}: keypoint '{lacking}' lacks a {' / '.join(coords)} "
                                f"column (every keypoint needs {', '.join(coords[:3])}"
                                f"{'' if coords[0] == 'x' else ' or none does'})")
    with_var = all("x_var" in c for c in columns.values())

    def numbers(coord: str) -> np.ndarray:
        cells = table.iloc[:, [c[coord] for c in columns.values()]]
        values = cells.apply(lambda s: pd.to_numeric(s.str.strip(), errors="coerce"))
        bad = (values.isna() & (cells.apply(lambda s: s.str.strip()) != "")).to_numpy()
        bad |= np.isinf(values.to_numpy(float))
        if bad.any():
            row, k = np.argwhere(bad)[0]
            raise ParallaxError(f"{path}: line {row + 4}, keypoint '{list(columns)[k]}' "
                                f"{coord}: '{cells.iat[row, k]}' is not a finite number")
        return values.to_numpy(float)

    points = np.stack([numbers("x"), numbers("y")], -1)
    variance = np.stack([numbers("x_var"), numbers("y_var")], -1) if with_var else None
    return ViewPredictions(path=path, index=tuple(str(i) for i in table.index),
                           keypoint_names=tuple(columns), points=points,
                           confidence=numbers("likelihood"), variance=variance)


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


__all__ = ["ViewPredictions", "read_labelled_3d", "read_view_predictions",
           "smoothed_pose_3d_table", "write_smoothed_3d"]
