"""3D augmentation math: similarity fit, parameter sampling, pose moves, pixel-centre affines."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data import augment3d as aug
from pipeline.geometry.cameras import Camera, CameraGroup


def similarity(scale: float, degrees: float, shift) -> np.ndarray:
    c, s = scale * np.cos(np.deg2rad(degrees)), scale * np.sin(np.deg2rad(degrees))
    return np.array([[c, -s, shift[0]], [s, c, shift[1]]])


def test_fit_similarity_recovers_exact_similarities():
    rng = np.random.default_rng(0)
    truth = np.stack([similarity(0.9, 10, (3, -4)), similarity(1.3, -35, (-20, 7)),
                      similarity(1.0, 0, (0.5, 0.25))])
    src = rng.uniform(0, 500, (3, 7, 2))
    dst = aug.apply_affine(truth, src)
    valid = np.ones((3, 7), bool)
    valid[1, 2:] = False  # two points determine a similarity exactly
    src[1, 2:], dst[1, 2:] = 1e6, np.nan  # whatever sits in invalid slots is ignored
    np.testing.assert_allclose(aug.fit_similarity(src, dst, valid), truth, atol=1e-9)


def test_fit_similarity_is_the_least_squares_optimum():
    rng = np.random.default_rng(1)
    src = rng.uniform(0, 300, (1, 12, 2))
    dst = aug.apply_affine(similarity(1.1, 25, (10, 4)), src) + rng.normal(0, 2.0, src.shape)
    fit = aug.fit_similarity(src, dst, np.ones((1, 12), bool))[0]
    # generic solver over (a, b, tx, ty): x' = a x − b y + tx, y' = b x + a y + ty
    x, y = src[0, :, 0], src[0, :, 1]
    one, zero = np.ones_like(x), np.zeros_like(x)
    design = np.concatenate([np.stack([x, -y, one, zero], 1), np.stack([y, x, zero, one], 1)])
    a, b, tx, ty = np.linalg.lstsq(design, np.concatenate([dst[0, :, 0], dst[0, :, 1]]),
                                   rcond=None)[0]
    np.testing.assert_allclose(fit, [[a, -b, tx], [b, a, ty]], rtol=1e-9, atol=1e-8)


def test_fit_similarity_flags_underdetermined_rows():
    src = np.array([[[10.0, 10.0], [20.0, 30.0]], [[5.0, 5.0], [5.0, 5.0]],
                    [[1.0, 2.0], [3.0, 4.0]]])
    valid = np.array([[True, False], [True, True], [True, True]])
    fit = aug.fit_similarity(src, src + 1.0, valid)
    assert np.isnan(fit[0]).all()  # one point
    assert np.isnan(fit[1]).all()  # two coincident points
    np.testing.assert_allclose(fit[2], similarity(1, 0, (1, 1)), atol=1e-12)


def test_params_depend_only_on_seed_frame_and_copy():
    cfg = aug.AugmentConfig(scale_range=(0.8, 1.2), rotate_deg=30.0)
    forward = [aug.sample_params(7, f, c, cfg) for f in range(5) for c in (1, 2)]
    backward = [aug.sample_params(7, f, c, cfg) for f in reversed(range(5)) for c in (2, 1)]
    key = {(p.scale, p.rotation_deg, *p.shift) for p in forward}
    assert key == {(p.scale, p.rotation_deg, *p.shift) for p in backward}
    assert len(key) == 10  # every (frame, copy) draws differently
    assert aug.sample_params(8, 0, 1, cfg).scale != aug.sample_params(7, 0, 1, cfg).scale
    many = [aug.sample_params(0, f, 1, cfg) for f in range(300)]
    scales = np.array([p.scale for p in many])
    assert 0.8 <= scales.min() and scales.max() <= 1.2 and np.ptp(scales) > 0.35
    assert max(abs(p.rotation_deg) for p in many) <= 30.0
    assert np.abs(np.array([p.shift for p in many])).max() <= 1.0
    assert aug.sample_params(0, 3, 1, aug.AugmentConfig()).rotation_deg == 0.0


def test_augment_points_scales_about_the_median_and_shifts_by_the_extent():
    rng = np.random.default_rng(2)
    pose = rng.normal(0, 20, (9, 3)) + [100, -50, 30]
    pose[4] = np.nan
    cfg = aug.AugmentConfig(translate_frac=0.25)
    still = aug.augment_points(pose, aug.AugmentParams(1.15, np.zeros(3), 0.0), cfg)
    centre = np.nanmedian(pose, axis=0)
    np.testing.assert_allclose(still - centre, 1.15 * (pose - centre))
    assert np.isnan(still[4]).all()
    shift = np.array([1.0, -0.5, 0.2])
    moved = aug.augment_points(pose, aug.AugmentParams(1.15, shift, 0.0), cfg)
    extent = np.nanmax(still, axis=0) - np.nanmin(still, axis=0)
    rows = np.isfinite(pose).all(-1)
    np.testing.assert_allclose((moved - still)[rows],
                               np.broadcast_to(0.25 * shift * extent, (8, 3)))


def test_rotation_turns_about_the_vertical_axis_through_the_median():
    rng = np.random.default_rng(3)
    pose = rng.normal(0, 20, (8, 3))
    cfg = aug.AugmentConfig(vertical_axis=(0.0, 0.0, 2.0))
    moved = aug.augment_points(pose, aug.AugmentParams(1.0, np.zeros(3), 90.0), cfg)
    centre = np.median(pose, axis=0)
    np.testing.assert_allclose(moved[:, 2], pose[:, 2], atol=1e-9)  # heights kept
    d, e = pose - centre, moved - centre
    np.testing.assert_allclose(e[:, :2], np.stack([-d[:, 1], d[:, 0]], 1), atol=1e-9)
    tilted = aug.axis_rotation(np.array([1.0, 1.0, 0.0]), 40.0)
    np.testing.assert_allclose(tilted @ tilted.T, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(tilted @ [1, 1, 0], [1, 1, 0], atol=1e-12)


def make_group() -> CameraGroup:
    matrix = np.array([[400.0, 0, 160], [0, 400, 128], [0, 0, 1]])
    cams = [Camera(name=f"c{i}", size=(320, 256), matrix=matrix,
                   dist=np.array([-0.1, 0.02, 0.001, -0.001, 0.0]),
                   rvec=np.array([0.0, angle, 0.0]), tvec=np.array([0.0, 0.0, 600.0]))
            for i, angle in enumerate((0.0, 0.5, -0.5))]
    return CameraGroup(cameras=tuple(cams))


def test_augment_frame_fits_every_view_from_the_3d_points():
    rng = np.random.default_rng(4)
    pose = rng.normal(0, 25, (10, 3))
    pose[[2, 7]] = np.nan
    group = make_group()
    params = aug.AugmentParams(1.1, np.array([0.5, -0.3, 0.2]), 0.0)
    moved = aug.augment_frame(pose, group, params, aug.AugmentConfig())
    assert moved.fittable and moved.fit_points.sum(1).tolist() == [8, 8, 8]
    np.testing.assert_allclose(moved.after, group.project(moved.moved), equal_nan=True)
    # the warp is the best similarity: its residual is small next to the motion itself
    mapped = aug.apply_affine(moved.warp, moved.before)
    ok = moved.fit_points
    residual = np.linalg.norm(mapped - moved.after, axis=-1)[ok]
    motion = np.linalg.norm(moved.before - moved.after, axis=-1)[ok]
    assert residual.max() < 0.2 * motion.max()
    assert np.isnan(aug.augment_frame(pose[:1].repeat(3, 0), group, params,
                                      aug.AugmentConfig()).warp).all()


def test_points_behind_a_camera_are_not_projected():
    group = make_group()
    pose = np.array([[0.0, 0, 0], [10, 0, 0], [0, 10, 0], [0, 0, -700]])  # the last: behind
    front = aug.in_front(group, pose)
    assert front[:, :3].all() and not front[0, 3]
    moved = aug.augment_frame(pose, group, aug.IDENTITY_PARAMS, aug.AugmentConfig())
    assert not moved.fit_points[0, 3] and np.isnan(moved.after[0, 3]).all()


def test_resize_affine_maps_pixel_edges_onto_pixel_edges():
    m = aug.model_from_frame(np.array([[10.0, 20.0, 100.0, 200.0]]), (50, 100))[0]
    corners = aug.apply_affine(m, np.array([[9.5, 19.5], [209.5, 119.5]]))  # the box's edges
    np.testing.assert_allclose(corners, [[-0.5, -0.5], [99.5, 49.5]])
    # x_frame = (x_model + 0.5)·s − 0.5 + x0, the OpenCV resize convention
    back = aug.apply_affine(aug.invert(m), np.array([[0.0, 0.0], [3.0, 7.0]]))
    np.testing.assert_allclose(back, [[10 + 0.5 * 2 - 0.5, 20 + 0.5 * 2 - 0.5],
                                      [10 + 3.5 * 2 - 0.5, 20 + 7.5 * 2 - 0.5]])


def test_compose_and_invert():
    a, b = similarity(1.2, 30, (4, -2)), aug.model_from_frame(np.array([0, 0, 64, 80]), (32, 32))
    points = np.random.default_rng(5).uniform(0, 50, (6, 2))
    np.testing.assert_allclose(aug.apply_affine(aug.compose(b, a), points),
                               aug.apply_affine(b, aug.apply_affine(a, points)))
    np.testing.assert_allclose(aug.compose(aug.invert(a), a), np.eye(2, 3), atol=1e-12)


@pytest.mark.parametrize(("point", "inside"), [((-0.5, 0.0), True), ((-0.51, 0.0), False),
                                               ((63.49, 31.49), True), ((63.5, 0.0), False),
                                               ((np.nan, 1.0), False)])
def test_inside_uses_pixel_edges(point, inside):
    assert aug.inside(np.array(point), (32, 64)) == inside


@pytest.mark.parametrize("size", [(48, 64), (160, 200)])
def test_resize_affine_is_opencvs_resize(size):
    """warpAffine with model_from_frame reproduces cv2.resize (same pixel-centre convention)."""
    import cv2

    image = cv2.GaussianBlur(np.random.default_rng(6).integers(0, 256, (80, 100, 3), np.uint8),
                             (0, 0), 1.5)
    matrix = aug.model_from_frame(np.array([0.0, 0.0, 80.0, 100.0]), size)
    warped = cv2.warpAffine(image, matrix, size[::-1], flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_REPLICATE).astype(int)
    resized = cv2.resize(image, size[::-1], interpolation=cv2.INTER_LINEAR).astype(int)
    assert np.abs(warped - resized)[2:-2, 2:-2].max() <= 2
