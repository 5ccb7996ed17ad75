"""Patch masking for multi-view training (LP's `training.patch_mask`, vectorised and seeded).

Masking is pixel-space, like Lightning Pose: a masked patch of the already-normalised image is set
to 0 (the ImageNet-mean colour, not black). Patches are squares of the backbone's patch size,
aligned with the token grid, so a masked patch becomes exactly one "blank" token; the sequence
length is unchanged and masked tokens keep their position and view embeddings.

Differences from Lightning Pose's PatchMasking callback:

- sampling is vectorised (one `topk` over uniform noise of shape (B, V, N)), no Python loops;
- each training step draws from its own generator seeded by ``SeedSequence((seed, step))``, so
  streams never collide across steps (LP's ``seed + step + 1000·b + 100·v`` does), and samples and
  views get independent draws from that one stream;
- the count per view is ``floor(ratio·N + 1e-9)``: LP's ``int(ratio·N)`` without its float-noise
  corner cases (e.g. 0.29·100 = 28.999… gives 29 here, 28 in LP).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from pipeline.core.errors import ParallaxError

#: LP's config defaults for `training.patch_mask` (its callback's defaults).
PATCH_MASK_DEFAULTS: dict[str, float] = {
    "init_epoch": 40,
    "final_epoch": 300,
    "init_ratio": 0.0,
    "final_ratio": 0.5,
}


def _number(cfg: Mapping[str, Any], key: str) -> float | None:
    value = cfg.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ParallaxError(f"training.patch_mask.{key} must be a finite number, got {value!r}")
    if value < 0:
        raise ParallaxError(f"training.patch_mask.{key} must be >= 0, got {value!r}")
    return float(value)


def schedule_steps(steps_per_epoch: int, cfg: Mapping[str, Any] | None) -> tuple[int, int]:
    """(init_step, final_step) of the schedule; `*_step` keys take precedence over `*_epoch`."""
    cfg = cfg or {}
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    bounds = []
    for name in ("init", "final"):
        step = _number(cfg, f"{name}_step")
        if step is None:
            epoch = _number(cfg, f"{name}_epoch")
            epoch = PATCH_MASK_DEFAULTS[f"{name}_epoch"] if epoch is None else epoch
            step = math.ceil(epoch * steps_per_epoch)
        bounds.append(int(step))
    init_step, final_step = bounds
    if final_step < init_step:
        raise ParallaxError(
            f"training.patch_mask: the final step/epoch ({final_step} steps) is before the "
            f"initial one ({init_step} steps)"
        )
    return init_step, final_step


def mask_ratio(step: int, steps_per_epoch: int, cfg: Mapping[str, Any] | None) -> float:
    """Fraction of patches to mask at global `step` (0-based).

    0 before `init_step`; from there linear from `init_ratio` to `final_ratio` at `final_step`;
    constant afterwards. `final_ratio` 0 disables masking whatever the other keys. Epoch bounds
    are converted with ``ceil(epoch · steps_per_epoch)``, as LP does.
    """
    cfg = cfg or {}
    ratios = {}
    for key in ("init_ratio", "final_ratio"):
        value = _number(cfg, key)
        ratios[key] = PATCH_MASK_DEFAULTS[key] if value is None else value
        if ratios[key] >= 1.0:
            raise ParallaxError(f"training.patch_mask.{key} must be in [0, 1), got {value!r}")
    init_ratio, final_ratio = ratios["init_ratio"], ratios["final_ratio"]
    if final_ratio == 0.0:
        return 0.0
    init_step, final_step = schedule_steps(steps_per_epoch, cfg)
    if step < init_step:
        return 0.0
    if final_step == init_step:
        return final_ratio
    progress = min((step - init_step) / (final_step - init_step), 1.0)
    return init_ratio + progress * (final_ratio - init_ratio)


def mask_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator for one training step, independent of every other (seed, step) pair."""
    if seed < 0 or step < 0:
        raise ValueError(f"seed and step must be >= 0, got seed={seed}, step={step}")
    state = np.random.SeedSequence((int(seed), int(step))).generate_state(1, dtype=np.uint64)
    generator = torch.Generator()
    generator.manual_seed(int(state[0]))
    return generator


def patches_to_mask(ratio: float, grid_h: int, grid_w: int) -> int:
    """Number of masked patches per view: floor(ratio · grid_h · grid_w), float-noise safe."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    return int(math.floor(ratio * grid_h * grid_w + 1e-9))


def sample_patch_mask(
    batch: int,
    views: int,
    grid_h: int,
    grid_w: int,
    ratio: float,
    generator: torch.Generator,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean mask (batch, views, grid_h, grid_w), True = masked.

    Exactly `patches_to_mask(ratio, grid_h, grid_w)` patches per sample and view, chosen
    uniformly without replacement (top-k of i.i.d. uniform noise), all from `generator`.
    """
    n_patches = grid_h * grid_w
    k = patches_to_mask(ratio, grid_h, grid_w)
    mask = torch.zeros(batch, views, n_patches, dtype=torch.bool)
    if k > 0:
        noise = torch.rand(batch, views, n_patches, generator=generator)
        idx = noise.topk(k, dim=-1, sorted=False).indices
        mask.scatter_(-1, idx, True)
    mask = mask.view(batch, views, grid_h, grid_w)
    return mask if device is None else mask.to(device)


def apply_patch_mask(images: torch.Tensor, mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Images (B, V, C, H, W) with every masked patch set to 0; returns a new tensor.

    `mask` is (B, V, H/patch_size, W/patch_size) bool; patch (i, j) covers rows
    [i·p, (i+1)·p) and columns [j·p, (j+1)·p). Gradients flow to the unmasked pixels.
    """
    b, v, c, h, w = images.shape
    gh, gw = h // patch_size, w // patch_size
    if gh * patch_size != h or gw * patch_size != w:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {patch_size}")
    if tuple(mask.shape) != (b, v, gh, gw):
        raise ValueError(f"patch mask has shape {tuple(mask.shape)}, expected {(b, v, gh, gw)}")
    # pixel mask (B, V, 1, H, W), broadcast over the channels: a contiguous H·W inner loop is
    # ~25% faster than broadcasting the (gh, 1, gw, 1) mask over the patch blocks
    pixels = (mask.to(device=images.device, dtype=torch.bool)[:, :, None, :, None, :, None]
              .expand(b, v, 1, gh, patch_size, gw, patch_size).reshape(b, v, 1, h, w))
    zero = torch.zeros((), dtype=images.dtype, device=images.device)
    return torch.where(pixels, zero, images)
