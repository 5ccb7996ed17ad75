"""The training loop (plain torch): losses, patch-masking curriculum, checkpoints, exact resume.

Determinism: model init, data order (a permutation per epoch from (seed, epoch)), photometric
augmentation (seeded by (seed, epoch, sample)) and patch masks (seeded by (seed, step)) are all
functions of the seed and the step, so a run killed after a checkpoint and resumed with
`resume=True` ends with the same weights as an unbroken run (on CPU).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from pipeline import losses
from pipeline.cache_dataset import CacheDataset, normalize_images
from pipeline.errors import ParallaxError
from pipeline.io_utils import atomic_path
from pipeline.masking import mask_generator, mask_ratio, sample_patch_mask
from pipeline.model import build_model, param_groups
from pipeline.photometric import from_imgaug

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """The `model`, `data`, `training` and `losses` values training uses (LP key names)."""

    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    max_epochs: int = 300
    max_steps: int | None = None
    train_batch_size: int = 8
    val_batch_size: int = 16
    learning_rate: float = 5e-4
    weight_decay: float = 0.05
    unfreezing_epoch: int = 0
    grad_clip: float = 1.0
    check_val_every_n_epoch: int = 5
    ckpt_every_n_steps: int = 200
    precision: str = "fp32"
    device: str = "auto"
    num_workers: int = 0
    seed: int = 0
    patch_mask: dict[str, Any] = field(default_factory=dict)
    imgaug: str = "dlc"
    heatmap_sigma: float = 1.25
    pairwise_log_weight: float | None = None
    reprojection_log_weight: float | None = None
    loss_warmup_epochs: float = 0.0

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TrainConfig:
        training, loss_cfg = config.get("training", {}), config.get("losses", {})
        pairwise = loss_cfg.get("supervised_pairwise_projections") or {}
        reprojection = loss_cfg.get("supervised_reprojection_heatmap_mse") or {}
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
            pairwise_log_weight=pairwise.get("log_weight"),
            reprojection_log_weight=reprojection.get("log_weight"),
            loss_warmup_epochs=float(loss_cfg.get("warmup_epochs", 0.0)),
        )


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ParallaxError("training.device is cuda but no CUDA device is available")
    return torch.device(name)


def autocast(device: torch.device, precision: str):
    """bf16/fp16 autocast (bf16 also on CPU); fp32 = no autocast."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        raise ParallaxError(f"training.precision must be fp32, bf16 or fp16, got {precision!r}")
    if dtype == torch.float16 and device.type != "cuda":
        raise ParallaxError("training.precision fp16 needs a CUDA device; use bf16 on CPU")
    return torch.autocast(device_type=device.type, dtype=dtype)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence((seed, epoch))
                                                  .generate_state(1)[0]))
    return torch.randperm(n, generator=generator).tolist()


