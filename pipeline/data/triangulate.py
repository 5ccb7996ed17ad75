"""Triangulation of a labelled multi-view dataset, one calibration's frames at a time.

Labels outside their camera's image (beyond half a pixel of the border) are counted and reported
with an example CSV line; labels further out than one image size (a wrong unit, a sentinel
value, a bbox mix-up) cannot be clicks on that image and are left out of the 3D (their error is
still measured, so outliers.csv lists them). Reprojection errors come from
`CameraGroup.reprojection_error`: computed without overflow, a non-finite one is NaN, never inf.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core.errors import ParallaxError
from pipeline.data.paths import relative_path
from pipeline.data.project import MultiviewLabels, frame_keys
from pipeline.geometry.cameras import CameraGroup
from pipeline.io.calibration_toml import read_calibration

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelTriangulation:
    """3D of every labelled frame, in calibration units.

    points_3d: (frames, keypoints, 3), NaN where fewer than `min_views` views labelled the point
    reproj_error: (views, frames, keypoints) pixels, NaN where the view has no label or no 3D
    n_views: (frames, keypoints) number of views whose labels were used
    calibrated: (frames,) whether a calibration file was found for the frame
    outside: (views, frames, keypoints) labels outside their camera's image
    left_out: (views, frames, keypoints) labels further out than one image size, not used
    """

    points_3d: np.ndarray
    reproj_error: np.ndarray
    n_views: np.ndarray
    calibrated: np.ndarray
    outside: np.ndarray | None = None
    left_out: np.ndarray | None = None


def image_bounds(labels: MultiviewLabels, groups: dict[str, CameraGroup]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(outside, far): (views, frames, keypoints) labels outside their camera's `size`, and
    further out than one image size (frames without calibration: neither)."""
    outside = np.zeros(labels.points_2d.shape[:3], bool)
    far = outside.copy()
    for path, group in groups.items():
        frames = labels.calibration_files == path
        size = np.array([cam.size for cam in group.cameras], float)[:, None, None, :]
        xy = labels.points_2d[:, frames]
        with np.errstate(invalid="ignore"):
            outside[:, frames] = ((xy < -0.5) | (xy > size - 0.5)).any(-1)
            far[:, frames] = ((xy < -size) | (xy > 2 * size)).any(-1)
    return outside, far


def load_calibrations(labels: MultiviewLabels, required: bool = True) -> dict[str, CameraGroup]:
    """Every calibration file the dataset's frames use (path -> cameras, checked against the view
    names). No calibration at all is an error when `required`, else a warning and {}."""
    files = sorted({path for path in labels.calibration_files if path})
    if not files and not required:
        log.warning("no frame has a calibration: no 3D")
        return {}
    if not files:
        raise ParallaxError(
            f"{labels.data_dir}: no calibration found for any labelled frame; expected "
            "calibrations/<session>.toml or calibration.toml (or data.camera_params_file)"
        )
    missing = int(np.sum(labels.calibration_files == ""))
    if missing:
        log.warning("%d of %d frames have no calibration: no 3D", missing, labels.n_frames)
    return {path: read_calibration(Path(path), view_names=labels.view_names) for path in files}


def triangulate_labels(
    labels: MultiviewLabels,
    groups: dict[str, CameraGroup],
    *,
    min_views: int = 2,
    view_weights: np.ndarray | None = None,
) -> LabelTriangulation:
    """Triangulate every labelled keypoint with its frame's calibration.

    view_weights: optional (views,) weights; a zero leaves that camera out of the triangulation
    (its reprojection error is still measured, which is how leave-one-out validation works).
    """
    n_views, n_frames, n_kp = labels.points_2d.shape[:3]
    points_3d = np.full((n_frames, n_kp, 3), np.nan)
    used = np.zeros((n_frames, n_kp), dtype=int)
    reproj = np.full((n_views, n_frames, n_kp), np.nan)
    outside, far = image_bounds(labels, groups)
    for path, group in groups.items():
        frames = np.flatnonzero(labels.calibration_files == path)
        observed = labels.points_2d[:, frames]
        used_2d = np.where(far[:, frames, :, None], np.nan, observed)  # far labels: missing
        weights = None
        if view_weights is not None:
            finite = np.isfinite(used_2d).all(axis=-1)
            weights = np.where(finite, np.asarray(view_weights, float)[:, None, None], 0.0)
        result = group.triangulate(used_2d, weights=weights, min_views=min_views)
        points_3d[frames] = result.points_3d
        used[frames] = result.n_views
        # measured against every label, the far ones included (outliers.csv lists them)
        reproj[:, frames] = group.reprojection_error(result.points_3d, observed)
    return LabelTriangulation(
        points_3d=points_3d,
        reproj_error=reproj,
        n_views=used,
        calibrated=labels.calibration_files != "",
        outside=outside,
        left_out=far,
    )


