"""Predictions that agree in 3D: robust triangulation of the network's 2D predictions and the
rule that replaces a view's prediction by the reprojection of the others' 3D point.

Per frame and keypoint (all of them at once, no loops over frames, keypoints or views):
1. candidate views: a finite prediction with confidence >= `min_confidence` (and always the two
   most confident finite views, so that a keypoint seen by >= 2 views gets a 3D point);
2. hypotheses: the 3D point of every pair of candidate views (two-view DLT on undistorted
   coordinates); each is scored over all candidate views by the truncated squared reprojection
   error (MSAC cost: min(e², t²), t = `outlier_px`), and the best pair wins (a RANSAC that tries
   every pair: at most 28 for 8 views);
3. refinement: the confidence-weighted N-view DLT of the winning pair's inliers (candidate views
   whose reprojection error is below t), its reprojection into every view;
4. the final prediction of a view is that reprojection where the view's own confidence is below
   `min_confidence`, its prediction is missing, or it lies further than t from the reprojection;
   elsewhere it is the network's own output. Without a consensus point (fewer than `min_views`
   views agree) the network's output stays.

t is in *model pixels* (the network's input resolution, where its accuracy is set: a heatmap
cell is 2**downsample_factor of them) and converted to frame pixels per view and frame with the
scale of `frame_from_model`, so one threshold serves any camera resolution.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np

from pipeline.core.errors import ParallaxError
from pipeline.geometry.cameras import CameraGroup
from pipeline.geometry.dlt import triangulate_dlt_normalized

#: points per block (frames x keypoints) of the pair hypotheses, to bound memory
BLOCK = 4096


@dataclass(frozen=True)
class ConsensusSettings:
    """`prediction.consensus.*`: min_confidence in [0, 1], outlier_px in model pixels."""

    min_confidence: float = 0.5
    outlier_px: float = 6.0
    min_views: int = 2

    def __post_init__(self) -> None:
        if not 0 <= self.min_confidence <= 1 or not self.outlier_px > 0 or self.min_views < 2:
            raise ParallaxError(
                f"prediction.consensus: min_confidence must be in [0, 1] (got "
                f"{self.min_confidence}), outlier_px > 0 (got {self.outlier_px}) and "
                f"triangulation.min_views >= 2 (got {self.min_views})")


@dataclass(frozen=True)
class Consensus:
    """3D-consistent predictions of V views, N frames, K keypoints.

    points_3d (N, K, 3): the consensus point, NaN with fewer than min_views views
    reprojected (V, N, K, 2): its projection in every view, frame px
    final (V, N, K, 2): the predictions to use (see the module docstring)
    replaced (V, N, K): where final is the reprojection instead of the network's output
    inlier (V, N, K): views that made the consensus point
    reproj_error (V, N, K): distance from each inlier view's prediction to the reprojection,
        frame px (NaN for views that did not take part)
    n_views (N, K): inlier views; score (N, K): their mean confidence
    """

    points_3d: np.ndarray
    reprojected: np.ndarray
    final: np.ndarray
    replaced: np.ndarray
    inlier: np.ndarray
    reproj_error: np.ndarray
    n_views: np.ndarray
    score: np.ndarray

    @property
    def mean_error(self) -> np.ndarray:
        """(N, K) mean reprojection error over the inlier views (NaN without 3D)."""
        used = np.isfinite(self.reproj_error)
        total = np.where(used, self.reproj_error, 0.0).sum(axis=0)
        count = used.sum(axis=0)
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def extrinsics(group: CameraGroup) -> np.ndarray:
    """(V, 3, 4) [R|t] of the cameras."""
    return np.stack([cam.extrinsic for cam in group.cameras])


def frame_scale(frame_from_model: np.ndarray) -> np.ndarray:
    """(..., 2, 3) affines -> (...) frame pixels per model pixel (sqrt of |det|)."""
    return np.sqrt(np.abs(np.linalg.det(np.asarray(frame_from_model, float)[..., :2])))


def _candidates(points: np.ndarray, confidence: np.ndarray, min_confidence: float
                ) -> np.ndarray:
    """(V, M) views that may take part: confident ones, plus the two most confident."""
    finite = np.isfinite(points).all(-1) & np.isfinite(confidence)
    conf = np.where(finite, confidence, -np.inf)
    order = np.argsort(-conf, axis=0, kind="stable")
    top2 = np.zeros_like(finite)
    np.put_along_axis(top2, order[:2], True, axis=0)
    return finite & ((confidence >= min_confidence) | top2)


def _best_pair(normalized: np.ndarray, points: np.ndarray, weights: np.ndarray,
               candidate: np.ndarray, group: CameraGroup, threshold: np.ndarray) -> np.ndarray:
    """(V, M) inliers of the best pair hypothesis (MSAC) for a block of M points."""
    n_views, m = candidate.shape
    pairs = np.array(list(combinations(range(n_views), 2)))  # (P, 2)
    choose = np.zeros((n_views, len(pairs)), bool)
    choose[pairs[:, 0], np.arange(len(pairs))] = True
    choose[pairs[:, 1], np.arange(len(pairs))] = True
    pair_w = np.where(choose[:, :, None] & candidate[:, None], weights[:, None], 0.0)  # (V,P,M)
    tiled = np.broadcast_to(normalized[:, None], (n_views, len(pairs), m, 2))
    hypotheses = triangulate_dlt_normalized(tiled.reshape(n_views, -1, 2),
                                            extrinsics(group),
                                            pair_w.reshape(n_views, -1))  # (P·M, 3)
    errors = np.linalg.norm(group.project(hypotheses).reshape(n_views, len(pairs), m, 2)
                            - points[:, None], axis=-1)  # (V, P, M)
    limit = threshold[:, None]
    cost = np.where(candidate[:, None], np.minimum(np.nan_to_num(errors, nan=np.inf), limit)
                    ** 2, 0.0).sum(0)  # (P, M)
    cost = np.where(np.isfinite(hypotheses).all(-1).reshape(len(pairs), m), cost, np.inf)
    best = np.argmin(cost, axis=0)  # (M,)
    chosen = np.take_along_axis(errors, best[None, None], axis=1)[:, 0]  # (V, M)
    with np.errstate(invalid="ignore"):
        return candidate & (chosen < threshold)


def consensus(points: np.ndarray, confidence: np.ndarray, group: CameraGroup,
              px_per_model_px: np.ndarray | float = 1.0,
              settings: ConsensusSettings | None = None) -> Consensus:
    """Robust 3D of predictions and the 3D-consistent 2D (see the module docstring).

    points: (V, N, K, 2) frame px (NaN = no prediction); confidence: (V, N, K) in [0, 1];
    px_per_model_px: frame pixels per model pixel, scalar or broadcastable to (V, N, K)
    (`frame_scale` of each prediction's frame_from_model).
    """
    settings = settings or ConsensusSettings()
    points = np.asarray(points, float)
    confidence = np.asarray(confidence, float)
    n_views = len(group)
    if points.shape[:-1] != confidence.shape or points.shape[0] != n_views:
        raise ValueError(f"points {points.shape} / confidence {confidence.shape} do not match "
                         f"{n_views} cameras")
    lead = points.shape[1:-1]
    flat = points.reshape(n_views, -1, 2)
    conf = confidence.reshape(n_views, -1)
    threshold = settings.outlier_px * np.broadcast_to(
        np.asarray(px_per_model_px, float), confidence.shape).reshape(n_views, -1)
    candidate = _candidates(flat, conf, settings.min_confidence)
    weights = np.where(candidate, np.maximum(conf, 1e-3), 0.0)
    normalized = group.undistort(np.where(candidate[..., None], flat, np.nan))
    inlier = np.zeros_like(candidate)
    for start in range(0, flat.shape[1], BLOCK):
        cols = slice(start, start + BLOCK)
        inlier[:, cols] = _best_pair(normalized[:, cols], flat[:, cols], weights[:, cols],
                                     candidate[:, cols], group, threshold[:, cols])
    # fewer than min_views views agree on a point (e.g. every pair disagrees with the others):
    # no consensus, the network's predictions stay
    use = inlier & (inlier.sum(0) >= settings.min_views)[None]
    points_3d = triangulate_dlt_normalized(normalized, extrinsics(group),
                                           np.where(use, weights, 0.0), settings.min_views)
    reprojected = group.project(points_3d)  # (V, M, 2)
    distance = np.linalg.norm(flat - reprojected, axis=-1)
    has_3d = np.isfinite(reprojected).all(-1)
    with np.errstate(invalid="ignore"):
        replaced = has_3d & (~np.isfinite(distance) | (conf < settings.min_confidence)
                             | (distance > threshold))
    final = np.where(replaced[..., None], reprojected, flat)
    used = use & np.isfinite(points_3d).all(-1)[None]
    count = used.sum(0)
    score = np.where(count > 0, np.where(used, conf, 0.0).sum(0) / np.maximum(count, 1), np.nan)
    shape_v = (n_views, *lead)
    return Consensus(
        points_3d=points_3d.reshape(*lead, 3),
        reprojected=reprojected.reshape(*shape_v, 2),
        final=final.reshape(*shape_v, 2),
        replaced=replaced.reshape(shape_v),
        inlier=used.reshape(shape_v),
        reproj_error=np.where(used, distance, np.nan).reshape(shape_v),
        n_views=count.reshape(lead),
        score=score.reshape(lead),
    )
