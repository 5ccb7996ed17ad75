"""pipeline.geometry.cameras: projection and undistortion against OpenCV, triangulation against
an SVD reference, TOML I/O and its error messages, and a sanity check on the real mouse
recording."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.core.errors import ParallaxError
from pipeline.geometry.cameras import (
    Camera,
    CameraGroup,
    Triangulation,
    rodrigues,
)
from pipeline.geometry.dlt import triangulate_dlt_normalized
from pipeline.io.calibration_toml import read_calibration, write_calibration

K = np.array([[1200.0, 0.0, 641.3], [0.0, 1185.0, 509.8], [0.0, 0.0, 1.0]])
# strong but monotonic inside the image (and a bit beyond)
DISTORTIONS = {
    "pinhole4": ([-0.35, 0.15, 1e-3, -8e-4], False),
    "pinhole5": ([-0.35, 0.15, 1e-3, -8e-4, -0.02], False),
    "pinhole8": ([-0.3, 0.1, 1e-3, -8e-4, 0.01, 0.05, 0.01, 0.002], False),
    "fisheye": ([0.05, -0.01, 0.003, -0.001], True),
}
MOUSE_VIEWS = ["back", "mid", "side", "top"]


def make_camera(model: str = "pinhole5", name: str = "cam", rvec=(0.1, -0.2, 0.05),
                tvec=(10.0, -20.0, 1000.0)) -> Camera:
    dist, fisheye = DISTORTIONS[model]
    return Camera(name=name, size=(1280, 1024), matrix=K, dist=np.array(dist),
                  rvec=np.array(rvec), tvec=np.array(tvec), fisheye=fisheye)


def points_in_view(
    cam: Camera, rng: np.random.Generator, n: int = 2000
) -> tuple[np.ndarray, np.ndarray]:
    """World points whose images cover the whole frame, corners included; and their ideal
    normalized coordinates."""
    normalized = np.concatenate([
        rng.uniform([-0.72, -0.58], [0.72, 0.58], size=(n, 2)),
        np.array([[sx * 0.72, sy * 0.58] for sx in (-1, 1) for sy in (-1, 1)]),
    ])
    depth = rng.uniform(300.0, 3000.0, size=(len(normalized), 1))
    cam_points = np.concatenate([normalized * depth, depth], axis=1)
    world = (cam_points - cam.tvec) @ cam.R  # R^T (x - t)
    return world, normalized


def ring_group(n_views: int = 6, radius: float = 1000.0, model: str = "pinhole5") -> CameraGroup:
    """Cameras on a ring at height 0.3 * radius, all looking at the origin."""
    cams = []
    for i in range(n_views):
        angle = 2 * np.pi * i / n_views
        center = radius * np.array([np.cos(angle), np.sin(angle), 0.3])
        z = -center / np.linalg.norm(center)
        x = np.cross(z, [0.0, 0.0, 1.0])
        x /= np.linalg.norm(x)
        R = np.stack([x, np.cross(z, x), z])
        rvec = cv2.Rodrigues(R)[0][:, 0]
        cam = make_camera(model, name=f"cam{i}", rvec=rvec, tvec=-R @ center)
        cams.append(cam)
    return CameraGroup(cameras=tuple(cams), metadata={})


def svd_dlt(normalized: np.ndarray, extrinsics: np.ndarray, weights=None) -> np.ndarray:
    """Reference: homogeneous DLT, smallest right singular vector per point (missing -> 0 rows)."""
    x, y = normalized[..., 0], normalized[..., 1]
    ok = np.isfinite(x) & np.isfinite(y)
    w = ok.astype(float) if weights is None else np.where(ok, weights, 0.0)
    P = extrinsics[:, None]  # (V, 1, 3, 4)
    rows = np.stack([np.nan_to_num(x)[..., None] * P[..., 2, :] - P[..., 0, :],
                     np.nan_to_num(y)[..., None] * P[..., 2, :] - P[..., 1, :]], axis=1)
    rows = rows * w[:, None, :, None]  # (V, 2, N, 4)
    A = rows.reshape(-1, rows.shape[2], 4).transpose(1, 0, 2)
    vh = np.linalg.svd(A)[2][:, -1]
    return vh[:, :3] / vh[:, 3:]


def lstsq_dlt(normalized: np.ndarray, extrinsics: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Reference: the same weighted inhomogeneous problem, solved by a batched pseudo-inverse."""
    x, y = normalized[..., 0], normalized[..., 1]
    P = extrinsics[:, None]
    rows = np.stack([x[..., None] * P[..., 2, :] - P[..., 0, :],
                     y[..., None] * P[..., 2, :] - P[..., 1, :]], axis=1)
    rows = rows * weights[:, None, :, None]
    A = rows.reshape(-1, rows.shape[2], 4).transpose(1, 0, 2)
    return (np.linalg.pinv(A[..., :3]) @ -A[..., 3:])[..., 0]


