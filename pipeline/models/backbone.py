"""ViT backbones from timm: LP backbone names, tiny test architectures, a power-of-two patch
size for the heatmap head, and loading local weights files (offline clusters)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from pipeline.core.errors import ParallaxError

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
