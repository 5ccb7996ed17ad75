"""The Kalman core of the 3D smoother (`pipeline.inference.smoothing`): a constant-velocity
filter in information form with a backward RTS pass, vectorised over keypoints (and chunks of
frames), with per-frame gating of views; and the limb-length prior.

Shapes: B independent tracks (keypoints x chunks), N frames; the state per track is position
and velocity (6,), its covariance (6, 6); observations come as information (B, N, 3, 3) and
information vector (B, N, 3) summed over views."""

from __future__ import annotations

import warnings

import numpy as np


def _prior(mean0: np.ndarray, var0: float) -> tuple[np.ndarray, np.ndarray]:
    """State (B, 6) and covariance (B, 6, 6) before the first frame: position mean0 (B, 3) with
    variance var0 per axis, velocity 0 with variance var0 / 100."""
    P = np.diag(np.repeat([var0, var0 / 100], 3))
    return np.concatenate([mean0, np.zeros_like(mean0)], -1), np.broadcast_to(P, (len(mean0),
                                                                                  6, 6))


def _predict(m: np.ndarray, P: np.ndarray, Q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One constant-velocity step: F m and F P F^T + Q, F = [[I, I], [0, I]] (block sums)."""
    m, P = m.copy(), P.copy()
    m[:, :3] += m[:, 3:]
    P[:, :3] += P[:, 3:]
    P[:, :, :3] += P[:, :, 3:]
    return m, P + Q


def _gated(J: np.ndarray, z: np.ndarray, info: np.ndarray, mu: np.ndarray, S: np.ndarray,
           scale: float, rounds: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One frame's information lam (B, 3, 3), eta (B, 3) from its views' rows J (B, 2V, 3),
    z (B, 2V) (J p = z + noise), info (B, 2V), each view weighted `rounds` times by its residual
    at the posterior given the prediction (mu (B, 3), S (B, 3, 3)) and the weighted views;
    weights (B, V) relative to the best view (all views moving together is motion)."""
    B, R = info.shape
    w = np.ones((B, R // 2))
    for r in range(rounds + 1):
        wjt = ((info * w.repeat(2, -1))[..., None] * J).swapaxes(-1, -2)
        lam, eta = wjt @ J, (wjt @ z[..., None])[..., 0]
        if r == rounds:
            break
        u = np.linalg.solve(np.eye(3) + lam @ S, (eta - (lam @ mu[..., None])[..., 0])[..., None])
        e2 = ((z - (J @ (mu[..., None] + S @ u))[..., 0]) ** 2 * info).reshape(B, -1, 2)
        w = 1.0 / (1.0 + 0.5 * e2.sum(-1) / scale**2) ** 2
        best = np.where(info[:, ::2] > 0, w, 0.0).max(-1, keepdims=True)
        w = np.minimum(w / np.maximum(best, 1e-12), 1.0)
    return lam, eta, w


def kalman_filter(lam: np.ndarray | None, eta: np.ndarray | None, q: np.ndarray,
                  mean0: np.ndarray, var0: float, store: bool = True, likelihood: bool = False,
                  views: tuple[np.ndarray, ...] | None = None,
                  scale: float = 3.0) -> tuple[list[np.ndarray], np.ndarray]:
    """Constant-velocity Kalman filter with information-form position updates.

    lam (T, B, 3, 3), eta (T, B, 3): observation information of the positions (precision,
    precision x mean); q (B,); mean0 (B, 3), var0: the prior (`_prior`). Or, instead of lam and
    eta, views = (J (T, B, 2V, 3), z (T, B, 2V), info (T, B, 2V)): every frame's views gated
    against the prediction (`_gated`, robust scale `scale`). Returns [m_pred, P_pred, m_filt,
    P_filt] ((T, B, 6), (T, B, 6, 6); empty unless `store`), plus the views' weights (T, B, V)
    with `views`; and, with `likelihood`, -2 log p(observations) + const (B,).
    """
    T, B = (views[1] if views is not None else eta).shape[:2]
    Q = q[:, None, None] * np.kron([[1 / 3, 1 / 2], [1 / 2, 1.0]], np.eye(3))
    out = [np.empty(s) for s in ([(T, B, 6), (T, B, 6, 6)] * 2 if store else [(0,)] * 4)]
    if views is not None:
        out.append(np.empty((T, B, views[2].shape[-1] // 2)))
    m, P = _prior(mean0, var0)
    nll = np.zeros(B)
    for t in range(T):
        if t:
            m, P = _predict(m, P, Q)
        PE = P[:, :, :3]
        if views is not None:
            lam_t, eta_t, out[4][t] = _gated(*(a[t] for a in views), m[:, :3], P[:, :3, :3],
                                             scale)
        else:
            lam_t, eta_t = lam[t], eta[t]
        A = np.eye(3) + lam_t @ P[:, :3, :3]
        delta = eta_t - (lam_t @ m[:, :3, None])[..., 0]
        sol = np.linalg.solve(A, np.concatenate([lam_t, delta[..., None]], -1))
        gain_u = PE @ sol[..., 3:]  # (B, 6, 1)
        if likelihood:  # log|A| - 2 mu.eta + mu.lam.mu - delta.S.A^-1.delta
            nll += (np.linalg.slogdet(A)[1] - (m[:, :3] * (eta_t + delta)).sum(-1)
                    - (delta * gain_u[:, :3, 0]).sum(-1))
        if store:
            out[0][t], out[1][t] = m, P
        m = m + gain_u[..., 0]
        P = P - PE @ sol[..., :3] @ PE.transpose(0, 2, 1)
        P = 0.5 * (P + P.transpose(0, 2, 1))
        if store:
            out[2][t], out[3][t] = m, P
    return out, nll


def kalman_smoother(lam: np.ndarray | None, eta: np.ndarray | None, q: np.ndarray,
                    mean0: np.ndarray, var0: float, views: tuple[np.ndarray, ...] | None = None,
                    scale: float = 3.0) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """`kalman_filter` + Rauch-Tung-Striebel backward pass: smoothed positions (T, B, 3), their
    covariances (T, B, 3, 3) and, with `views`, the gated weights (T, B, V) (else None)."""
    m_pred, P_pred, m_filt, P_filt, *weights = kalman_filter(lam, eta, q, mean0, var0,
                                                             views=views, scale=scale)[0]
    mean, cov = np.empty(m_pred.shape[:2] + (3,)), np.empty(m_pred.shape[:2] + (3, 3))
    m, P = m_filt[-1], P_filt[-1]
    mean[-1], cov[-1] = m[:, :3], P[:, :3, :3]
    for t in range(len(m_pred) - 2, -1, -1):
        FP = P_filt[t].copy()
        FP[:, :3] += FP[:, 3:]  # F P_filt
        gain_t = np.linalg.solve(P_pred[t + 1], FP)  # C^T, C = P_filt F^T P_pred^-1
        gain = gain_t.transpose(0, 2, 1)
        m = m_filt[t] + (gain @ (m - m_pred[t + 1])[..., None])[..., 0]
        P = P_filt[t] + gain @ (P - P_pred[t + 1]) @ gain_t
        P = 0.5 * (P + P.transpose(0, 2, 1))
        mean[t], cov[t] = m[:, :3], P[:, :3, :3]
    return mean, cov, (weights[0] if weights else None)


def limb_lengths_from_points(points: np.ndarray,
                             pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labelled 3D (M, K, 3), edges (E, 2) -> median length (E,) and robust std (E,) (1.4826
    MAD); NaN for edges never labelled at both ends."""
    pairs = np.asarray(pairs, int).reshape(-1, 2)
    lengths = np.linalg.norm(points[:, pairs[:, 0]] - points[:, pairs[:, 1]], axis=-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # edges never labelled stay NaN
        median = np.nanmedian(lengths, axis=0)
        return median, 1.4826 * np.nanmedian(np.abs(lengths - median), axis=0)


def limb_information(x: np.ndarray, cov: np.ndarray, pairs: np.ndarray, lengths: np.ndarray,
                      std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Estimates x (..., K, 3) and their covariances (..., K, 3, 3) of the previous pass ->
    information (..., K, 3, 3) and (..., K, 3) of the limb-length pseudo-observations: end a
    sees n.p_a = L + n.x_b, n the unit vector b -> a, with variance s² + n^T P_b n (the other
    end's uncertainty: a well-seen end is not dragged towards a poorly seen one)."""
    lam, eta = np.zeros(x.shape + (3,)), np.zeros(x.shape)
    a, b = pairs[:, 0], pairs[:, 1]
    diff = x[..., a, :] - x[..., b, :]  # (..., E, 3)
    norm = np.linalg.norm(diff, axis=-1, keepdims=True)
    ok = (norm[..., 0] > 0) & np.isfinite(lengths) & np.isfinite(std)
    n = np.where(ok[..., None], diff / np.where(norm > 0, norm, 1.0), 0.0)
    for ends, other, sign in ((a, b, 1.0), (b, a, -1.0)):  # the two ends of every edge
        spread = np.einsum("...i,...ij,...j->...", n, cov[..., other, :, :], n)
        w = np.where(ok, 1.0 / (std**2 + spread), 0.0)[..., None]
        target = np.where(ok, lengths + sign * (n * x[..., other, :]).sum(-1), 0.0)
        np.add.at(np.moveaxis(lam, -3, 0), ends,
                  np.moveaxis(w[..., None] * n[..., :, None] * n[..., None, :], -3, 0))
        np.add.at(np.moveaxis(eta, -2, 0), ends, np.moveaxis(sign * w * n * target[..., None],
                                                             -2, 0))
    return lam, eta
