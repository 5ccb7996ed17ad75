"""Heatmap head of the pose models (decoding: `pipeline.models.decoding`).

Coordinate convention (README, "Model variants": the coordinates paragraph; model pixels): model
pixel centres are at integer coordinates, origin at the top-left pixel centre, x right, y down. A
heatmap of output stride ``s = 2**downsample_factor`` has cell (row i, column j) covering model
pixels ``[j·s, (j+1)·s) × [i·s, (i+1)·s)``, so its centre is at model pixel

    x = j·s + (s − 1)/2,    y = i·s + (s − 1)/2.

(LP's "subtract 0.5 / 1.5 / 2.5 px for ds = 1 / 2 / 3" is the same convention.) Heatmap targets
must put a keypoint at model pixel (x, y) at heatmap position ((x − (s−1)/2)/s, (y − (s−1)/2)/s).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.core.errors import ParallaxError


def num_upsampling_stages(patch_size: int, downsample_factor: int) -> int:
    """Transposed convolutions after PixelShuffle(2) so the head's output stride is 2**ds.

    Tokens have stride `patch_size`; PixelShuffle(2) halves it and every stride-2 transposed
    convolution halves it again: ``n = log2(patch_size) − 1 − downsample_factor``.
    """
    if patch_size < 2 or patch_size & (patch_size - 1):
        raise ParallaxError(
            f"the backbone's patch size {patch_size} is not a power of two, so no heatmap head "
            "has an exact output stride (model.backbone)"
        )
    if isinstance(downsample_factor, bool) or not isinstance(downsample_factor, int):
        raise ParallaxError(
            f"data.downsample_factor must be an integer, got {downsample_factor!r}"
        )
    max_ds = int(math.log2(patch_size)) - 1
    if not 0 <= downsample_factor <= max_ds:
        raise ParallaxError(
            f"data.downsample_factor={downsample_factor} is impossible with patch size "
            f"{patch_size}: heatmap stride 2**{downsample_factor} must be between 1 and "
            f"{patch_size // 2} (allowed downsample_factor: 0..{max_ds})"
        )
    return max_ds - downsample_factor


class HeatmapHead(nn.Module):
    """Token grid (N, D, gh, gw) -> heatmap logits (N, K, gh·p/2**ds, gw·p/2**ds).

    PixelShuffle(2) (D -> D/4 channels), then `n` ConvTranspose2d(kernel 3, stride 2, padding 1,
    output_padding 1), GELU between them, the last one to K channels. When n = 0 (LP's broken
    `downsample_factor: 3` case, §2) a 1×1 convolution maps D/4 -> K instead. The final layer is
    Xavier-uniform with gain 0.01, so initial heatmaps are nearly uniform. It has no bias: the
    spatial softmax is invariant to a per-channel constant, so a bias would get an exactly-zero
    gradient and AdamW would turn float rounding in it into full-size random updates.
    """

    def __init__(self, embed_dim: int, num_keypoints: int, patch_size: int,
                 downsample_factor: int = 2) -> None:
        super().__init__()
        if embed_dim % 4:
            raise ParallaxError(
                f"model.backbone: embedding dimension {embed_dim} is not divisible by 4, "
                "which PixelShuffle(2) in the heatmap head needs"
            )
        n_up = num_upsampling_stages(patch_size, downsample_factor)
        self.stride = 2**downsample_factor
        channels = embed_dim // 4
        layers: list[nn.Module] = [nn.PixelShuffle(2)]
        if n_up == 0:
            layers.append(nn.Conv2d(channels, num_keypoints, kernel_size=1, bias=False))
        for i in range(n_up):
            last = i == n_up - 1
            layers.append(nn.ConvTranspose2d(
                channels, num_keypoints if last else channels, kernel_size=3, stride=2,
                padding=1, output_padding=1, bias=not last,
            ))
            if not last:
                layers.append(nn.GELU())
        self.layers = nn.Sequential(*layers)
        final = layers[-1]
        nn.init.xavier_uniform_(final.weight, gain=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def spatial_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last two dims (each map sums to 1), computed in float32."""
    shape = logits.shape
    flat = logits.float().flatten(-2)
    return torch.softmax(flat, dim=-1).view(shape)


