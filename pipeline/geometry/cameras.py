"""Calibrated cameras: projection, undistortion, triangulation (file I/O is in
`pipeline.io.calibration_toml`).

Conventions (anipose calibration.toml): OpenCV world->camera, x_cam = R @ X + t, R from the
Rodrigues vector `rvec`; frame pixels with the origin at the centre of the top-left pixel.
Shapes: 2D points are (views, ..., 2) in frame pixels, 3D points (..., 3) in calibration
units; NaN marks a missing value and propagates (NaN in -> NaN out), never raises.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from pipeline.core.errors import ParallaxError
from pipeline.geometry import distortion
from pipeline.geometry.dlt import dlt_basis, solve_dlt

log = logging.getLogger(__name__)


def rodrigues(rvec: np.ndarray) -> np.ndarray:
    """Rotation matrices (..., 3, 3) from Rodrigues vectors (..., 3) (axis * angle)."""
    rvec = np.asarray(rvec, dtype=float)
    theta = np.linalg.norm(rvec, axis=-1)[..., None, None]
    kx, ky, kz = np.moveaxis(rvec, -1, 0)
    zero = np.zeros_like(kx)
    cross = np.stack([zero, -kz, ky, kz, zero, -kx, -ky, kx, zero], -1)
    cross = cross.reshape(rvec.shape[:-1] + (3, 3))  # [r]x, not normalized
    small = theta < 1e-6
    t2 = np.where(small, 1.0, theta * theta)
    with np.errstate(invalid="ignore", divide="ignore"):
        a = np.where(small, 1.0 - theta**2 / 6.0, np.sin(theta) / np.where(small, 1.0, theta))
        b = np.where(small, 0.5 - theta**2 / 24.0, (1.0 - np.cos(theta)) / t2)
    return np.eye(3) + a * cross + b * (cross @ cross)


def _check_camera(cam: Camera, ctx: str) -> None:
    K, dist = cam.matrix, cam.dist
    for key, arr, shape in (("matrix", K, (3, 3)), ("rotation", cam.rvec, (3,)),
                            ("translation", cam.tvec, (3,))):
        if arr.shape != shape:
            raise ParallaxError(f"{ctx}: '{key}' has shape {arr.shape}, expected {shape}")
    allowed = (4,) if cam.fisheye else (4, 5, 8)
    if dist.ndim != 1 or dist.size not in allowed:
        model = "fisheye" if cam.fisheye else "pinhole"
        raise ParallaxError(
            f"{ctx}: 'distortions' has {dist.size} values, expected "
            f"{' or '.join(map(str, allowed))} for the {model} model"
        )
    for key, arr in (("matrix", K), ("distortions", dist), ("rotation", cam.rvec),
                     ("translation", cam.tvec)):
        if not np.isfinite(arr).all():
            raise ParallaxError(f"{ctx}: '{key}' has non-finite values {arr.tolist()}")
    if not np.array_equal(K[2], [0.0, 0.0, 1.0]):
        raise ParallaxError(f"{ctx}: K third row is {K[2].tolist()}, expected [0, 0, 1]")
    if not (K[0, 0] > 0 and K[1, 1] > 0):
        raise ParallaxError(f"{ctx}: focal lengths fx={K[0, 0]:g}, fy={K[1, 1]:g} must be > 0")
    if K[1, 0] != 0:
        raise ParallaxError(f"{ctx}: K[1][0] is {K[1, 0]:g}, expected 0")
    size = cam.size
    if not (isinstance(size, tuple) and len(size) == 2
            and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
        raise ParallaxError(f"{ctx}: 'size' must be [width, height] positive integers, got {size}")


def _frozen(value: Any) -> np.ndarray:
    arr = np.array(value, dtype=float)
    arr.flags.writeable = False
    return arr


@dataclass(frozen=True)
class Camera:
    """One calibrated camera (anipose/OpenCV conventions).

    size: (width, height) pixels; matrix: (3, 3) K; dist: (n,) OpenCV order, n in {4, 5, 8}
    (k1 k2 p1 p2 [k3 [k4 k5 k6]]) for the pinhole model, exactly 4 (k1..k4) when `fisheye`;
    rvec: (3,) Rodrigues world->camera; tvec: (3,) world->camera in calibration units.
    The skew K[0, 1] is applied if non-zero (OpenCV's pinhole projectPoints ignores it).
    """

    name: str
    size: tuple[int, int]
    matrix: np.ndarray
    dist: np.ndarray
    rvec: np.ndarray
    tvec: np.ndarray
    fisheye: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ParallaxError(f"camera name must be a non-empty string, got {self.name!r}")
        size = tuple(self.size) if isinstance(self.size, list | tuple | np.ndarray) else self.size
        size = tuple(int(s) if isinstance(s, np.integer) else s for s in size)
        object.__setattr__(self, "size", size)
        for key in ("matrix", "dist", "rvec", "tvec"):
            object.__setattr__(self, key, _frozen(getattr(self, key)))
        object.__setattr__(self, "fisheye", bool(self.fisheye))
        _check_camera(self, f"camera '{self.name}'")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Camera):
            return NotImplemented
        keys = ("name", "size", "fisheye")
        return all(getattr(self, k) == getattr(other, k) for k in keys) and all(
            np.array_equal(getattr(self, k), getattr(other, k))
            for k in ("matrix", "dist", "rvec", "tvec")
        )

    def __hash__(self) -> int:
        return hash((self.name, self.size, self.fisheye, self.matrix.tobytes(),
                     self.dist.tobytes(), self.rvec.tobytes(), self.tvec.tobytes()))

    @cached_property
    def R(self) -> np.ndarray:
        """(3, 3) world->camera rotation."""
        return rodrigues(self.rvec)

    @property
    def center(self) -> np.ndarray:
        """(3,) camera centre in world coordinates, -R^T t."""
        return -self.R.T @ self.tvec

    @property
    def extrinsic(self) -> np.ndarray:
        """(3, 4) [R | t]."""
        return np.concatenate([self.R, self.tvec[:, None]], axis=1)

    @cached_property
    def _group(self) -> CameraGroup:
        return CameraGroup(cameras=(self,), metadata={})

    def project(self, points_3d: np.ndarray) -> np.ndarray:
        """(..., 3) world points -> (..., 2) frame pixels, with distortion."""
        return self._group.project(points_3d)[0]

    def distort(self, normalized: np.ndarray) -> np.ndarray:
        """(..., 2) ideal normalized coordinates -> (..., 2) frame pixels."""
        return self._group._distort(np.asarray(normalized, dtype=float)[None])[0]

    def undistort(self, points_2d: np.ndarray) -> np.ndarray:
        """(..., 2) frame pixels -> (..., 2) ideal normalized coordinates (x/z, y/z)."""
        return self._group.undistort(np.asarray(points_2d, dtype=float)[None])[0]





@dataclass(frozen=True)
class Triangulation:
    """points_3d (..., 3): NaN where fewer than min_views views (weight > 0) saw the point or the
    views are degenerate; reproj_error (views, ...) pixels, NaN where the view has no observation
    or the point is NaN; n_views (...,) int: views with an observation and weight > 0."""

    points_3d: np.ndarray
    reproj_error: np.ndarray
    n_views: np.ndarray


@dataclass(frozen=True)
class CameraGroup:
    """Cameras in view order plus the calibration's [metadata] table."""

    cameras: tuple[Camera, ...]
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        cams = tuple(self.cameras)
        object.__setattr__(self, "cameras", cams)
        object.__setattr__(self, "metadata", dict(self.metadata or {}))
        if not cams or not all(isinstance(c, Camera) for c in cams):
            raise ParallaxError("a camera group needs at least one Camera")
        names = [c.name for c in cams]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ParallaxError(f"duplicate camera name(s) {dupes} in {names}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.cameras)

    def __len__(self) -> int:
        return len(self.cameras)

    def __getitem__(self, key: int | str) -> Camera:
        if isinstance(key, str):
            for cam in self.cameras:
                if cam.name == key:
                    return cam
            raise KeyError(f"no camera named {key!r}; cameras are {list(self.names)}")
        return self.cameras[key]



    def subset(self, names: Sequence[str]) -> CameraGroup:
        """The cameras `names`, in that order."""
        missing = [n for n in names if n not in self.names]
        if missing:
            raise ParallaxError(f"no camera(s) {missing}; cameras are {list(self.names)}")
        return CameraGroup(cameras=tuple(self[n] for n in names), metadata=self.metadata)

    # ---------------------------------------------------------------- geometry
    @cached_property
    def _stack(self) -> dict[str, Any]:
        cams = self.cameras
        rot = rodrigues(np.stack([c.rvec for c in cams]))
        tvec = np.stack([c.tvec for c in cams])
        out: dict[str, Any] = {
            "R": rot, "t": tvec, "K": np.stack([c.matrix for c in cams]),
            "extrinsics": np.concatenate([rot, tvec[:, :, None]], axis=2),
        }
        fish = np.array([c.fisheye for c in cams])
        pin = np.zeros((len(cams), 8))
        fcoef = np.zeros((len(cams), 4))
        for i, c in enumerate(cams):
            (fcoef if c.fisheye else pin)[i, : c.dist.size] = c.dist
        models = []
        for mask, coeffs, fwd, inv in ((~fish, pin, distortion.pinhole_distort,
                                        distortion.pinhole_undistort),
                                       (fish, fcoef, distortion.fisheye_distort,
                                        distortion.fisheye_undistort)):
            if mask.any():
                rows = slice(None) if mask.all() else np.flatnonzero(mask)
                models.append((rows, coeffs[mask][:, None, :], fwd, inv))
        out["models"] = models
        return out

    def _distort(self, normalized: np.ndarray) -> np.ndarray:
        """(V, ..., 2) ideal normalized -> (V, ..., 2) frame pixels."""
        flat = normalized.reshape(len(self), -1, 2)
        return self._pixels(flat[..., 0], flat[..., 1]).reshape(normalized.shape)

    def _pixels(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Ideal normalized x, y (V, M) -> (V, M, 2) frame pixels."""
        xd, yd = np.empty(x.shape), np.empty(x.shape)
        for rows, coeffs, fwd, _ in self._stack["models"]:
            xd[rows], yd[rows] = distortion.blockwise(fwd, x[rows], y[rows], coeffs)
        K = self._stack["K"]
        out = np.empty(x.shape + (2,))
        u, v = out[..., 0], out[..., 1]
        np.multiply(xd, K[:, 0, 0, None], out=u)
        u += K[:, 0, 2, None]
        if np.any(K[:, 0, 1]):
            u += K[:, 0, 1, None] * yd
        np.multiply(yd, K[:, 1, 1, None], out=v)
        v += K[:, 1, 2, None]
        return out

    def _check_2d(self, points_2d: np.ndarray) -> np.ndarray:
        pts = np.asarray(points_2d, dtype=float)
        if pts.ndim < 2 or pts.shape[0] != len(self) or pts.shape[-1] != 2:
            raise ValueError(f"expected points of shape ({len(self)}, ..., 2), got {pts.shape}")
        return pts

    def project(self, points_3d: np.ndarray) -> np.ndarray:
        """(..., 3) world points -> (views, ..., 2) frame pixels."""
        pts = np.asarray(points_3d, dtype=float)
        if pts.shape[-1:] != (3,):
            raise ValueError(f"expected points of shape (..., 3), got {pts.shape}")
        flat = pts.reshape(-1, 3)
        st = self._stack
        cam = np.matmul(st["R"], flat.T)  # (V, 3, N)
        cam += st["t"][:, :, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            x = cam[:, 0] / cam[:, 2]
            y = cam[:, 1] / cam[:, 2]
        return self._pixels(x, y).reshape((len(self),) + pts.shape[:-1] + (2,))

    def undistort(self, points_2d: np.ndarray) -> np.ndarray:
        """(views, ..., 2) frame pixels -> (views, ..., 2) ideal normalized coordinates."""
        pts = self._check_2d(points_2d)
        return np.stack(self._normalized(pts.reshape(len(self), -1, 2)), -1).reshape(pts.shape)

    def _normalized(self, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(V, M, 2) frame pixels -> ideal normalized x, y, each (V, M)."""
        K = self._stack["K"]
        yd = flat[..., 1] - K[:, 1, 2, None]
        yd /= K[:, 1, 1, None]
        xd = flat[..., 0] - K[:, 0, 2, None]
        if np.any(K[:, 0, 1]):
            xd -= K[:, 0, 1, None] * yd
        xd /= K[:, 0, 0, None]
        x, y = np.empty(xd.shape), np.empty(xd.shape)
        for rows, coeffs, _, inv in self._stack["models"]:
            x[rows], y[rows] = distortion.blockwise(inv, xd[rows], yd[rows], coeffs)
        return x, y

    def triangulate(
        self, points_2d: np.ndarray, weights: np.ndarray | None = None, min_views: int = 2
    ) -> Triangulation:
        """Linear N-view DLT of (views, ..., 2) frame pixels (NaN = missing).

        weights: optional (views, ...) >= 0 scaling each view's equations (0 = ignore the view).
        """
        pts = self._check_2d(points_2d)
        V, lead = len(self), pts.shape[1:-1]
        w = None
        if weights is not None:
            w = np.asarray(weights, dtype=float)
            if w.shape != pts.shape[:-1]:
                raise ValueError(f"weights shape {w.shape} != points shape {pts.shape[:-1]}")
            w = w.reshape(V, -1)
        if min_views < 2:
            raise ValueError(f"min_views must be >= 2, got {min_views}")
        flat = pts.reshape(V, -1, 2)
        n = flat.shape[1]
        points, n_views = np.empty((n, 3)), np.empty(n, dtype=int)
        reproj = np.empty((V, n))
        basis = dlt_basis(self._stack["extrinsics"])
        # cache blocking: all steps on a few thousand points at a time (2-3x faster than whole
        # arrays of 100k points, whose temporaries spill out of the CPU cache)
        step = max(256, distortion.BLOCK // V)
        for start in range(0, n, step):
            cols = slice(start, start + step)
            x, y = self._normalized(flat[:, cols])
            points[cols], n_views[cols] = solve_dlt(
                x, y, basis, None if w is None else w[:, cols], min_views
            )
            reproj[:, cols] = self.reprojection_error(points[cols], flat[:, cols])
        return Triangulation(
            points_3d=points.reshape(lead + (3,)),
            reproj_error=reproj.reshape((V,) + lead),
            n_views=n_views.reshape(lead),
        )

    def reprojection_error(self, points_3d: np.ndarray, points_2d: np.ndarray) -> np.ndarray:
        """(..., 3) and (views, ..., 2) -> (views, ...) pixel distance: NaN if either is missing
        or the distance is not finite (a label at 1e308), never inf."""
        with np.errstate(invalid="ignore", over="ignore"):
            diff = self.project(points_3d) - self._check_2d(points_2d)
            dist = np.hypot(diff[..., 0], diff[..., 1])  # no overflow for far-off points
        return np.where(np.isfinite(dist), dist, np.nan)
