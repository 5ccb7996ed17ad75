"""pipeline.geometry.camera_torch agrees with the numpy cameras and has correct gradients."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from pipeline.geometry import camera_torch as gt
from pipeline.geometry.cameras import Camera, CameraGroup

DIST = {
    "pinhole5": [-0.21, 0.06, 1.2e-3, -8e-4, -0.012],
    "pinhole8": [0.35, -0.12, 6e-4, 1.1e-3, 0.02, 0.55, -0.08, 0.03],
    "fisheye": [0.06, -0.015, 0.003, -4e-4],
}


def look_at(centre: np.ndarray, target: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rotation world->camera of a camera at `centre` whose optical axis points at `target`."""
    z = target - centre
    z /= np.linalg.norm(z)
    x = np.cross(z, rng.normal(size=3))
    x /= np.linalg.norm(x)
    return np.stack([x, np.cross(z, x), z])


def random_group(rng: np.random.Generator, models: list[str], size: tuple[int, int] = (640, 480),
                 radius: float = 2000.0) -> CameraGroup:
    """Cameras on a sphere of `radius` around the origin, looking at it, with the given models."""
    cams = []
    for i, model in enumerate(models):
        centre = rng.normal(size=3)
        centre *= radius / np.linalg.norm(centre)
        rot = look_at(centre, rng.normal(scale=50.0, size=3), rng)
        f = rng.uniform(500, 700)
        K = [[f, rng.uniform(-1, 1), size[0] / 2 + rng.uniform(-20, 20)],
             [0, f * rng.uniform(0.98, 1.02), size[1] / 2 + rng.uniform(-20, 20)], [0, 0, 1]]
        dist = np.array(DIST[model]) * rng.uniform(0.8, 1.2, len(DIST[model]))
        cams.append(Camera(f"cam{i}", size, K, dist, cv2.Rodrigues(rot)[0].ravel(),
                           -rot @ centre, fisheye=model == "fisheye"))
    return CameraGroup(tuple(cams))


def camera_tensors(group: CameraGroup, batch: int = 1, dtype: torch.dtype = torch.float64
                   ) -> dict[str, torch.Tensor]:
    """intrinsics (B, V, 3, 3), extrinsics (B, V, 3, 4), distortions (B, V, 8), fisheye (B, V)."""
    dist = np.zeros((len(group), 8))
    for i, cam in enumerate(group.cameras):
        dist[i, : cam.dist.size] = cam.dist
    arrays = {
        "intrinsics": np.stack([c.matrix for c in group.cameras]),
        "extrinsics": np.stack([c.extrinsic for c in group.cameras]),
        "distortions": dist,
    }
    out = {k: torch.tensor(v, dtype=dtype).expand(batch, *v.shape).clone()
           for k, v in arrays.items()}
    out["fisheye"] = torch.tensor([c.fisheye for c in group.cameras]).expand(batch, -1).clone()
    return out


MODELS = ["pinhole5", "pinhole8", "fisheye", "pinhole5"]


@pytest.fixture
def scene() -> tuple[CameraGroup, np.ndarray]:
    rng = np.random.default_rng(7)
    return random_group(rng, MODELS), rng.uniform(-400, 400, size=(2, 30, 3))


def test_project_matches_numpy(scene) -> None:
    group, points = scene
    cams = camera_tensors(group, batch=2)
    out = gt.project(torch.tensor(points), **cams).numpy()  # (B, V, N, 2)
    expected = np.moveaxis(group.project(points), 0, 1)  # (B, V, N, 2)
    assert np.abs(out - expected).max() < 1e-4
    # the points are in front of every camera and inside the images
    assert ((expected > 0) & (expected < [640, 480])).all()


def test_project_valid_masks_points_behind() -> None:
    group = random_group(np.random.default_rng(1), ["pinhole5", "fisheye"])
    cams = camera_tensors(group)
    behind = torch.tensor(group.cameras[0].center * 2.0)[None, None]  # behind camera 0
    pts = behind.clone().requires_grad_(True)
    pix, valid = gt.project_valid(pts, **cams, max_radius=10.0)
    assert not valid[0, 0, 0] and torch.isfinite(pix).all()
    pix.sum().backward()
    assert torch.isfinite(pts.grad).all()


