"""Smooth a session's 3D keypoints through the camera model: an iterated, robust Kalman smoother.

Shapes: points_2d (views, frames, keypoints, 2) frame px (NaN = missing); variance_2d the same
in px² (an ensemble's variance of x and y; None for an ensemble of one); confidence (views,
frames, keypoints) in [0, 1] (None = all 1). 3D in calibration units, time in frames.

Model, per keypoint (independent of the others apart from the optional limb priors):
- state: 3D position and velocity; prior: constant velocity driven by white-noise acceleration
  of intensity q_k, per axis Cov(position, velocity step) = q_k [[1/3, 1/2], [1/2, 1]];
- observation: each view's prediction y = project(position) + e, e ~ N(0, diag(r_x, r_y)) px,
  r = sigma0² / confidence + ensemble variance; confidence < `min_confidence` = no observation;
- robustness: each observation's information is multiplied by the Geman-McClure weight
  1 / (1 + d²/c²)², d² = mean over x, y of residual² / r, c = `robust_scale`. In the first pass
  the residuals are taken, frame by frame inside the forward filter, at the posterior given the
  prediction from the past (weights relative to the best view: views moving together is
  motion), so a view that turns wrong is refused from its onset even when, with 3 views, it and
  another view agree on a wrong point; later passes reweight about the smoothed 3D (IRLS);
- limb priors (optional): per skeleton edge (a, b) of length L ± s, the pseudo-observation
  n.p_a = L + n.x_b (n the unit vector b -> a, x_b the previous pass's estimate) with variance
  s² + n^T P_b n, and the same for b (a message from the other end: a well-seen end is not
  dragged towards a poorly seen one).
Solution: a per-frame DLT reweighted 3 times (the first linearisation point; gaps filled by
linear interpolation in time); then `iterations` times: linearise every projection about the
current estimate (finite-difference Jacobians of `CameraGroup.project`, distortion included),
sum the views' information into one 3D information matrix per frame and keypoint (the
recursion's cost does not depend on the number of views), run a Kalman filter and a
Rauch-Tung-Striebel smoother.
The recursion loops over frames, vectorised over keypoints and chunks: the session is cut into
`chunk_frames` chunks with `overlap_frames` of context on each side, `chunks_per_batch` smoothed
side by side, so memory beyond the inputs and outputs does not grow with the session (a gap
longer than the overlap is bridged from one side only at a chunk border).

Noise scales are estimated from the data, so one default serves mm and m rigs at any frame rate:
- sigma0 (px, the 2D noise at confidence 1): median over observations of the raw DLT's squared
  reprojection residual x confidence (minus the ensemble variance), corrected for the 3
  coordinates fitted to n views (x 2n / (2n - 3)) and for the median of chi² with 2 dof;
- q_k: maximum marginal likelihood of the Kalman filter (on up to 4 stretches of 512 frames)
  over the grid 10^-6 .. 10^1 (22 steps) x 1.5 D_k, D_k the per-axis variance of the first
  estimate's second differences over frames (robust median; white-noise acceleration q gives
  E|Δ²x|² = 2/3 q per axis: 1.5 D_k is the q that would explain all of them by motion).
  `process_noise_scale` multiplies q (< 1 smoother), `process_noise` replaces it.
The posterior std is the model's: trust it as far as the 2D errors are Gaussian and independent
across views and frames (a network's errors on similar frames are correlated: then it is low).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from pipeline.core.errors import ParallaxError
from pipeline.geometry.cameras import CameraGroup
from pipeline.inference.kalman import (
    kalman_filter,
    kalman_smoother,
    limb_information,
)

log = logging.getLogger(__name__)

CHI2_3_MEDIAN = 2.3660  # median of chi² with 3 degrees of freedom
CHI2_2_MEDIAN = 2 * np.log(2)  # median of chi² with 2 degrees of freedom
BLOCK = 2**18  # observations per block of the per-frame triangulations


@dataclass(frozen=True)
class SmoothingSettings:
    """Knobs of `smooth_session`; None = estimated from the data (module docstring).

    pixel_noise_px: sigma0 (px); process_noise: q ((calibration units)² per frame³);
    robust_scale: c (standard deviations); outlier_threshold_px: residual flagged as outlier.
    """

    pixel_noise_px: float | None = None
    min_pixel_noise_px: float = 0.25
    process_noise: float | None = None
    process_noise_scale: float = 1.0
    min_confidence: float = 0.05
    robust_scale: float = 3.0
    outlier_threshold_px: float = 10.0
    iterations: int = 3
    chunk_frames: int = 1024
    overlap_frames: int = 128
    chunks_per_batch: int = 4
    limb_std_fraction: float = 0.05  # limb length std (x length) where none is given

    def __post_init__(self) -> None:
        optional = [k for k in ("pixel_noise_px", "process_noise") if getattr(self, k) is not None]
        bad = [k for k in ("min_pixel_noise_px", "process_noise_scale", "robust_scale",
                           "outlier_threshold_px", "iterations", "chunk_frames",
                           "chunks_per_batch", "limb_std_fraction", *optional)
               if not getattr(self, k) > 0]
        bad += [k for k, ok in (("overlap_frames", self.overlap_frames >= 0),
                                ("min_confidence", 0 <= self.min_confidence <= 1)) if not ok]
        if bad:
            raise ParallaxError("smoothing settings out of range: " + ", ".join(
                f"{k}={getattr(self, k)!r}" for k in bad))


@dataclass(frozen=True)
class SmoothedSession:
    """The smoother's result for V views, N frames, K keypoints.

    points_3d (N, K, 3) posterior mean; std_3d (N, K, 3) posterior std per axis; reprojected
    (V, N, K, 2) frame px and reprojected_std_px (V, N, K) its std (root mean over x, y);
    residual_px (V, N, K) distance from each used prediction to the reprojection (NaN where
    unused); outlier (V, N, K) residual > outlier_threshold_px; weight (V, N, K) final robust
    weight (0 where unused); raw_3d (N, K, 3) per-frame confidence-weighted DLT; pixel_noise_px
    sigma0; process_noise (K,) q. Keypoints never triangulated in the session are NaN.
    """

    points_3d: np.ndarray
    std_3d: np.ndarray
    reprojected: np.ndarray
    reprojected_std_px: np.ndarray
    residual_px: np.ndarray
    outlier: np.ndarray
    weight: np.ndarray
    raw_3d: np.ndarray
    pixel_noise_px: float
    process_noise: np.ndarray

    @property
    def std(self) -> np.ndarray:
        """(N, K) expected 3D error: the root of the posterior variances summed over x, y, z."""
        return np.sqrt((self.std_3d**2).sum(-1))

    def reprojection_confidence(self, radius_px: float) -> np.ndarray:
        """(V, N, K) posterior probability that the true 2D lies within `radius_px` of the
        reprojection: 1 - exp(-radius² / (2 std²)) (isotropic 2D Gaussian)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return 1.0 - np.exp(-0.5 * radius_px**2 / self.reprojected_std_px**2)


