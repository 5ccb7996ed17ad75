"""Pose models: the multi-view transformer (MVT) and the single-view heatmap baseline.

Both wrap a timm `VisionTransformer` and share the heatmap head of `pipeline.models.heads`.

Tensor conventions
------------------
- ``images``: (B, V, 3, H, W), normalised with the ImageNet mean/std; views in `data.view_names`
  order. H and W must be multiples of the patch size; non-square sizes are fine.
- ``patch_mask``: optional (B, V, H/p, W/p) bool, True = masked. Masking is pixel-space, as in LP:
  the masked p×p squares are set to 0 before the patch embedding (see `pipeline.models.masking`).
- ``forward_features`` -> tokens (B, V, H/p, W/p, D) after the final norm, prefix tokens dropped.
- ``forward_head`` -> heatmap logits (B, V, K, H/s, W/s) with ``s = model.stride = 2**ds``.
- ``forward`` -> ``{"heatmaps": spatial softmax of the logits (each map sums to 1, float32),
  "logits": ...}``. Heatmap cell (i, j) is centred on model pixel (j·s + (s−1)/2, i·s + (s−1)/2);
  see `pipeline.models.decoding` for the convention and the decoders.

MVT token sequence
------------------
Each view is tokenised by the backbone's own ``patch_embed`` and ``_pos_embed`` (which prepends the
backbone's prefix tokens: CLS and/or registers, ``num_prefix_tokens`` of them, any combination,
with or without position embeddings on them). A learned view embedding (V, D), trunc-normal std
0.02, is added to **every token of that view, prefix tokens included**: without it the V copies of
the CLS/register tokens would be identical inputs and stay identical through every layer; with it
they become per-view summary tokens. The sequence is then (B, V·(P+N), D), run through the
backbone's ``norm_pre``, ``blocks`` (full self-attention across all views) and final norm, and the
prefix tokens are dropped. ``keep_prefix_tokens=False`` drops them *before* the encoder instead
(LP's behaviour: no CLS or register token enters the encoder).

Patch size
----------
The head needs a power-of-two token stride for an exact heatmap stride. Backbones whose native
patch is not a power of two (DINOv2: 14) are built with ``patch_size=16``; timm resamples the
pretrained 14×14 kernel to 16×16 when loading (FlexiViT-style pseudo-inverse,
`resample_patch_embed`; LP bicubic-resizes instead) and the position embedding to the new grid.
So a DINOv2 MVT at 256 px has 16×16 tokens per view, like LP's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from pipeline.core.errors import ParallaxError
from pipeline.models.backbone import build_backbone
from pipeline.models.heads import HeatmapHead, spatial_softmax
from pipeline.models.masking import apply_patch_mask

log = logging.getLogger(__name__)




class _HeatmapModel(nn.Module):
    """Shared machinery: backbone, tokenisation, encoder, heatmap head and output dict."""

    model_type = ""

    def __init__(
        self,
        backbone: str,
        num_views: int,
        num_keypoints: int,
        img_size: tuple[int, int],
        downsample_factor: int = 2,
        pretrained: bool = False,
        checkpoint: str | Path | None = None,
        backbone_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if num_views < 1 or num_keypoints < 1:
            raise ParallaxError(
                f"need at least one view and one keypoint, got {num_views} views and "
                f"{num_keypoints} keypoints"
            )
        self.init_args = {
            "backbone": backbone, "num_views": int(num_views),
            "num_keypoints": int(num_keypoints), "img_size": tuple(int(v) for v in img_size),
            "downsample_factor": downsample_factor,
            "backbone_kwargs": dict(backbone_kwargs or {}),
        }
        self.backbone = build_backbone(backbone, img_size, pretrained, checkpoint,
                                       backbone_kwargs)
        self.num_views = int(num_views)
        self.num_keypoints = int(num_keypoints)
        self.img_size = self.init_args["img_size"]
        self.patch_size = int(self.backbone.patch_embed.patch_size[0])
        self.embed_dim = int(self.backbone.embed_dim)
        self.num_prefix_tokens = int(self.backbone.num_prefix_tokens)
        self.head = HeatmapHead(self.embed_dim, self.num_keypoints, self.patch_size,
                                downsample_factor)
        self.stride = self.head.stride
        self.heatmap_size = (self.img_size[0] // self.stride, self.img_size[1] // self.stride)
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each transformer block in the backward pass (less memory, ~30% slower)."""
        self.grad_checkpointing = enable

    def _embed(self, images: torch.Tensor, patch_mask: torch.Tensor | None):
        """(B, V, 3, H, W) -> tokens (B, V, P+N, D) with prefix and position embeddings."""
        if images.ndim != 5 or images.shape[2] != 3:
            raise ValueError(f"images must be (B, V, 3, H, W), got {tuple(images.shape)}")
        b, v, _, h, w = images.shape
        if h % self.patch_size or w % self.patch_size:
            raise ParallaxError(
                f"data.image_resize_dims: images are {h}x{w}, not multiples of the patch size "
                f"{self.patch_size}"
            )
        if patch_mask is not None:
            images = apply_patch_mask(images, patch_mask, self.patch_size)
        bb = self.backbone
        x = bb.patch_embed(images.flatten(0, 1))  # (B·V, gh, gw, D): dynamic_img_size -> NHWC
        gh, gw = x.shape[1], x.shape[2]
        x = bb._pos_embed(x)  # (B·V, P+N, D)
        return x.view(b, v, x.shape[1], x.shape[2]), gh, gw

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone norm_pre, blocks and final norm on a (N, L, D) sequence."""
        bb = self.backbone
        x = bb.norm_pre(x)
        for block in bb.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = activation_checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        norm = bb.norm if not isinstance(bb.norm, nn.Identity) else bb.fc_norm
        return norm(x)

    def forward_features(self, images: torch.Tensor,
                         patch_mask: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Tokens (B, V, gh, gw, D) -> heatmap logits (B, V, K, h, w); head shared by views."""
        b, v, gh, gw, d = features.shape
        x = features.permute(0, 1, 4, 2, 3).reshape(b * v, d, gh, gw)
        x = self.head(x)
        return x.view(b, v, *x.shape[1:])

    def forward(self, images: torch.Tensor,
                patch_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.forward_head(self.forward_features(images, patch_mask))
        return {"heatmaps": spatial_softmax(logits), "logits": logits}


class MultiviewTransformer(_HeatmapModel):
    """Early-fusion MVT: all views' tokens in one sequence with full self-attention."""

    model_type = "heatmap_multiview_transformer"

    def __init__(
        self,
        backbone: str,
        num_views: int,
        num_keypoints: int,
        img_size: tuple[int, int],
        downsample_factor: int = 2,
        pretrained: bool = False,
        checkpoint: str | Path | None = None,
        backbone_kwargs: Mapping[str, Any] | None = None,
        keep_prefix_tokens: bool = True,
    ) -> None:
        super().__init__(backbone, num_views, num_keypoints, img_size, downsample_factor,
                         pretrained, checkpoint, backbone_kwargs)
        self.init_args["keep_prefix_tokens"] = bool(keep_prefix_tokens)
        self.keep_prefix_tokens = bool(keep_prefix_tokens)
        self.view_embedding = nn.Parameter(torch.empty(self.num_views, self.embed_dim))
        nn.init.trunc_normal_(self.view_embedding, std=0.02)

    def forward_features(self, images: torch.Tensor,
                         patch_mask: torch.Tensor | None = None) -> torch.Tensor:
        if images.ndim == 5 and images.shape[1] != self.num_views:
            raise ValueError(
                f"model was built for {self.num_views} views, got {images.shape[1]}"
            )
        x, gh, gw = self._embed(images, patch_mask)
        if not self.keep_prefix_tokens:
            x = x[:, :, self.num_prefix_tokens:]
        x = x + self.view_embedding[None, :, None, :].to(x.dtype)
        b, v, length, d = x.shape
        x = self._encode(x.reshape(b, v * length, d)).view(b, v, length, d)
        return x[:, :, length - gh * gw:].reshape(b, v, gh, gw, d)


class SingleViewHeatmapModel(_HeatmapModel):
    """Baseline: the same backbone and head on every view independently (no view mixing)."""

    model_type = "heatmap"

    def forward_features(self, images: torch.Tensor,
                         patch_mask: torch.Tensor | None = None) -> torch.Tensor:
        x, gh, gw = self._embed(images, patch_mask)
        b, v, length, d = x.shape
        x = self._encode(x.reshape(b * v, length, d)).view(b, v, length, d)
        return x[:, :, self.num_prefix_tokens:].reshape(b, v, gh, gw, d)


#: model.model_type -> class (LP's names); the one registry training and inference use
MODEL_CLASSES: dict[str, type[_HeatmapModel]] = {
    "heatmap_multiview_transformer": MultiviewTransformer,
    "heatmap": SingleViewHeatmapModel,
}
MODEL_TYPES = tuple(MODEL_CLASSES)


def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value) \
            or value <= 0:
        raise ParallaxError(f"{key} must be a positive integer, got {value!r}")
    return int(value)