def test_undistort_matches_numpy(scene) -> None:
    group, _ = scene
    xs, ys = np.meshgrid(np.linspace(0, 639, 9), np.linspace(0, 479, 7))
    pixels = np.broadcast_to(np.stack([xs, ys], -1).reshape(-1, 2), (len(group), 63, 2))
    expected = group.undistort(pixels)
    assert np.isfinite(expected).all()
    cams = camera_tensors(group)
    out = gt.undistort(torch.tensor(pixels)[None], cams["intrinsics"], cams["distortions"],
                       cams["fisheye"])[0].numpy()
    f = np.array([c.matrix[0, 0] for c in group.cameras])[:, None, None]
    assert np.abs(out - expected).max() * f.max() < 1e-4  # in pixels
    # and back: distort(undistort(p)) == p
    again = gt.apply_affine(cams["intrinsics"][..., :2, :],
                            gt.distort(torch.tensor(out)[None], cams["distortions"],
                                       cams["fisheye"]))[0].numpy()
    assert np.abs(again - pixels).max() < 1e-6


def test_distort_matches_opencv() -> None:
    group = random_group(np.random.default_rng(2), ["pinhole8", "fisheye"])
    cams = camera_tensors(group)
    pts = np.random.default_rng(3).uniform(-0.5, 0.5, size=(20, 2))
    out = gt.apply_affine(cams["intrinsics"][..., :2, :],
                          gt.distort(torch.tensor(pts).expand(1, 2, 20, 2), cams["distortions"],
                                     cams["fisheye"]))[0].numpy()
    obj = np.concatenate([pts, np.ones((20, 1))], 1)[:, None]
    for v, cam in enumerate(group.cameras):
        K = cam.matrix.copy()
        K[0, 1] = 0.0  # OpenCV's projectPoints ignore K's skew: added below
        if cam.fisheye:
            ref = cv2.fisheye.projectPoints(obj, np.zeros(3), np.zeros(3), K, cam.dist)[0][:, 0]
        else:
            ref = cv2.projectPoints(obj, np.zeros(3), np.zeros(3), K, cam.dist)[0][:, 0]
        ref[:, 0] += cam.matrix[0, 1] * (ref[:, 1] - K[1, 2]) / K[1, 1]
        assert np.abs(out[v] - ref).max() < 1e-6, cam.name


def test_triangulate_matches_numpy(scene) -> None:
    group, points = scene
    rng = np.random.default_rng(4)
    pix = group.project(points) + rng.normal(scale=0.5, size=(len(group), 2, 30, 2))
    weights = rng.uniform(0.2, 1.0, size=pix.shape[:-1])
    weights[:, 0, :5] = 0.0  # five points with no view at all
    weights[1:, 0, 5:10] = 0.0  # five points seen by one view only
    weights[2:, 1, :10] = 0.0  # ten points seen by exactly two views
    ref = group.triangulate(pix, weights=weights).points_3d  # (2, 30, 3)
    cams = camera_tensors(group, batch=2)
    normalized = gt.undistort(torch.tensor(np.moveaxis(pix, 0, 1)), cams["intrinsics"],
                              cams["distortions"], cams["fisheye"])
    out, valid = gt.triangulate(normalized, cams["extrinsics"],
                                torch.tensor(np.moveaxis(weights, 0, 1)))
    np.testing.assert_array_equal(valid.numpy(), np.isfinite(ref).all(-1))
    assert not valid[0, :10].any() and valid[1].all() and valid[0, 10:].all()
    assert (out[~valid] == 0).all()
    good = valid.numpy()
    rel = np.abs(out.numpy()[good] - ref[good]).max() / np.abs(ref[good]).max()
    assert rel < 1e-6


def test_triangulate_pairs() -> None:
    group = random_group(np.random.default_rng(5), ["pinhole5"] * 4)
    points = np.random.default_rng(6).uniform(-300, 300, size=(3, 8, 3))
    cams = camera_tensors(group, batch=3)
    pix = torch.tensor(np.moveaxis(group.project(points), 0, 1))
    normalized = gt.undistort(pix, cams["intrinsics"], cams["distortions"], cams["fisheye"])
    weights = torch.ones(3, 4, 8, dtype=torch.float64)
    weights[0, 1, 0] = 0.0  # view 1 misses point 0 of sample 0
    out, valid = gt.triangulate_pairs(normalized, cams["extrinsics"], weights)
    assert out.shape == (3, 6, 8, 3) and valid.shape == (3, 6, 8)
    pairs = gt.view_pairs(4).T.tolist()
    assert pairs == [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]
    with_view1 = [p for p, pair in enumerate(pairs) if 1 in pair]
    assert not valid[0, with_view1, 0].any() and valid.sum() == 3 * 6 * 8 - 3
    err = (out - torch.tensor(points)[:, None]).norm(dim=-1)
    assert err[valid].max() < 1e-6