def view_counts(labels: MultiviewLabels) -> np.ndarray:
    """(frames, keypoints) number of views that labelled each keypoint."""
    return np.isfinite(labels.points_2d).all(axis=-1).sum(axis=0)


def points_table(labels: MultiviewLabels, tri: LabelTriangulation) -> pd.DataFrame:
    """One row per frame: image, session, calibration, then per keypoint x, y, z, error, ncams."""
    errors = tri.reproj_error if tri.left_out is None else np.where(tri.left_out, np.nan,
                                                                     tri.reproj_error)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices stay NaN
        mean_error = np.nanmean(errors, axis=0)  # over the views used
    columns: dict[str, np.ndarray | list] = {
        "image": frame_keys(labels),
        "session": list(labels.sessions),
        "calibration": [relative_path(p, labels.data_dir) if p else ""
                        for p in labels.calibration_files],
    }
    for k, name in enumerate(labels.keypoint_names):
        for axis, suffix in enumerate("xyz"):
            columns[f"{name}_{suffix}"] = tri.points_3d[:, k, axis]
        columns[f"{name}_error"] = mean_error[:, k]
        columns[f"{name}_ncams"] = tri.n_views[:, k]
    return pd.DataFrame(columns)


def outliers_table(
    labels: MultiviewLabels, tri: LabelTriangulation, threshold: float
) -> pd.DataFrame:
    """Labels reprojecting further than `threshold` px from their 3D point, worst first."""
    view, frame, kp = np.nonzero(np.nan_to_num(tri.reproj_error, nan=-1.0) > threshold)
    keys = np.asarray(frame_keys(labels), dtype=object)
    table = pd.DataFrame(
        {
            "image": keys[frame],
            "view": np.asarray(labels.view_names, dtype=object)[view],
            "keypoint": np.asarray(labels.keypoint_names, dtype=object)[kp],
            "reprojection_px": tri.reproj_error[view, frame, kp],
            "label_x": labels.points_2d[view, frame, kp, 0],
            "label_y": labels.points_2d[view, frame, kp, 1],
            "ncams": tri.n_views[frame, kp],
        }
    )
    return table.sort_values("reprojection_px", ascending=False, kind="stable")


def outside_report(labels: MultiviewLabels, tri: LabelTriangulation) -> dict:
    """Count of labels outside their image (and of those left out of the 3D), with the
    farthest one as an example `<csv> line <n>` (for the log and summary.json)."""
    outside = np.zeros(labels.points_2d.shape[:3], bool) if tri.outside is None else tri.outside
    far = np.zeros_like(outside) if tri.left_out is None else tri.left_out
    report = {"count": int(outside.sum()), "left_out_of_3d": int(far.sum()), "example": None,
              "explained": "labels outside their camera's image (calibration size); those "
                           "further out than one image size are left out of the 3D"}
    if outside.any():
        flat = labels.points_2d[outside]
        view, frame, kp = np.argwhere(outside)[int(np.argmax(np.abs(flat).max(-1)))]
        x, y = labels.points_2d[view, frame, kp]
        report["example"] = (f"{labels.where(view, frame)}: view '{labels.view_names[view]}' "
                             f"keypoint '{labels.keypoint_names[kp]}' at ({x:.6g}, {y:.6g}) "
                             f"in '{labels.image_paths[view, frame]}'")
    return report


def _median(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(np.median(finite)) if finite.size else None


def summarize(labels: MultiviewLabels, tri: LabelTriangulation, min_views: int,
              n_outliers: int, threshold: float) -> dict:
    """Counts and median reprojection errors per view and per keypoint."""
    counts = view_counts(labels)
    calibrated = tri.calibrated[:, None]
    return {
        "frames": int(labels.n_frames),
        "frames_without_calibration": int((~tri.calibrated).sum()),
        "keypoints": list(labels.keypoint_names),
        "views": list(labels.view_names),
        "labelled_points": int(np.isfinite(labels.points_2d).all(axis=-1).sum()),
        "triangulated": int(np.isfinite(tri.points_3d).all(axis=-1).sum()),
        "too_few_views": int(((counts > 0) & (counts < min_views) & calibrated).sum()),
        "too_few_views_explained": f"keypoints labelled in 1..{min_views - 1} views: no 3D",
        "unlabelled": int((counts == 0).sum()),
        "no_calibration": int(((counts > 0) & ~calibrated).sum()),
        "median_reprojection_px": _median(tri.reproj_error),
        "median_reprojection_px_per_view": {
            view: _median(tri.reproj_error[v]) for v, view in enumerate(labels.view_names)
        },
        "median_reprojection_px_per_keypoint": {
            kp: _median(tri.reproj_error[:, :, k]) for k, kp in enumerate(labels.keypoint_names)
        },
        "outlier_threshold_px": threshold,
        "outliers": n_outliers,
        "labels_outside_image": outside_report(labels, tri),
        "units": "calibration units (as in calibration.toml translation)",
    }