def build_model(
    model_cfg: Mapping[str, Any],
    data_cfg: Mapping[str, Any],
    num_views: int,
    num_keypoints: int,
) -> _HeatmapModel:
    """The model described by the `model:` and `data:` config sections (LP key names).

    Reads model.model_type (default heatmap_multiview_transformer), model.backbone (vits_dino),
    model.pretrained (false), model.backbone_checkpoint (none), data.image_resize_dims
    {height, width} (256×256) and data.downsample_factor (2).
    """
    model_type = model_cfg.get("model_type", "heatmap_multiview_transformer")
    if model_type not in MODEL_CLASSES:
        raise ParallaxError(
            f"model.model_type: unsupported {model_type!r}; use one of {', '.join(MODEL_TYPES)}"
        )
    pretrained = model_cfg.get("pretrained", False)
    if not isinstance(pretrained, bool):
        raise ParallaxError(f"model.pretrained must be true or false, got {pretrained!r}")
    dims = data_cfg.get("image_resize_dims") or {"height": 256, "width": 256}
    if not isinstance(dims, Mapping) or not {"height", "width"} <= set(dims):
        raise ParallaxError(
            f"data.image_resize_dims must be a mapping with height and width, got {dims!r}"
        )
    height = _positive_int(dims["height"], "data.image_resize_dims.height")
    width = _positive_int(dims["width"], "data.image_resize_dims.width")
    ds = data_cfg.get("downsample_factor", 2)
    if isinstance(ds, bool) or not isinstance(ds, int | float) or ds != int(ds):
        raise ParallaxError(f"data.downsample_factor must be an integer, got {ds!r}")
    return MODEL_CLASSES[model_type](
        backbone=model_cfg.get("backbone", "vits_dino"),
        num_views=num_views,
        num_keypoints=num_keypoints,
        img_size=(height, width),
        downsample_factor=int(ds),
        pretrained=pretrained,
        checkpoint=model_cfg.get("backbone_checkpoint"),
    )


def param_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Parameters split into 'backbone', 'head' and 'view_embedding' (empty for single-view).

    Lets training freeze the backbone while the head and view embedding keep learning.
    """
    groups = {
        "backbone": list(model.backbone.parameters()),
        "head": list(model.head.parameters()),
        "view_embedding": [model.view_embedding] if hasattr(model, "view_embedding") else [],
    }
    grouped = {id(p) for params in groups.values() for p in params}
    stray = [n for n, p in model.named_parameters() if id(p) not in grouped]
    if stray:
        raise RuntimeError(f"parameters in no group: {stray}")
    return groups


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (for logs and the report)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def patch_grid(model: _HeatmapModel, height: int, width: int) -> tuple[int, int]:
    """Token grid (gh, gw) for a model input of `height`×`width` (for sampling patch masks)."""
    p = model.patch_size
    if height % p or width % p:
        raise ParallaxError(
            f"data.image_resize_dims: {height}x{width} not a multiple of patch size {p}"
        )
    return height // p, width // p


__all__ = [
    "MODEL_CLASSES", "MODEL_TYPES", "MultiviewTransformer", "SingleViewHeatmapModel",
    "build_model", "count_parameters", "param_groups", "patch_grid",
]
