"""Calibrated cameras: anipose `calibration.toml` I/O, projection, undistortion, triangulation.

Conventions (docs/formats.md §4): OpenCV world->camera, x_cam = R @ X + t, R from the Rodrigues
vector `rvec`; frame pixels with the origin at the centre of the top-left pixel. Shapes: 2D
points are (views, ..., 2) in frame pixels, 3D points (..., 3) in calibration units; NaN marks
a missing value and propagates (NaN in -> NaN out), never raises.
"""

from __future__ import annotations

import logging
import math
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import distortion
from pipeline.errors import ParallaxError

log = logging.getLogger(__name__)

_CAM_KEY = re.compile(r"cam_(\d+)")


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


def _context(where: str, name: str) -> str:
    """'file.toml [cam_2]' + 'side' -> "file.toml: camera 'side' ([cam_2])"."""
    match = re.fullmatch(r"(.*) (\[[^\]]*\])", where)
    if match:
        return f"{match[1]}: camera '{name}' ({match[2]})"
    return f"{where}: camera '{name}'" if where else f"camera '{name}'"


def _numbers(value: Any, shape: tuple[int, ...], ctx: str, key: str) -> np.ndarray:
    """A nested list of finite numbers of exactly `shape`, as float64."""
    def ok(v: Any, dims: tuple[int, ...]) -> bool:
        if not dims:
            return isinstance(v, int | float) and not isinstance(v, bool)
        return isinstance(v, list) and len(v) == dims[0] and all(ok(e, dims[1:]) for e in v)

    if not ok(value, shape):
        text = repr(value)
        text = text if len(text) <= 120 else text[:117] + "..."
        want = " x ".join(map(str, shape))
        raise ParallaxError(f"{ctx}: '{key}' must be {want} numbers, got {text}")
    arr = np.array(value, dtype=float)
    if not np.isfinite(arr).all():
        raise ParallaxError(f"{ctx}: '{key}' has non-finite values {arr.tolist()}")
    return arr


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

    def to_dict(self) -> dict[str, Any]:
        """The anipose TOML table of this camera."""
        d: dict[str, Any] = {
            "name": self.name,
            "size": list(self.size),
            "matrix": self.matrix.tolist(),
            "distortions": self.dist.tolist(),
            "rotation": self.rvec.tolist(),
            "translation": self.tvec.tolist(),
        }
        if self.fisheye:
            d["fisheye"] = True
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, where: str) -> Camera:
        """A camera from its anipose TOML table; `where` ("file.toml [cam_2]") is for errors."""
        if not isinstance(d, dict):
            raise ParallaxError(f"{where}: expected a table, got {type(d).__name__}")
        name = d.get("name")
        ctx = _context(where, name if isinstance(name, str) else "?")
        if not isinstance(name, str) or not name:
            raise ParallaxError(f"{ctx}: 'name' must be a non-empty string, got {name!r}")
        missing = [k for k in ("size", "matrix", "distortions", "rotation", "translation")
                   if k not in d]
        if missing:
            raise ParallaxError(f"{ctx}: missing key(s) {', '.join(map(repr, missing))}")
        fisheye = d.get("fisheye", False)
        if not isinstance(fisheye, bool):
            raise ParallaxError(f"{ctx}: 'fisheye' must be true or false, got {fisheye!r}")
        size = d["size"]
        dist = d["distortions"]
        if not isinstance(dist, list):
            raise ParallaxError(f"{ctx}: 'distortions' must be a list of numbers, got {dist!r}")
        cam = dict(
            name=name, size=tuple(size) if isinstance(size, list) else size, fisheye=fisheye,
            matrix=_numbers(d["matrix"], (3, 3), ctx, "matrix"),
            dist=_numbers(dist, (len(dist),), ctx, "distortions"),
            rvec=_numbers(d["rotation"], (3,), ctx, "rotation"),
            tvec=_numbers(d["translation"], (3,), ctx, "translation"),
        )
        probe = object.__new__(cls)
        for key, value in cam.items():
            object.__setattr__(probe, key, value)
        _check_camera(probe, ctx)
        return cls(**cam)


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

    # ---------------------------------------------------------------- file I/O
    @classmethod
    def load(cls, path: str | Path, view_names: Sequence[str] | None = None) -> CameraGroup:
        """Read an anipose calibration.toml; cameras in numeric cam_N order, checked.

        With `view_names`, the camera names must equal them in the same order.
        """
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ParallaxError(f"{path}: calibration file not found") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ParallaxError(f"{path}: cannot read calibration file: {err}") from None
        except tomllib.TOMLDecodeError as err:
            raise ParallaxError(f"{path}: not valid TOML: {err}") from None
        keys = sorted((int(m[1]), k) for k in data if (m := _CAM_KEY.fullmatch(k)))
        if not keys:
            raise ParallaxError(f"{path}: no [cam_N] tables found (keys: {sorted(data)})")
        cameras = tuple(Camera.from_dict(data[k], where=f"{path} [{k}]") for _, k in keys)
        sections = {cam.name: [] for cam in cameras}
        for (_, key), cam in zip(keys, cameras, strict=True):
            sections[cam.name].append(f"[{key}]")
        for name, secs in sections.items():
            if len(secs) > 1:
                raise ParallaxError(
                    f"{path}: camera name '{name}' is used by {' and '.join(secs)}"
                )
        metadata = data.get("metadata", {})
        if not isinstance(metadata, dict):
            raise ParallaxError(f"{path}: [metadata] must be a table, got {metadata!r}")
        group = cls(cameras=cameras, metadata=metadata)
        if view_names is not None:
            group._check_views(path, list(view_names), dict(sections))
        return group

    def _check_views(self, path: Path, views: list[str], sections: dict[str, list[str]]) -> None:
        names = list(self.names)
        if names == views:
            return
        missing = [v for v in views if v not in names]
        extra = [f"'{n}' ({sections[n][0]})" for n in names if n not in views]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"no camera for view(s) {missing}")
            if extra:
                parts.append(f"camera(s) {', '.join(extra)} not in the view names")
            raise ParallaxError(
                f"{path}: {'; '.join(parts)} (cameras {names}, views {views}); camera names "
                "must equal the view names"
            )
        raise ParallaxError(
            f"{path}: cameras are in order {names} but the views are {views}; write the "
            "[cam_N] tables in view order (cameras are matched by name, never by position)"
        )

    def dump(self, path: str | Path) -> None:
        """Write anipose TOML ([cam_0] ... in order, then [metadata]) atomically, bit-exact."""
        from pipeline.io_utils import atomic_path

        chunks = [_toml_table(f"cam_{i}", cam.to_dict()) for i, cam in enumerate(self.cameras)]
        chunks.append(_toml_table("metadata", self.metadata))
        with atomic_path(path) as tmp:
            tmp.write_text("\n".join(chunks), encoding="utf-8")

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
        basis = _dlt_basis(self._stack["extrinsics"])
        # cache blocking: all steps on a few thousand points at a time (2-3x faster than whole
        # arrays of 100k points, whose temporaries spill out of the CPU cache)
        step = max(256, distortion.BLOCK // V)
        for start in range(0, n, step):
            cols = slice(start, start + step)
            x, y = self._normalized(flat[:, cols])
            points[cols], n_views[cols] = _dlt(
                x, y, basis, None if w is None else w[:, cols], min_views
            )
            reproj[:, cols] = self.reprojection_error(points[cols], flat[:, cols])
        return Triangulation(
            points_3d=points.reshape(lead + (3,)),
            reproj_error=reproj.reshape((V,) + lead),
            n_views=n_views.reshape(lead),
        )

    def reprojection_error(self, points_3d: np.ndarray, points_2d: np.ndarray) -> np.ndarray:
        """(..., 3) and (views, ..., 2) -> (views, ...) pixel distance (NaN if either missing)."""
        diff = self.project(points_3d) - self._check_2d(points_2d)
        return np.sqrt(np.einsum("...i,...i->...", diff, diff))


def _dlt_basis(extrinsics: np.ndarray) -> np.ndarray:
    """(V, 3, 4) [R|t] -> (9, 4V): how the per-point coefficients (w²(x²+y²), w²x, w²y, w²) of
    each view add to the normal matrix M (entries 00 01 02 11 12 22) and right-hand side b."""
    r1, r2, r3 = extrinsics[:, 0, :3], extrinsics[:, 1, :3], extrinsics[:, 2, :3]
    t1, t2, t3 = (extrinsics[:, i, 3, None] for i in range(3))

    def outer(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        m = np.einsum("vi,vj->vij", a, b)
        return m + m.transpose(0, 2, 1) if a is not b else m

    mats = np.stack([outer(r3, r3), -outer(r3, r1), -outer(r3, r2),
                     outer(r1, r1) + outer(r2, r2)], axis=1)        # (V, 4, 3, 3)
    rhs = np.stack([-t3 * r3, t3 * r1 + t1 * r3, t3 * r2 + t2 * r3,
                    -(t1 * r1 + t2 * r2)], axis=1)                  # (V, 4, 3)
    iu = ([0, 0, 0, 1, 1, 2], [0, 1, 2, 1, 2, 2])
    basis = np.concatenate([mats[..., iu[0], iu[1]], rhs], axis=-1)  # (V, 4, 9)
    return np.ascontiguousarray(basis.reshape(-1, 9).T)


def _dlt(
    x: np.ndarray, y: np.ndarray, basis: np.ndarray, weights: np.ndarray | None, min_views: int
) -> tuple[np.ndarray, np.ndarray]:
    """The DLT core: x, y (V, N), _dlt_basis (9, 4V), (V, N) | None -> (N, 3), n_views (N,)."""
    V, N = x.shape
    ok = np.isfinite(x) & np.isfinite(y)
    if weights is None:
        w2 = ok.astype(float)
    else:
        ok &= weights > 0
        w2 = np.where(ok, weights * weights, 0.0)
    xs = np.where(ok, x, 0.0)
    ys = np.where(ok, y, 0.0)
    coef = np.empty((V, 4, N))
    np.multiply(w2, xs, out=coef[:, 1])
    np.multiply(w2, ys, out=coef[:, 2])
    coef[:, 3] = w2
    np.multiply(coef[:, 1], xs, out=coef[:, 0])
    coef[:, 0] += coef[:, 2] * ys
    s = basis @ coef.reshape(4 * V, N)  # (9, N)
    a, b, c, d, e, f, b0, b1, b2 = s
    c00, c01, c02 = d * f - e * e, c * e - b * f, b * e - c * d
    c11, c12, c22 = a * f - c * c, b * c - a * e, a * d - b * b
    det = a * c00 + b * c01 + c * c02
    n_views = ok.sum(axis=0)
    scale = (a + d + f) / 3.0
    good = (n_views >= min_views) & (np.abs(det) > 1e-12 * scale**3)
    degenerate = int(np.count_nonzero((n_views >= min_views) & ~good))
    if degenerate:
        log.debug("%d point(s) with degenerate view geometry left unsolved", degenerate)
    with np.errstate(invalid="ignore", divide="ignore"):
        inv = np.where(good, 1.0 / det, np.nan)
    out = np.empty((N, 3))
    out[:, 0] = (c00 * b0 + c01 * b1 + c02 * b2) * inv
    out[:, 1] = (c01 * b0 + c11 * b1 + c12 * b2) * inv
    out[:, 2] = (c02 * b0 + c12 * b1 + c22 * b2) * inv
    return out, n_views


def triangulate_dlt_normalized(
    normalized: np.ndarray, extrinsics: np.ndarray, weights: np.ndarray | None = None,
    min_views: int = 2,
) -> np.ndarray:
    """Closed-form linear N-view DLT (inhomogeneous normal equations, adjugate solve).

    normalized: (views, N, 2) ideal coordinates (NaN = missing); extrinsics: (views, 3, 4)
    [R|t]; weights: (views, N) >= 0 or None. Returns (N, 3), NaN where fewer than `min_views`
    views with weight > 0 saw the point or the views are degenerate.
    """
    normalized = np.asarray(normalized, dtype=float)
    extrinsics = np.asarray(extrinsics, dtype=float)
    if normalized.ndim != 3 or normalized.shape[-1] != 2 or extrinsics.shape != (
            normalized.shape[0], 3, 4):
        raise ValueError(f"bad shapes {normalized.shape}, {extrinsics.shape}")
    if min_views < 2:
        raise ValueError(f"min_views must be >= 2, got {min_views}")
    w = None if weights is None else np.asarray(weights, dtype=float)
    basis = _dlt_basis(extrinsics)
    x, y = normalized[..., 0], normalized[..., 1]
    out = np.empty((x.shape[1], 3))
    step = max(256, distortion.BLOCK // len(x))
    for start in range(0, x.shape[1], step):
        cols = slice(start, start + step)
        out[cols] = _dlt(x[:, cols], y[:, cols], basis, None if w is None else w[:, cols],
                         min_views)[0]
    return out


# ---------------------------------------------------------------- tiny TOML writer
def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_str(key)


def _toml_str(s: str) -> str:
    out = s.replace("\\", "\\\\").replace('"', '\\"')
    out = re.sub(r"[\x00-\x1f\x7f]", lambda m: f"\\u{ord(m[0]):04x}", out)
    return f'"{out}"'


def _toml_value(v: Any) -> str:
    if isinstance(v, bool | np.bool_):
        return "true" if v else "false"
    if isinstance(v, int | np.integer):
        return str(int(v))
    if isinstance(v, float | np.floating):
        v = float(v)
        if math.isnan(v):
            return "nan"
        return repr(v) if math.isfinite(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, list | tuple | np.ndarray):
        return "[" + ", ".join(_toml_value(e) for e in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(str(k))} = {_toml_value(e)}"
                               for k, e in v.items()) + "}"
    if hasattr(v, "isoformat"):
        return v.isoformat()
    raise ParallaxError(f"cannot write {type(v).__name__} value {v!r} to TOML")


def _toml_table(name: str, table: dict[str, Any]) -> str:
    lines = [f"[{name}]"] + [f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"