def compute_losses(
    model, batch: dict[str, torch.Tensor], cfg: TrainConfig, warmup: float,
    patch_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss and its terms for one batch (on the model's device)."""
    images = batch["images"]
    images = normalize_images(images) if images.dtype == torch.uint8 else images
    out = model(images, patch_mask=patch_mask)
    heatmaps = out["heatmaps"].float()
    height, width = heatmaps.shape[-2:]
    valid = batch["keypoints_valid"]
    centres = losses.model_to_heatmap(batch["keypoints_2d"], model.stride)
    targets = losses.gaussian_heatmaps(centres, valid, height, width, cfg.heatmap_sigma)
    heatmap_loss = losses.heatmap_mse(heatmaps, targets, valid)
    total = losses.loss_weight(0.0) * heatmap_loss
    keypoints = losses.soft_argmax(heatmaps, model.stride)
    terms = {"heatmap_mse": float(heatmap_loss.detach())}
    if cfg.pairwise_log_weight is not None:
        pairwise, metrics = losses.pairwise_projection_loss(keypoints, batch)
        total = total + warmup * losses.loss_weight(cfg.pairwise_log_weight) * pairwise
        terms.update(pairwise_projection=float(pairwise.detach()),
                     pairwise_dist_world=float(metrics["pairwise_dist_world"]))
    if cfg.reprojection_log_weight is not None:
        reproj, metrics = losses.reprojection_heatmap_loss(keypoints, targets, batch,
                                                           cfg.heatmap_sigma, model.stride)
        total = total + warmup * losses.loss_weight(cfg.reprojection_log_weight) * reproj
        terms.update(reprojection_heatmap_mse=float(reproj.detach()))
    error = torch.linalg.vector_norm(keypoints.detach() - batch["keypoints_2d"], dim=-1)
    terms["pixel_error_model"] = float(error[valid].mean()) if valid.any() else float("nan")
    terms["loss"] = float(total.detach())
    return total, terms


class Trainer:
    def __init__(self, cfg: TrainConfig, train_h5: Path, eval_h5: Path, out_dir: Path,
                 expected_config_hash: str | None = None) -> None:
        self.cfg, self.out_dir = cfg, Path(out_dir)
        self.device = pick_device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.train_set = CacheDataset(train_h5, expected_config_hash=expected_config_hash,
                                      photometric=from_imgaug(cfg.imgaug), seed=cfg.seed)
        self.val_set = CacheDataset(eval_h5, expected_config_hash=expected_config_hash,
                                    sets=("val",))
        if len(self.train_set) == 0:
            raise ParallaxError(f"{train_h5}: no training samples")
        calibrated = bool(self.train_set.meta["calibration_index"].min() >= 0)
        if not calibrated and (cfg.pairwise_log_weight is not None
                               or cfg.reprojection_log_weight is not None):
            raise ParallaxError("a 3D loss (losses.supervised_*.log_weight) is enabled but some "
                                "training frames have no calibration; disable it (null)")
        views, keypoints = len(self.train_set.view_names), len(self.train_set.keypoint_names)
        self.model = build_model(cfg.model, cfg.data, views, keypoints).to(self.device)
        groups = param_groups(self.model)
        self.optimizer = torch.optim.AdamW(
            [{"params": groups["backbone"], "name": "backbone"},
             {"params": groups["head"] + groups["view_embedding"], "name": "head"}],
            lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.steps_per_epoch = math.ceil(len(self.train_set) / cfg.train_batch_size)
        self.total_steps = cfg.max_steps or cfg.max_epochs * self.steps_per_epoch
        unfreeze = cfg.unfreezing_epoch * self.steps_per_epoch

        def cosine(step: int) -> float:
            return 0.5 * (1 + math.cos(math.pi * min(step / max(self.total_steps, 1), 1.0)))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, [lambda s: cosine(s) if s >= unfreeze else 0.0, cosine])
        self.step, self.best_val, self.rows = 0, math.inf, []

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "step": self.step,
                "best_val": self.best_val, "rows": self.rows,
                "init_args": getattr(self.model, "init_args", None),
                "model_type": self.model.model_type,
                "view_names": self.train_set.view_names,
                "keypoint_names": self.train_set.keypoint_names,
                "torch_rng": torch.get_rng_state()}

    def save(self, name: str) -> None:
        with atomic_path(self.out_dir / name) as tmp:
            torch.save(self.state(), tmp)
        with atomic_path(self.out_dir / "metrics.csv") as tmp:
            pd.DataFrame(self.rows).to_csv(tmp, index=False)

    def resume(self) -> None:
        path = self.out_dir / "last.pt"
        if not path.is_file():
            log.info("no %s: starting from scratch", path)
            return
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.best_val, self.rows = state["step"], state["best_val"], state["rows"]
        torch.set_rng_state(state["torch_rng"])
        log.info("resumed from %s at step %d", path, self.step)

    # ------------------------------------------------------------------ loop
    def batches(self, epoch: int, skip: int):
        self.train_set.set_epoch(epoch)
        order = epoch_order(len(self.train_set), self.cfg.seed, epoch)
        size = self.cfg.train_batch_size
        sampler = [order[i:i + size] for i in range(0, len(order), size)][skip:]
        return torch.utils.data.DataLoader(self.train_set, batch_sampler=sampler,
                                           num_workers=self.cfg.num_workers)

    def validate(self) -> dict[str, float]:
        if len(self.val_set) == 0:
            return {}
        self.model.eval()
        loader = torch.utils.data.DataLoader(self.val_set, batch_size=self.cfg.val_batch_size)
        sums: dict[str, float] = {}
        with torch.no_grad(), autocast(self.device, self.cfg.precision):
            for batch in loader:
                batch = {k: v.to(self.device) for k, v in batch.items()}
                _, terms = compute_losses(self.model, batch, self.cfg, 1.0)
                for key, value in terms.items():
                    sums[key] = sums.get(key, 0.0) + value * len(batch["index"])
        self.model.train()
        return {f"val_{k}": v / len(self.val_set) for k, v in sums.items()}

    def fit(self) -> dict[str, float]:
        cfg, model = self.cfg, self.model
        model.train()
        progress = tqdm(total=self.total_steps, initial=self.step, desc="train", disable=None)
        while self.step < self.total_steps:
            epoch, skip = divmod(self.step, self.steps_per_epoch)
            tick = time.perf_counter()
            for batch in self.batches(epoch, skip):
                data_time = time.perf_counter() - tick
                batch = {k: v.to(self.device) for k, v in batch.items()}
                ratio = mask_ratio(self.step, self.steps_per_epoch, cfg.patch_mask)
                mask = None
                if ratio > 0 and model.model_type == "heatmap_multiview_transformer":
                    b, v, _, h, w = batch["images"].shape
                    mask = sample_patch_mask(b, v, h // model.patch_size, w // model.patch_size,
                                             ratio, mask_generator(cfg.seed, self.step),
                                             device=self.device)
                warmup = min(1.0, (self.step / self.steps_per_epoch) / cfg.loss_warmup_epochs) \
                    if cfg.loss_warmup_epochs > 0 else 1.0
                with autocast(self.device, cfg.precision):
                    total, terms = compute_losses(model, batch, cfg, warmup, mask)
                self.optimizer.zero_grad(set_to_none=True)
                total.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                self.optimizer.step()
                self.scheduler.step()
                self.step += 1
                row = {"step": self.step, "epoch": epoch, **terms, "mask_ratio": ratio,
                       "loss_warmup": warmup, "lr": self.optimizer.param_groups[1]["lr"],
                       "lr_backbone": self.optimizer.param_groups[0]["lr"],
                       "data_time": data_time, "step_time": time.perf_counter() - tick}
                end_of_epoch = self.step % self.steps_per_epoch == 0
                if end_of_epoch and (epoch + 1) % cfg.check_val_every_n_epoch == 0 \
                        or self.step == self.total_steps:
                    row.update(self.validate())
                    val = row.get("val_loss", terms["loss"])
                    if val < self.best_val:
                        self.best_val = val
                        self.rows.append(row)
                        self.save("best.pt")
                        row = None
                if row is not None:
                    self.rows.append(row)
                progress.update(1)
                progress.set_postfix(loss=f"{terms['loss']:.4f}", mask=f"{ratio:.2f}")
                if self.step % cfg.ckpt_every_n_steps == 0 or self.step == self.total_steps:
                    self.save("last.pt")
                if self.step >= self.total_steps:
                    break
                tick = time.perf_counter()
        progress.close()
        last = self.rows[-1] if self.rows else {}
        return {k: v for k, v in last.items() if isinstance(v, float)}