# ------------------------------------------------------------------ projection / distortion
def test_rodrigues_matches_opencv():
    rng = np.random.default_rng(0)
    special = [[0, 0, 0], [1e-9, -2e-9, 0], [np.pi, 0, 0]]
    rvecs = np.concatenate([rng.normal(size=(20, 3)), special])
    ours = rodrigues(rvecs)
    for rvec, R in zip(rvecs, ours, strict=True):
        np.testing.assert_allclose(R, cv2.Rodrigues(rvec)[0], atol=1e-14)
    cam = make_camera()
    np.testing.assert_allclose(cam.center, -cv2.Rodrigues(cam.rvec)[0].T @ cam.tvec, atol=1e-10)
    assert cam.extrinsic.shape == (3, 4)


@pytest.mark.parametrize("model", DISTORTIONS)
def test_project_matches_opencv(model):
    rng = np.random.default_rng(1)
    cam = make_camera(model)
    world, _ = points_in_view(cam, rng)
    ours = cam.project(world)
    if cam.fisheye:
        ref = cv2.fisheye.projectPoints(world[:, None], cam.rvec, cam.tvec, K, cam.dist)[0][:, 0]
    else:
        ref = cv2.projectPoints(world, cam.rvec, cam.tvec, K, cam.dist)[0][:, 0]
    assert np.abs(ours - ref).max() < 1e-6
    # the sample really reaches the image corners
    assert ours[:, 0].min() < 30 and ours[:, 0].max() > 1250
    assert ours[:, 1].min() < 30 and ours[:, 1].max() > 994


@pytest.mark.parametrize("model", DISTORTIONS)
def test_undistort_inverts_project(model):
    rng = np.random.default_rng(2)
    cam = make_camera(model)
    world, normalized = points_in_view(cam, rng)
    pixels = cam.project(world)
    assert np.abs(cam.undistort(pixels) - normalized).max() < 1e-9
    np.testing.assert_allclose(cam.distort(normalized), pixels, atol=1e-9)


def test_newton_beats_opencv_default_near_corners():
    cam = make_camera("pinhole5")
    normalized = np.array([[sx * 0.72, sy * 0.58] for sx in (-1, 1) for sy in (-1, 1)])
    pixels = cam.distort(normalized)
    ours = np.abs(cam.undistort(pixels) - normalized).max()
    opencv = cv2.undistortPoints(pixels[:, None], K, cam.dist)[:, 0]
    assert np.abs(opencv - normalized).max() > 1e-4 > 1e6 * ours
    strict = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 100, 1e-15)
    if hasattr(cv2, "undistortPointsIter"):
        iterated = cv2.undistortPointsIter(pixels[:, None], K, cam.dist, None, None, strict)
    else:
        try:
            iterated = cv2.undistortPoints(pixels[:, None], K, cam.dist, criteria=strict)
        except (TypeError, cv2.error):
            pytest.skip("this OpenCV has no undistortPoints with a termination criterion")
    np.testing.assert_allclose(cam.undistort(pixels), iterated[:, 0], atol=1e-9)


def test_nan_in_nan_out():
    group = ring_group(3)
    points = np.array([[0.0, 1.0, 2.0], [np.nan, 0.0, 0.0]])
    projected = group.project(points)
    assert projected.shape == (3, 2, 2)
    assert np.isfinite(projected[:, 0]).all() and np.isnan(projected[:, 1]).all()
    undistorted = group.undistort(projected)
    assert np.isfinite(undistorted[:, 0]).all() and np.isnan(undistorted[:, 1]).all()


# ------------------------------------------------------------------ triangulation
def noisy_scene(seed: int = 3, n: int = 20000, noise_px: float = 0.7, missing: float = 0.2):
    rng = np.random.default_rng(seed)
    group = ring_group(6)
    truth = rng.uniform(-150, 150, size=(n, 3))
    clean = group.project(truth)
    noisy = clean + rng.normal(scale=noise_px, size=clean.shape)
    noisy[rng.random(noisy.shape[:2]) < missing] = np.nan
    return group, truth, clean, noisy


