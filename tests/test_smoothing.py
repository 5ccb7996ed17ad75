"""pipeline.inference.smoothing and stage smooth_video: the robust Kalman smoother recovers a
known 3D trajectory from noisy projections (better and smoother than per-frame triangulation),
flags and down-weights a view that is wrong for a stretch, bridges missing views and frames,
works on one frame, uses ensemble variances, agrees with a dense least-squares solution, and the
stage writes its four outputs (or nothing, with one error line, on bad input)."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest

from pipeline.core.errors import ParallaxError
from pipeline.geometry.cameras import Camera, CameraGroup
from pipeline.inference.kalman import kalman_smoother, limb_lengths_from_points
from pipeline.inference.smoothing import SmoothingSettings, motion_variance, smooth_session
from pipeline.io.calibration_toml import write_calibration
from pipeline.io.labels_csv import write_label_csv
from pipeline.io.predictions_csv import read_pose_3d, read_predictions_2d, write_predictions_2d
from pipeline.stages import smooth_video

VIEWS = ("top", "left", "right", "back")


def ring(n_views: int = 4, radius: float = 600.0) -> CameraGroup:
    """Cameras around and above the origin, looking at it, with some barrel distortion."""
    cams = []
    for i in range(n_views):
        angle = 2 * np.pi * i / n_views + 0.3
        center = radius * np.array([np.cos(angle), np.sin(angle), 0.6])
        z = -center / np.linalg.norm(center)
        x = np.cross(z, [0.0, 0.0, 1.0])
        x /= np.linalg.norm(x)
        R = np.stack([x, np.cross(z, x), z])
        cams.append(Camera(name=VIEWS[i], size=(640, 512),
                           matrix=np.array([[800.0, 0, 319.5], [0, 800.0, 255.5], [0, 0, 1]]),
                           dist=np.array([-0.12, 0.03, 0.0, 0.0, 0.0]),
                           rvec=cv2.Rodrigues(R)[0][:, 0], tvec=-R @ center))
    return CameraGroup(cameras=tuple(cams), metadata={})


def trajectory(n: int, k: int = 5, seed: int = 0) -> np.ndarray:
    """(n, k, 3) smooth 3D paths (mm): a body offset per keypoint plus slow sinusoids."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)[:, None, None]
    period = rng.uniform(60, 200, (1, k, 3))
    return (rng.normal(0, 30, (1, k, 3)) + 40 * np.sin(2 * np.pi * t / period
                                                      + rng.uniform(0, 6, (1, k, 3))))


