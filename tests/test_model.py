"""Tests of pipeline.models.model and pipeline.models.heads on tiny random-init ViTs (CPU, no
downloads)."""

from __future__ import annotations

import math

import pytest
import timm
import torch

from pipeline.core.errors import ParallaxError
from pipeline.models.backbone import BACKBONE_ALIASES, build_backbone
from pipeline.models.decoding import decode_heatmaps
from pipeline.models.heads import HeatmapHead, num_upsampling_stages
from pipeline.models.masking import apply_patch_mask
from pipeline.models.model import (
    MultiviewTransformer,
    SingleViewHeatmapModel,
    build_model,
    param_groups,
)

B, V, K = 2, 3, 5
TINY = "vit_tiny_test"
REG4_KWARGS = {"depth": 2, "embed_dim": 64, "num_heads": 2}


def _images(size=(64, 64), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, V, 3, *size, generator=gen)


def _model(cls, size=(64, 64), **kwargs):
    torch.manual_seed(0)
    return cls(TINY, V, K, size, **kwargs).eval()


@pytest.fixture(scope="module")
def mvt():
    return _model(MultiviewTransformer)


@pytest.fixture(scope="module")
def single():
    return _model(SingleViewHeatmapModel)


@pytest.mark.parametrize("cls", [MultiviewTransformer, SingleViewHeatmapModel])
@pytest.mark.parametrize("size", [(64, 64), (64, 96)])
def test_output_shapes_and_softmax(cls, size):
    model = _model(cls, size)
    with torch.no_grad():
        feats = model.forward_features(_images(size))
        out = model(_images(size))
    h, w = size
    assert feats.shape == (B, V, h // 16, w // 16, 64)
    assert set(out) == {"heatmaps", "logits"}
    assert model.stride == 4 and model.heatmap_size == (h // 4, w // 4)
    for key in ("heatmaps", "logits"):
        assert out[key].shape == (B, V, K, h // 4, w // 4)
    sums = out["heatmaps"].sum(dim=(-1, -2))
    torch.testing.assert_close(sums, torch.ones_like(sums))
    assert (out["heatmaps"] >= 0).all()


def test_cross_view_attention_mixes_views(mvt, single):
    x = _images()
    y = x.clone()
    y[:, 0] += 1.0
    with torch.no_grad():
        m0, m1 = mvt(x)["logits"], mvt(y)["logits"]
        s0, s1 = single(x)["logits"], single(y)["logits"]
    assert not torch.allclose(m0[:, 1], m1[:, 1], atol=1e-6)
    assert not torch.allclose(m0[:, 2], m1[:, 2], atol=1e-6)
    torch.testing.assert_close(s0[:, 1:], s1[:, 1:], rtol=0, atol=1e-6)
    assert not torch.allclose(s0[:, 0], s1[:, 0], atol=1e-6)


def test_view_embedding_breaks_permutation_equivariance(mvt, single):
    x = _images()
    perm = torch.tensor([2, 0, 1])
    with torch.no_grad():
        single_out, single_perm = single(x)["logits"], single(x[:, perm])["logits"]
        torch.testing.assert_close(single_perm, single_out[:, perm], rtol=1e-4, atol=1e-5)
        mvt_out, mvt_perm = mvt(x)["logits"], mvt(x[:, perm])["logits"]
        assert not torch.allclose(mvt_perm, mvt_out[:, perm], atol=1e-5)
        # without the view embedding full attention is permutation-equivariant
        saved = mvt.view_embedding.detach().clone()
        mvt.view_embedding.zero_()
        try:
            out0, out1 = mvt(x)["logits"], mvt(x[:, perm])["logits"]
        finally:
            mvt.view_embedding.copy_(saved)
        torch.testing.assert_close(out1, out0[:, perm], rtol=1e-4, atol=1e-5)


def test_patch_mask_masks_pixels(mvt):
    x = _images()
    mask = torch.zeros(B, V, 4, 4, dtype=torch.bool)
    with torch.no_grad():
        plain = mvt.forward_features(x)
        torch.testing.assert_close(mvt.forward_features(x, mask), plain)
        mask[0, 1, 2, 3] = True
        masked = mvt.forward_features(x, mask)
        pre_masked = mvt.forward_features(apply_patch_mask(x, mask, 16))
    assert not torch.allclose(masked[0, 1, 2, 3], plain[0, 1, 2, 3], atol=1e-5)
    torch.testing.assert_close(masked, pre_masked)


@pytest.mark.parametrize("keep_prefix", [True, False])
def test_register_tokens(keep_prefix):
    torch.manual_seed(0)
    model = MultiviewTransformer(
        "vit_small_patch14_reg4_dinov2", V, K, (64, 96), backbone_kwargs=REG4_KWARGS,
        keep_prefix_tokens=keep_prefix,
    ).eval()
    assert model.num_prefix_tokens == 5  # CLS + 4 registers, no position embedding on them
    assert model.backbone.no_embed_class
    assert model.patch_size == 16  # native 14 resampled to an exact power-of-two stride
    with torch.no_grad():
        assert model.forward_features(_images((64, 96))).shape == (B, V, 4, 6, 64)
        assert model(_images((64, 96)))["heatmaps"].shape == (B, V, K, 16, 24)


def test_backbone_without_class_token():
    torch.manual_seed(0)
    model = MultiviewTransformer(
        TINY, V, K, (64, 64), backbone_kwargs={"class_token": False, "global_pool": "avg"}
    ).eval()
    assert model.num_prefix_tokens == 0
    with torch.no_grad():
        feats = model.forward_features(_images())
    assert feats.shape == (B, V, 4, 4, 64)
    # the final norm (here timm's fc_norm) is applied: per-token mean ~0
    assert feats.mean(dim=-1).abs().max() < 1e-4


def test_dinov2_alias_uses_patch_16():
    backbone = build_backbone("vits_dinov2", (64, 96), backbone_kwargs={"depth": 1})
    assert backbone.patch_embed.patch_size == (16, 16)
    assert backbone.patch_embed.grid_size == (4, 6)


def test_aliases_exist_in_timm_registry():
    for name in BACKBONE_ALIASES.values():
        arch = name.split(".")[0]
        assert name in timm.list_pretrained(arch + "*"), name


def test_errors():
    with pytest.raises(ParallaxError, match=r"model\.backbone.*vits_dino"):
        MultiviewTransformer("resnet50", V, K, (64, 64))
    with pytest.raises(ParallaxError, match=r"data\.image_resize_dims.*16"):
        MultiviewTransformer(TINY, V, K, (64, 72))
    with pytest.raises(ParallaxError, match=r"data\.downsample_factor"):
        MultiviewTransformer(TINY, V, K, (64, 64), downsample_factor=4)
    with pytest.raises(ParallaxError, match=r"model\.model_type"):
        build_model({"model_type": "regression", "backbone": TINY}, {}, V, K)
    with pytest.raises(ParallaxError, match="data.image_resize_dims.height"):
        build_model({"backbone": TINY}, {"image_resize_dims": {"height": 0, "width": 64}}, V, K)


def test_head_depth():
    assert [num_upsampling_stages(16, ds) for ds in (0, 1, 2, 3)] == [3, 2, 1, 0]
    with pytest.raises(ParallaxError, match="data.downsample_factor"):
        num_upsampling_stages(16, 4)
    with pytest.raises(ParallaxError):
        num_upsampling_stages(14, 2)
    for ds in (0, 1, 3):  # ds 3 = LP's broken case: still K channels at stride 8
        head = HeatmapHead(64, K, 16, ds)
        out = head(torch.zeros(1, 64, 4, 6))
        assert out.shape == (1, K, 64 // 2**ds, 96 // 2**ds)


def test_forward_backward_finite_gradients():
    torch.manual_seed(0)
    model = MultiviewTransformer(TINY, V, K, (64, 96)).train()
    mask = torch.zeros(B, V, 4, 6, dtype=torch.bool)
    mask[:, :, 0, 0] = True
    out = model(_images((64, 96)), patch_mask=mask)
    target = torch.rand_like(out["heatmaps"])
    loss = ((out["heatmaps"] - target) ** 2).sum()
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
    assert model.view_embedding.grad.abs().sum() > 0


def test_grad_checkpointing_same_result():
    model = _model(MultiviewTransformer).train()
    x = _images()
    ref = model(x)["logits"]
    model.set_grad_checkpointing(True)
    out = model(x)["logits"]
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    assert model.view_embedding.grad is not None


def test_build_model_and_param_groups():
    data_cfg = {"image_resize_dims": {"height": 64, "width": 96}, "downsample_factor": 2}
    mvt = build_model({"model_type": "heatmap_multiview_transformer", "backbone": TINY},
                      data_cfg, V, K)
    base = build_model({"model_type": "heatmap", "backbone": TINY}, data_cfg, V, K)
    assert isinstance(mvt, MultiviewTransformer) and isinstance(base, SingleViewHeatmapModel)
    assert mvt.heatmap_size == (16, 24)
    groups = param_groups(mvt)
    assert set(groups) == {"backbone", "head", "view_embedding"}
    assert groups["view_embedding"] == [mvt.view_embedding]
    ids = [id(p) for params in groups.values() for p in params]
    assert len(ids) == len(set(ids)) == len(list(mvt.parameters()))
    assert param_groups(base)["view_embedding"] == []


def test_backbone_checkpoint(tmp_path):
    torch.manual_seed(1)
    source = build_backbone(TINY, (64, 64))
    path = tmp_path / "weights.pt"
    wrapped = {f"backbone.{k}": v for k, v in source.state_dict().items()}
    torch.save({"state_dict": wrapped, "epoch": 3}, path)
    torch.manual_seed(2)
    target = build_backbone(TINY, (64, 96), checkpoint=str(path))  # pos embed resampled
    torch.testing.assert_close(target.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert target.pos_embed.shape[1] == 1 + 4 * 6
    with pytest.raises(ParallaxError, match="does not exist"):
        build_backbone(TINY, (64, 64), checkpoint=str(tmp_path / "missing.pt"))
    torch.save({"foo.weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ParallaxError, match="no tensor"):
        build_backbone(TINY, (64, 64), checkpoint=str(tmp_path / "other.pt"))


@pytest.mark.parametrize("stride", [2, 4, 8])
def test_decode_heatmaps_convention(stride):
    h, w = 12, 16
    maps = torch.zeros(2, 1, h, w)
    maps[0, 0, 5, 7] = 1.0  # one cell: its centre
    maps[1, 0, 3, 9] = maps[1, 0, 3, 10] = 0.4  # between two cells, with mass 0.2 elsewhere
    maps[1, 0, 11, 0] = 0.2
    xy, conf = decode_heatmaps(maps, stride)
    off = (stride - 1) / 2
    torch.testing.assert_close(xy[0, 0], torch.tensor([7 * stride + off, 5 * stride + off]))
    torch.testing.assert_close(xy[1, 0], torch.tensor([9.5 * stride + off, 3 * stride + off]))
    torch.testing.assert_close(conf, torch.tensor([[1.0], [0.8]]))
    assert math.isclose(float(conf.max()), 1.0)


def test_dinov2_checkpoint_resampled_to_patch_16(tmp_path):
    """A native patch-14 DINOv2-reg state dict (37×37 grid) loads into the patch-16 backbone."""
    torch.manual_seed(3)
    native = timm.create_model("vit_small_patch14_reg4_dinov2", num_classes=0, **REG4_KWARGS)
    assert native.patch_embed.patch_size == (14, 14)
    torch.save(native.state_dict(), tmp_path / "dinov2.pt")
    model = build_backbone("vit_small_patch14_reg4_dinov2", (64, 96),
                           checkpoint=tmp_path / "dinov2.pt", backbone_kwargs=REG4_KWARGS)
    assert model.patch_embed.proj.weight.shape[-2:] == (16, 16)
    assert model.pos_embed.shape[1] == 4 * 6
    torch.testing.assert_close(model.reg_token, native.reg_token)
    torch.testing.assert_close(model.blocks[1].mlp.fc1.weight, native.blocks[1].mlp.fc1.weight)