def test_affine_inverse() -> None:
    A = torch.tensor([[2.0, 0.3, 5.0], [-0.2, 1.5, -7.0]], dtype=torch.float64)
    pts = torch.randn(4, 2, dtype=torch.float64)
    back = gt.apply_affine(gt.invert_affine(A), gt.apply_affine(A, pts))
    assert torch.allclose(back, pts)


def test_gradcheck_triangulate() -> None:
    group = random_group(np.random.default_rng(8), ["pinhole5"] * 3)
    cams = camera_tensors(group)
    points = np.random.default_rng(9).uniform(-300, 300, size=(1, 3, 3))
    normalized = gt.undistort(torch.tensor(np.moveaxis(group.project(points), 0, 1)),
                              cams["intrinsics"], cams["distortions"], cams["fisheye"])
    normalized = (normalized + 1e-3 * torch.randn_like(normalized)).requires_grad_(True)
    weights = torch.tensor([[[1.0, 0.5, 0.0], [0.7, 1.0, 1.0], [0.3, 0.9, 1.0]]],
                           dtype=torch.float64, requires_grad=True)
    extr = cams["extrinsics"].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda n, e, w: gt.triangulate(n, e, w)[0], (normalized, extr, weights))
    # invalid points (one view only) are 0 with zero, finite gradient
    w1 = torch.zeros(1, 3, 3, dtype=torch.float64)
    w1[0, 0] = 1.0
    out, valid = gt.triangulate(normalized, cams["extrinsics"], w1)
    assert not valid.any()
    out.sum().backward()
    assert torch.isfinite(normalized.grad).all() and (normalized.grad == 0).all()


@pytest.mark.parametrize("model", ["pinhole5", "pinhole8", "fisheye"])
def test_gradcheck_undistort(model: str) -> None:
    group = random_group(np.random.default_rng(10), [model, "pinhole5"])
    cams = camera_tensors(group)
    pix = torch.tensor([[[[30.0, 40.0], [320.5, 250.0], [600.0, 420.0]]] * 2],
                       dtype=torch.float64, requires_grad=True)
    dist = cams["distortions"].clone().requires_grad_(True)
    intr = cams["intrinsics"].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda p, k, d: gt.undistort(p, k, d, cams["fisheye"]), (pix, intr, dist))


def test_gradcheck_project() -> None:
    group = random_group(np.random.default_rng(11), ["pinhole8", "fisheye"])
    cams = camera_tensors(group)
    pts = torch.tensor([[[10.0, -50.0, 30.0], [0.0, 0.0, 0.0]]], dtype=torch.float64,
                       requires_grad=True)
    dist = cams["distortions"].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, d: gt.project(x, cams["intrinsics"], cams["extrinsics"], d, cams["fisheye"]),
        (pts, dist))


def test_fisheye_centre_is_smooth() -> None:
    """The fisheye maps are finite with the right derivative at the optical axis (r = 0)."""
    dist = torch.tensor([[[0.1, -0.02, 0.0, 0.0, 0, 0, 0, 0]]], dtype=torch.float64)
    fish = torch.tensor([[True]])
    p = torch.zeros(1, 1, 1, 2, dtype=torch.float64, requires_grad=True)
    out = gt.distort(p, dist, fish)
    (jac,) = torch.autograd.grad(out[..., 0].sum(), p)
    assert torch.allclose(jac, torch.tensor([1.0, 0.0], dtype=torch.float64))
    K = torch.eye(3, dtype=torch.float64)[None, None]
    back = gt.undistort(p, K, dist, fish)
    (jac,) = torch.autograd.grad(back[..., 1].sum(), p)
    assert torch.allclose(jac, torch.tensor([0.0, 1.0], dtype=torch.float64))


def test_undistort_outside_invertible_region_is_finite() -> None:
    """Strong barrel distortion folds over at r = 0.82 (max distorted radius 0.54): beyond it
    there is no inverse; the result stays finite with finite gradients (numpy gives NaN)."""
    K = torch.eye(3, dtype=torch.float64)[None, None]
    dist = torch.zeros(1, 1, 8, dtype=torch.float64)
    dist[..., 0] = -0.5
    pts = torch.tensor([[[[0.3, 0.1], [1.0, 0.2], [-3.0, 2.0]]]], dtype=torch.float64,
                       requires_grad=True)
    out = gt.undistort(pts, K, dist, torch.tensor([[False]]))
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(pts.grad).all()
    back = gt.distort(out, dist, torch.tensor([[False]]))
    assert torch.allclose(back[0, 0, 0], pts[0, 0, 0])
