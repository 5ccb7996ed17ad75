"""Read and cross-check every input of the `evaluate` stage (formats: README.md, "Stages"; "Shared
output formats"), aligned to the labelled dataset: views in `data.view_names` order, frames in
label-CSV order, keypoints in label order.

Every mismatch (a view's predictions missing, other keypoints, frames that are not the labelled
frames, a `set` that contradicts splits.csv, an unknown view in view_dropout.csv) is a
ParallaxError naming the file. Rows are never dropped silently.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core.errors import ParallaxError
from pipeline.data.project import MultiviewLabels, frame_keys
from pipeline.data.splits import read_splits
from pipeline.data.tables import read_points_3d
from pipeline.data.triangulate import load_calibrations
from pipeline.geometry.cameras import CameraGroup
from pipeline.io.predictions_csv import read_pixel_error, read_pose_3d, read_predictions_2d

log = logging.getLogger(__name__)

ERROR_3D_COLUMNS = ("frame", "set", "keypoint", "error_3d", "reprojection_error_px", "n_views")
DROPOUT_COLUMNS = ("blanked_view", "view", "keypoint", "set", "n", "mean_px", "median_px")


@dataclass(frozen=True)
class EvalInputs:
    """Everything `evaluate` reads, aligned to the dataset.

    sets: (frames,) train | val | test (splits.csv)
    pred_2d: (views, frames, keypoints, 2) frame px, the final (3D-consistent) predictions;
    confidence: (views, frames, keypoints); raw_2d: the network's own predictions
    pixel_error_file, raw_pixel_error_file: (views, frames, keypoints) the predict stage's pixel
    errors (cross-check)
    pred_3d, gt_3d: (frames, keypoints, 3) calibration units
    error_3d_file: (frames, keypoints) the predict stage's 3D errors (cross-check)
    view_dropout: the view_dropout.csv rows of the final predictions (raw_view_dropout: of the
    raw ones); training: metrics.csv (maybe without rows)
    groups: calibration path -> cameras, for every calibration the frames use ({} if none)
    """

    labels: MultiviewLabels
    sets: np.ndarray
    pred_2d: np.ndarray
    confidence: np.ndarray
    pixel_error_file: np.ndarray
    raw_2d: np.ndarray
    raw_pixel_error_file: np.ndarray
    pred_3d: np.ndarray
    gt_3d: np.ndarray
    error_3d_file: np.ndarray
    view_dropout: pd.DataFrame
    raw_view_dropout: pd.DataFrame
    training: pd.DataFrame
    groups: dict[str, CameraGroup]

    def raw(self) -> EvalInputs:
        """The same inputs with the network's raw predictions in place of the final ones."""
        return replace(self, pred_2d=self.raw_2d, pixel_error_file=self.raw_pixel_error_file,
                       view_dropout=self.raw_view_dropout)


def align_rows(path: Path, index: Sequence[str], expected: Sequence[str], what: str) -> np.ndarray:
    """Row order that puts `index` (a file's row keys) in `expected` order; both must hold the
    same keys exactly once."""
    index = [str(i) for i in index]
    position = {key: row for row, key in enumerate(index)}
    if len(position) != len(index):
        dupes = sorted({k for k in index if index.count(k) > 1})
        raise ParallaxError(f"{path}: {len(dupes)} {what} listed twice, first '{dupes[0]}'")
    missing = [key for key in expected if key not in position]
    if missing:
        raise ParallaxError(f"{path}: no row for {len(missing)} of the {len(expected)} labelled "
                            f"{what}, first '{missing[0]}'; rerun the predict stage")
    extra = sorted(set(index) - set(expected))
    if extra:
        raise ParallaxError(f"{path}: {len(extra)} rows are not labelled {what}, first "
                            f"'{extra[0]}'; rerun the predict stage")
    return np.array([position[key] for key in expected], dtype=int)


def check_keypoints(path: Path, found: Sequence[str], expected: Sequence[str]) -> None:
    if list(found) != list(expected):
        raise ParallaxError(f"{path}: keypoints {list(found)} do not match the labels' keypoints "
                            f"{list(expected)} (same names in the same order needed)")


def check_sets(path: Path, found: np.ndarray | None, order: np.ndarray, sets: np.ndarray) -> None:
    if found is None:
        return
    found = np.asarray(found, dtype=object)[order]
    bad = np.flatnonzero(found != sets)
    if bad.size:
        raise ParallaxError(f"{path}: the 'set' of {bad.size} frames differs from splits.csv "
                            f"(first frame row {int(bad[0]) + 1}: '{found[bad[0]]}' vs "
                            f"'{sets[bad[0]]}'); rerun the predict stage")


def read_view_predictions(pred_dir: Path, labels: MultiviewLabels, sets: np.ndarray,
                          kind: str = ""):
    """(pred_2d, confidence, pixel_error_file) from predictions_<view><kind>[_pixel_error].csv
    (kind "" = the final predictions, "_raw" = the network's own)."""
    points, confidence, errors = [], [], []
    for v, view in enumerate(labels.view_names):
        expected = [str(k) for k in labels.image_paths[v]]
        path = pred_dir / f"predictions_{view}{kind}.csv"
        if not path.is_file():
            raise ParallaxError(f"{path}: predictions of view '{view}' not found")
        index, names, pts, conf, found_sets = read_predictions_2d(path)
        check_keypoints(path, names, labels.keypoint_names)
        order = align_rows(path, index, expected, "frames")
        check_sets(path, found_sets, order, sets)
        points.append(pts[order])
        confidence.append(conf[order])
        path = pred_dir / f"predictions_{view}{kind}_pixel_error.csv"
        if not path.is_file():
            raise ParallaxError(f"{path}: pixel errors of view '{view}' not found")
        index, names, err, found_sets = read_pixel_error(path)
        check_keypoints(path, names, labels.keypoint_names)
        order = align_rows(path, index, expected, "frames")
        check_sets(path, found_sets, order, sets)
        errors.append(err[order])
    return np.stack(points), np.stack(confidence), np.stack(errors)


