"""pipeline.training.losses: heatmap conventions, heatmap MSE scale, and the two supervised 3D
losses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.models import decoding
from pipeline.models.decoding import decode_heatmaps
from pipeline.training import losses
from tests.test_geometry_torch import camera_tensors, random_group

SIGMA, STRIDE, SIZE = 1.25, 4, 64  # heatmaps 16 x 16
HM = SIZE // STRIDE


SCENES: dict[int, tuple] = {}


def model_px(points_3d: np.ndarray, seed: int) -> np.ndarray:
    """(B, K, 3) world points -> (B, V, K, 2) model pixels of `make_batch(seed)`'s crops."""
    group, lin, offset = SCENES[seed]
    frame = np.moveaxis(group.project(points_3d), 0, 1)
    return np.linalg.solve(lin[:, :, None], (frame - offset[:, :, None])[..., None])[..., 0]


def make_batch(seed: int = 0, batch: int = 3, keypoints: int = 5,
               models: tuple[str, ...] = ("pinhole5", "pinhole8", "fisheye"),
               dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """A noise-free calibrated batch: random cameras, 3D poses, per-view crops (with rotation);
    `model_px(points, seed)` projects other 3D points into the same crops."""
    rng = np.random.default_rng(seed)
    group = random_group(rng, list(models))
    points = rng.uniform(-300, 300, size=(batch, keypoints, 3))
    frame = np.moveaxis(group.project(points), 0, 1)  # (B, V, K, 2)
    centre = (frame.max(2) + frame.min(2)) / 2  # (B, V, 2)
    scale = 1.5 * (frame.max(2) - frame.min(2)).max(-1) / SIZE  # (B, V)
    angle = rng.uniform(-0.3, 0.3, size=scale.shape)
    rot = np.stack([np.cos(angle), -np.sin(angle), np.sin(angle), np.cos(angle)], -1)
    lin = scale[..., None, None] * rot.reshape(*scale.shape, 2, 2)
    offset = centre - lin @ np.full(2, (SIZE - 1) / 2)
    affine = np.concatenate([lin, offset[..., None]], -1)  # (B, V, 2, 3) model -> frame
    SCENES[seed] = (group, lin, offset)
    model = np.linalg.solve(lin[:, :, None], (frame - offset[:, :, None])[..., None])[..., 0]
    assert ((model > 0) & (model < SIZE - 1)).all()
    out = {k: v.to(dtype) if v.is_floating_point() else v
           for k, v in camera_tensors(group, batch, dtype).items()}
    valid = torch.ones(batch, len(models), keypoints, dtype=torch.bool)
    out.update(
        keypoints_2d=torch.tensor(model, dtype=dtype), keypoints_valid=valid,
        keypoints_3d=torch.tensor(points, dtype=dtype),
        keypoints_3d_valid=torch.ones(batch, keypoints, dtype=torch.bool),
        frame_from_model=torch.tensor(affine, dtype=dtype),
        has_calibration=torch.ones(batch, dtype=torch.bool),
    )
    return out


def targets(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return losses.gaussian_heatmaps(decoding.model_to_heatmap(batch["keypoints_2d"], STRIDE),
                                    batch["keypoints_valid"], HM, HM, SIGMA)


def both_losses(pred: torch.Tensor, batch: dict[str, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    pair = losses.pairwise_projection_loss(pred, batch)[0]
    reproj = losses.reprojection_heatmap_loss(pred, targets(batch), batch, SIGMA, STRIDE)[0]
    return pair, reproj


def test_loss_weight() -> None:
    assert losses.loss_weight(None) == 0.0
    assert losses.loss_weight(0.0) == 0.5
    assert losses.loss_weight(3.0) == pytest.approx(0.0249, abs=1e-4)


@pytest.mark.parametrize("stride", [1, 2, 4, 8])
def test_render_then_decode_round_trip(stride: int) -> None:
    p = torch.tensor([[[[120.3, 131.7], [132.0, 140.49], [127.5, 124.0]]]],
                     dtype=torch.float64)
    maps = losses.gaussian_heatmaps(decoding.model_to_heatmap(p, stride),
                                    torch.ones(p.shape[:-1], dtype=torch.bool),
                                    256 // stride, 192 // stride, SIGMA)
    assert torch.allclose(maps.sum((-2, -1)), torch.ones(1, 1, 3, dtype=torch.float64))
    back = decoding.soft_argmax(maps, stride)
    assert (back - p).abs().max() < 0.05
    assert (back - p).abs().max() < 1e-6  # in fact unbiased
    conf = decoding.confidence(maps, back, stride)
    assert ((conf > 0.85) & (conf <= 1.0 + 1e-9)).all()  # 5x5 window, sigma 1.25


def test_convention_matches_heads_decoder() -> None:
    """A Gaussian on a cell centre decodes to the same model pixel with pipeline.models.heads."""
    p = torch.tensor([[[[4 * 5 + 1.5, 4 * 9 + 1.5]]]])
    maps = losses.gaussian_heatmaps(decoding.model_to_heatmap(p, 4), torch.ones(1, 1, 1).bool(),
                                    HM, HM, SIGMA)
    assert torch.allclose(maps[0, 0, 0].argmax(), torch.tensor(9 * HM + 5))
    xy, _ = decode_heatmaps(maps, 4)
    assert torch.allclose(xy, p, atol=1e-5)


def test_gaussian_heatmaps_invalid_and_far() -> None:
    pts = torch.tensor([[3.0, 4.0], [3.0, 4.0], [-30.0, 5.0], [-1.0, 5.0]], requires_grad=True)
    valid = torch.tensor([True, False, True, True])
    maps = losses.gaussian_heatmaps(pts, valid, 8, 10, SIGMA)
    assert maps.shape == (4, 8, 10)
    sums = maps.sum((-2, -1))
    assert sums[0].item() == pytest.approx(1.0) and sums[1] == 0 and sums[2] < 1e-6
    assert sums[3].item() == pytest.approx(1.0)  # partly off the map: still normalised
    maps.sum().backward()
    assert torch.isfinite(pts.grad).all() and (pts.grad[1] == 0).all()


def test_soft_argmax_temperature_and_confidence() -> None:
    maps = torch.zeros(1, 1, 2, 6, 7)
    maps[0, 0, 0, 2, 3] = 0.6
    maps[0, 0, 0, 2, 4] = 0.4
    maps[0, 0, 1] = 1 / 42  # uniform
    xy = decoding.soft_argmax(maps, stride=1)
    assert torch.allclose(xy[0, 0, 0], torch.tensor([3.4, 2.0]))
    assert torch.allclose(xy[0, 0, 1], torch.tensor([3.0, 2.5]))
    sharp = decoding.soft_argmax(maps, stride=1, temperature=1000.0)
    assert torch.allclose(sharp[0, 0, 0], torch.tensor([3.0, 2.0]), atol=1e-3)
    conf = decoding.confidence(maps, xy, stride=1, radius=1)
    assert conf[0, 0, 0] == pytest.approx(1.0) and conf[0, 0, 1] == pytest.approx(9 / 42)


def test_heatmap_mse_scale_does_not_depend_on_views_keypoints_or_resolution() -> None:
    def loss(views: int, kps: int, size: int) -> float:
        """Targets at the map centre, predictions 1.2 heatmap px off, sigma in heatmap px."""
        true = torch.full((1, views, kps, 2), size / 2)
        pred = true + torch.tensor([1.0, -0.7])
        valid = torch.ones(1, views, kps, dtype=torch.bool)
        valid[0, 0, 0] = False  # an invalid map does not dilute the mean
        t = losses.gaussian_heatmaps(true, valid, size, size, SIGMA)
        p = losses.gaussian_heatmaps(pred, valid | True, size, size, SIGMA)
        return float(losses.heatmap_mse(p, t, valid))

    ref = loss(2, 3, 16)
    assert ref > 0
    for args in [(4, 3, 16), (2, 7, 16), (2, 3, 32)]:
        assert loss(*args) == pytest.approx(ref, rel=1e-3)
    pred = torch.rand(1, 2, 3, 4, 4, requires_grad=True)
    zero = losses.heatmap_mse(pred, torch.rand(1, 2, 3, 4, 4), torch.zeros(1, 2, 3).bool())
    assert zero == 0
    zero.backward()
    assert (pred.grad == 0).all()


def test_3d_losses_zero_at_ground_truth() -> None:
    batch = make_batch()
    pair, reproj = both_losses(batch["keypoints_2d"].clone(), batch)
    assert pair == 0  # the same inputs triangulate bit-identically
    assert 0 <= reproj < 1e-12
    _, metrics = losses.reprojection_heatmap_loss(batch["keypoints_2d"], targets(batch), batch,
                                                  SIGMA, STRIDE)
    assert metrics["reprojection_error_px"] < 1e-6 and metrics["reprojection_count"] == 45
    # pairwise GT triangulations equal the true 3D points (noise-free labels)
    _, metrics = losses.pairwise_projection_loss(batch["keypoints_2d"] + 0.0, batch)
    assert metrics["pairwise_count"] == 3 * 3 * 5


def test_3d_losses_gradients() -> None:
    batch = make_batch(seed=1)
    noise = torch.randn(batch["keypoints_2d"].shape, generator=torch.Generator().manual_seed(0),
                        dtype=torch.float64)
    pred = (batch["keypoints_2d"] + noise).requires_grad_(True)
    for loss in both_losses(pred, batch):
        (grad,) = torch.autograd.grad(loss, pred)
        assert loss > 0 and torch.isfinite(grad).all() and (grad.abs().sum(-1) > 0).all()
    # pairwise_dist_world is in world units: one-pixel noise -> millimetres, not metres
    _, metrics = losses.pairwise_projection_loss(pred, batch)
    assert 0.1 < metrics["pairwise_dist_world"] < 50
    assert not metrics["pairwise_dist_world"].requires_grad
    # descending the reprojection loss moves the predictions towards the labels
    reproj = both_losses(pred, batch)[1]
    (grad,) = torch.autograd.grad(reproj, pred)
    better = both_losses(pred.detach() - 0.05 * noise.norm() * grad / grad.norm(), batch)[1]
    assert better < reproj


def test_3d_losses_ignore_uncalibrated_and_missing() -> None:
    batch = make_batch(seed=2)
    noise = 2.0 * torch.randn(batch["keypoints_2d"].shape,
                              generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    pred = batch["keypoints_2d"] + noise
    first = {k: v[:1] for k, v in batch.items()}
    ref = both_losses(pred[:1], first)
    # samples 1 and 2 uncalibrated, with garbage cameras and wild predictions: no effect
    batch["has_calibration"][1:] = False
    batch["intrinsics"][1] = 0.0
    batch["extrinsics"][2] = float("nan")
    wild = pred.clone()
    wild[1:] = 1e4
    pred_ = wild.requires_grad_(True)
    out = both_losses(pred_, batch)
    for a, b in zip(out, ref, strict=True):
        assert a.item() == pytest.approx(b.item(), rel=1e-9)
    (grad,) = torch.autograd.grad(sum(out), pred_)
    assert torch.isfinite(grad).all() and (grad[1:] == 0).all() and (grad[0] != 0).any()
    # missing keypoints: the loss stays finite; all missing: exactly 0 with finite gradients
    batch["keypoints_valid"][0, 0] = False
    batch["keypoints_valid"][0, 1:, 2] = False
    pred_ = pred.clone().requires_grad_(True)
    out = both_losses(pred_, batch)
    (grad,) = torch.autograd.grad(sum(out), pred_)
    assert all(torch.isfinite(x) and x > 0 for x in out) and torch.isfinite(grad).all()
    assert (grad[0, 0] == 0).all() and (grad[0, :, 2] == 0).all()
    batch["keypoints_valid"][:] = False
    out = both_losses(pred_, batch)
    (grad,) = torch.autograd.grad(sum(out), pred_)
    assert all(x == 0 for x in out) and (grad == 0).all()


def test_reprojection_excludes_occluded_targets() -> None:
    batch = make_batch(seed=3)
    pred = batch["keypoints_2d"] + 1.5
    target = targets(batch)
    base, m0 = losses.reprojection_heatmap_loss(pred, target, batch, SIGMA, STRIDE)
    target[0, 1, 2] = 1.0 / HM**2  # an occluded keypoint's uniform map (LP visible = 1)
    _, m1 = losses.reprojection_heatmap_loss(pred, target, batch, SIGMA, STRIDE)
    assert m1["reprojection_count"] == m0["reprojection_count"] - 1
    batch["visible"] = torch.full(batch["keypoints_valid"].shape, 2, dtype=torch.int8)
    batch["visible"][0, 0, 0] = 1
    _, m2 = losses.reprojection_heatmap_loss(pred, target, batch, SIGMA, STRIDE)
    assert m2["reprojection_count"] == m0["reprojection_count"] - 2
    assert torch.isfinite(base)


def test_gradients_reach_heatmap_logits_float32() -> None:
    torch.manual_seed(0)
    batch = make_batch(seed=4, batch=2, keypoints=2, dtype=torch.float32)
    logits = torch.randn(2, 3, 2, HM, HM, requires_grad=True)
    heatmaps = torch.softmax(logits.flatten(-2), -1).view(logits.shape)
    pred = decoding.soft_argmax(heatmaps, STRIDE)
    target = targets(batch)
    total = (losses.heatmap_mse(heatmaps, target, batch["keypoints_valid"])
             + losses.pairwise_projection_loss(pred, batch)[0] * 1e-4
             + losses.reprojection_heatmap_loss(pred, target, batch, SIGMA, STRIDE)[0])
    total.backward()
    assert math.isfinite(total.item())
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    for fn in (lambda p: losses.pairwise_projection_loss(p, batch)[0],
               lambda p: losses.reprojection_heatmap_loss(p, target, batch, SIGMA, STRIDE)[0]):
        logits.grad = None
        heatmaps = torch.softmax(logits.flatten(-2), -1).view(logits.shape)
        fn(decoding.soft_argmax(heatmaps, STRIDE)).backward()
        assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def moved_predictions(seed: int, shift: np.ndarray) -> tuple[dict, torch.Tensor, np.ndarray]:
    """make_batch(seed) and predictions that are the exact projections of the 3D points moved
    by `shift` (B, K, 3): every view pair triangulates them at exactly points + shift."""
    batch = make_batch(seed=seed)
    moved = batch["keypoints_3d"].numpy() + shift
    return batch, torch.tensor(model_px(moved, seed)), moved


def test_pairwise_loss_is_the_mean_3d_distance_in_closed_form() -> None:
    rng = np.random.default_rng(11)
    shift = rng.normal(scale=5.0, size=(3, 5, 3))  # mm
    batch, pred, _ = moved_predictions(5, shift)
    distance = np.linalg.norm(shift, axis=-1)  # (B, K): the same for every view pair
    points = batch["keypoints_3d"].numpy()
    extent = np.sqrt(((points - points.mean(1, keepdims=True)) ** 2).sum(-1).mean(1))  # (B,)
    world, metrics = losses.pairwise_projection_loss(pred, batch, "world")
    assert world.item() == pytest.approx(distance.mean(), rel=1e-6)  # Euclidean, not squared
    assert metrics["pairwise_dist_world"].item() == pytest.approx(distance.mean(), rel=1e-6)
    assert metrics["pairwise_count"] == 3 * 3 * 5  # samples x view pairs x keypoints
    pose, _ = losses.pairwise_projection_loss(pred, batch, "pose")
    assert pose.item() == pytest.approx((distance / extent[:, None]).mean(), rel=1e-6)


def test_pairwise_pose_scale_is_unit_free() -> None:
    """The same rig in metres: 2D identical, 3D / 1000: the pose-scaled loss is unchanged, the
    world one 1000x smaller."""
    shift = np.random.default_rng(12).normal(scale=4.0, size=(3, 5, 3))
    batch, pred, _ = moved_predictions(6, shift)
    metres = dict(batch)
    metres["extrinsics"] = batch["extrinsics"].clone()
    metres["extrinsics"][..., 3] /= 1000.0
    metres["keypoints_3d"] = batch["keypoints_3d"] / 1000.0
    for scale, ratio in (("pose", 1.0), ("world", 1e-3)):
        mm = losses.pairwise_projection_loss(pred, batch, scale)[0].item()
        m = losses.pairwise_projection_loss(pred, metres, scale)[0].item()
        assert m == pytest.approx(ratio * mm, rel=1e-6)


def render_numpy(points: np.ndarray, size: int, sigma: float) -> np.ndarray:
    """Normalised Gaussians (..., size, size) at heatmap points (..., 2), written afresh."""
    grid = np.arange(size, dtype=float)
    gx = np.exp(-((grid - points[..., :1]) ** 2) / (2 * sigma**2))
    gy = np.exp(-((grid - points[..., 1:]) ** 2) / (2 * sigma**2))
    maps = gy[..., :, None] * gx[..., None, :]
    return maps / maps.sum((-2, -1), keepdims=True)


def test_reprojection_loss_in_closed_form() -> None:
    """Predictions that are exact projections of moved 3D points triangulate to them and
    reproject onto themselves: the loss is the heatmap MSE between Gaussians at the
    predictions and at the labels, rendered independently here."""
    shift = np.random.default_rng(13).normal(scale=1.5, size=(3, 5, 3))
    batch, pred, _ = moved_predictions(7, shift)
    loss, metrics = losses.reprojection_heatmap_loss(pred, targets(batch), batch, SIGMA, STRIDE)
    pred_hm = (pred.numpy() + 0.5) / STRIDE - 0.5  # model -> heatmap coordinates
    label_hm = (batch["keypoints_2d"].numpy() + 0.5) / STRIDE - 0.5
    expected = ((render_numpy(pred_hm, HM, SIGMA) - render_numpy(label_hm, HM, SIGMA)) ** 2
                ).sum((-2, -1)).mean()
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    error = np.linalg.norm(pred.numpy() - batch["keypoints_2d"].numpy(), axis=-1).mean()
    assert metrics["reprojection_error_px"].item() == pytest.approx(error, rel=1e-6)


def test_reprojection_compares_hidden_views_only_when_asked() -> None:
    batch, pred, _ = moved_predictions(8, np.full((3, 5, 3), 2.0))
    target = targets(batch)
    hidden = torch.zeros_like(batch["keypoints_valid"])
    hidden[0, 1, 2] = True  # keypoint 2 of sample 0 not clicked in view 1, target projected
    batch["keypoints_valid"] = batch["keypoints_valid"] & ~hidden
    _, clicked = losses.reprojection_heatmap_loss(pred, target, batch, SIGMA, STRIDE)
    _, both = losses.reprojection_heatmap_loss(pred, target, batch, SIGMA, STRIDE,
                                               compared=batch["keypoints_valid"] | hidden)
    assert clicked["reprojection_count"] == 44 and both["reprojection_count"] == 45
