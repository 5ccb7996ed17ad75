"""Heatmap targets, decoding and losses: supervised heatmap MSE and two supervised 3D losses.

Batch keys used (B batch, V views, K keypoints; see `pipeline.data.cache.torch_dataset`):
keypoints_2d (B, V, K, 2) model px, keypoints_valid (B, V, K), frame_from_model (B, V, 2, 3),
intrinsics (B, V, 3, 3), extrinsics (B, V, 3, 4), distortions (B, V, 8), fisheye (B, V),
has_calibration (B,), optionally visible (B, V, K) (LP 0/1/2).

Compared with Lightning Pose's losses: the heatmap MSE is the
per-map sum of squared errors (mean × h·w) averaged over valid maps, so its scale does not
depend on resolution, V or K, and the reprojection loss uses exactly the same function;
occluded (uniform) and empty targets are excluded from it; triangulation is one batched,
weighted N-view DLT (no loops over samples or pairs); all-missing batches give 0, never NaN.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pipeline.geometry import camera_torch as geo
from pipeline.models.decoding import model_to_heatmap

# reprojections farther than this (ideal normalized radius, ~84°) from a pinhole camera's axis
# are treated as invalid: the distortion polynomial is meaningless (and may overflow) there
MAX_NORMALIZED_RADIUS = 10.0
# a rendered Gaussian is normalised to sum 1 while at least this fraction of its mass is on
# the map; farther off the map it fades continuously to an all-zero map
MIN_MASS_FRACTION = 0.01


def loss_weight(log_weight: float | None) -> float:
    """LP's convention: weight = 1 / (2·exp(log_weight)); None disables the loss (weight 0)."""
    return 0.0 if log_weight is None else 0.5 * math.exp(-float(log_weight))


# ---------------------------------------------------------------------------- heatmaps
def gaussian_heatmaps(points: Tensor, valid: Tensor, height: int, width: int, sigma: float
                      ) -> Tensor:
    """Isotropic Gaussians at points (..., 2) (x, y in heatmap coordinates) -> (..., h, w).

    Differentiable in `points`. Each map is normalised to sum 1 while at least
    MIN_MASS_FRACTION of the Gaussian's mass falls on the map (points on or near the map, the
    normal case); for points farther off the map it fades smoothly to zero (instead of piling
    up at the border). Invalid points (valid False) give all-zero maps with zero gradient.
    """
    valid = valid.bool()
    pts = torch.where(valid[..., None], points, torch.zeros_like(points))
    xs = torch.arange(width, dtype=pts.dtype, device=pts.device)
    ys = torch.arange(height, dtype=pts.dtype, device=pts.device)
    gx = torch.exp(-((xs - pts[..., :1]) ** 2) / (2 * sigma**2))  # (..., w)
    gy = torch.exp(-((ys - pts[..., 1:]) ** 2) / (2 * sigma**2))  # (..., h)
    mass = gx.sum(-1) * gy.sum(-1)
    norm = mass.clamp_min(MIN_MASS_FRACTION * 2 * math.pi * sigma**2)
    scale = torch.where(valid, 1.0 / norm, torch.zeros_like(norm))
    return (gy * scale[..., None])[..., :, None] * gx[..., None, :]