def read_pred_3d(path: Path, labels: MultiviewLabels, sets: np.ndarray) -> np.ndarray:
    """(frames, keypoints, 3) from predictions_3d.csv, rows matched by its `frame` column."""
    if not path.is_file():
        raise ParallaxError(f"{path}: 3D predictions not found")
    names, points, _, _, _, rest = read_pose_3d(path)
    check_keypoints(path, names, labels.keypoint_names)
    if "frame" not in rest.columns:
        raise ParallaxError(f"{path}: no 'frame' column (the frame key of the first view)")
    order = align_rows(path, rest["frame"].astype(str).tolist(),
                       [str(k) for k in labels.image_paths[0]], "frames")
    check_sets(path, rest["set"].to_numpy(object) if "set" in rest.columns else None, order, sets)
    return points[order]


def read_table(path: Path, columns: Sequence[str], what: str) -> pd.DataFrame:
    if not path.is_file():
        raise ParallaxError(f"{path}: {what} not found")
    try:
        table = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        table = pd.DataFrame(columns=list(columns))
    except (OSError, ValueError) as err:
        raise ParallaxError(f"{path}: cannot read {what}: {err}") from None
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ParallaxError(f"{path}: {what} lacks column(s) {missing} (found "
                            f"{list(table.columns)})")
    return table


def read_error_3d(path: Path, labels: MultiviewLabels) -> np.ndarray:
    """(frames, keypoints) error_3d from the long error_3d.csv (NaN where not listed)."""
    table = read_table(path, ERROR_3D_COLUMNS, "3D error table")
    frames = {str(k): i for i, k in enumerate(labels.image_paths[0])}
    kps = {k: i for i, k in enumerate(labels.keypoint_names)}
    f = table["frame"].astype(str).map(frames)
    k = table["keypoint"].astype(str).map(kps)
    for column, idx in (("frame", f), ("keypoint", k)):
        if idx.isna().any():
            row = int(np.flatnonzero(idx.isna())[0])
            raise ParallaxError(f"{path}: line {row + 2}: unknown {column} "
                                f"'{table[column].iloc[row]}'")
    out = np.full((labels.n_frames, labels.n_keypoints), np.nan)
    out[f.to_numpy(int), k.to_numpy(int)] = pd.to_numeric(table["error_3d"],
                                                          errors="coerce").to_numpy(float)
    return out


def read_view_dropout(path: Path, labels: MultiviewLabels) -> pd.DataFrame:
    """view_dropout.csv, checked; a table without a `predictions` column is all final."""
    table = read_table(path, DROPOUT_COLUMNS, "view-dropout table")
    if "predictions" not in table.columns:
        table.insert(0, "predictions", "final")
    bad = ~table["predictions"].isin(["final", "raw"])
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ParallaxError(f"{path}: line {row + 2}: predictions "
                            f"'{table['predictions'].iloc[row]}' is not final or raw")
    table["blanked_view"] = table["blanked_view"].astype(str)
    table["view"] = table["view"].astype(str)
    for column, allowed in (("blanked_view", {*labels.view_names, "none"}),
                            ("view", set(labels.view_names))):
        bad = ~table[column].isin(allowed)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ParallaxError(f"{path}: line {row + 2}: {column} '{table[column].iloc[row]}' "
                                f"is not one of {sorted(allowed)}")
    return table


def read_training_metrics(path: Path) -> pd.DataFrame:
    """metrics.csv of the train stage (a table with a `step` column; may have no rows)."""
    return read_table(path, ("step",), "training metrics")



def load_inputs(labels: MultiviewLabels, pred_dir: Path, labels_3d: Path, splits: Path,
                metrics_csv: Path) -> EvalInputs:
    """Read every input of `evaluate` (see the module docstring)."""
    pred_dir = Path(pred_dir)
    sets = read_splits(splits, frame_keys(labels))
    pred_2d, confidence, pixel_error = read_view_predictions(pred_dir, labels, sets)
    raw_2d, _, raw_pixel_error = read_view_predictions(pred_dir, labels, sets, "_raw")
    dropout = read_view_dropout(pred_dir / "view_dropout.csv", labels)
    if not Path(labels_3d).is_file():
        raise ParallaxError(f"{labels_3d}: ground-truth 3D (labels_3d.csv) not found")
    return EvalInputs(
        labels=labels,
        sets=sets,
        pred_2d=pred_2d,
        confidence=confidence,
        pixel_error_file=pixel_error,
        raw_2d=raw_2d,
        raw_pixel_error_file=raw_pixel_error,
        pred_3d=read_pred_3d(pred_dir / "predictions_3d.csv", labels, sets),
        gt_3d=read_points_3d(Path(labels_3d), labels),
        error_3d_file=read_error_3d(pred_dir / "error_3d.csv", labels),
        view_dropout=dropout[dropout["predictions"] == "final"],
        raw_view_dropout=dropout[dropout["predictions"] == "raw"],
        training=read_training_metrics(Path(metrics_csv)),
        groups=load_calibrations(labels, required=False),
    )
