"""Pose models: the multi-view transformer (MVT) and the single-view heatmap baseline.

Both wrap a timm `VisionTransformer` and share the heatmap head of `pipeline.heads`.

Tensor conventions
------------------
- ``images``: (B, V, 3, H, W), normalised with the ImageNet mean/std; views in `data.view_names`
  order. H and W must be multiples of the patch size; non-square sizes are fine.
- ``patch_mask``: optional (B, V, H/p, W/p) bool, True = masked. Masking is pixel-space, as in LP:
  the masked p×p squares are set to 0 before the patch embedding (see `pipeline.masking`).
- ``forward_features`` -> tokens (B, V, H/p, W/p, D) after the final norm, prefix tokens dropped.
- ``forward_head`` -> heatmap logits (B, V, K, H/s, W/s) with ``s = model.stride = 2**ds``.
- ``forward`` -> ``{"heatmaps": spatial softmax of the logits (each map sums to 1, float32),
  "logits": ...}``. Heatmap cell (i, j) is centred on model pixel (j·s + (s−1)/2, i·s + (s−1)/2);
  see `pipeline.heads` for the convention and `decode_heatmaps`.

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

import timm
import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from pipeline.errors import ParallaxError
from pipeline.heads import HeatmapHead, spatial_softmax
from pipeline.masking import apply_patch_mask

log = logging.getLogger(__name__)

#: LP backbone names -> timm model names with pretrained tags.
BACKBONE_ALIASES: dict[str, str] = {
    "vits_dino": "vit_small_patch16_224.dino",
    "vitb_dino": "vit_base_patch16_224.dino",
    "vits_dinov2": "vit_small_patch14_dinov2.lvd142m",
    "vitb_dinov2": "vit_base_patch14_dinov2.lvd142m",
    "vitb_imagenet": "vit_base_patch16_224.mae",
}

#: Tiny random-init architectures for CPU tests: name -> (timm architecture, kwargs).
TEST_BACKBONES: dict[str, tuple[str, dict[str, Any]]] = {
    "vit_tiny_test": (
        "vit_small_patch16_224",
        {"embed_dim": 64, "depth": 2, "num_heads": 4, "mlp_ratio": 2.0},
    ),
}

#: Patch size used when a backbone's native patch is not a power of two (DINOv2's 14).
FALLBACK_PATCH_SIZE = 16

MODEL_TYPES = ("heatmap_multiview_transformer", "heatmap")


def resolve_backbone(name: str) -> tuple[str, dict[str, Any]]:
    """`model.backbone` -> (timm model name, extra timm kwargs)."""
    if isinstance(name, str):
        if name in BACKBONE_ALIASES:
            return BACKBONE_ALIASES[name], {}
        if name in TEST_BACKBONES:
            arch, kwargs = TEST_BACKBONES[name]
            return arch, dict(kwargs)
        if name.startswith("vit_") and timm.is_model(name):
            return name, {}
    raise ParallaxError(
        f"model.backbone: unknown backbone {name!r}; use one of "
        f"{', '.join(sorted(BACKBONE_ALIASES))}, {', '.join(TEST_BACKBONES)} (tests), "
        "or a timm 'vit_*' model name (timm.list_models('vit_*'))"
    )


def _is_power_of_two(n: int) -> bool:
    return n >= 2 and not n & (n - 1)


def build_backbone(
    name: str,
    img_size: tuple[int, int],
    pretrained: bool = False,
    checkpoint: str | Path | None = None,
    backbone_kwargs: Mapping[str, Any] | None = None,
) -> VisionTransformer:
    """A timm ViT without classifier, built for `img_size` (H, W) with `dynamic_img_size`.

    `pretrained` downloads timm's weights for the tag (never in tests); `checkpoint` is a local
    state-dict file loaded non-strictly on top of a random init (it replaces `pretrained`).
    `backbone_kwargs` are passed to `timm.create_model` (e.g. depth=2 for tests).
    """
    arch, kwargs = resolve_backbone(name)
    kwargs.update(backbone_kwargs or {})
    kwargs.update(num_classes=0, dynamic_img_size=True)
    try:
        with torch.device("meta"):  # cheap probe of the architecture, no weights allocated
            probe = timm.create_model(arch, pretrained=False, **kwargs)
    except (TypeError, ValueError, AssertionError) as err:
        raise ParallaxError(
            f"model.backbone: cannot build {name!r} ({arch}) as a heatmap backbone: {err}"
        ) from err
    if not isinstance(probe, VisionTransformer) or type(probe.patch_embed) is not PatchEmbed:
        raise ParallaxError(
            f"model.backbone: {name!r} ({arch}) is a {type(probe).__name__}, not a plain "
            "patch-embedding timm VisionTransformer"
        )
    ph, pw = probe.patch_embed.patch_size
    if ph != pw or not _is_power_of_two(ph):
        if "patch_size" in (backbone_kwargs or {}):
            raise ParallaxError(f"model.backbone: patch size {(ph, pw)} is not a power of two")
        log.info("backbone %s: native patch %dx%d resampled to %d", arch, ph, pw,
                 FALLBACK_PATCH_SIZE)
        ph = pw = FALLBACK_PATCH_SIZE
        kwargs["patch_size"] = FALLBACK_PATCH_SIZE
    height, width = (int(v) for v in img_size)
    if height <= 0 or width <= 0 or height % ph or width % pw:
        raise ParallaxError(
            f"data.image_resize_dims: {height}x{width} (height x width) must be positive "
            f"multiples of the backbone's patch size {ph} (model.backbone={name!r})"
        )
    kwargs["img_size"] = (height, width)
    download = bool(pretrained) and checkpoint is None
    try:
        model = timm.create_model(arch, pretrained=download, **kwargs)
    except Exception as err:  # network / hub / cache problems when downloading weights
        if not download:
            raise
        raise ParallaxError(
            f"model.pretrained: cannot load pretrained weights for {arch}: {err}; set "
            "model.backbone_checkpoint to a local weights file or model.pretrained: false"
        ) from err
    # unused classifier-side modules would get no gradient; tokens use norm (or fc_norm)
    model.attn_pool = None
    if checkpoint is not None:
        load_backbone_checkpoint(model, checkpoint)
    return model


_WRAPPER_KEYS = ("state_dict", "model", "teacher", "module", "model_state")
_KEY_PREFIXES = ("module.", "_orig_mod.", "backbone.", "encoder.", "model.")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ParallaxError(f"model.backbone_checkpoint: cannot read {path}: {err}") from err
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise ParallaxError(f"model.backbone_checkpoint: {path} does not hold a state dict")
    state = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue
        stripped = True
        while stripped:
            stripped = False
            for prefix in _KEY_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        state[key] = value
    return state


def load_backbone_checkpoint(model: VisionTransformer, path: str | Path) -> dict[str, list[str]]:
    """Load a local state dict into `model` non-strictly; returns and logs what matched.

    Wrappers ('state_dict', 'model', 'teacher', ...) and prefixes ('module.', 'backbone.', ...)
    are removed; timm's filter resamples the position embedding and patch kernel to the model.
    Tensors whose shape still differs are skipped. Raises ParallaxError when nothing matches.
    """
    path = Path(path)
    if not path.is_file():
        raise ParallaxError(f"model.backbone_checkpoint: {path} does not exist")
    state = _read_state_dict(path)
    try:
        state = checkpoint_filter_fn(state, model)
    except Exception as err:  # foreign layouts: fall back to the keys as they are
        log.warning("backbone checkpoint %s: timm's key filter failed (%s)", path, err)
    own = model.state_dict()
    matched = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    summary = {
        "loaded": sorted(matched),
        "missing": sorted(k for k in own if k not in matched),
        "unexpected": sorted(k for k in state if k not in own),
        "shape_mismatch": sorted(k for k in state if k in own and k not in matched),
    }
    if not matched:
        raise ParallaxError(
            f"model.backbone_checkpoint: no tensor in {path} matches the backbone "
            f"({len(state)} tensors, e.g. {sorted(state)[:3]}; expected timm names such as "
            f"{sorted(own)[:3]})"
        )
    model.load_state_dict(matched, strict=False)
    log.info(
        "backbone checkpoint %s: loaded %d tensors; missing %d %s; unexpected %d %s; "
        "shape mismatch %d %s", path, len(matched),
        len(summary["missing"]), summary["missing"][:5],
        len(summary["unexpected"]), summary["unexpected"][:5],
        len(summary["shape_mismatch"]), summary["shape_mismatch"][:5],
    )
    return summary


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
    classes = {"heatmap_multiview_transformer": MultiviewTransformer,
               "heatmap": SingleViewHeatmapModel}
    if model_type not in classes:
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
    return classes[model_type](
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
    "BACKBONE_ALIASES", "TEST_BACKBONES", "MODEL_TYPES", "MultiviewTransformer",
    "SingleViewHeatmapModel", "build_backbone", "build_model", "load_backbone_checkpoint",
    "param_groups", "count_parameters", "patch_grid", "resolve_backbone",
]
