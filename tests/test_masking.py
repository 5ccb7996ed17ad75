"""Tests of pipeline.models.masking: schedule, sampling, seeding and pixel masking."""

from __future__ import annotations

import pytest
import torch

from pipeline.core.errors import ParallaxError
from pipeline.models.masking import (
    apply_patch_mask,
    mask_generator,
    mask_ratio,
    patches_to_mask,
    sample_patch_mask,
)

LP_DEFAULT = {"init_epoch": 40, "final_epoch": 300, "init_ratio": 0.0, "final_ratio": 0.5}


def test_schedule_epochs():
    spe = 10  # init step 400, final step 3000
    assert mask_ratio(0, spe, LP_DEFAULT) == 0.0
    assert mask_ratio(399, spe, LP_DEFAULT) == 0.0
    assert mask_ratio(400, spe, LP_DEFAULT) == 0.0
    assert mask_ratio(1700, spe, LP_DEFAULT) == pytest.approx(0.25)
    assert mask_ratio(3000, spe, LP_DEFAULT) == pytest.approx(0.5)
    assert mask_ratio(10**6, spe, LP_DEFAULT) == pytest.approx(0.5)
    assert mask_ratio(1700, spe, None) == pytest.approx(0.25)  # LP defaults when absent
    # fractional epochs round up to whole steps, as in LP
    assert mask_ratio(3, 3, {"init_epoch": 0.5, "final_epoch": 1, "final_ratio": 0.4}) \
        == pytest.approx(0.4)


def test_schedule_steps_take_precedence():
    cfg = dict(LP_DEFAULT, init_step=700, final_step=5000, init_ratio=0.1)
    assert mask_ratio(699, 10, cfg) == 0.0
    assert mask_ratio(700, 10, cfg) == pytest.approx(0.1)
    assert mask_ratio(2850, 10, cfg) == pytest.approx(0.3)
    assert mask_ratio(5000, 10, cfg) == pytest.approx(0.5)
    # a step bound mixes with an epoch bound
    assert mask_ratio(100, 10, {"init_step": 0, "final_epoch": 20}) == pytest.approx(0.25)
    assert mask_ratio(5, 10, {"init_step": 5, "final_step": 5}) == pytest.approx(0.5)


def test_schedule_disabled_and_invalid():
    off = dict(LP_DEFAULT, final_ratio=0.0, init_ratio=0.3)
    assert all(mask_ratio(s, 10, off) == 0.0 for s in (0, 500, 10**5))
    with pytest.raises(ParallaxError, match="final_ratio"):
        mask_ratio(0, 10, dict(LP_DEFAULT, final_ratio=1.0))
    with pytest.raises(ParallaxError, match="training.patch_mask"):
        mask_ratio(0, 10, {"init_step": 10, "final_step": 5})
    with pytest.raises(ParallaxError, match="init_epoch"):
        mask_ratio(0, 10, {"init_epoch": "forty"})


def test_exact_count_per_sample_and_view():
    for ratio, gh, gw in [(0.5, 16, 16), (0.3, 4, 6), (0.0, 4, 4), (0.29, 10, 10), (0.99, 3, 5)]:
        mask = sample_patch_mask(3, 4, gh, gw, ratio, mask_generator(0, 1))
        assert mask.shape == (3, 4, gh, gw) and mask.dtype == torch.bool
        expected = patches_to_mask(ratio, gh, gw)
        assert (mask.sum(dim=(-1, -2)) == expected).all(), (ratio, gh, gw)
    assert patches_to_mask(0.29, 10, 10) == 29  # int(0.29 * 100) would be 28
    assert patches_to_mask(0.5, 16, 16) == int(0.5 * 256)


def test_reproducible_and_independent():
    a = sample_patch_mask(2, 4, 16, 16, 0.5, mask_generator(7, 100))
    b = sample_patch_mask(2, 4, 16, 16, 0.5, mask_generator(7, 100))
    assert torch.equal(a, b)
    # different steps, seeds, samples and views: different masks (LP's seeds collide here)
    masks = [sample_patch_mask(2, 4, 16, 16, 0.5, mask_generator(seed, step))
             for seed, step in [(7, 101), (7, 200), (8, 100), (0, 0)]]
    for other in masks:
        assert not torch.equal(a, other)
    flat = a.flatten(0, 1)
    assert len({tuple(m.flatten().tolist()) for m in flat}) == flat.shape[0]


def test_sampling_is_uniform():
    gen = mask_generator(1, 0)
    freq = sample_patch_mask(500, 2, 4, 4, 0.25, gen).float().mean(dim=(0, 1))
    assert torch.allclose(freq, torch.full_like(freq, 0.25), atol=0.05)


def test_apply_masks_exact_patch_squares():
    torch.manual_seed(0)
    p = 8
    images = torch.randn(2, 3, 3, 4 * p, 6 * p) + 5.0  # no pixel is 0 by chance
    mask = sample_patch_mask(2, 3, 4, 6, 0.4, mask_generator(3, 9))
    out = apply_patch_mask(images, mask, p)
    assert out.shape == images.shape
    zero = out == 0
    expected = mask.repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)
    assert torch.equal(zero, expected[:, :, None].expand_as(zero))
    torch.testing.assert_close(out[~zero], images[~zero])
    with pytest.raises(ValueError):
        apply_patch_mask(images[..., :-1], mask, p)
    with pytest.raises(ValueError):
        apply_patch_mask(images, mask[:, :2], p)


def test_apply_keeps_gradients_of_unmasked_pixels():
    images = torch.randn(1, 2, 3, 32, 32, requires_grad=True)
    mask = torch.zeros(1, 2, 2, 2, dtype=torch.bool)
    mask[0, 1, 0, 1] = True
    apply_patch_mask(images, mask, 16).sum().backward()
    grad = images.grad
    assert (grad[0, 1, :, :16, 16:] == 0).all()
    assert grad.sum() == 2 * 3 * 32 * 32 - 3 * 16 * 16


def naive_patch_mask(images: torch.Tensor, mask: torch.Tensor, p: int) -> torch.Tensor:
    """Reference: zero each masked p x p square, one patch at a time."""
    out = images.clone()
    for b, v, i, j in mask.nonzero().tolist():
        out[b, v, :, i * p:(i + 1) * p, j * p:(j + 1) * p] = 0
    return out


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.5, 0.9])
def test_vectorized_masking_equals_a_naive_loop(ratio):
    """Sample + apply at B=2, V=4, 256 px (the former micro-benchmark's shapes) and a
    non-square 96 x 160 image: the vectorised result equals zeroing patch by patch."""
    generator = torch.Generator().manual_seed(5)
    for height, width, p in ((256, 256, 16), (96, 160, 16), (64, 48, 8)):
        images = torch.randn(2, 4, 3, height, width, generator=generator)
        for step in range(3):
            mask = sample_patch_mask(2, 4, height // p, width // p, ratio,
                                     mask_generator(0, step))
            assert int(mask.sum()) == 2 * 4 * patches_to_mask(ratio, height // p, width // p)
            out = apply_patch_mask(images, mask, p)
            assert torch.equal(out, naive_patch_mask(images, mask, p)), (height, width, step)
