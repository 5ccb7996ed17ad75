"""Triangulation of a labelled multi-view dataset, one calibration's frames at a time."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.cameras import CameraGroup
from pipeline.dataset import MultiviewLabels
from pipeline.errors import ParallaxError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelTriangulation:
    """3D of every labelled frame, in calibration units.

    points_3d: (frames, keypoints, 3), NaN where fewer than `min_views` views labelled the point
    reproj_error: (views, frames, keypoints) pixels, NaN where the view has no label or no 3D
    n_views: (frames, keypoints) number of views whose labels were used
    calibrated: (frames,) whether a calibration file was found for the frame
    """

    points_3d: np.ndarray
    reproj_error: np.ndarray
    n_views: np.ndarray
    calibrated: np.ndarray


def load_calibrations(labels: MultiviewLabels) -> dict[str, CameraGroup]:
    """Load every calibration file the dataset's frames use, cameras checked against view names."""
    files = sorted({path for path in labels.calibration_files if path})
    if not files:
        raise ParallaxError(
            f"{labels.data_dir}: no calibration found for any labelled frame; expected "
            "calibrations/<session>.toml or calibration.toml (or data.camera_params_file)"
        )
    missing = int(np.sum(labels.calibration_files == ""))
    if missing:
        log.warning("%d of %d frames have no calibration: no 3D", missing, labels.n_frames)
    return {path: CameraGroup.load(Path(path), view_names=labels.view_names) for path in files}


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
    for path, group in groups.items():
        frames = np.flatnonzero(labels.calibration_files == path)
        observed = labels.points_2d[:, frames]
        weights = None
        if view_weights is not None:
            finite = np.isfinite(observed).all(axis=-1)
            weights = np.where(finite, np.asarray(view_weights, float)[:, None, None], 0.0)
        result = group.triangulate(observed, weights=weights, min_views=min_views)
        points_3d[frames] = result.points_3d
        used[frames] = result.n_views
        reproj[:, frames] = group.reprojection_error(result.points_3d, observed)
    return LabelTriangulation(
        points_3d=points_3d,
        reproj_error=reproj,
        n_views=used,
        calibrated=labels.calibration_files != "",
    )


def view_counts(labels: MultiviewLabels) -> np.ndarray:
    """(frames, keypoints) number of views that labelled each keypoint."""
    return np.isfinite(labels.points_2d).all(axis=-1).sum(axis=0)
