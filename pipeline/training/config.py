"""What a training run is: TrainConfig (from the workflow config, LP key names) and the
hash that decides whether a checkpoint may be resumed."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py

from pipeline.core.digest import code_digest
from pipeline.core.errors import ParallaxError

#: the stage module whose imports make up the code part of the resume hash
TRAIN_STAGE = "pipeline.stages.train"
HIDDEN_KEYPOINTS = ("projected", "uniform", "ignore")
PAIRWISE_SCALES = ("pose", "world")
#: TrainConfig values that do not change the trained weights (left out of the resume hash)
RUNTIME_KEYS = ("device", "num_workers", "num_gpus", "ckpt_every_n_steps", "val_batch_size")



@dataclass(frozen=True)
class TrainConfig:
    """The `model`, `data`, `training`, `losses` and `callbacks` values training uses (LP key
    names)."""

    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    max_epochs: int = 300
    max_steps: int | None = None
    train_batch_size: int = 8  # global: split over the torchrun processes
    val_batch_size: int = 16
    learning_rate: float = 5e-4
    weight_decay: float = 0.05
    unfreezing_epoch: int = 0
    grad_clip: float = 1.0
    check_val_every_n_epoch: int = 5
    ckpt_every_n_steps: int = 200
    precision: str = "fp32"
    device: str = "auto"
    num_workers: int | str = "auto"
    num_gpus: int = 1  # the rule's torchrun switch; here only checked against WORLD_SIZE
    seed: int = 0
    patch_mask: dict[str, Any] = field(default_factory=dict)
    imgaug: str = "dlc"
    heatmap_sigma: float = 1.25
    #: targets of keypoints hidden in a view (not clicked there, triangulated from the others):
    #: projected (a Gaussian at the projection of the 3D point) | uniform (LP) | ignore
    hidden_keypoints: str = "ignore"
    hidden_log_weight: float = 0.0
    pairwise_log_weight: float | None = None
    #: pose: the distance divided by the pose's extent (unit-free) | world: calibration units (LP)
    pairwise_scale: str = "pose"
    reprojection_log_weight: float | None = None
    #: compare reprojections also in views where the keypoint is hidden (projected targets)
    reprojection_hidden_views: bool = False
    #: LP's callbacks.anneal_weight for the 3D terms: init_val until freeze_until_epoch, then
    #: + increase_factor per epoch up to final_val (LP's defaults: 0 until epoch 60, full at 160)
    anneal_init_val: float = 0.0
    anneal_increase_factor: float = 0.01
    anneal_final_val: float = 1.0
    anneal_freeze_until_epoch: float = 60.0

    def __post_init__(self) -> None:
        choices = {"training.hidden_keypoints": (self.hidden_keypoints, HIDDEN_KEYPOINTS),
                   "losses.supervised_pairwise_projections.scale": (self.pairwise_scale,
                                                                    PAIRWISE_SCALES)}
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise ParallaxError(f"{key} must be one of {list(allowed)}, got {value!r}")

    def anneal_weight(self, epoch: float) -> float:
        """Weight factor of the 3D loss terms at (fractional) `epoch`."""
        if epoch < self.anneal_freeze_until_epoch:
            return self.anneal_init_val
        ramp = self.anneal_init_val + self.anneal_increase_factor * (
            epoch - self.anneal_freeze_until_epoch)
        return float(min(self.anneal_final_val, ramp))

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TrainConfig:
        training, loss_cfg = config.get("training", {}), config.get("losses", {})
        pairwise = loss_cfg.get("supervised_pairwise_projections") or {}
        reprojection = loss_cfg.get("supervised_reprojection_heatmap_mse") or {}
        hidden = loss_cfg.get("supervised_hidden_heatmap_mse") or {}
        anneal = (config.get("callbacks") or {}).get("anneal_weight") or {}
        keys = {f for f in cls.__dataclass_fields__} & set(training)
        optimizer = training.get("optimizer_params") or {}
        if "learning_rate" in optimizer:
            keys.add("learning_rate")
            training = {**training, "learning_rate": optimizer["learning_rate"]}
        return cls(
            model=dict(config.get("model", {})), data=dict(config.get("data", {})),
            **{key: training[key] for key in keys if key not in ("model", "data")},
            seed=int(training.get("rng_seed_model_pt", 0)),
            heatmap_sigma=float(loss_cfg.get("heatmap_sigma", 1.25)),
            hidden_log_weight=float(hidden.get("log_weight", cls.hidden_log_weight)),
            pairwise_log_weight=pairwise.get("log_weight"),
            pairwise_scale=str(pairwise.get("scale", cls.pairwise_scale)),
            reprojection_log_weight=reprojection.get("log_weight"),
            reprojection_hidden_views=bool(reprojection.get("hidden_views",
                                                            cls.reprojection_hidden_views)),
            anneal_init_val=float(anneal.get("init_val", cls.anneal_init_val)),
            anneal_increase_factor=float(anneal.get("increase_factor",
                                                    cls.anneal_increase_factor)),
            anneal_final_val=float(anneal.get("final_val", cls.anneal_final_val)),
            anneal_freeze_until_epoch=float(anneal.get("freeze_until_epoch",
                                                       cls.anneal_freeze_until_epoch)),
        )


def train_config_hash(cfg: TrainConfig, caches: dict[str, Path]) -> str:
    """Digest of what shapes the trained weights: TrainConfig minus RUNTIME_KEYS, each
    cache's config_hash and input_hash attributes, and the source of every pipeline module the
    train stage imports (edited model or loss code never resumes an old run)."""
    values: dict[str, Any] = {k: v for k, v in asdict(cfg).items() if k not in RUNTIME_KEYS}
    values["code"] = code_digest(TRAIN_STAGE)
    for name, path in caches.items():
        with h5py.File(path, "r") as h5:
            values[name] = {k: str(h5.attrs.get(k)) for k in ("config_hash", "input_hash")}
    text = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]