def observation_variance(confidence: np.ndarray, ensemble: np.ndarray | None,
                         sigma0: float) -> np.ndarray:
    """(V, ..., 2) px²: sigma0² / confidence + ensemble (V, ..., 2); inf where confidence is 0."""
    with np.errstate(divide="ignore"):
        var = np.where(confidence > 0, sigma0**2 / confidence, np.inf)[..., None].repeat(2, -1)
    return var if ensemble is None else var + np.nan_to_num(np.maximum(ensemble, 0.0))


def robust_weight(residual: np.ndarray, info: np.ndarray, scale: float) -> np.ndarray:
    """(...) Geman-McClure weights of residuals (..., 2) px with information (..., 2) 1/px²
    (1 / variance); NaN residuals count as 0."""
    d2 = 0.5 * (np.nan_to_num(residual) ** 2 * info).sum(-1)
    return 1.0 / (1.0 + d2 / scale**2) ** 2


def fill_gaps(points: np.ndarray) -> np.ndarray:
    """(N, K, 3) with NaN frames -> linear interpolation in time per keypoint (the nearest value
    before the first / after the last finite frame); keypoints never finite stay NaN."""
    n = len(points)
    ok = np.isfinite(points).all(-1)
    frames = np.arange(n)[:, None]
    prev = np.maximum.accumulate(np.where(ok, frames, -1), axis=0)
    nxt = np.minimum.accumulate(np.where(ok, frames, n)[::-1], axis=0)[::-1]
    prev, nxt = np.where(prev < 0, nxt, prev), np.where(nxt >= n, prev, nxt)
    never = prev >= n
    prev, nxt = np.clip(prev, 0, n - 1), np.clip(nxt, 0, n - 1)
    cols = np.arange(points.shape[1])[None]
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(nxt > prev, (frames - prev) / (nxt - prev), 0.0)[..., None]
    out = points[prev, cols] + frac * (points[nxt, cols] - points[prev, cols])
    out[never] = np.nan
    return out


