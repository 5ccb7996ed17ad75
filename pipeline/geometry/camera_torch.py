"""Differentiable torch versions of the camera math in `pipeline.geometry.cameras` (used by
the 3D losses).

Conventions are those of `pipeline.geometry.cameras`: OpenCV world->camera
``x_cam = R @ X + t``; frame pixels with the origin at the centre of the top-left pixel;
*normalized* coordinates are the ideal (undistorted) ``(x/z, y/z)``. Batched shapes: B batch,
V views, N points.

- intrinsics (B, V, 3, 3) K with K[1, 0] = 0 (skew K[0, 1] is applied, like `cameras`)
- extrinsics (B, V, 3, 4) [R | t]
- distortions (B, V, 8) OpenCV order zero padded: pinhole k1 k2 p1 p2 k3 k4 k5 k6; for a
  fisheye camera the first four entries are the fisheye k1..k4 and the rest are ignored
- fisheye (B, V) bool

Missing values are never NaN here: callers pass masks/weights, and every function keeps
non-finite numbers out of both the forward and the backward pass for finite inputs (guarded
divisions, `torch.where` on *inputs* rather than on outputs, iterations under `no_grad`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

UNDISTORT_ITERATIONS = 20
_SMALL_R2 = 1e-10  # below this squared radius the fisheye maps use their Taylor expansion


# ------------------------------------------------------------------------------------ affine
def apply_affine(A: Tensor, points: Tensor) -> Tensor:
    """Affine maps A (..., 2, 3) applied to points (..., N, 2) -> (..., N, 2).

    p' = A[:, :2] @ p + A[:, 2], with A broadcast over the N points.
    """
    return points @ A[..., :2].transpose(-1, -2) + A[..., None, :, 2]


def invert_affine(A: Tensor) -> Tensor:
    """Inverse of affine maps (..., 2, 3) (closed-form 2x2 inverse; A must be invertible)."""
    a, b, tx = A[..., 0, 0], A[..., 0, 1], A[..., 0, 2]
    c, d, ty = A[..., 1, 0], A[..., 1, 1], A[..., 1, 2]
    inv_det = 1.0 / (a * d - b * c)
    ia, ib, ic, id_ = d * inv_det, -b * inv_det, -c * inv_det, a * inv_det
    row0 = torch.stack([ia, ib, -(ia * tx + ib * ty)], dim=-1)
    row1 = torch.stack([ic, id_, -(ic * tx + id_ * ty)], dim=-1)
    return torch.stack([row0, row1], dim=-2)


# -------------------------------------------------------------------------------- distortion
def _split(distortions: Tensor, fisheye: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(B, V, 8), (B, V) -> pinhole (B, V, 1, 8), fisheye (B, V, 1, 4) coeffs, mask (B, V, 1).

    Each model only sees its own cameras' coefficients (zeros elsewhere), so evaluating both
    models on every camera and selecting afterwards cannot create inf/NaN gradients.
    """
    fish = fisheye.bool()[..., None]
    pin = torch.where(fish, torch.zeros_like(distortions), distortions)
    fcoef = torch.where(fish, distortions[..., :4], torch.zeros_like(distortions[..., :4]))
    return pin[..., None, :], fcoef[..., None, :], fish


def _radial(r2: Tensor, c: Tensor) -> Tensor:
    """Radial factor (1 + k1 r² + k2 r⁴ + k3 r⁶) / (1 + k4 r² + k5 r⁴ + k6 r⁶) of r2 = r²."""
    k1, k2, _, _, k3, k4, k5, k6 = c.unbind(-1)
    return (1 + r2 * (k1 + r2 * (k2 + r2 * k3))) / (1 + r2 * (k4 + r2 * (k5 + r2 * k6)))


