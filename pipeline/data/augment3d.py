"""3D augmentation math: move the animal in 3D, keep the cameras, warp each view to match.

For a labelled frame with triangulated keypoints X (K, 3), NaN where not triangulated:
1. draw a scale s ~ U(scale_range), a shift u ~ U(-1, 1)^3 and, when `rotate_deg` > 0, an angle
   θ ~ U(-rotate_deg, rotate_deg) from a generator seeded by SeedSequence((seed, frame, copy)),
   so a sample never depends on iteration order or on the other frames;
2. X' = m + s·R_θ·(X − m) + u·translate_frac·extent, with m the per-axis median keypoint,
   R_θ the rotation about `vertical_axis` (through m) and extent the per-axis range of the
   scaled, rotated pose (LP's recipe, with the ranges from the config);
3. project X and X' (with distortion) into every view and fit per view the 2D similarity S
   (4 DOF: scale, rotation, shift; exact closed-form least squares, no RANSAC) that takes the
   projections of X onto those of X'. Every triangulated keypoint in front of the camera takes
   part, whether or not it was clicked in that view, so a view with fewer than 3 clicks still
   gets a warp (LP issue #396);
4. the view's image is warped by S. Its new labels are the projections of X' (consistent in 3D
   by construction); they differ from S·(original label) by the fit residual, because a
   perspective camera does not map a 3D similarity to a 2D one.

A view is "unfittable" when fewer than 2 keypoints project (in front of the camera) both before
and after the move, or they coincide; the caller then does not augment that copy.

Affines are (..., 2, 3) arrays `[A | b]` acting on column points: p' = A·p + b.
Pixel convention everywhere: integer coordinates are pixel centres (OpenCV's).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.geometry.cameras import CameraGroup


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


IDENTITY_PARAMS = AugmentParams(scale=1.0, shift=np.zeros(3), rotation_deg=0.0)


@dataclass(frozen=True)
class FrameAugmentation:
    """One augmented copy of a frame, before any image work."""

    params: AugmentParams
    moved: np.ndarray  # (K, 3) X', NaN where X is NaN
    before: np.ndarray  # (V, K, 2) projections of X, frame px
    after: np.ndarray  # (V, K, 2) projections of X', frame px; NaN behind the camera
    fit_points: np.ndarray  # (V, K) bool, the keypoints each view's fit used
    warp: np.ndarray  # (V, 2, 3) original frame px -> augmented frame px

    @property
    def fittable(self) -> bool:
        return bool(np.isfinite(self.warp).all())


def sample_params(seed: int, frame: int, copy: int, cfg: AugmentConfig) -> AugmentParams:
    """The augmentation of copy `copy` of frame `frame`, independent of everything else."""
    rng = np.random.default_rng(np.random.SeedSequence((seed, frame, copy)))
    scale = rng.uniform(*cfg.scale_range)
    shift = rng.uniform(-1.0, 1.0, 3)
    rotation = rng.uniform(-cfg.rotate_deg, cfg.rotate_deg) if cfg.rotate_deg > 0 else 0.0
    return AugmentParams(scale=float(scale), shift=shift, rotation_deg=float(rotation))


def axis_rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    """(3, 3) rotation by `degrees` about `axis` (right-hand rule, Rodrigues' formula)."""
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    theta = np.deg2rad(degrees)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(theta) * cross + (1 - np.cos(theta)) * cross @ cross


def augment_points(points_3d: np.ndarray, params: AugmentParams, cfg: AugmentConfig) -> np.ndarray:
    """(K, 3) pose (NaN = missing, >= 1 finite point) -> (K, 3) moved pose (NaN stays NaN)."""
    center = np.nanmedian(points_3d, axis=0)
    rot = axis_rotation(np.asarray(cfg.vertical_axis), params.rotation_deg)
    moved = (points_3d - center) @ (params.scale * rot).T
    extent = np.nanmax(moved, axis=0) - np.nanmin(moved, axis=0)
    return moved + center + params.shift * cfg.translate_frac * extent


def in_front(group: CameraGroup, points_3d: np.ndarray) -> np.ndarray:
    """(K, 3) world points -> (V, K) bool: strictly in front of each camera (z_cam > 0)."""
    depth = np.stack([(points_3d @ cam.R.T + cam.tvec)[:, 2] for cam in group.cameras])
    with np.errstate(invalid="ignore"):
        return depth > 0


def fit_similarity(src: np.ndarray, dst: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Least-squares 2D similarities, one per leading index (closed form).

    src, dst: (V, N, 2) corresponding points; valid: (V, N) bool. Minimises
    Σ |A·src + b − dst|² over A = [[a, −b], [b, a]] and the shift: with centred points
    s, d (about the valid points' means), a = Σ s·d / Σ|s|², b = Σ s×d / Σ|s|². Exact for 2
    points. Rows with < 2 valid points or no spread are NaN.
    Returns (V, 2, 3) [[a, −b, tx], [b, a, ty]] with dst ≈ A @ [src, 1].
    """
    valid = valid & np.isfinite(src).all(-1) & np.isfinite(dst).all(-1)
    w = valid.astype(float)[..., None]
    count = np.maximum(w.sum(axis=1), 1.0)  # (V, 1)
    src0 = np.where(valid[..., None], src, 0.0)
    dst0 = np.where(valid[..., None], dst, 0.0)
    mean_s = src0.sum(axis=1) / count
    mean_d = dst0.sum(axis=1) / count
    s = (src0 - mean_s[:, None]) * w
    d = (dst0 - mean_d[:, None]) * w
    norm = (s**2).sum(axis=(1, 2))
    scale_sq = np.maximum((mean_s**2).sum(-1), 1.0)
    ok = (valid.sum(axis=1) >= 2) & (norm > 1e-12 * scale_sq)
    norm = np.where(ok, norm, np.nan)
    a = (s * d).sum(axis=(1, 2)) / norm
    b = (s[..., 0] * d[..., 1] - s[..., 1] * d[..., 0]).sum(axis=1) / norm
    linear = np.stack([np.stack([a, -b], -1), np.stack([b, a], -1)], axis=1)  # (V, 2, 2)
    shift = mean_d - np.einsum("vij,vj->vi", linear, mean_s)
    return np.concatenate([linear, shift[..., None]], axis=2)


def augment_frame(pose: np.ndarray, group: CameraGroup, params: AugmentParams,
                  cfg: AugmentConfig) -> FrameAugmentation:
    """Move `pose` (K, 3) by `params`, project before/after into `group`, fit the warps."""
    moved = augment_points(pose, params, cfg)
    before, after = group.project(pose), group.project(moved)  # (V, K, 2)
    after = np.where(in_front(group, moved)[..., None], after, np.nan)
    before = np.where(in_front(group, pose)[..., None], before, np.nan)
    fit_points = np.isfinite(before).all(-1) & np.isfinite(after).all(-1)
    warp = fit_similarity(before, after, fit_points)
    return FrameAugmentation(params=params, moved=moved, before=before, after=after,
                             fit_points=fit_points, warp=warp)


def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(..., 2, 3) affine applied to (..., N, 2) points."""
    return np.einsum("...ij,...nj->...ni", matrix[..., :2], points) + matrix[..., None, :, 2]


def compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """The affine `outer ∘ inner` (both (..., 2, 3)): first inner, then outer."""
    linear = outer[..., :2] @ inner[..., :2]
    shift = np.einsum("...ij,...j->...i", outer[..., :2], inner[..., 2]) + outer[..., 2]
    return np.concatenate([linear, shift[..., None]], axis=-1)


def invert(matrix: np.ndarray) -> np.ndarray:
    """Inverse of (..., 2, 3) affines."""
    linear = np.linalg.inv(matrix[..., :2])
    shift = -np.einsum("...ij,...j->...i", linear, matrix[..., 2])
    return np.concatenate([linear, shift[..., None]], axis=-1)


def identity(n: int) -> np.ndarray:
    """(n, 2, 3) identity affines."""
    return np.broadcast_to(np.eye(2, 3), (n, 2, 3)).copy()


def model_from_frame(boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize affines taking each box of frame pixels onto the (H, W) model image.

    boxes: (..., 4) x, y, h, w (LP bbox order; the box covers frame pixels x .. x+w-1);
    size: (height, width). Pixel *edges* map onto pixel edges, so with centres at integers:
    x_model = (x_frame − x + 0.5)·W/w − 0.5, i.e. x_frame = (x_model + 0.5)·w/W − 0.5 + x.
    """
    height, width = size
    x, y, h, w = np.moveaxis(np.asarray(boxes, float), -1, 0)
    sx, sy = width / w, height / h
    zero = np.zeros_like(sx)
    rows = [np.stack([sx, zero, (0.5 - x) * sx - 0.5], -1),
            np.stack([zero, sy, (0.5 - y) * sy - 0.5], -1)]
    return np.stack(rows, axis=-2)


def inside(points: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(..., 2) model pixels inside the (H, W) image, i.e. within its pixel edges
    [−0.5, W − 0.5) × [−0.5, H − 0.5). NaN is outside."""
    height, width = size
    with np.errstate(invalid="ignore"):
        return ((points >= -0.5) & (points < np.array([width - 0.5, height - 0.5]))).all(-1)