def observe(group: CameraGroup, truth: np.ndarray, noise: float = 2.0,
            seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    points = group.project(truth)
    return points + rng.normal(0, noise, points.shape)


def error(points: np.ndarray, truth: np.ndarray) -> np.ndarray:
    return np.linalg.norm(points - truth, axis=-1)


def jitter(points: np.ndarray) -> float:
    return float(np.nanmedian(np.linalg.norm(points[2:] - 2 * points[1:-1] + points[:-2],
                                             axis=-1)))


@pytest.fixture(scope="module")
def scene():
    group = ring()
    truth = trajectory(300)
    return group, truth, observe(group, truth)


def test_recovers_a_smooth_trajectory(scene):
    group, truth, obs = scene
    conf = np.random.default_rng(2).uniform(0.6, 1.0, obs.shape[:-1])
    result = smooth_session(obs, None, conf, group)
    raw, smooth = error(result.raw_3d, truth), error(result.points_3d, truth)
    assert np.median(smooth) < 0.6 * np.median(raw)
    assert np.percentile(smooth, 95) < 0.6 * np.percentile(raw, 95)
    assert jitter(result.points_3d) < jitter(result.raw_3d) / 3
    assert 1.5 < result.pixel_noise_px < 3.0  # 2 px noise at confidence ~0.8
    # the posterior std is about the actual error (expected 3D error: within a factor of 2)
    rms = np.sqrt(np.mean(smooth**2))
    assert 0.5 * rms < np.median(result.std) < 2 * rms
    reproj = group.project(result.points_3d)
    np.testing.assert_allclose(result.reprojected, reproj, atol=1e-6)
    assert not result.outlier.any()
    conf2d = result.reprojection_confidence(10.0)
    assert ((conf2d > 0.9) & (conf2d <= 1)).all()


def test_a_wrong_view_is_flagged_and_down_weighted(scene):
    group, truth, obs = scene
    bad = obs.copy()
    bad[1, 100:160] += 40.0  # view 'left' off by 40 px for 60 frames
    result = smooth_session(bad, None, None, group)
    assert result.outlier[1, 100:160].mean() > 0.95
    assert result.weight[1, 100:160].mean() < 0.05
    others = np.delete(result.outlier, 1, axis=0)
    assert others[:, 100:160].mean() < 0.02 and result.outlier[:, :95].mean() < 0.02
    stretch = error(result.points_3d[100:160], truth[100:160])
    assert np.median(stretch) < 1.5 * np.median(error(result.points_3d, truth))
    assert np.median(stretch) < 0.3 * np.median(error(result.raw_3d[100:160], truth[100:160]))


def test_three_views_a_wrong_view_is_refused_from_its_onset():
    """With 3 views the wrong view and one good view can agree on a wrong 3D point; only the
    trajectory before the stretch tells them apart (the gated first pass)."""
    group, truth = ring(3), trajectory(300)
    obs = observe(group, truth)
    obs[2, 100:160] += (30.0, 30.0)
    result = smooth_session(obs, None, None, group)
    stretch = error(result.points_3d[100:160], truth[100:160])
    assert np.median(stretch) < 2.0, np.median(stretch)  # per-frame robust weights: ~29 mm
    assert result.outlier[2, 100:160].mean() > 0.95
    assert result.outlier[:2, 100:160].mean() < 0.05


def test_missing_views_and_frames_are_bridged(scene):
    group, truth, obs = scene
    holes = obs.copy()
    holes[2, 50:90] = np.nan  # one view missing for a stretch
    holes[:, 200:206] = np.nan  # frames seen by no view
    holes[0, 10, 0] = np.nan
    result = smooth_session(holes, None, None, group)
    assert np.isfinite(result.points_3d).all() and np.isfinite(result.std).all()
    assert np.isnan(result.raw_3d[200:206]).all()
    gap = error(result.points_3d[200:206], truth[200:206])
    assert gap.max() < 5 * np.median(error(result.points_3d, truth))
    assert (result.std[200:206].mean(0) > 1.25 * np.median(result.std, 0)).all()
    assert np.isnan(result.residual_px[2, 50:90]).all() and (result.weight[2, 50:90] == 0).all()
    assert not result.outlier[:, 200:206].any()
    assert np.isfinite(result.reprojected[2, 50:90]).all()


def test_one_frame_and_two_frames(scene):
    group, truth, obs = scene
    for n in (1, 2):
        result = smooth_session(obs[:, :n], None, None, group)
        assert result.points_3d.shape == (n, truth.shape[1], 3)
        assert error(result.points_3d, truth[:n]).max() < 5.0
        assert np.isfinite(result.std).all()


def test_a_keypoint_never_triangulated_stays_empty(scene):
    group, truth, obs = scene
    lonely = obs.copy()
    lonely[1:, :, 3] = np.nan  # keypoint 3 only ever seen by one view
    result = smooth_session(lonely, None, None, group)
    assert np.isnan(result.points_3d[:, 3]).all() and np.isnan(result.reprojected[:, :, 3]).all()
    assert np.isfinite(np.delete(result.points_3d, 3, axis=1)).all()


def test_ensemble_variance_weights_the_views(scene):
    group, truth, _ = scene
    rng = np.random.default_rng(3)
    clean = group.project(truth)
    noisy = clean + rng.normal(0, 2.0, clean.shape)
    noisy[0] = clean[0] + rng.normal(0, 15.0, clean[0].shape)  # one much worse view
    variance = np.full(noisy.shape, 4.0)
    variance[0] = 225.0
    plain = smooth_session(noisy, None, None, group)
    weighted = smooth_session(noisy, variance, None, group)
    assert (np.median(error(weighted.points_3d, truth))
            < 0.8 * np.median(error(plain.points_3d, truth)))
    with pytest.raises(ValueError):
        smooth_session(noisy, variance[:, :10], None, group)


def test_chunks_agree_with_one_pass(scene):
    group, _, obs = scene
    settings = SmoothingSettings(process_noise=0.5)
    whole = smooth_session(obs, None, None, group, settings=settings)
    chunked = smooth_session(obs, None, None, group, settings=SmoothingSettings(
        process_noise=0.5, chunk_frames=64, overlap_frames=48, chunks_per_batch=2))
    assert np.abs(whole.points_3d - chunked.points_3d).max() < 0.05
    assert np.abs(whole.std - chunked.std).max() < 0.05


def test_kalman_smoother_equals_dense_least_squares():
    """Linear Gaussian case: the RTS smoother is the exact posterior of the whole sequence."""
    rng = np.random.default_rng(4)
    T, q, var0 = 12, 0.3, 100.0
    mean0 = rng.normal(size=3)
    lam, eta = np.zeros((T, 1, 3, 3)), np.zeros((T, 1, 3))
    for t in range(T):
        if t != 5:  # frame 5: no observation
            a = rng.normal(size=(2 if t % 3 else 4, 3))  # rank-2 information on some frames
            lam[t, 0] = a.T @ a
            eta[t, 0] = a.T @ rng.normal(size=len(a))
    mean, cov, _ = kalman_smoother(lam, eta, np.array([q]), mean0[None], var0)
    F = np.eye(6)
    F[:3, 3:] = np.eye(3)
    Qi = np.linalg.inv(q * np.kron([[1 / 3, 1 / 2], [1 / 2, 1.0]], np.eye(3)))
    H = np.zeros((6 * T, 6 * T))
    h = np.zeros(6 * T)
    H[:6, :6] += np.diag(np.repeat([1 / var0, 100 / var0], 3))  # velocity prior var0 / 100
    h[:3] += mean0 / var0
    for t in range(T):
        H[6 * t:6 * t + 3, 6 * t:6 * t + 3] += lam[t, 0]
        h[6 * t:6 * t + 3] += eta[t, 0]
        if t:  # prior term (x_t - F x_{t-1})^T Q^-1 (x_t - F x_{t-1})
            D = np.zeros((6, 6 * T))
            D[:, 6 * t:6 * t + 6] = np.eye(6)
            D[:, 6 * t - 6:6 * t] = -F
            H += D.T @ Qi @ D
    dense_cov = np.linalg.inv(H)
    dense_mean = dense_cov @ h
    for t in range(T):
        np.testing.assert_allclose(mean[t, 0], dense_mean[6 * t:6 * t + 3], atol=1e-8)
        np.testing.assert_allclose(cov[t, 0], dense_cov[6 * t:6 * t + 3, 6 * t:6 * t + 3],
                                   atol=1e-8)


def test_process_noise_is_estimated_in_any_unit():
    """White-noise-acceleration paths: the estimate finds q within a factor of 3, in mm or m."""
    rng = np.random.default_rng(5)
    group, n, q = ring(), 1200, 2e-5
    truth = np.cumsum(np.cumsum(rng.normal(0, np.sqrt(q), (n, 4, 3)), 0), 0)
    truth -= truth.mean(0)
    assert 20 < np.abs(truth).max() < 200  # stays in view
    obs = observe(group, truth, noise=1.0)
    result = smooth_session(obs, None, None, group)
    ratio = result.process_noise / q
    assert ((ratio > 1 / 3) & (ratio < 3)).all(), ratio
    assert 0.7 < result.pixel_noise_px < 1.4
    metres = CameraGroup(cameras=tuple(
        Camera(name=c.name, size=c.size, matrix=c.matrix, dist=c.dist, rvec=c.rvec,
               tvec=c.tvec / 1000) for c in group.cameras))
    in_m = smooth_session(obs, None, None, metres)
    np.testing.assert_allclose(in_m.points_3d * 1000, result.points_3d, rtol=0, atol=0.05)
    assert np.isnan(motion_variance(truth[:3])).all()


def test_limb_prior_pins_a_keypoint_seen_by_one_view(scene):
    group, truth, _ = scene
    t = np.arange(len(truth))
    arm = 40 * np.stack([np.cos(t / 40), np.sin(t / 40), 0.3 * np.sin(t / 25)], -1)
    arm *= 40 / np.linalg.norm(arm, axis=-1, keepdims=True)  # a rigid 40 mm limb, turning
    rigid = truth.copy()
    rigid[:, 1] = rigid[:, 0] + arm
    obs = observe(group, rigid)
    obs[1:, 100:200, 1] = np.nan  # keypoint 1 seen by one view only for 100 frames
    pairs = np.array([[0, 1], [3, 4]])
    lengths, std = limb_lengths_from_points(rigid[::10], pairs)
    assert abs(lengths[0] - 40) < 1e-9 and std[0] < 1e-9 and std[1] > 1
    free = smooth_session(obs, None, None, group)
    pinned = smooth_session(obs, None, None, group, limb_pairs=pairs, limb_lengths=lengths,
                            limb_std=np.maximum(std, 0.5))
    stretch = slice(100, 200)
    free_err = error(free.points_3d[stretch, 1], rigid[stretch, 1])
    pinned_err = error(pinned.points_3d[stretch, 1], rigid[stretch, 1])
    assert np.median(pinned_err) < 0.5 * np.median(free_err), (pinned_err, free_err)
    length = np.linalg.norm(pinned.points_3d[:, 1] - pinned.points_3d[:, 0], axis=-1)
    assert np.abs(length - 40).max() < 3


def test_settings_are_checked():
    with pytest.raises(ParallaxError, match="iterations=0"):
        SmoothingSettings(iterations=0)
    with pytest.raises(ParallaxError, match="min_confidence"):
        SmoothingSettings(min_confidence=2.0)


# ---------------------------------------------------------------- the stage
def write_session(root, group, obs, conf, variance=None):
    """Per-view prediction CSVs (variance: x_var, y_var columns) and the calibration."""
    names = [f"kp{k}" for k in range(obs.shape[2])]
    paths = []
    for v, view in enumerate(group.names):
        path = root / f"s0_{view}.csv"
        extra = {"likelihood": conf[v]}
        if variance is not None:
            extra.update(x_var=variance[v, ..., 0], y_var=variance[v, ..., 1])
        write_label_csv(path, [str(i) for i in range(obs.shape[1])], names, obs[v],
                        scorer="model", extra=extra)
        paths.append(path)
    write_calibration(group, root / "s0.toml")
    return names, paths


def stage_args(root, paths, *extra, views=VIEWS):
    return ["--predictions", *map(str, paths), "--view-names", *views,
            "--calibration", str(root / "s0.toml"), "--session", "s0",
            "--out-3d", str(root / "out" / "s0_3d.csv"),
            "--out-2d", *[str(root / "out" / f"s0_{v}.csv") for v in views],
            "--out-outliers", str(root / "out" / "s0_outliers.csv"),
            "--out-figure", str(root / "out" / "s0.png"), *extra]


@pytest.mark.parametrize("with_variance", [False, True])
def test_stage_end_to_end(scene, tmp_path, with_variance):
    group, truth, obs = scene
    obs, truth = obs[:, :120].copy(), truth[:120]
    obs[3, 30:60, 2] += 60.0  # view 'back' wrong on keypoint 2
    conf = np.full(obs.shape[:-1], 0.9)
    variance = np.full(obs.shape, 1.0) if with_variance else None
    names, paths = write_session(tmp_path, group, obs, conf, variance)
    labels = {f"{kp}_{a}": truth[::7, k, i] for k, kp in enumerate(names)
              for i, a in enumerate("xyz")}
    pd.DataFrame(labels).to_csv(tmp_path / "labels_3d.csv", index=False)
    argv = stage_args(tmp_path, paths, "--labels-3d", str(tmp_path / "labels_3d.csv"),
                      "--skeleton", "kp0", "kp1", "kp1", "kp2", "--fps", "100")
    assert smooth_video.main(argv) == 0
    out = tmp_path / "out"
    kps, points, err, ncams, score, rest = read_pose_3d(out / "s0_3d.csv")
    assert kps == names and points.shape == (120, len(names), 3)
    assert np.median(error(points, truth)) < 1.0
    stds = rest[[f"{kp}_std" for kp in names]].to_numpy()
    assert np.isfinite(stds).all() and (stds > 0).all()
    assert (ncams[30:60, 2] == 3).all() and (ncams[:30] == 4).all()
    index, kp2d, xy, likelihood, _ = read_predictions_2d(out / "s0_top.csv")
    assert index == [str(i) for i in range(120)] and kp2d == names
    np.testing.assert_allclose(xy, group.project(points)[0], atol=1e-6)
    assert ((likelihood > 0) & (likelihood <= 1)).all()
    outliers = pd.read_csv(out / "s0_outliers.csv")
    assert list(outliers.columns) == ["frame", "view", "keypoint", "residual_px", "weight",
                                      "flagged"]
    flagged = outliers[outliers.flagged]
    assert set(flagged.view) == {"back"} and set(flagged.keypoint) == {"kp2"}
    assert sorted(flagged.frame) == list(range(30, 60))
    assert (out / "s0.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stage_refuses_bad_input(scene, tmp_path, capsys):
    group, _, obs = scene
    obs = obs[:, :20]
    names, paths = write_session(tmp_path, group, obs, np.ones(obs.shape[:-1]))
    short = tmp_path / "short.csv"
    write_predictions_2d(short, range(19), names, obs[2, :19], np.ones((19, len(names))),
                         scorer="model")
    assert smooth_video.main(stage_args(tmp_path, [paths[0], paths[1], short, paths[3]])) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("parallax error:")]
    assert len(lines) == 1 and str(short) in lines[0] and "(19)" in lines[0]
    assert not (tmp_path / "out").exists()
    # calibration cameras that are not the views
    argv = stage_args(tmp_path, paths, views=("front", *VIEWS[1:]))
    assert smooth_video.main(argv) == 2
    err = capsys.readouterr().err
    assert "s0.toml" in err and "front" in err and err.count("parallax error:") == 1
    # a cell that is not a number
    text = paths[1].read_text().splitlines()
    text[5] = text[5].replace(text[5].split(",")[1], "oops", 1)
    paths[1].write_text("\n".join(text) + "\n")
    assert smooth_video.main(stage_args(tmp_path, paths)) == 2
    err = capsys.readouterr().err
    assert f"{paths[1]}: line 6" in err and "'oops'" in err
    assert not (tmp_path / "out").exists()
