"""Lens distortion math (pure numpy): OpenCV's pinhole and fisheye models, both directions.

All functions work on normalized image coordinates (x/z, y/z) given as separate arrays `x`, `y`
of any common shape S. Coefficients are arrays whose last axis holds the coefficients and whose
leading axes broadcast against S, e.g. shape (V, 1, 8) for points of shape (V, M): one camera
per row, all cameras evaluated at once.

- pinhole: `coeffs` (..., 8) = k1 k2 p1 p2 k3 k4 k5 k6 (OpenCV order, zero padded)
- fisheye: `coeffs` (..., 4) = k1 k2 k3 k4 (OpenCV fisheye, polynomial in the ray angle)

Undistortion inverts the forward model with Newton's method (analytic Jacobian), all points
at once, until every Newton step is below `tol` or `max_iter` is reached. Points that have not
converged by then (outside the region where the model is invertible) become NaN.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

MAX_ITER = 20
# Newton stops when every step is below TOL (normalized units). Convergence is quadratic, so
# the error left after a step of size s is ~C s^2 with C ~ 1: below 1e-13 for TOL = 1e-7.
TOL = 1e-7
NOT_CONVERGED = 1e-6  # a last step above this after MAX_ITER: not invertible there (NaN)
BLOCK = 32768  # elements per block in `blockwise`: the temporaries stay in the CPU cache


def blockwise(
    fn: Callable[..., tuple[np.ndarray, np.ndarray]], a: np.ndarray, b: np.ndarray,
    coeffs: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """`fn(a, b, coeffs)` on (V, M) arrays, over column blocks of about BLOCK elements.

    Cache blocking only (numpy temporaries of a few hundred kB instead of tens of MB): about
    twice as fast for large inputs, and each block stops iterating as soon as it converges.
    """
    step = max(1024, BLOCK // max(a.shape[0], 1))
    if a.ndim != 2 or a.shape[1] <= step:
        return fn(a, b, coeffs)
    out_a, out_b = np.empty(a.shape), np.empty(a.shape)
    for start in range(0, a.shape[1], step):
        cols = slice(start, start + step)
        out_a[:, cols], out_b[:, cols] = fn(a[:, cols], b[:, cols], coeffs)
    return out_a, out_b


def _radial(r2: np.ndarray, c: np.ndarray, rational: bool) -> np.ndarray:
    """Radial factor g(r2) = (1 + k1 r2 + k2 r2^2 + k3 r2^3) / (1 + k4 r2 + k5 r2^2 + k6 r2^3)."""
    g = c[..., 4] * r2
    g += c[..., 1]
    g *= r2
    g += c[..., 0]
    g *= r2
    g += 1.0
    if rational:
        g /= 1.0 + r2 * (c[..., 5] + r2 * (c[..., 6] + r2 * c[..., 7]))
    return g


def _radial_slope(r2: np.ndarray, g: np.ndarray, c: np.ndarray, rational: bool) -> np.ndarray:
    """d g / d r2, given g = _radial(r2)."""
    dg = (3.0 * c[..., 4]) * r2
    dg += 2.0 * c[..., 1]
    dg *= r2
    dg += c[..., 0]
    if rational:
        k4, k5, k6 = c[..., 5], c[..., 6], c[..., 7]
        den = 1.0 + r2 * (k4 + r2 * (k5 + r2 * k6))
        dg -= g * (k4 + r2 * (2.0 * k5 + 3.0 * k6 * r2))
        dg /= den
    return dg


def _flags(c: np.ndarray) -> tuple[bool, bool]:
    """(tangential, rational): which optional parts of the pinhole model are non-zero."""
    return bool(np.any(c[..., 2:4])), bool(np.any(c[..., 5:8]))


def pinhole_distort(
    x: np.ndarray, y: np.ndarray, coeffs: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Ideal normalized (x, y) -> distorted normalized (xd, yd), OpenCV pinhole model."""
    tangential, rational = _flags(coeffs)
    r2 = x * x + y * y
    g = _radial(r2, coeffs, rational)
    xd, yd = x * g, y * g
    if tangential:
        p1, p2 = coeffs[..., 2], coeffs[..., 3]
        xy2 = 2.0 * x * y
        xd += p1 * xy2 + p2 * (r2 + 2.0 * x * x)
        yd += p1 * (r2 + 2.0 * y * y) + p2 * xy2
    return xd, yd


