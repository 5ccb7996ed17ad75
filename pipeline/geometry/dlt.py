"""Closed-form linear N-view triangulation (DLT) on undistorted, normalized coordinates.

The inhomogeneous DLT: each view contributes two rows (x·P3 − P1, y·P3 − P2) of a linear system
in X; the 3×3 normal equations of all points are built with one matrix product and solved by
the adjugate, so there is no per-point SVD (see bench/triangulate.py).
"""

from __future__ import annotations

import logging

import numpy as np

from pipeline.geometry import distortion

log = logging.getLogger(__name__)


def dlt_basis(extrinsics: np.ndarray) -> np.ndarray:
    """(V, 3, 4) [R|t] -> (9, 4V): how the per-point coefficients (w²(x²+y²), w²x, w²y, w²) of
    each view add to the normal matrix M (entries 00 01 02 11 12 22) and right-hand side b."""
    r1, r2, r3 = extrinsics[:, 0, :3], extrinsics[:, 1, :3], extrinsics[:, 2, :3]
    t1, t2, t3 = (extrinsics[:, i, 3, None] for i in range(3))

    def outer(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        m = np.einsum("vi,vj->vij", a, b)
        return m + m.transpose(0, 2, 1) if a is not b else m

    mats = np.stack(
        [outer(r3, r3), -outer(r3, r1), -outer(r3, r2), outer(r1, r1) + outer(r2, r2)], axis=1
    )  # (V, 4, 3, 3)
    rhs = np.stack(
        [-t3 * r3, t3 * r1 + t1 * r3, t3 * r2 + t2 * r3, -(t1 * r1 + t2 * r2)], axis=1
    )  # (V, 4, 3)
    iu = ([0, 0, 0, 1, 1, 2], [0, 1, 2, 1, 2, 2])
    basis = np.concatenate([mats[..., iu[0], iu[1]], rhs], axis=-1)  # (V, 4, 9)
    return np.ascontiguousarray(basis.reshape(-1, 9).T)


def solve_dlt(
    x: np.ndarray, y: np.ndarray, basis: np.ndarray, weights: np.ndarray | None, min_views: int
) -> tuple[np.ndarray, np.ndarray]:
    """The DLT core: x, y (V, N), dlt_basis (9, 4V), (V, N) | None -> (N, 3), n_views (N,)."""
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
    normalized: np.ndarray,
    extrinsics: np.ndarray,
    weights: np.ndarray | None = None,
    min_views: int = 2,
) -> np.ndarray:
    """Closed-form linear N-view DLT (inhomogeneous normal equations, adjugate solve).

    normalized: (views, N, 2) ideal coordinates (NaN = missing); extrinsics: (views, 3, 4)
    [R|t]; weights: (views, N) >= 0 or None. Returns (N, 3), NaN where fewer than `min_views`
    views with weight > 0 saw the point or the views are degenerate.
    """
    normalized = np.asarray(normalized, dtype=float)
    extrinsics = np.asarray(extrinsics, dtype=float)
    if (
        normalized.ndim != 3
        or normalized.shape[-1] != 2
        or extrinsics.shape != (normalized.shape[0], 3, 4)
    ):
        raise ValueError(f"bad shapes {normalized.shape}, {extrinsics.shape}")
    if min_views < 2:
        raise ValueError(f"min_views must be >= 2, got {min_views}")
    w = None if weights is None else np.asarray(weights, dtype=float)
    basis = dlt_basis(extrinsics)
    x, y = normalized[..., 0], normalized[..., 1]
    out = np.empty((x.shape[1], 3))
    step = max(256, distortion.BLOCK // len(x))
    for start in range(0, x.shape[1], step):
        cols = slice(start, start + step)
        out[cols] = solve_dlt(
            x[:, cols], y[:, cols], basis, None if w is None else w[:, cols], min_views
        )[0]
    return out