def test_round_trip_noise_free():
    group, truth, clean, _ = noisy_scene(n=5000)
    result = group.triangulate(clean.reshape(6, 50, 100, 2))
    assert isinstance(result, Triangulation)
    assert result.points_3d.shape == (50, 100, 3) and result.n_views.shape == (50, 100)
    assert result.reproj_error.shape == (6, 50, 100)
    scale = np.ptp(truth, axis=0).max()
    assert np.abs(result.points_3d.reshape(-1, 3) - truth).max() < 1e-6 * scale
    assert (result.n_views == 6).all() and np.nanmax(result.reproj_error) < 1e-6


def test_accuracy_matches_svd_dlt():
    group, truth, _, noisy = noisy_scene()
    ours = group.triangulate(noisy)
    normalized = group.undistort(noisy)
    extrinsics = np.stack([cam.extrinsic for cam in group.cameras])
    ref = svd_dlt(normalized, extrinsics)
    ref[ours.n_views < 2] = np.nan
    err_ours = np.linalg.norm(ours.points_3d - truth, axis=1)
    err_ref = np.linalg.norm(ref - truth, axis=1)
    assert np.array_equal(np.isnan(err_ours), np.isnan(err_ref))
    for q in (50, 90):
        a, b = np.nanpercentile(err_ours, q), np.nanpercentile(err_ref, q)
        assert abs(a - b) <= 0.01 * b, (q, a, b)
    core = triangulate_dlt_normalized(normalized, extrinsics)
    np.testing.assert_allclose(core, ours.points_3d, atol=1e-9)


def test_missing_views_and_min_views():
    group, truth, clean, _ = noisy_scene(n=6)
    pts = clean.copy()
    pts[:, 0] = np.nan                 # nobody sees point 0
    pts[1:, 1] = np.nan                # one view sees point 1
    pts[2:, 2] = np.nan                # two views see point 2
    pts[3:, 3, 0] = np.nan             # half-missing coordinates count as missing
    result = group.triangulate(pts)
    assert result.n_views.tolist() == [0, 1, 2, 3, 6, 6]
    assert np.isnan(result.points_3d[:2]).all()
    np.testing.assert_allclose(result.points_3d[2:], truth[2:], atol=1e-7)
    assert np.isnan(result.reproj_error[:, :2]).all()
    assert np.isnan(result.reproj_error[3:, 3]).all() and (result.reproj_error[:3, 3] < 1e-6).all()
    strict = group.triangulate(pts, min_views=3)
    assert np.isnan(strict.points_3d[2]).all() and np.isfinite(strict.points_3d[3]).all()
    with pytest.raises(ValueError):
        group.triangulate(pts, min_views=1)


def test_weights_scale_rows_and_zero_drops_a_view():
    group, _, _, noisy = noisy_scene(n=2000, missing=0.0)
    rng = np.random.default_rng(4)
    weights = rng.uniform(0.2, 1.0, size=noisy.shape[:2])
    ours = group.triangulate(noisy, weights=weights)
    extrinsics = np.stack([cam.extrinsic for cam in group.cameras])
    ref = lstsq_dlt(group.undistort(noisy), extrinsics, weights)
    np.testing.assert_allclose(ours.points_3d, ref, atol=1e-7)
    unweighted = group.triangulate(noisy).points_3d
    assert np.abs(unweighted - ours.points_3d).max() > 1e-3
    weights[0] = 0.0
    dropped = group.triangulate(noisy, weights=weights)
    rest = group.subset(group.names[1:]).triangulate(noisy[1:], weights=weights[1:])
    np.testing.assert_allclose(dropped.points_3d, rest.points_3d, atol=1e-9)
    assert (dropped.n_views == 5).all()
    assert np.isfinite(dropped.reproj_error[0]).all()  # measured, not used: leave-one-out
    with pytest.raises(ValueError):
        group.triangulate(noisy, weights=weights[:, :10])


def test_degenerate_views_give_nan():
    cam = make_camera()
    group = CameraGroup(cameras=(cam, Camera(**{**vars_of(cam), "name": "twin"})), metadata={})
    pixels = np.array([[[600.0, 500.0]], [[600.0, 500.0]]])
    result = group.triangulate(pixels)
    assert np.isnan(result.points_3d).all() and result.n_views.tolist() == [2]


def vars_of(cam: Camera) -> dict:
    return dict(name=cam.name, size=cam.size, matrix=cam.matrix, dist=cam.dist, rvec=cam.rvec,
                tvec=cam.tvec, fisheye=cam.fisheye)


def test_reprojection_error_semantics():
    group, truth, clean, _ = noisy_scene(n=4)
    observed = clean.copy()
    observed[0, 0] = np.nan
    observed[1, 1] += [3.0, 4.0]
    points = truth.copy()
    points[2] = np.nan
    err = group.reprojection_error(points, observed)
    assert err.shape == (6, 4)
    assert np.isnan(err[0, 0]) and np.isnan(err[:, 2]).all()
    assert err[1, 1] == pytest.approx(5.0)
    assert np.nanmax(np.delete(err, [1, 2], axis=1)) < 1e-9


