"""Predict every labelled frame (and, for view dropout, the test frames with each view blanked
in turn), make the predictions agree in 3D (`pipeline.inference.consensus`) and tabulate the
errors."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline.data.images import frame_from_image, read_image
from pipeline.data.project import MultiviewLabels
from pipeline.data.triangulate import load_calibrations
from pipeline.inference.consensus import ConsensusSettings, consensus, frame_scale
from pipeline.inference.ensemble import Ensemble, combine, predict_members
from pipeline.inference.predictor import prepare_views

log = logging.getLogger(__name__)


def load_frame(labels: MultiviewLabels, frame: int,
               size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One labelled frame's model images (V, H, W, 3) and frame_from_model (V, 2, 3)."""
    images = [read_image(labels.data_dir / p) for p in labels.image_paths[:, frame]]
    if labels.bboxes is None:
        return prepare_views(images, None, size)
    return prepare_views(images, labels.bboxes[:, frame], size,
                         image_to_frame=frame_from_image(labels, frame, images))


@dataclass(frozen=True)
class LabeledPredictions:
    """The network's predictions of every labelled frame (an ensemble's: the members' mean).

    points (V, N, K, 2) frame px, confidence (V, N, K), scale (V, N) frame px per model px;
    variance (V, N, K, 2) px² across ensemble members (None for one model), member_points
    (M, V, N, K, 2) and member_confidence (M, V, N, K); dropout_points (B, V, N_d, K, 2) and
    dropout_confidence (B, V, N_d, K): the dropout frames with view b blanked (B = V, or 0
    without view dropout).
    """

    points: np.ndarray
    confidence: np.ndarray
    scale: np.ndarray
    variance: np.ndarray | None
    member_points: np.ndarray
    member_confidence: np.ndarray
    dropout_points: np.ndarray
    dropout_confidence: np.ndarray


def predict_frames(ensemble: Ensemble, labels: MultiviewLabels, dropout: np.ndarray,
                   batch_size: int, threads: int, view_dropout: bool) -> LabeledPredictions:
    """Predict every frame with every member, a batch of frames at a time; dropout: (N,) bool,
    the frames of the view-dropout runs."""
    n, v, k, m = labels.n_frames, labels.n_views, labels.n_keypoints, len(ensemble)
    size = ensemble.first.image_size
    points, confidence = np.full((m, n, v, k, 2), np.nan), np.full((m, n, v, k), np.nan)
    scale = np.full((n, v), np.nan)
    blanked = np.full((v if view_dropout else 0, n, v, k, 2), np.nan)
    blanked_conf = np.full((v if view_dropout else 0, n, v, k), np.nan)
    eye = np.eye(v, dtype=bool)
    starts = range(0, n, batch_size)
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for start in tqdm(starts, desc="predict", unit="batch", disable=None):
            frames = np.arange(start, min(start + batch_size, n))
            loaded_frames = list(pool.map(lambda f: load_frame(labels, int(f), size), frames))
            images = np.stack([item[0] for item in loaded_frames])  # (b, V, H, W, 3)
            to_frame = np.stack([item[1] for item in loaded_frames])  # (b, V, 2, 3)
            scale[frames] = frame_scale(to_frame)
            points[:, frames], confidence[:, frames] = predict_members(
                ensemble, images, to_frame, batch_size=batch_size)
            chosen = np.flatnonzero(dropout[frames])
            if view_dropout and chosen.size:
                # every chosen frame once per blanked view, in one batched call: (V·c, V, ...)
                reps = np.repeat(chosen[None], v, axis=0).ravel()
                mask = np.repeat(eye, chosen.size, axis=0)
                xy, conf, _ = combine(*predict_members(ensemble, images[reps], to_frame[reps],
                                                       blank_mask=mask, batch_size=batch_size))
                blanked[:, frames[chosen]] = xy.reshape(v, chosen.size, v, k, 2)
                blanked_conf[:, frames[chosen]] = conf.reshape(v, chosen.size, v, k)
    member_points, member_conf = points.swapaxes(1, 2), confidence.swapaxes(1, 2)
    mean, conf, variance = combine(member_points, member_conf)
    return LabeledPredictions(
        points=mean, confidence=conf, scale=scale.T, variance=variance,
        member_points=member_points, member_confidence=member_conf,
        dropout_points=blanked[:, dropout].transpose(0, 2, 1, 3, 4),
        dropout_confidence=blanked_conf[:, dropout].transpose(0, 2, 1, 3))


