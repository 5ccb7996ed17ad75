"""Heatmap coordinates and decoding, for training (differentiable) and inference.

Coordinates (README, "Model variants": the coordinates paragraph): model pixel centres at integer
coordinates, origin at the top-left pixel centre. A heatmap of stride s has cell (row i, column j)
covering model pixels [j·s, (j+1)·s) × [i·s, (i+1)·s); heatmap cell centres are at integer heatmap
coordinates, so

    heatmap = (model + 0.5) / s - 0.5        model = (heatmap + 0.5) · s - 0.5

(`model_to_heatmap` / `heatmap_to_model`; LP's "subtract 1.5 px at stride 4" is the same map).
Training decodes with `soft_argmax` over the whole map (differentiable, unbiased for a symmetric
peak); inference with `decode_heatmaps`, the same expectation restricted to a window around the
arg-max, plus the window's mass as confidence.
"""

from __future__ import annotations

import torch
from torch import Tensor


def model_to_heatmap(points: Tensor, stride: float) -> Tensor:
    """Model pixels (..., 2) -> heatmap coordinates (cell centres at integers)."""
    return (points + 0.5) / stride - 0.5


def heatmap_to_model(points: Tensor, stride: float) -> Tensor:
    """Heatmap coordinates (..., 2) -> model pixels."""
    return (points + 0.5) * stride - 0.5


def soft_argmax(heatmaps: Tensor, stride: float, temperature: float | None = None) -> Tensor:
    """Expected position of heatmaps (B, V, K, h, w) -> keypoints (B, V, K, 2) model pixels.

    The maps are used as they are (already softmaxed: each sums to 1; they are renormalised, so
    an all-zero map gives heatmap (0, 0)). The expectation over the whole map is unbiased for a
    symmetric target (e.g. a `gaussian_heatmaps` Gaussian) away from the borders: the error is
    O(exp(-2π²σ²)), ~1e-13 heatmap px at σ = 1.25. With `temperature`, the maps are first
    sharpened by softmax(temperature · map) (LP decodes with 1000): closer to the arg-max but
    no longer unbiased between cell centres.
    """
    *lead, h, w = heatmaps.shape
    maps = heatmaps
    if temperature is not None:
        maps = torch.softmax(temperature * heatmaps.flatten(-2), dim=-1).view(heatmaps.shape)
    xs = torch.arange(w, dtype=maps.dtype, device=maps.device)
    ys = torch.arange(h, dtype=maps.dtype, device=maps.device)
    total = maps.sum((-2, -1)).clamp_min(1e-12)
    x = (maps.sum(-2) * xs).sum(-1) / total
    y = (maps.sum(-1) * ys).sum(-1) / total
    return heatmap_to_model(torch.stack([x, y], dim=-1), stride)


def _window(heatmaps: Tensor, cell: Tensor, radius: int) -> Tensor:
    """(..., h, w) 0/1 mask of the (2r+1)² cells around `cell` (..., 2) (x, y heatmap
    coordinates, integers); cells outside the map do not exist, so they count 0."""
    h, w = heatmaps.shape[-2:]
    xs = torch.arange(w, dtype=heatmaps.dtype, device=heatmaps.device)
    ys = torch.arange(h, dtype=heatmaps.dtype, device=heatmaps.device)
    mx = ((xs - cell[..., :1]).abs() <= radius).to(heatmaps.dtype)  # (..., w)
    my = ((ys - cell[..., 1:]).abs() <= radius).to(heatmaps.dtype)  # (..., h)
    return my[..., :, None] * mx[..., None, :]


def confidence(heatmaps: Tensor, keypoints: Tensor, stride: float, radius: int = 2) -> Tensor:
    """Heatmap mass (B, V, K) in the (2r+1)² cells around keypoints (B, V, K, 2) model px.

    The window is centred on the heatmap cell nearest to the keypoint (cells outside the map
    count 0). LP's `likelihood` is the 5×5 mass on a ×s upsampled map, so values differ a bit.
    """
    centre = model_to_heatmap(keypoints.detach(), stride).round()
    return (heatmaps * _window(heatmaps, centre, radius)).sum((-2, -1))


def decode_heatmaps(heatmaps: Tensor, stride: float, radius: int = 2
                    ) -> tuple[Tensor, Tensor]:
    """Keypoints and confidences for inference: (..., K, h, w) softmaxed maps ->
    (xy (..., K, 2) model pixels, confidence (..., K) in [0, 1]).

    The keypoint is the local soft-argmax: the expectation of the map over the (2·radius+1)²
    cells around its arg-max (cells outside the map weigh 0), robust to a second mode elsewhere
    in the map; the confidence is the map's mass in that window (LP's "likelihood" is the 5×5
    mass on a ×2**ds upsampled map, so the numbers are close but not identical).
    """
    maps = heatmaps.float()
    h, w = maps.shape[-2:]
    peak = maps.flatten(-2).argmax(-1)
    cell = torch.stack([peak % w, torch.div(peak, w, rounding_mode="floor")], -1).to(maps.dtype)
    window = _window(maps, cell, radius)
    return soft_argmax(maps * window, stride), (maps * window).sum((-2, -1))