def test_group_access_and_subset():
    group = ring_group(4)
    assert len(group) == 4 and group.names == ("cam0", "cam1", "cam2", "cam3")
    assert group["cam2"] is group[2]
    sub = group.subset(["cam3", "cam0"])
    assert sub.names == ("cam3", "cam0")
    with pytest.raises(KeyError):
        group["nope"]
    with pytest.raises(ParallaxError, match="nope"):
        group.subset(["nope"])
    with pytest.raises(ParallaxError, match="duplicate"):
        CameraGroup(cameras=(group[0], group[0]), metadata={})


# ------------------------------------------------------------------ TOML
def test_dump_load_round_trip_is_bit_exact(tmp_path):
    rng = np.random.default_rng(5)
    cams = []
    for i, model in enumerate(DISTORTIONS):
        dist, fisheye = DISTORTIONS[model]
        cams.append(Camera(name=f"view {i} \"q\"", size=(1280 + i, 1024),
                           matrix=np.array([[rng.uniform(900, 1500), 0.0, rng.uniform(600, 700)],
                                            [0.0, rng.uniform(900, 1500), rng.uniform(480, 540)],
                                            [0.0, 0.0, 1.0]]),
                           dist=np.array(dist) * rng.uniform(0.9, 1.1, len(dist)),
                           rvec=rng.normal(size=3), tvec=rng.normal(size=3) * 1e3,
                           fisheye=fisheye))
    metadata = {"adjusted": True, "error": 0.1 + 0.2, "n": 3, "tiny": 1e-300, "note": "a\\b",
                "nested": {"x": [1.5, 2]}}
    group = CameraGroup(cameras=tuple(cams), metadata=metadata)
    path = tmp_path / "calibration.toml"
    write_calibration(group, path)
    loaded = read_calibration(path)
    assert loaded == group and loaded.metadata == metadata
    for a, b in zip(loaded.cameras, group.cameras, strict=True):
        for key in ("matrix", "dist", "rvec", "tvec"):
            assert getattr(a, key).tobytes() == getattr(b, key).tobytes()
    again = tmp_path / "again.toml"
    write_calibration(loaded, again)
    assert again.read_bytes() == path.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.toml", "calibration.toml"]


def test_cam_tables_sorted_numerically(tmp_path):
    group = ring_group(12)
    path = tmp_path / "calibration.toml"
    write_calibration(group, path)
    chunks = re.split(r"\n(?=\[)", path.read_text())
    assert chunks[2].startswith("[cam_2]") and chunks[10].startswith("[cam_10]")
    chunks.sort(key=lambda chunk: chunk[1:chunk.index("]")])  # cam_0 cam_1 cam_10 cam_11 cam_2
    assert chunks[2].startswith("[cam_10]")
    path.write_text("\n".join(chunks))
    assert read_calibration(path).names == group.names


def write_mouse_like(tmp_path: Path) -> Path:
    group = ring_group(3)
    cams = [Camera(**{**vars_of(c), "name": n}) for c, n in zip(group.cameras,
                                                                ["back", "mid", "side"],
                                                                strict=True)]
    path = tmp_path / "calib.toml"
    write_calibration(CameraGroup(cameras=tuple(cams), metadata={"error": 0.4}), path)
    return path


BAD_EDITS = {
    # id: (old, new, needles that must appear in the message)
    "third_row": ("[0.0, 0.0, 1.0]]", "[1451.1, 993.0, 1.0]]", ["'back'", "[cam_0]", "third row"]),
    "missing_key": ('translation = ', 'translationX = ', ["'back'", "[cam_0]", "translation"]),
    "rotation_len": ("rotation = [", "rotation = [0.5, ", ["'back'", "rotation"]),
    "dist_len": ("distortions = [", "distortions = [0.0, ", ["'back'", "distortions", "6"]),
    "nan": ("translation = [", "translation = [nan, ", ["'back'", "translation"]),
    "fx_negative": ("matrix = [[1200.0", "matrix = [[-1200.0", ["'back'", "fx"]),
    "size_float": ("size = [1280, 1024]", "size = [1280.0, 1024]", ["'back'", "size"]),
    "size_zero": ("size = [1280, 1024]", "size = [0, 1024]", ["'back'", "size"]),
    "string_in_matrix": ("matrix = [[1200.0", 'matrix = [["1200"', ["'back'", "matrix"]),
    "fisheye_5": ("[cam_0]\n", "[cam_0]\nfisheye = true\n", ["'back'", "fisheye"]),
    "no_name": ('name = "back"', 'nam = "back"', ["[cam_0]", "name"]),
    "duplicate": ('name = "side"', 'name = "back"', ["'back'", "[cam_0]", "[cam_2]"]),
    "bad_toml": ("]\n", "\n", ["line"]),
}