def pixel_errors(points: np.ndarray, labels_2d: np.ndarray) -> np.ndarray:
    """(..., 2) predictions and labels (NaN = unlabelled) -> (...) distances, NaN unlabelled."""
    return np.linalg.norm(points - labels_2d, axis=-1)


def consensus_all(labels: MultiviewLabels, points: np.ndarray, confidence: np.ndarray,
                  scale: np.ndarray, settings: ConsensusSettings,
                  frames: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """3D-consistent predictions of the labelled frames `frames` (default all), per calibration.

    points (V, F, K, 2), confidence (V, F, K), scale (V, F) of those frames. Returns points_3d
    (F, K, 3), error, n_views, score (F, K) and final (V, F, K, 2), replaced (V, F, K); frames
    without calibration keep the network's predictions and have no 3D.
    """
    frames = np.arange(labels.n_frames) if frames is None else np.asarray(frames)
    f, k = len(frames), labels.n_keypoints
    out = {"points_3d": np.full((f, k, 3), np.nan), "error": np.full((f, k), np.nan),
           "n_views": np.zeros((f, k), int), "score": np.full((f, k), np.nan),
           "final": np.array(points, float), "replaced": np.zeros(points.shape[:-1], bool)}
    calibration = labels.calibration_files[frames]
    for path, group in load_calibrations(labels, required=False).items():
        rows = np.flatnonzero(calibration == path)
        if not rows.size:
            continue
        agreed = consensus(points[:, rows], confidence[:, rows], group,
                           scale[:, rows, None], settings)
        out["points_3d"][rows] = agreed.points_3d
        out["error"][rows] = agreed.mean_error
        out["n_views"][rows] = agreed.n_views
        out["score"][rows] = agreed.score
        out["final"][:, rows] = agreed.final
        out["replaced"][:, rows] = agreed.replaced
    return out


def error_3d_table(keys: Sequence[str], sets: np.ndarray, keypoint_names: Sequence[str],
                   tri: dict[str, np.ndarray], truth: np.ndarray) -> pd.DataFrame:
    """Long table frame x keypoint: error_3d, reprojection_error_px, n_views."""
    n, k = truth.shape[:2]
    frame, kp = np.divmod(np.arange(n * k), k)
    return pd.DataFrame({
        "frame": np.asarray(keys, dtype=object)[frame],
        "set": sets[frame],
        "keypoint": np.asarray(keypoint_names, dtype=object)[kp],
        "error_3d": np.linalg.norm(tri["points_3d"] - truth, axis=-1).ravel(),
        "reprojection_error_px": tri["error"].ravel(),
        "n_views": tri["n_views"].ravel(),
    })


def dropout_table(errors: np.ndarray, names: Sequence[str], view_names: Sequence[str],
                  keypoint_names: Sequence[str], set_name: str) -> pd.DataFrame:
    """errors (B, V, N, K) px (B = blanked runs named `names`) -> the long view_dropout table."""
    b, v, _, k = errors.shape
    finite = np.isfinite(errors)
    count = finite.sum(axis=2)  # (B, V, K)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # unlabelled everywhere -> NaN
        mean, median = np.nanmean(errors, axis=2), np.nanmedian(errors, axis=2)
    blank, view, kp = (idx.ravel() for idx in np.indices((b, v, k)))
    return pd.DataFrame({
        "blanked_view": np.asarray(names, dtype=object)[blank],
        "view": np.asarray(view_names, dtype=object)[view],
        "keypoint": np.asarray(keypoint_names, dtype=object)[kp],
        "set": set_name, "n": count.ravel(), "mean_px": mean.ravel(),
        "median_px": median.ravel(),
    })


def dropout_frames(sets: np.ndarray) -> tuple[str, np.ndarray]:
    """The set used for view dropout (test, else val) and its frame mask."""
    for name in ("test", "val"):
        if (sets == name).any():
            return name, sets == name
    log.warning("no test or val frames: view_dropout.csv will be empty")
    return "test", np.zeros(sets.shape, bool)


def nan_median(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(np.median(finite)) if finite.size else float("nan")
