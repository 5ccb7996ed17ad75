"""Loss terms of a training batch and their reduction over data-parallel processes.

Each term is a mean over its own count of entries (valid maps, valid view pairs, compared
reprojections). Single process: total = sum of weight·mean, exactly as the loss functions
define it. Under DDP the sums and counts are all-reduced after the forward pass (one small
collective) and each process's term is re-weighted by world_size·count/global_count, so that
DDP's averaged gradient is the gradient of the global mean over the whole global batch, and the
logged values are the global means (identical on every process).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from pipeline.data.images import normalize_images
from pipeline.models.decoding import model_to_heatmap, soft_argmax
from pipeline.training import losses
from pipeline.training.config import TrainConfig
from pipeline.training.distributed import DistContext


@dataclass
class Term:
    """One loss or metric of a batch: `mean` over `count` entries."""

    name: str
    mean: torch.Tensor
    count: torch.Tensor


def term_weights(cfg: TrainConfig, anneal: float) -> dict[str, float | None]:
    """Every term `loss_terms` returns, in order (the same on every process), with its weight
    in the total loss (None = a metric, not in the loss). `anneal` multiplies the 3D terms
    (`TrainConfig.anneal_weight`)."""
    weights: dict[str, float | None] = {"heatmap_mse": losses.loss_weight(0.0)}
    if cfg.hidden_keypoints != "ignore":
        weights["heatmap_mse_hidden"] = losses.loss_weight(cfg.hidden_log_weight)
    if cfg.pairwise_log_weight is not None:
        weights["pairwise_projection"] = anneal * losses.loss_weight(cfg.pairwise_log_weight)
        weights["pairwise_dist_world"] = None
    if cfg.reprojection_log_weight is not None:
        weights["reprojection_heatmap_mse"] = \
            anneal * losses.loss_weight(cfg.reprojection_log_weight)
    weights["pixel_error_model"] = None
    if cfg.hidden_keypoints != "ignore":
        weights["pixel_error_hidden"] = None
    return weights


#: a term's value when nothing was counted (else 0, as the loss functions return)
EMPTY = {"pixel_error_model": float("nan"), "pixel_error_hidden": float("nan")}


def loss_terms(model, batch: dict[str, torch.Tensor], cfg: TrainConfig,
               patch_mask: torch.Tensor | None = None, amp=None) -> list[Term]:
    """Every loss term and metric of one batch (on the model's device), see `term_weights`.

    model may be wrapped in DistributedDataParallel; only its forward runs under `amp`.
    """
    net = getattr(model, "module", model)
    images = batch["images"]
    images = normalize_images(images) if images.dtype == torch.uint8 else images
    with amp if amp is not None else contextlib.nullcontext():
        out = model(images, patch_mask=patch_mask)
    heatmaps = out["heatmaps"].float()
    height, width = heatmaps.shape[-2:]
    valid = batch["keypoints_valid"]
    hidden = batch["hidden_valid"] & (cfg.hidden_keypoints != "ignore")
    n_valid = valid.sum()
    centres = model_to_heatmap(batch["keypoints_2d"], net.stride)
    targets = losses.gaussian_heatmaps(centres, valid | hidden, height, width, cfg.heatmap_sigma)
    terms = [Term("heatmap_mse", losses.heatmap_mse(heatmaps, targets, valid), n_valid)]
    if cfg.hidden_keypoints == "uniform":  # LP's target for a keypoint it cannot place
        targets = torch.where(hidden[..., None, None],
                              torch.full_like(targets, 1.0 / (height * width)), targets)
    if cfg.hidden_keypoints != "ignore":
        terms.append(Term("heatmap_mse_hidden", losses.heatmap_mse(heatmaps, targets, hidden),
                          hidden.sum()))
    keypoints = soft_argmax(heatmaps, net.stride)
    if cfg.pairwise_log_weight is not None:
        pairwise, metrics = losses.pairwise_projection_loss(keypoints, batch, cfg.pairwise_scale)
        count = metrics["pairwise_count"]
        terms += [Term("pairwise_projection", pairwise, count),
                  Term("pairwise_dist_world", metrics["pairwise_dist_world"], count)]
    if cfg.reprojection_log_weight is not None:
        compared = valid | (hidden if cfg.reprojection_hidden_views else torch.zeros_like(hidden))
        reproj, metrics = losses.reprojection_heatmap_loss(keypoints, targets, batch,
                                                           cfg.heatmap_sigma, net.stride,
                                                           compared=compared)
        terms.append(Term("reprojection_heatmap_mse", reproj, metrics["reprojection_count"]))
    error = torch.linalg.vector_norm(keypoints.detach() - batch["keypoints_2d"], dim=-1)
    terms.append(Term("pixel_error_model", error[valid].mean(), n_valid))
    if cfg.hidden_keypoints != "ignore":
        terms.append(Term("pixel_error_hidden", error[hidden].mean(), hidden.sum()))
    return terms


def term_sums(terms: list[Term]) -> torch.Tensor:
    """(2T,) float64: each term's sum (mean·count, 0 when nothing counted), then its count."""
    counts = torch.stack([t.count.detach().double().reshape(()) for t in terms])
    means = torch.stack([t.mean.detach().double().reshape(()) for t in terms])
    sums = torch.where(counts > 0, means * counts, torch.zeros_like(means))
    return torch.cat([sums, counts])


def term_values(weights: dict[str, float | None], sums: torch.Tensor) -> dict[str, float]:
    """Means of the (reduced) `term_sums` of the terms named by `weights`, and `loss`, the
    weighted sum of the losses."""
    n = len(weights)
    values = {}
    for i, name in enumerate(weights):
        count = float(sums[n + i])
        values[name] = float(sums[i]) / count if count > 0 else EMPTY.get(name, 0.0)
    values["loss"] = sum(w * values[k] for k, w in weights.items() if w is not None)
    return values


def combine(terms: list[Term], weights: dict[str, float | None], ctx: DistContext
            ) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss to backpropagate and the batch's values (over all processes' samples).

    Single process: the sum of weight·mean. Under DDP each term is multiplied by
    world_size·count/global_count, so that DDP's gradient average equals the gradient of the
    mean over the whole global batch.
    """
    weighted = [(weights[t.name], t) for t in terms if weights[t.name] is not None]
    if not ctx.enabled:
        total = weighted[0][0] * weighted[0][1].mean
        for weight, t in weighted[1:]:
            total = total + weight * t.mean
        values = {t.name: float(t.mean.detach()) for t in terms}
        values["loss"] = float(total.detach())
        return total, values
    sums = ctx.all_reduce_sum(term_sums(terms))
    index = {t.name: i for i, t in enumerate(terms)}
    total = torch.zeros((), device=terms[0].mean.device)
    for weight, t in weighted:
        global_count = sums[len(terms) + index[t.name]].clamp_min(1.0)
        scale = (ctx.world_size * t.count.detach().double() / global_count).to(t.mean.dtype)
        total = total + weight * (t.mean * scale)
    return total, term_values(weights, sums)


def compute_losses(model, batch: dict[str, torch.Tensor], cfg: TrainConfig, anneal: float,
                   patch_mask: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss and its terms for one batch (single process)."""
    return combine(loss_terms(model, batch, cfg, patch_mask), term_weights(cfg, anneal),
                   DistContext())