def pinhole_undistort(
    xd: np.ndarray, yd: np.ndarray, coeffs: np.ndarray, max_iter: int = MAX_ITER,
    tol: float = TOL,
) -> tuple[np.ndarray, np.ndarray]:
    """Distorted normalized (xd, yd) -> ideal normalized (x, y): Newton on the 2x2 system."""
    tangential, rational = _flags(coeffs)
    if not tangential and not rational and not np.any(coeffs[..., [0, 1, 4]]):
        return xd.copy(), yd.copy()
    p1, p2 = coeffs[..., 2], coeffs[..., 3]
    # start from the radial-only inverse at r(xd): one step closer than xd itself
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        g = _radial(xd * xd + yd * yd, coeffs, rational)
        scale = np.where((g > 0.25) & (g < 4.0), 1.0 / g, 1.0)
    x, y = xd * scale, yd * scale
    step = np.zeros(x.shape)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        for _ in range(max_iter):
            xx, yy = x * x, y * y
            r2 = xx + yy
            g = _radial(r2, coeffs, rational)
            fx = x * g
            fx -= xd
            fy = y * g
            fy -= yd
            dg = _radial_slope(r2, g, coeffs, rational)
            dg *= 2.0  # d g / d x = 2 x dg/dr2
            j01 = x * y
            j01 *= dg
            j00 = xx * dg
            j00 += g
            j11 = yy * dg
            j11 += g
            if tangential:
                xy2 = 2.0 * x * y
                fx += p1 * xy2 + p2 * (r2 + 2.0 * xx)
                fy += p1 * (r2 + 2.0 * yy) + p2 * xy2
                j00 += 2.0 * p1 * y + 6.0 * p2 * x
                j11 += 6.0 * p1 * y + 2.0 * p2 * x
                j01 += 2.0 * (p1 * x + p2 * y)
            det = j00 * j11
            det -= j01 * j01
            dx = j11 * fx
            dx -= j01 * fy
            dx /= det
            dy = j00 * fy
            dy -= j01 * fx
            dy /= det
            x -= dx
            y -= dy
            step = np.abs(dx, out=dx)
            step += np.abs(dy)
            if not (step > tol).any():  # NaN (a missing point) counts as converged
                return x, y
    bad = ~(step <= NOT_CONVERGED)
    x[bad] = np.nan
    y[bad] = np.nan
    return x, y


def fisheye_distort(
    x: np.ndarray, y: np.ndarray, coeffs: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Ideal normalized (x, y) -> distorted normalized, OpenCV fisheye (equidistant) model."""
    r = np.hypot(x, y)
    theta = np.arctan(r)
    t2 = theta * theta
    k1, k2, k3, k4 = (coeffs[..., i] for i in range(4))
    theta_d = theta * (1.0 + t2 * (k1 + t2 * (k2 + t2 * (k3 + t2 * k4))))
    with np.errstate(invalid="ignore", divide="ignore"):
        scale = np.where(r > 1e-12, theta_d / r, 1.0)
    return x * scale, y * scale


def fisheye_undistort(
    xd: np.ndarray, yd: np.ndarray, coeffs: np.ndarray, max_iter: int = MAX_ITER,
    tol: float = TOL,
) -> tuple[np.ndarray, np.ndarray]:
    """Distorted normalized -> ideal normalized for the fisheye model (1D Newton on the angle)."""
    theta_d = np.minimum(np.hypot(xd, yd), np.pi / 2)
    k1, k2, k3, k4 = (coeffs[..., i] for i in range(4))
    theta = theta_d.copy()
    converged = False
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        for _ in range(max_iter):
            t2 = theta * theta
            f = theta * (1.0 + t2 * (k1 + t2 * (k2 + t2 * (k3 + t2 * k4)))) - theta_d
            df = 1.0 + t2 * (3.0 * k1 + t2 * (5.0 * k2 + t2 * (7.0 * k3 + t2 * 9.0 * k4)))
            step = f / df
            theta -= step
            if not (np.abs(step) > tol).any():
                converged = True
                break
        scale = np.where(theta_d > 1e-12, np.tan(theta) / theta_d, 1.0)
    if not converged:
        scale[~(np.abs(step) <= NOT_CONVERGED)] = np.nan
    scale[(theta < 0) | (theta >= np.pi / 2)] = np.nan
    return xd * scale, yd * scale
