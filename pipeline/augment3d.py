"""3D augmentation math: move the animal in 3D, keep the cameras, warp each view to match.

For a labelled frame with triangulated keypoints X (K, 3):
1. draw a scale s ~ U(scale_range), a shift u ~ U(-1, 1)^3 and optionally a rotation about the
   world vertical axis, from a generator seeded by (seed, frame, copy) only, so a sample does not
   depend on iteration order;
2. X' = m + R·s·(X − m) + u·translate_frac·extent, m = the median keypoint, extent = per-axis
   range of the scaled pose;
3. project X and X' into every view; fit per view the 2D similarity S (4 DOF, exact least squares)
   taking the projections of X to those of X'. Every triangulated keypoint takes part, so a view
   where the user clicked fewer than 3 keypoints still gets a warp (LP issue #396);
4. the view's image is warped by S; its labels become the projections of X' (3D-consistent by
   construction) and differ from S·(click) only by the fit residual, which is returned.
Pixel convention everywhere: integer coordinates are pixel centres (OpenCV's).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AugmentConfig:
    """`augmentation.*` config values."""

    copies_per_frame: int = 2
    scale_range: tuple[float, float] = (0.8, 1.2)
    translate_frac: float = 0.25
    rotate_deg: float = 0.0
    vertical_axis: tuple[float, float, float] = (0.0, 0.0, 1.0)


@dataclass(frozen=True)
class AugmentParams:
    scale: float
    shift: np.ndarray  # (3,) in [-1, 1], times translate_frac * extent
    rotation_deg: float


def sample_params(seed: int, frame: int, copy: int, cfg: AugmentConfig) -> AugmentParams:
    """The augmentation of copy `copy` of frame `frame`, independent of everything else."""
    rng = np.random.default_rng(np.random.SeedSequence((seed, frame, copy)))
    scale = rng.uniform(*cfg.scale_range)
    shift = rng.uniform(-1.0, 1.0, 3)
    rotation = rng.uniform(-cfg.rotate_deg, cfg.rotate_deg) if cfg.rotate_deg > 0 else 0.0
    return AugmentParams(scale=float(scale), shift=shift, rotation_deg=float(rotation))


def axis_rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    """(3, 3) rotation by `degrees` about `axis` (Rodrigues formula)."""
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    theta = np.deg2rad(degrees)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(theta) * cross + (1 - np.cos(theta)) * cross @ cross


def augment_points(points_3d: np.ndarray, params: AugmentParams, cfg: AugmentConfig) -> np.ndarray:
    """(K, 3) pose (NaN = missing) -> (K, 3) moved pose (NaN stays NaN)."""
    center = np.nanmedian(points_3d, axis=0)
    rot = axis_rotation(np.asarray(cfg.vertical_axis), params.rotation_deg)
    moved = (points_3d - center) @ (params.scale * rot).T
    extent = np.nanmax(moved, axis=0) - np.nanmin(moved, axis=0)
    return moved + center + params.shift * cfg.translate_frac * extent


def fit_similarity(src: np.ndarray, dst: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Least-squares 2D similarities, one per leading index.

    src, dst: (V, N, 2) corresponding points; valid: (V, N) bool, >= 2 per row.
    Returns (V, 2, 3) matrices [[a, -b, tx], [b, a, ty]] with dst ≈ A @ [src, 1].
    """
    w = valid.astype(float)[..., None]
    count = w.sum(axis=1)  # (V, 1)
    src0 = np.where(valid[..., None], src, 0.0)
    dst0 = np.where(valid[..., None], dst, 0.0)
    mean_s = src0.sum(axis=1) / count
    mean_d = dst0.sum(axis=1) / count
    s = (src0 - mean_s[:, None]) * w
    d = (dst0 - mean_d[:, None]) * w
    norm = (s**2).sum(axis=(1, 2))
    a = (s * d).sum(axis=(1, 2)) / norm
    b = (s[..., 0] * d[..., 1] - s[..., 1] * d[..., 0]).sum(axis=1) / norm
    linear = np.stack([np.stack([a, -b], -1), np.stack([b, a], -1)], axis=1)  # (V, 2, 2)
    shift = mean_d - np.einsum("vij,vj->vi", linear, mean_s)
    return np.concatenate([linear, shift[..., None]], axis=2)


def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(..., 2, 3) affine applied to (..., N, 2) points."""
    return np.einsum("...ij,...nj->...ni", matrix[..., :2], points) + matrix[..., None, :, 2]


def compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """The affine `outer ∘ inner` (both (..., 2, 3))."""
    linear = outer[..., :2] @ inner[..., :2]
    shift = np.einsum("...ij,...j->...i", outer[..., :2], inner[..., 2]) + outer[..., 2]
    return np.concatenate([linear, shift[..., None]], axis=-1)


def invert(matrix: np.ndarray) -> np.ndarray:
    """Inverse of (..., 2, 3) affines."""
    linear = np.linalg.inv(matrix[..., :2])
    return np.concatenate([linear, -np.einsum("...ij,...j->...i", linear, matrix[..., 2])[
        ..., None]], axis=-1)


def model_from_frame(boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize affines taking each box of frame pixels onto the (H, W) model image.

    boxes: (..., 4) x, y, h, w (LP bbox order); size: (height, width). Pixel centres map
    exactly: x_model = (x_frame − x + 0.5)·W/w − 0.5.
    """
    height, width = size
    x, y, h, w = np.moveaxis(np.asarray(boxes, float), -1, 0)
    sx, sy = width / w, height / h
    zero = np.zeros_like(sx)
    rows = [np.stack([sx, zero, (0.5 - x) * sx - 0.5], -1),
            np.stack([zero, sy, (0.5 - y) * sy - 0.5], -1)]
    return np.stack(rows, axis=-2)


def inside(points: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(..., 2) model pixels inside the (H, W) image (pixel-centre convention)."""
    height, width = size
    return ((points >= -0.5) & (points < np.array([width - 0.5, height - 0.5]))).all(-1)