def heatmap_mse(pred: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """Mean over valid maps of the per-map MSE × h·w (= per-map sum of squared errors).

    pred, target (B, V, K, h, w); valid (B, V, K). Scalar; 0 (with a graph) if nothing is valid.
    """
    per_map = ((pred - target) ** 2).sum((-2, -1))
    mask = valid.to(per_map.dtype)
    return (per_map * mask).sum() / mask.sum().clamp_min(1.0)


def informative_targets(target: Tensor, valid: Tensor, visible: Tensor | None = None) -> Tensor:
    """(B, V, K) maps worth comparing: valid, visible == 2 when given (LP: 1 = occluded), and
    the target map is a peak: mass > 0.5 and max - min > max / 2 (excludes all-zero and
    uniform "occluded" maps whatever their origin)."""
    hi, lo = target.amax((-2, -1)), target.amin((-2, -1))
    ok = valid.bool() & (target.sum((-2, -1)) > 0.5) & (hi - lo > 0.5 * hi)
    if visible is not None:
        ok = ok & (visible == 2)
    return ok


# ---------------------------------------------------------------------------------- 3D losses
def _cameras(batch: dict[str, Tensor], like: Tensor) -> dict[str, Tensor]:
    """Camera tensors in `like`'s dtype/device; uncalibrated samples get a harmless identity
    camera (so nothing inside the graph can become inf/NaN) and must be masked by the caller."""
    calib = batch["has_calibration"].to(like.device).bool().reshape(-1)

    def get(key: str, default: Tensor) -> Tensor:
        value = batch[key].to(device=like.device, dtype=like.dtype)
        keep = calib.view(-1, *[1] * (value.dim() - 1)) & torch.isfinite(value)
        return torch.where(keep, value, default.to(like).expand_as(value))

    eye = torch.eye(3, 4, dtype=like.dtype, device=like.device)
    return {
        "calib": calib,
        "frame_from_model": get("frame_from_model", eye[:2, :3]),
        "intrinsics": get("intrinsics", eye[:, :3]),
        "extrinsics": get("extrinsics", eye),
        "distortions": get("distortions", torch.zeros(8)),
        "fisheye": batch["fisheye"].to(like.device).bool() & calib[:, None],
    }


def _normalized(points_model: Tensor, cams: dict[str, Tensor]) -> Tensor:
    """Model pixels (B, V, K, 2) -> ideal normalized coordinates (B, V, K, 2)."""
    frame = geo.apply_affine(cams["frame_from_model"], points_model)
    return geo.undistort(frame, cams["intrinsics"], cams["distortions"], cams["fisheye"])


def _weights(batch: dict[str, Tensor], cams: dict[str, Tensor], like: Tensor) -> Tensor:
    """(B, V, K) 1 where the ground truth 2D keypoint is valid in a calibrated sample."""
    valid = batch["keypoints_valid"].to(like.device).bool() & cams["calib"][:, None, None]
    return valid.to(like.dtype)


def pose_extent(points_3d: Tensor, valid: Tensor) -> Tensor:
    """(B,) RMS distance of each sample's valid 3D keypoints (B, K, 3) from their mean: the
    pose's size in world units; NaN with fewer than 2 valid keypoints."""
    w = valid.to(points_3d.dtype)[..., None]
    n = w.sum(-2)  # (B, 1)
    mean = (points_3d * w).sum(-2) / n.clamp_min(1.0)
    sq = (((points_3d - mean[:, None]) ** 2) * w).sum((-2, -1)) / n[:, 0].clamp_min(1.0)
    return torch.where(n[:, 0] >= 2, sq.sqrt(), torch.full_like(sq, float("nan")))


def pairwise_projection_loss(keypoints_pred: Tensor, batch: dict[str, Tensor],
                             scale: str = "pose") -> tuple[Tensor, dict[str, Tensor]]:
    """3D distance between pairwise triangulations of predictions and of ground truth.

    keypoints_pred (B, V, K, 2) model px. For each view pair and keypoint clicked in both views
    of a calibrated sample, the prediction and the ground truth are both triangulated from that
    pair (two-view DLT on undistorted coordinates); the loss is the mean over these entries of
    the Euclidean distance (LP's `supervised_pairwise_projections`, not its square). scale
    "world": in calibration units (LP; its weight then depends on the unit and the animal);
    "pose": divided by the sample's pose extent (`pose_extent` of `keypoints_3d`), so one
    log_weight serves millimetres and metres alike; samples without an extent are left out.
    Exactly 0 when the predictions equal the labels, whatever the label noise. Metrics
    (detached): pairwise_dist_world (mean distance, world units), pairwise_count.
    """
    cams = _cameras(batch, keypoints_pred)
    weights = _weights(batch, cams, keypoints_pred)
    target = batch["keypoints_2d"].to(keypoints_pred)
    pred_3d, pred_ok = geo.triangulate_pairs(_normalized(keypoints_pred, cams),
                                             cams["extrinsics"], weights)
    with torch.no_grad():
        gt_3d, gt_ok = geo.triangulate_pairs(_normalized(target, cams), cams["extrinsics"],
                                             weights)
    ok = pred_ok & gt_ok  # (B, P, K)
    norm = torch.ones(ok.shape[0], dtype=keypoints_pred.dtype, device=ok.device)
    if scale == "pose":
        extent = pose_extent(batch["keypoints_3d"].to(keypoints_pred),
                             batch["keypoints_3d_valid"].to(ok.device))
        ok = ok & (torch.isfinite(extent) & (extent > 0))[:, None, None]
        norm = torch.where(ok.any(-1).any(-1), extent, norm)
    elif scale != "world":
        raise ValueError(f"scale must be pose or world, got {scale!r}")
    mask = ok.to(keypoints_pred.dtype)
    sq = torch.where(ok, ((pred_3d - gt_3d) ** 2).sum(-1), torch.ones_like(mask))
    # |d| with a finite gradient everywhere (0 at d = 0, where the distance is exactly 0)
    dist = torch.where(sq > 0, sq.clamp_min(1e-24).sqrt(), torch.zeros_like(sq))
    count = mask.sum()
    loss = (dist / norm[:, None, None] * mask).sum() / count.clamp_min(1.0)
    world = (dist.detach() * mask).sum() / count.clamp_min(1.0)
    return loss, {"pairwise_dist_world": world, "pairwise_count": count}


def reprojection_heatmap_loss(keypoints_pred: Tensor, target_heatmaps: Tensor,
                              batch: dict[str, Tensor], sigma: float, stride: float,
                              compared: Tensor | None = None
                              ) -> tuple[Tensor, dict[str, Tensor]]:
    """Heatmap MSE between reprojected triangulated predictions and the target heatmaps.

    keypoints_pred (B, V, K, 2) model px; target_heatmaps (B, V, K, h, w) (the supervised
    targets, rendered with `gaussian_heatmaps` at this sigma). Per sample and keypoint the
    predictions of all views whose ground truth is valid are triangulated (weighted DLT, weight
    = ground-truth validity), projected back into every view with distortion, mapped to model
    then heatmap coordinates, rendered as Gaussians (sigma heatmap px, differentiable) and
    compared with `heatmap_mse`, i.e. on exactly the scale of the supervised heatmap loss.

    Maps compared: `informative_targets` of `compared` (default keypoints_valid, the clicks;
    with projected targets of hidden keypoints added, their views take part too; visible == 2
    if the batch has `visible`, for clicks; not all-zero or uniform), in calibrated samples,
    where the keypoint triangulated from >= 2 views and reprojects in front of the camera.
    Everything else is excluded (not compared against a uniform map as LP does). Metrics
    (detached): reprojection_error_px (mean model-pixel distance from reprojection to the label
    over compared maps), reprojection_count.
    """
    h, w = target_heatmaps.shape[-2:]
    cams = _cameras(batch, keypoints_pred)
    weights = _weights(batch, cams, keypoints_pred)
    points_3d, ok_3d = geo.triangulate(_normalized(keypoints_pred, cams), cams["extrinsics"],
                                       weights)  # (B, K, 3), (B, K)
    frame, ok_proj = geo.project_valid(points_3d, cams["intrinsics"], cams["extrinsics"],
                                       cams["distortions"], cams["fisheye"],
                                       max_radius=MAX_NORMALIZED_RADIUS)  # (B, V, K, 2)
    model = geo.apply_affine(geo.invert_affine(cams["frame_from_model"]), frame)
    valid = batch["keypoints_valid"].to(ok_3d.device).bool()
    compared = valid if compared is None else compared.to(ok_3d.device).bool()
    visible = batch.get("visible")
    if visible is not None:  # LP's visible flag applies to clicks; projected targets pass
        visible = torch.where(valid, visible.to(ok_3d.device), torch.full_like(visible, 2))
    mask = (informative_targets(target_heatmaps, compared, visible)
            & ok_3d[:, None] & ok_proj & cams["calib"][:, None, None])
    rendered = gaussian_heatmaps(model_to_heatmap(model, stride), mask, h, w, sigma)
    loss = heatmap_mse(rendered, target_heatmaps.to(rendered), mask)
    with torch.no_grad():
        m = mask.to(model.dtype)
        err = (model - batch["keypoints_2d"].to(model)).norm(dim=-1)
        err = torch.where(mask, err, torch.zeros_like(err))
        metrics = {"reprojection_error_px": err.sum() / m.sum().clamp_min(1.0),
                   "reprojection_count": m.sum()}
    return loss, metrics
