"""pipeline.training.objective and config: hidden-keypoint targets, loss weights and the
annealing schedule, checked through the loss total against values computed here."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.core.errors import ParallaxError
from pipeline.training.config import TrainConfig
from pipeline.training.distributed import DistContext
from pipeline.training.objective import Term, combine, loss_terms, term_weights

H = W = 16
STRIDE = 4


class FixedHeatmaps(torch.nn.Module):
    """A stand-in model returning the same softmaxed heatmaps for any input."""

    stride = STRIDE

    def __init__(self, heatmaps: torch.Tensor) -> None:
        super().__init__()
        self.heatmaps = heatmaps

    def forward(self, images, patch_mask=None):
        return {"heatmaps": self.heatmaps}


def gaussian(x: float, y: float, sigma: float = 1.25) -> np.ndarray:
    """A normalised Gaussian on the H x W heatmap at heatmap coordinates (x, y)."""
    gy, gx = np.mgrid[:H, :W]
    g = np.exp(-((gx - x) ** 2 + (gy - y) ** 2) / (2 * sigma**2))
    return g / g.sum()


def setup() -> tuple[FixedHeatmaps, dict[str, torch.Tensor], np.ndarray]:
    """One sample, 2 views, 2 keypoints: keypoint 0 clicked in both views, keypoint 1 clicked in
    view 0 and hidden (projected target) in view 1."""
    rng = np.random.default_rng(0)
    logits = torch.tensor(rng.normal(size=(1, 2, 2, H, W)))
    heatmaps = torch.softmax(logits.flatten(-2), -1).view(logits.shape)
    model_xy = np.array([[[[20.5, 30.5], [40.5, 10.5]], [[12.5, 44.5], [33.5, 25.5]]]])
    batch = {
        "images": torch.zeros(1, 2, 3, 64, 64),
        "keypoints_2d": torch.tensor(model_xy),
        "keypoints_valid": torch.tensor([[[True, True], [True, False]]]),
        "hidden_valid": torch.tensor([[[False, False], [False, True]]]),
    }
    return FixedHeatmaps(heatmaps), batch, heatmaps.numpy()


def sse(pred: np.ndarray, target: np.ndarray) -> float:
    return float(((pred - target) ** 2).sum())


@pytest.mark.parametrize("mode", ["projected", "uniform", "ignore"])
def test_hidden_keypoint_targets(mode):
    model, batch, maps = setup()
    cfg = TrainConfig(hidden_keypoints=mode, hidden_log_weight=1.0)
    terms = {t.name: t for t in loss_terms(model, batch, cfg)}
    centre = (batch["keypoints_2d"].numpy() + 0.5) / STRIDE - 0.5  # heatmap coordinates
    clicked = [(0, 0, 0), (0, 0, 1), (0, 1, 0)]
    expected = np.mean([sse(maps[i], gaussian(*centre[i])) for i in clicked])
    assert terms["heatmap_mse"].mean.item() == pytest.approx(expected, rel=1e-6)
    assert terms["heatmap_mse"].count.item() == 3
    if mode == "ignore":
        assert "heatmap_mse_hidden" not in terms and "pixel_error_hidden" not in terms
        assert "heatmap_mse_hidden" not in term_weights(cfg, 1.0)
        return
    target = gaussian(*centre[0, 1, 1]) if mode == "projected" else np.full((H, W), 1 / (H * W))
    assert terms["heatmap_mse_hidden"].mean.item() == pytest.approx(
        sse(maps[0, 1, 1], target), rel=1e-6)
    assert terms["heatmap_mse_hidden"].count.item() == 1
    weights = term_weights(cfg, 1.0)
    assert weights["heatmap_mse_hidden"] == pytest.approx(0.5 * math.exp(-1.0))
    # the hidden term enters the total with its own weight
    total, values = combine(list(terms.values()), weights, DistContext())
    assert total.item() == pytest.approx(
        0.5 * expected + 0.5 * math.exp(-1.0) * sse(maps[0, 1, 1], target), rel=1e-6)
    assert values["loss"] == pytest.approx(total.item())


def test_anneal_schedule_hold_then_ramp():
    cfg = TrainConfig(pairwise_log_weight=2.0, reprojection_log_weight=1.0,
                      anneal_init_val=0.0, anneal_freeze_until_epoch=10,
                      anneal_increase_factor=0.1, anneal_final_val=1.0)
    assert [cfg.anneal_weight(e) for e in (0, 5, 9.99, 10)] == [0.0] * 4
    assert cfg.anneal_weight(15) == pytest.approx(0.5)
    assert cfg.anneal_weight(20) == cfg.anneal_weight(300) == 1.0
    flat = TrainConfig(anneal_init_val=1.0, anneal_freeze_until_epoch=0.0)
    assert flat.anneal_weight(0) == 1.0  # no schedule: full weight from the start
    # through the loss total: before the hold ends neither 3D term adds anything
    terms = [Term("heatmap_mse", torch.tensor(0.3), torch.tensor(4.0)),
             Term("pairwise_projection", torch.tensor(7.0), torch.tensor(6.0)),
             Term("pairwise_dist_world", torch.tensor(9.0), torch.tensor(6.0)),
             Term("reprojection_heatmap_mse", torch.tensor(0.2), torch.tensor(5.0)),
             Term("pixel_error_model", torch.tensor(2.0), torch.tensor(4.0))]
    for epoch, factor in ((5, 0.0), (15, 0.5), (40, 1.0)):
        weights = term_weights(cfg, cfg.anneal_weight(epoch))
        assert list(weights) == [t.name for t in terms]
        total, _ = combine(terms, weights, DistContext())
        three_d = 0.5 * math.exp(-2.0) * 7.0 + 0.5 * math.exp(-1.0) * 0.2
        assert total.item() == pytest.approx(0.5 * 0.3 + factor * three_d)


def test_lp_config_keys_reach_train_config():
    cfg = TrainConfig.from_config({
        "training": {"hidden_keypoints": "uniform"},
        "losses": {"supervised_hidden_heatmap_mse": {"log_weight": 2.0},
                   "supervised_pairwise_projections": {"log_weight": 1.0, "scale": "world"},
                   "supervised_reprojection_heatmap_mse": {"log_weight": 3.0,
                                                           "hidden_views": True}},
        "callbacks": {"anneal_weight": {"init_val": 0.0, "increase_factor": 0.01,
                                        "final_val": 1.0, "freeze_until_epoch": 60}}})
    assert (cfg.hidden_keypoints, cfg.hidden_log_weight, cfg.pairwise_scale) == \
        ("uniform", 2.0, "world")
    assert cfg.reprojection_hidden_views and cfg.reprojection_log_weight == 3.0
    assert cfg.anneal_weight(60) == 0.0 and cfg.anneal_weight(160) == pytest.approx(1.0)
    with pytest.raises(ParallaxError, match="training.hidden_keypoints"):
        TrainConfig(hidden_keypoints="visible")


def test_train_config_defaults_are_the_schemas():
    """TrainConfig (used without the workflow by tests and benchmarks) and the workflow's config
    schema must not disagree on a default."""
    import yaml

    schema = yaml.safe_load((Path(__file__).resolve().parents[1] / "workflow" / "schemas"
                             / "config.schema.yaml").read_text())["properties"]

    def default(*path: str):
        node = schema
        for key in path[:-1]:
            node = node[key]["properties"]
        return node[path[-1]]["default"]

    cfg = TrainConfig()
    pairs = {
        "hidden_keypoints": ("training", "hidden_keypoints"),
        "hidden_log_weight": ("losses", "supervised_hidden_heatmap_mse", "log_weight"),
        "pairwise_log_weight": ("losses", "supervised_pairwise_projections", "log_weight"),
        "pairwise_scale": ("losses", "supervised_pairwise_projections", "scale"),
        "reprojection_log_weight": ("losses", "supervised_reprojection_heatmap_mse",
                                    "log_weight"),
        "reprojection_hidden_views": ("losses", "supervised_reprojection_heatmap_mse",
                                      "hidden_views"),
        "heatmap_sigma": ("losses", "heatmap_sigma"),
        "anneal_init_val": ("callbacks", "anneal_weight", "init_val"),
        "anneal_increase_factor": ("callbacks", "anneal_weight", "increase_factor"),
        "anneal_final_val": ("callbacks", "anneal_weight", "final_val"),
        "anneal_freeze_until_epoch": ("callbacks", "anneal_weight", "freeze_until_epoch"),
    }
    for field, path in pairs.items():
        assert getattr(cfg, field) == default(*path), field
    assert TrainConfig.from_config({}) == cfg