def motion_variance(points: np.ndarray) -> np.ndarray:
    """(N, K, 3) per-frame 3D (NaN = missing) -> (K,) per-axis variance of the second difference
    over frames (robust: median |Δ²x|² / median(chi²_3)); NaN with < 10 complete triplets."""
    sq = ((points[2:] - 2 * points[1:-1] + points[:-2]) ** 2).sum(-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN keypoints stay NaN
        d1 = np.nanmedian(sq, axis=0) / CHI2_3_MEDIAN if len(sq) else np.nan
    return np.where(np.isfinite(sq).sum(0) >= 10, d1, np.nan)


def project_with_jacobian(group: CameraGroup, points: np.ndarray,
                          step: float) -> tuple[np.ndarray, np.ndarray]:
    """(..., 3) -> projections (V, ..., 2) and Jacobians (V, ..., 2, 3) (forward differences)."""
    offsets = np.concatenate([np.zeros((1, 3)), step * np.eye(3)])
    proj = group.project(points[None] + offsets.reshape((4,) + (1,) * (points.ndim - 1) + (3,)))
    return proj[:, 0], np.moveaxis((proj[:, 1:] - proj[:, :1]) / step, 1, -1)


def robust_triangulation(group: CameraGroup, points: np.ndarray, variance: np.ndarray,
                         scale: float, rounds: int = 3) -> np.ndarray:
    """Per-frame DLT of (V, ..., 2) -> (..., 3), each view's equations weighted by
    focal x sqrt(information x robust weight), reweighted `rounds` times."""
    focal = np.array([cam.matrix[0, 0] for cam in group.cameras])
    info = 1.0 / variance  # 0 where unused (infinite variance)
    weight = np.ones(info.shape[:-1])
    for _ in range(rounds):
        dlt_w = focal.reshape((-1,) + (1,) * (weight.ndim - 1)) * np.sqrt(info.mean(-1) * weight)
        tri = group.triangulate(points, weights=dlt_w)
        weight = robust_weight(group.project(tri.points_3d) - points, info, scale)
    return tri.points_3d


@dataclass(frozen=True)
class _Problem:
    """What every chunk needs (V views, N frames, K keypoints)."""

    group: CameraGroup
    points: np.ndarray  # (V, N, K, 2)
    confidence: np.ndarray  # (V, N, K), 0 = unused
    ensemble: np.ndarray | None  # (V, N, K, 2)
    sigma0: float
    first: np.ndarray  # (N, K, 3) linearisation point of the first iteration
    step: float  # finite-difference step (calibration units)
    limbs: tuple[np.ndarray, np.ndarray, np.ndarray] | None  # pairs, lengths, std

    def window(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Frames idx (W, g) (out of range = padding, no observation) -> y, v (V, W, g, K, 2),
        x (W, g, K, 3)."""
        n = self.points.shape[1]
        ci = np.clip(idx, 0, n - 1)
        conf = self.confidence[:, ci] * ((idx >= 0) & (idx < n))[None, :, :, None]
        ens = None if self.ensemble is None else self.ensemble[:, ci]
        return self.points[:, ci], observation_variance(conf, ens, self.sigma0), self.first[ci]

    def linearise(self, y: np.ndarray, v: np.ndarray,
                  x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per view, about x (W, g, K, 3): Jacobians (W, g, K, V, 2, 3), residuals y - project(x)
        (W, g, K, V, 2) and information 1 / v (W, g, K, V, 2); all 0 where unused. One chunk at
        a time (bounds the projections' temporaries)."""
        V, W, g, K = v.shape[:4]
        jac, res, info = (np.empty((W, g, K, V, 2) + e) for e in ((3,), (), ()))
        for c in range(g):
            proj, j = project_with_jacobian(self.group, x[:, c], self.step)
            r = y[:, :, c] - proj
            ok = np.isfinite(r).all(-1) & np.isfinite(j).all((-1, -2)) & np.isfinite(
                v[:, :, c]).all(-1)
            jac[:, c] = np.where(ok[..., None, None], j, 0.0).transpose(1, 2, 0, 3, 4)
            res[:, c] = np.where(ok[..., None], r, 0.0).transpose(1, 2, 0, 3)
            info[:, c] = np.where(ok[..., None], 1.0 / v[:, :, c], 0.0).transpose(1, 2, 0, 3)
        return jac, res, info

    def information(self, jac: np.ndarray, res: np.ndarray, info: np.ndarray, weight: np.ndarray,
                    x: np.ndarray, cov: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """3D information (W, g, K, 3, 3) and (W, g, K, 3) from `linearise`'s per-view terms
        times weight (W, g, K, V), linearised at x; plus the limb priors given the previous
        pass's covariances cov (W, g, K, 3, 3) (none without)."""
        lead = jac.shape[:3]
        J = jac.reshape(lead + (-1, 3))  # the views' x, y rows of one Jacobian
        wjt = ((info * weight[..., None]).reshape(lead + (-1, 1)) * J).swapaxes(-1, -2)
        lam = wjt @ J
        eta = (wjt @ res.reshape(lead + (-1, 1)) + lam @ x[..., None])[..., 0]
        if self.limbs is not None and cov is not None:
            lam_l, eta_l = limb_information(x, cov, *self.limbs)
            lam, eta = lam + lam_l, eta + eta_l
        return lam, eta


def select_process_noise(problem: _Problem, anchor: np.ndarray, var0: float, scale: float,
                         frames: int = 512, chunks: int = 4) -> np.ndarray:
    """q (K,) of maximum marginal likelihood over the grid anchor x 10^[-6, 1] (22 values), on
    up to `chunks` stretches of `frames` frames spread over the session."""
    n = problem.points.shape[1]
    span = min(frames, n)
    starts = np.unique(np.linspace(0, n - span, max(1, min(chunks, n // span))).astype(int))
    y, v, x = problem.window(starts[None] + np.arange(span)[:, None])
    jac, res, info = problem.linearise(y, v, x)
    lam, eta = problem.information(jac, res, info, robust_weight(res, info, scale), x, None)
    grid = np.logspace(-6, 1, 22)
    T, g, K = eta.shape[:3]
    lam = np.broadcast_to(lam[:, None], (T, len(grid)) + lam.shape[1:]).reshape(T, -1, 3, 3)
    eta = np.broadcast_to(eta[:, None], (T, len(grid)) + eta.shape[1:]).reshape(T, -1, 3)
    q = np.broadcast_to(grid[:, None, None] * anchor, (len(grid), g, K)).reshape(-1)
    mean0 = np.broadcast_to(x[0], (len(grid), g, K, 3)).reshape(-1, 3)
    _, nll = kalman_filter(lam, eta, q, mean0, var0, store=False, likelihood=True)
    return grid[nll.reshape(len(grid), g, K).sum(1).argmin(0)] * anchor


def _first_estimate(group: CameraGroup, pts: np.ndarray, conf: np.ndarray,
                    ens: np.ndarray | None, st: SmoothingSettings) -> tuple[np.ndarray, ...]:
    """Raw DLT (N, K, 3), sigma0 and the robust DLT (N, K, 3), over blocks of frames (bounded
    temporaries)."""
    V, N, K = conf.shape
    size = max(1, BLOCK // (V * K))
    blocks = [slice(a, a + size) for a in range(0, N, size)]
    raw, stride = np.empty((N, K, 3)), max(1, V * N * K // 10**6)
    samples: list[list[np.ndarray]] = [[], []]  # sigma0² estimates, points in >= 3 / 2 views
    for b in blocks:
        tri = group.triangulate(pts[:, b], weights=conf[:, b])
        raw[b] = tri.points_3d
        resid = np.where(conf[:, b] > 0, tri.reproj_error, np.nan)
        n = np.isfinite(resid).sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            est = resid**2 * (2 * n / (2 * n - 3.0)) / CHI2_2_MEDIAN
            est = (est - (0 if ens is None else np.nan_to_num(ens[:, b].mean(-1)))) * conf[:, b]
        for i, views in enumerate((n >= 3, n == 2)):
            samples[i].append(est[np.isfinite(est) & views][::stride])
    sigma0 = st.pixel_noise_px
    if sigma0 is None:
        found = next((np.concatenate(s) for s in samples if sum(map(len, s))), None)
        sigma0 = 1.0 if found is None else float(np.sqrt(max(np.median(found), 0.0)))
        sigma0 = max(sigma0, st.min_pixel_noise_px)
    init = np.empty((N, K, 3))
    for b in blocks:
        var = observation_variance(conf[:, b], None if ens is None else ens[:, b], sigma0)
        init[b] = robust_triangulation(group, pts[:, b], var, st.robust_scale)
    return raw, sigma0, init


def smooth_session(points_2d: np.ndarray, variance_2d: np.ndarray | None,
                   confidence: np.ndarray | None, group: CameraGroup, *,
                   settings: SmoothingSettings | None = None,
                   limb_pairs: np.ndarray | None = None, limb_lengths: np.ndarray | None = None,
                   limb_std: np.ndarray | None = None,
                   progress: str | None = None) -> SmoothedSession:
    """Smooth one session (module docstring). points_2d (V, N, K, 2) frame px, variance_2d
    (V, N, K, 2) px² or None, confidence (V, N, K) or None; limb_pairs (E, 2) keypoint indices,
    limb_lengths (E,) and limb_std (E,) in calibration units (NaN length = no prior; std
    defaults to settings.limb_std_fraction x length); progress: tqdm label."""
    st = settings or SmoothingSettings()
    pts = np.asarray(points_2d, float)
    if pts.ndim != 4 or pts.shape[0] != len(group) or pts.shape[-1] != 2:
        raise ValueError(f"points_2d shape {pts.shape}, expected ({len(group)}, N, K, 2)")
    V, N, K = pts.shape[:3]
    conf = np.ones((V, N, K)) if confidence is None else np.asarray(confidence, float)
    ens = None if variance_2d is None else np.asarray(variance_2d, float)
    if conf.shape != (V, N, K) or (ens is not None and ens.shape != pts.shape):
        raise ValueError(f"confidence {conf.shape} / variance_2d "
                         f"{None if ens is None else ens.shape} do not match {pts.shape}")
    with np.errstate(invalid="ignore"):
        usable = (np.isfinite(pts).all(-1) & np.isfinite(conf) & (conf >= st.min_confidence)
                  & (conf > 0))
    conf = np.where(usable, conf, 0.0)
    raw, sigma0, init = _first_estimate(group, pts, conf, ens, st)
    finite = init[np.isfinite(init).all(-1)]
    scale = float(np.median(np.linalg.norm(finite - np.median(finite, 0), axis=-1))) \
        if len(finite) else 0.0
    scale = scale or 1e-3 * float(np.median([np.linalg.norm(c.tvec) for c in group.cameras]))
    x_all = fill_gaps(init)
    has = np.isfinite(x_all).all(-1).any(0)  # (K,) keypoints triangulated at least once
    limbs = None
    if limb_pairs is not None and limb_lengths is not None and len(limb_pairs):
        lengths = np.asarray(limb_lengths, float)
        std_l = np.full(len(lengths), np.nan) if limb_std is None else np.asarray(limb_std)
        limbs = (np.asarray(limb_pairs, int).reshape(-1, 2), lengths,
                 np.where(std_l > 0, std_l, st.limb_std_fraction * lengths))
    conf[:, :, ~has], x_all[:, ~has] = 0.0, 0.0  # in place: no copies of session size
    problem = _Problem(group, pts, conf, ens, sigma0, x_all, 1e-5 * scale, limbs)
    var0 = (10 * scale) ** 2
    if st.process_noise is not None:
        q = np.full(K, float(st.process_noise))
    else:
        q = 1.5 * motion_variance(init)  # the q that would explain every Δ²x by motion
        q = np.where(np.isfinite(q) & (q > 0), q, (0.1 * scale) ** 2)
        if N >= 10:
            q = select_process_noise(problem, q, var0, st.robust_scale)
        q = q * st.process_noise_scale
    log.info("smoothing %d frames x %d keypoints x %d views: sigma0 %.2f px%s, acceleration "
             "std (sqrt q) per frame: median %.3g, keypoints %.3g-%.3g; pose scale %.3g", N, K,
             V, sigma0, "" if st.pixel_noise_px else " (estimated)",
             *np.sqrt([np.median(q), q.min(), q.max()]), scale)

    mean, std = np.full((N, K, 3), np.nan), np.full((N, K, 3), np.nan)
    reproj = np.full((V, N, K, 2), np.nan)
    reproj_std, residual = np.full((V, N, K), np.nan), np.full((V, N, K), np.nan)
    weight = np.zeros((V, N, K))
    span = min(st.chunk_frames, N)
    pad = st.overlap_frames if N > span else 0
    starts = np.arange(0, N, span)
    core = np.zeros(span + 2 * pad, bool)
    core[pad:pad + span] = True
    batches = range(0, len(starts), st.chunks_per_batch)
    for b0 in tqdm(batches, desc=progress, unit="batch", disable=None, leave=False):
        idx = starts[None, b0:b0 + st.chunks_per_batch] - pad + np.arange(len(core))[:, None]
        W, g = idx.shape
        y, v, x = problem.window(idx)
        cov, q_b = None, np.tile(q, g)
        for it in range(st.iterations + (problem.limbs is not None)):  # limbs from pass 2 on
            jac, res, info = problem.linearise(y, v, x)
            lam = eta = views = None
            if it:  # iteratively reweighted about the smoothed 3D
                w_rob = robust_weight(res, info, st.robust_scale)
                lam, eta = (a.reshape((W, g * K) + a.shape[3:]) for a in problem.information(
                    jac, res, info, w_rob, x, cov))
            else:  # the first pass: each frame's views gated against the trajectory so far
                J = jac.reshape(W, g * K, 2 * V, 3)
                z = res.reshape(W, g * K, 2 * V) + (J @ x.reshape(W, g * K, 3, 1))[..., 0]
                views = (J, z, info.reshape(W, g * K, 2 * V))
            m, cov, _ = kalman_smoother(lam, eta, q_b, x[0].reshape(g * K, 3), var0, views,
                                        st.robust_scale)
            x, cov = m.reshape(W, g, K, 3), cov.reshape(W, g, K, 3, 3)
        keep = core[:, None] & (idx >= 0) & (idx < N)  # (W, g): the frames this batch owns
        frames, x, cov = idx[keep], x[keep], cov[keep]
        proj, jac = project_with_jacobian(group, x, problem.step)
        r, v = y[:, keep] - proj, v[:, keep]
        used = np.isfinite(v).all(-1) & np.isfinite(r).all(-1)
        mean[frames], reproj[:, frames] = x, proj
        std[frames] = np.sqrt(np.diagonal(cov, axis1=-2, axis2=-1))
        reproj_std[:, frames] = np.sqrt(0.5 * ((jac @ cov) * jac).sum((-1, -2)))  # tr J P J^T
        residual[:, frames] = np.where(used, np.linalg.norm(r, axis=-1), np.nan)
        weight[:, frames] = np.where(used, robust_weight(r, 1.0 / v, st.robust_scale), 0.0)
    mean[:, ~has], std[:, ~has], reproj[:, :, ~has], reproj_std[:, :, ~has] = (np.nan,) * 4
    with np.errstate(invalid="ignore"):
        outlier = residual > st.outlier_threshold_px
    log.info("smoothed: %d of %d used observations flagged (> %g px from the smoothed 3D)",
             int(outlier.sum()), int(np.isfinite(residual).sum()), st.outlier_threshold_px)
    return SmoothedSession(points_3d=mean, std_3d=std, reprojected=reproj,
                           reprojected_std_px=reproj_std, residual_px=residual, outlier=outlier,
                           weight=weight, raw_3d=raw, pixel_noise_px=float(sigma0),
                           process_noise=np.where(has, q, np.nan))