def _pinhole(x: Tensor, y: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """Ideal normalized x, y (..., N) -> distorted, OpenCV rational + tangential model."""
    p1, p2 = c[..., 2], c[..., 3]
    r2 = x * x + y * y
    g = _radial(r2, c)
    xy2 = 2 * x * y
    return (x * g + p1 * xy2 + p2 * (r2 + 2 * x * x),
            y * g + p1 * (r2 + 2 * y * y) + p2 * xy2)


def _pinhole_jacobian(x: Tensor, y: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Entries j00, j01 (= j10), j11 of d(xd, yd)/d(x, y) for `_pinhole`."""
    k1, k2, p1, p2, k3, k4, k5, k6 = c.unbind(-1)
    r2 = x * x + y * y
    num = 1 + r2 * (k1 + r2 * (k2 + r2 * k3))
    den = 1 + r2 * (k4 + r2 * (k5 + r2 * k6))
    dnum = k1 + r2 * (2 * k2 + 3 * k3 * r2)
    dden = k4 + r2 * (2 * k5 + 3 * k6 * r2)
    g = num / den
    dg2 = 2 * (dnum - g * dden) / den  # 2 dg/dr2
    j00 = g + x * x * dg2 + 2 * p1 * y + 6 * p2 * x
    j11 = g + y * y * dg2 + 6 * p1 * y + 2 * p2 * x
    j01 = x * y * dg2 + 2 * (p1 * x + p2 * y)
    return j00, j01, j11


def _poly_theta(t2: Tensor, c: Tensor) -> Tensor:
    """Fisheye 1 + k1 t² + k2 t⁴ + k3 t⁶ + k4 t⁸ given t2 = θ²."""
    k1, k2, k3, k4 = c.unbind(-1)
    return 1 + t2 * (k1 + t2 * (k2 + t2 * (k3 + t2 * k4)))


def _fisheye(x: Tensor, y: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """Ideal normalized -> distorted, OpenCV fisheye: scale θ_d / r with θ = atan r (safe at 0)."""
    r2 = x * x + y * y
    small = r2 < _SMALL_R2
    r = torch.sqrt(torch.where(small, torch.ones_like(r2), r2))
    ratio = torch.where(small, 1 - r2 / 3, torch.atan(r) / r)  # θ / r
    scale = ratio * _poly_theta(r2 * ratio * ratio, c)
    return x * scale, y * scale


def distort(normalized: Tensor, distortions: Tensor, fisheye: Tensor) -> Tensor:
    """Ideal normalized (B, V, N, 2) -> distorted normalized (B, V, N, 2), per-camera model."""
    pin, fcoef, fish = _split(distortions, fisheye)
    x, y = normalized[..., 0], normalized[..., 1]
    zero = torch.zeros_like(x)
    px, py = _pinhole(torch.where(fish, zero, x), torch.where(fish, zero, y), pin)
    fx, fy = _fisheye(torch.where(fish, x, zero), torch.where(fish, y, zero), fcoef)
    return torch.stack([torch.where(fish, fx, px), torch.where(fish, fy, py)], dim=-1)


def to_camera(points_3d: Tensor, extrinsics: Tensor) -> Tensor:
    """World points (B, N, 3) -> camera coordinates (B, V, N, 3) with extrinsics (B, V, 3, 4)."""
    rot, t = extrinsics[..., :3], extrinsics[..., 3]
    return torch.einsum("...vij,...nj->...vni", rot, points_3d) + t[..., None, :]


def project_valid(
    points_3d: Tensor, intrinsics: Tensor, extrinsics: Tensor, distortions: Tensor,
    fisheye: Tensor, *, min_depth: float = 1e-6, max_radius: float | None = None,
) -> tuple[Tensor, Tensor]:
    """World points (B, N, 3) -> frame pixels (B, V, N, 2) and valid (B, V, N).

    valid is False for points at depth z <= min_depth (behind or at the camera) and, when
    `max_radius` is given, for pinhole cameras where the ideal normalized radius exceeds it
    (outside any calibrated field the polynomial model is meaningless and can overflow; the
    fisheye model is bounded in the ray angle and needs no limit). Invalid points are projected
    from normalized (0, 0), i.e. they land on the principal point, with zero gradient.
    """
    cam = to_camera(points_3d, extrinsics)
    z = cam[..., 2]
    valid = z > min_depth
    z_safe = torch.where(valid, z, torch.ones_like(z))
    normalized = cam[..., :2] / z_safe[..., None]
    if max_radius is not None:
        r2 = (normalized.detach() ** 2).sum(-1)
        valid = valid & ((r2 <= max_radius**2) | fisheye.bool()[..., None])
    normalized = torch.where(valid[..., None], normalized, torch.zeros_like(normalized))
    distorted = distort(normalized, distortions, fisheye)
    return apply_affine(intrinsics[..., :2, :], distorted), valid


def project(
    points_3d: Tensor, intrinsics: Tensor, extrinsics: Tensor, distortions: Tensor,
    fisheye: Tensor,
) -> Tensor:
    """World points (B, N, 3) -> frame pixels (B, V, N, 2) (see `project_valid`)."""
    return project_valid(points_3d, intrinsics, extrinsics, distortions, fisheye)[0]


# ------------------------------------------------------------------------------ undistortion
def _undistort_pinhole(xd: Tensor, yd: Tensor, c: Tensor, iterations: int
                       ) -> tuple[Tensor, Tensor]:
    """Newton on the 2x2 system, iterated without a graph, then one differentiable step.

    The last step x1 = x0 - J(x0)⁻¹ (f(x0) - xd), with x0 detached, has exactly the implicit-
    function gradient dx/dxd = J⁻¹ and dx/dc = -J⁻¹ ∂f/∂c at convergence.
    """
    with torch.no_grad():
        xd0, yd0, c0 = xd.detach(), yd.detach(), c.detach()
        # start from the radial-only inverse at the distorted radius
        g = _radial(xd0 * xd0 + yd0 * yd0, c0)
        ok = (g > 0.25) & (g < 4.0)
        scale = torch.where(ok, 1 / torch.where(ok, g, torch.ones_like(g)), torch.ones_like(g))
        x, y = xd0 * scale, yd0 * scale
        x_init, y_init = x, y
        for _ in range(iterations):
            x, y = _newton_step(x, y, xd0, yd0, c0)
        fx, fy = _pinhole(x, y, c0)
        # diverged or not converged (no inverse there): the initial guess keeps things finite
        bad = ~(((fx - xd0).abs() + (fy - yd0).abs()) < 1e-3)  # NaN counts as bad
        x, y = torch.where(bad, x_init, x), torch.where(bad, y_init, y)
    return _newton_step(x, y, xd, yd, c)


def _newton_step(x: Tensor, y: Tensor, xd: Tensor, yd: Tensor, c: Tensor
                 ) -> tuple[Tensor, Tensor]:
    fx, fy = _pinhole(x, y, c)
    fx, fy = fx - xd, fy - yd
    j00, j01, j11 = _pinhole_jacobian(x, y, c)
    det = j00 * j11 - j01 * j01
    tiny = torch.finfo(det.dtype).tiny ** 0.5
    det = torch.where(det.abs() > tiny, det, torch.full_like(det, tiny))
    return x - (j11 * fx - j01 * fy) / det, y - (j00 * fy - j01 * fx) / det


def _undistort_fisheye(xd: Tensor, yd: Tensor, c: Tensor, iterations: int
                       ) -> tuple[Tensor, Tensor]:
    """1D Newton on θ(1 + k1θ² + ...) = θ_d (= distorted radius), then scale tan(θ) / θ_d."""
    rd2 = xd * xd + yd * yd
    small = rd2 < _SMALL_R2
    rd = torch.sqrt(torch.where(small, torch.ones_like(rd2), rd2))
    theta_d = rd.clamp(max=math.pi / 2)
    top = math.pi / 2 - 1e-6

    def step(theta: Tensor, theta_d: Tensor, c: Tensor) -> Tensor:
        t2 = theta * theta
        k1, k2, k3, k4 = c.unbind(-1)
        slope = 1 + t2 * (3 * k1 + t2 * (5 * k2 + t2 * (7 * k3 + t2 * 9 * k4)))
        slope = torch.where(slope.abs() > 1e-12, slope, torch.full_like(slope, 1e-12))
        return theta - (theta * _poly_theta(t2, c) - theta_d) / slope

    with torch.no_grad():
        theta = theta_d.detach()
        for _ in range(iterations):
            theta = step(theta, theta_d.detach(), c.detach())
        theta = torch.nan_to_num(theta, nan=0.0).clamp(0.0, top)
    theta = step(theta, theta_d, c).clamp(0.0, top)
    scale = torch.where(small, 1 + (1 / 3 - c[..., 0]) * rd2, torch.tan(theta) / theta_d)
    return xd * scale, yd * scale


def undistort(
    points: Tensor, intrinsics: Tensor, distortions: Tensor, fisheye: Tensor,
    iterations: int = UNDISTORT_ITERATIONS,
) -> Tensor:
    """Frame pixels (B, V, N, 2) -> ideal normalized coordinates (B, V, N, 2).

    Newton's method with the analytic Jacobian, a fixed number of iterations (no data-dependent
    stopping), without autograd; one final differentiable Newton step gives exact gradients
    with respect to the points and the distortion coefficients (implicit-function theorem)
    and through the intrinsics. Where Newton does not converge (no inverse: outside the region
    where the model is invertible) the pinhole result falls back to the radial-only initial
    guess (the numpy version returns NaN there), so the output is always finite.
    """
    distorted = apply_affine(invert_affine(intrinsics[..., :2, :]), points)
    pin, fcoef, fish = _split(distortions, fisheye)
    xd, yd = distorted[..., 0], distorted[..., 1]
    zero = torch.zeros_like(xd)
    px, py = _undistort_pinhole(torch.where(fish, zero, xd), torch.where(fish, zero, yd), pin,
                                iterations)
    fx, fy = _undistort_fisheye(torch.where(fish, xd, zero), torch.where(fish, yd, zero), fcoef,
                                iterations)
    return torch.stack([torch.where(fish, fx, px), torch.where(fish, fy, py)], dim=-1)


# ----------------------------------------------------------------------------- triangulation
def triangulate(
    normalized: Tensor, extrinsics: Tensor, weights: Tensor, min_views: int = 2,
) -> tuple[Tensor, Tensor]:
    """Weighted linear N-view DLT: normalized (..., V, N, 2), extrinsics (..., V, 3, 4),
    weights (..., V, N) >= 0 -> points_3d (..., N, 3), valid (..., N) bool.

    Each view adds the rows w·(x r3 - r1)·X = w·(t1 - x t3) and w·(y r3 - r2)·X = w·(t2 - y t3)
    (as `CameraGroup.triangulate(weights=w)`: weights scale the equations, so w² weighs the
    normal equations); the 3x3 normal equations are solved in closed form (adjugate). A point
    is valid when at least `min_views` views have weight > 0 and the system is well conditioned
    (|det| > eps·(trace/3)³, eps 1e-12 in float64, 1e-6 otherwise); invalid points are exactly 0
    with zero gradient. Leading dims (e.g. B, or B and pairs) are batched.
    """
    used = weights > 0
    w2 = torch.where(used, weights * weights, torch.zeros_like(weights))
    pts = torch.where(used[..., None], normalized, torch.zeros_like(normalized))
    rot, t = extrinsics[..., :3], extrinsics[..., 3]  # (..., V, 3, 3), (..., V, 3)
    r3 = rot[..., None, 2, :]  # (..., V, 1, 3)
    t3 = t[..., None, 2]  # (..., V, 1)
    rows = pts[..., None] * r3[..., None, :] - rot[..., None, :2, :]  # (..., V, N, 2, 3)
    rhs = t[..., None, :2] - pts * t3[..., None]  # (..., V, N, 2)
    m = torch.einsum("...vn,...vnri,...vnrj->...nij", w2, rows, rows)
    b = torch.einsum("...vn,...vnri,...vnr->...ni", w2, rows, rhs)
    m00, m01, m02 = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
    m11, m12, m22 = m[..., 1, 1], m[..., 1, 2], m[..., 2, 2]
    c00, c01, c02 = m11 * m22 - m12 * m12, m02 * m12 - m01 * m22, m01 * m12 - m02 * m11
    c11, c12, c22 = m00 * m22 - m02 * m02, m01 * m02 - m00 * m12, m00 * m11 - m01 * m01
    det = m00 * c00 + m01 * c01 + m02 * c02
    eps = 1e-12 if det.dtype == torch.float64 else 1e-6
    scale = (m00 + m11 + m22).detach() / 3
    valid = (used.sum(-2) >= min_views) & (det.detach().abs() > eps * scale**3)
    inv_det = 1.0 / torch.where(valid, det, torch.ones_like(det))
    b0, b1, b2 = b.unbind(-1)
    out = torch.stack([c00 * b0 + c01 * b1 + c02 * b2,
                       c01 * b0 + c11 * b1 + c12 * b2,
                       c02 * b0 + c12 * b1 + c22 * b2], dim=-1) * inv_det[..., None]
    return torch.where(valid[..., None], out, torch.zeros_like(out)), valid


def view_pairs(views: int, device: torch.device | None = None) -> Tensor:
    """(2, P) indices (i < j) of the P = V(V-1)/2 unordered view pairs, in row-major order."""
    return torch.triu_indices(views, views, offset=1, device=device)


def triangulate_pairs(
    normalized: Tensor, extrinsics: Tensor, weights: Tensor,
) -> tuple[Tensor, Tensor]:
    """Two-view DLT for every unordered view pair, in one batched call.

    normalized (B, V, N, 2), extrinsics (B, V, 3, 4), weights (B, V, N) -> points (B, P, N, 3),
    valid (B, P, N), pairs in `view_pairs(V)` order. A pair is valid only where both views
    have weight > 0.
    """
    pairs = view_pairs(normalized.shape[-3], normalized.device)  # (2, P)
    idx = pairs.T  # (P, 2)
    return triangulate(normalized[:, idx], extrinsics[:, idx], weights[:, idx])