@pytest.mark.parametrize("case", BAD_EDITS)
def test_malformed_calibration_names_file_and_camera(tmp_path, case):
    path = write_mouse_like(tmp_path)
    old, new, needles = BAD_EDITS[case]
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(ParallaxError) as err:
        read_calibration(path)
    message = str(err.value)
    for needle in ["calib.toml", *needles]:
        assert needle in message, message


def test_third_row_message_format(tmp_path):
    path = write_mouse_like(tmp_path)
    path.write_text(path.read_text().replace("[0.0, 0.0, 1.0]]", "[1451.1, 993.0, 1.0]]", 3))
    with pytest.raises(ParallaxError) as err:
        read_calibration(path)
    assert str(err.value) == (f"{path}: camera 'back' ([cam_0]): K third row is "
                              "[1451.1, 993.0, 1.0], expected [0, 0, 1]")


def test_view_names_checked_by_name(tmp_path):
    path = write_mouse_like(tmp_path)
    assert read_calibration(path, ["back", "mid", "side"]).names == ("back", "mid", "side")
    with pytest.raises(ParallaxError) as err:
        read_calibration(path, ["back", "mid", "side", "top"])
    assert "calib.toml" in str(err.value) and "'top'" in str(err.value)
    with pytest.raises(ParallaxError) as err:
        read_calibration(path, ["mid", "back", "side"])
    message = str(err.value)
    assert "['back', 'mid', 'side']" in message and "['mid', 'back', 'side']" in message
    with pytest.raises(ParallaxError) as err:
        read_calibration(path, ["back", "mid"])
    assert "'side'" in str(err.value) and "[cam_2]" in str(err.value)


def test_missing_file_and_no_cameras(tmp_path):
    with pytest.raises(ParallaxError, match="nothere.toml"):
        read_calibration(tmp_path / "nothere.toml")
    empty = tmp_path / "empty.toml"
    empty.write_text("[metadata]\n")
    with pytest.raises(ParallaxError, match="empty.toml"):
        read_calibration(empty)


def test_constructor_validates():
    with pytest.raises(ParallaxError, match="third row"):
        Camera(name="a", size=(10, 10), matrix=np.ones((3, 3)), dist=np.zeros(5),
               rvec=np.zeros(3), tvec=np.zeros(3))
    with pytest.raises(ParallaxError, match="distortions"):
        Camera(name="a", size=(10, 10), matrix=K, dist=np.zeros(5), rvec=np.zeros(3),
               tvec=np.zeros(3), fisheye=True)
    cam = make_camera()
    assert not cam.matrix.flags.writeable
    assert cam == make_camera() and cam != make_camera(tvec=(0.0, 0.0, 1.0))


# ------------------------------------------------------------------ real data
def test_real_calibration_loads(mouse_dir, tmp_path):
    group = read_calibration(mouse_dir / "calibration.toml", view_names=MOUSE_VIEWS)
    assert group.names == tuple(MOUSE_VIEWS) and group.metadata == {}
    assert all(cam.size == (1280, 1024) and cam.dist.size == 5 for cam in group.cameras)
    with pytest.raises(ParallaxError, match="calibration.toml"):
        read_calibration(mouse_dir / "calibration.toml", view_names=MOUSE_VIEWS[::-1])
    write_calibration(group, tmp_path / "copy.toml")
    assert read_calibration(tmp_path / "copy.toml") == group


def test_real_labels_reprojection(mouse_dir):
    pd = pytest.importorskip("pandas")
    group = read_calibration(mouse_dir / "calibration.toml", view_names=MOUSE_VIEWS)
    views = []
    for view in MOUSE_VIEWS:
        table = pd.read_csv(mouse_dir / f"CollectedData_{view}.csv", header=[0, 1, 2],
                            index_col=0)
        assert list(table.columns.get_level_values(2)[:2]) == ["x", "y"]
        views.append(table.to_numpy(dtype=float).reshape(len(table), -1, 2))
    points = np.stack(views)
    assert points.shape == (4, 80, 15, 2)
    result = group.triangulate(points)
    used = result.n_views >= 2
    median = np.nanmedian(result.reproj_error[:, used])
    assert 5.5 < median < 6.7, median
