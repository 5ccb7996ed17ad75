"""The training loop (plain torch): losses, patch-masking curriculum, checkpoints, exact resume,
data parallel over torchrun processes (`pipeline.training.distributed`).

Determinism: model init, data order (a permutation per epoch from (seed, epoch)), photometric
augmentation (seeded by (seed, epoch, sample)) and patch masks (seeded by (seed, step), drawn
for the whole global batch) are all functions of the seed and the step, so a run killed after a
checkpoint and resumed with `resume()` ends with the same weights as an unbroken run (on CPU).
None of them depends on the number of processes, and every loss term is weighted by its count
of valid entries all-reduced over the processes, so a DDP run follows the single-process run of
the same global batch up to float rounding.

Resume: last.pt stores `train_config_hash` (every TrainConfig value that can change the
result, the caches' config and input hashes, and the loaded pipeline code). `resume()`
continues only when it matches and the run was not finished; otherwise it logs why and the run
starts from scratch, removing the stale best.pt, last.pt, metrics.csv, tensorboard/ and resume/
first: a run never mixes two configurations, so the rule can always pass --resume. Checkpoints
are hard-linked into resume/, which survives Snakemake deleting a killed job's outputs.

Validation: each process evaluates a contiguous shard of the validation set; the sums and
counts of every term are all-reduced, so val_* are means over the valid entries of the whole
set (independent of val_batch_size and of the number of processes) and agree on every rank.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from pipeline.core.atomic import atomic_path
from pipeline.core.device import pick_device
from pipeline.core.errors import ParallaxError
from pipeline.data.cache.torch_dataset import CacheDataset
from pipeline.data.photometric import from_imgaug
from pipeline.models.masking import mask_generator, mask_ratio, sample_patch_mask
from pipeline.models.model import build_model, param_groups
from pipeline.training.config import TrainConfig, train_config_hash
from pipeline.training.distributed import (
    DistContext,
    PaddedDataset,
    Shard,
    check_num_gpus,
    init_process_group,
    per_rank_batch,
    rank_device,
    shard_batches,
)
from pipeline.training.objective import (
    combine,
    compute_losses,
    loss_terms,
    term_sums,
    term_values,
    term_weights,
)
from pipeline.training.runtime import (
    ScalarLog,
    autocast,
    enable_tf32,
    grad_scaler,
    loader_options,
    oom_hint,
    to_device,
)

__all__ = ["TrainConfig", "Trainer", "autocast", "compute_losses", "pick_device"]

log = logging.getLogger(__name__)

OUTPUTS = ("best.pt", "last.pt", "metrics.csv")
#: hard links to the latest best.pt and last.pt: Snakemake deletes a killed job's declared
#: outputs before `--rerun-incomplete` runs it again, these survive and the run resumes
RESUME_DIR = "resume"


def link_or_copy(source: Path, target: Path) -> None:
    """Make `target` the same file as `source` (a hard link; a copy where links fail),
    atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence((seed, epoch))
                                                  .generate_state(1)[0]))
    return torch.randperm(n, generator=generator).tolist()


# ---------------------------------------------------------------------------- trainer
class Trainer:
    def __init__(self, cfg: TrainConfig, train_h5: Path, eval_h5: Path, out_dir: Path,
                 expected_config_hash: str | None = None, ctx: DistContext | None = None,
                 threads: int = 1, expected_images_hash: str | None = None) -> None:
        self.cfg, self.out_dir = cfg, Path(out_dir)
        self.ctx = ctx = ctx or DistContext()
        self.device = rank_device(ctx, cfg.device) if ctx.enabled else pick_device(cfg.device)
        check_num_gpus(cfg.num_gpus, ctx, self.device)
        self.per_rank_batch = per_rank_batch(cfg.train_batch_size, ctx)
        self.loader_options = loader_options(self.device, cfg.num_workers, threads)
        enable_tf32(self.device)
        torch.manual_seed(cfg.seed)
        self.train_set = CacheDataset(train_h5, expected_config_hash=expected_config_hash,
                                      photometric=from_imgaug(cfg.imgaug), seed=cfg.seed,
                                      normalize=False, expected_images_hash=expected_images_hash)
        self.val_set = CacheDataset(eval_h5, expected_config_hash=expected_config_hash,
                                    sets=("val",), normalize=False,
                                    expected_images_hash=expected_images_hash)
        if len(self.train_set) == 0:
            raise ParallaxError(f"{train_h5}: no training samples")
        calibrated = bool(self.train_set.meta["calibration_index"].min() >= 0)
        if not calibrated and (cfg.pairwise_log_weight is not None
                               or cfg.reprojection_log_weight is not None):
            raise ParallaxError("a 3D loss (losses.supervised_*.log_weight) is enabled but some "
                                "training frames have no calibration; disable it (null)")
        self.config_hash = train_config_hash(cfg, {"train_cache": Path(train_h5),
                                                   "eval_cache": Path(eval_h5)})
        views, keypoints = len(self.train_set.view_names), len(self.train_set.keypoint_names)
        self.net = build_model(cfg.model, cfg.data, views, keypoints).to(self.device)
        init_process_group(ctx, self.device)
        self.model = self.net
        if ctx.enabled:  # every parameter is used unless prefix tokens are dropped
            unused = getattr(self.net, "keep_prefix_tokens", True) is False
            self.model = DistributedDataParallel(
                self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=unused)
        groups = param_groups(self.net)
        self.optimizer = torch.optim.AdamW(
            [{"params": groups["backbone"], "name": "backbone"},
             {"params": groups["head"] + groups["view_embedding"], "name": "head"}],
            lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.scaler = grad_scaler(self.device, cfg.precision)
        self.steps_per_epoch = math.ceil(len(self.train_set) / cfg.train_batch_size)
        self.total_steps = cfg.max_steps or cfg.max_epochs * self.steps_per_epoch
        last_epoch = (self.total_steps - 1) / self.steps_per_epoch
        if (cfg.pairwise_log_weight is not None or cfg.reprojection_log_weight is not None) \
                and cfg.anneal_weight(last_epoch) == 0:
            log.warning("a 3D loss is on but callbacks.anneal_weight keeps its weight at 0 for "
                        "the whole run (freeze_until_epoch %g, %.1f epochs): it has no effect",
                        cfg.anneal_freeze_until_epoch, self.total_steps / self.steps_per_epoch)
        unfreeze = cfg.unfreezing_epoch * self.steps_per_epoch

        def cosine(step: int) -> float:
            return 0.5 * (1 + math.cos(math.pi * min(step / max(self.total_steps, 1), 1.0)))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, [lambda s: cosine(s) if s >= unfreeze else 0.0, cosine])
        self.step, self.best_val, self.rows = 0, math.inf, []
        self.scalars: ScalarLog | None = None

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        return {"model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "step": self.step,
                "best_val": self.best_val, "rows": self.rows,
                "init_args": getattr(self.net, "init_args", None),
                "model_type": self.net.model_type,
                "view_names": self.train_set.view_names,
                "keypoint_names": self.train_set.keypoint_names,
                "torch_rng": torch.get_rng_state(),
                "scaler": None if self.scaler is None else self.scaler.state_dict(),
                "train_config_hash": self.config_hash,
                "world_size": self.ctx.world_size}

    def save(self, name: str) -> None:
        """Write a checkpoint and metrics.csv (the main process only)."""
        if not self.ctx.is_main:
            return
        with atomic_path(self.out_dir / name) as tmp:
            torch.save(self.state(), tmp)
        link_or_copy(self.out_dir / name, self.out_dir / RESUME_DIR / name)
        with atomic_path(self.out_dir / "metrics.csv") as tmp:
            pd.DataFrame(self.rows).to_csv(tmp, index=False)
        if self.scalars is not None:
            self.scalars.flush()

    def resume(self) -> bool:
        """Continue from <out_dir>/last.pt when it exists and was written with this training
        configuration (same `train_config_hash`); else start from scratch. Every process reads
        the same file, so all make the same decision."""
        path = self.out_dir / "last.pt"
        if not path.is_file():  # Snakemake removes the outputs of an incomplete job
            path = self.out_dir / RESUME_DIR / "last.pt"
        if not path.is_file():
            log.info("no %s: starting from scratch", path)
            return False
        state = torch.load(path, map_location="cpu", weights_only=False)
        found = state.get("train_config_hash")
        if found != self.config_hash:
            log.warning("%s was written with another training configuration or cache (hash "
                        "%s, now %s): starting from scratch, not resuming", path, found,
                        self.config_hash)
            return False
        if state["step"] >= self.total_steps:
            log.info("%s is a finished run (step %d of %d): training again from scratch", path,
                     state["step"], self.total_steps)
            return False
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.best_val, self.rows = state["step"], state["best_val"], state["rows"]
        torch.set_rng_state(state["torch_rng"].cpu())
        kept = self.out_dir / RESUME_DIR / "best.pt"
        if self.ctx.is_main and not (self.out_dir / "best.pt").exists() and kept.is_file():
            link_or_copy(kept, self.out_dir / "best.pt")  # its val loss is state["best_val"]
        log.info("resumed from %s at step %d", path, self.step)
        return True

    def _start_fresh(self) -> None:
        """Remove a previous run's outputs (main process) so that runs never mix."""
        self.ctx.barrier()  # every process has read last.pt (resume) before it goes
        if not self.ctx.is_main:
            return
        stale = [self.out_dir / name for name in OUTPUTS if (self.out_dir / name).exists()]
        for path in stale:
            path.unlink()
        for folder in (self.out_dir / "tensorboard", self.out_dir / RESUME_DIR):
            if folder.is_dir():
                shutil.rmtree(folder)
                stale.append(folder)
        if stale:
            log.info("fresh start: removed %s", ", ".join(p.name for p in stale))

    # ------------------------------------------------------------------ loop
    def batches(self, epoch: int, skip: int):
        """(this process's Shard, its batch) for the steps of `epoch` after `skip`."""
        self.train_set.set_epoch(epoch)
        order = epoch_order(len(self.train_set), self.cfg.seed, epoch)
        shards = shard_batches(order, self.cfg.train_batch_size, self.ctx)[skip:]
        loader = torch.utils.data.DataLoader(PaddedDataset(self.train_set),
                                             batch_sampler=[s.items for s in shards],
                                             **self.loader_options)
        return zip(shards, loader, strict=True)

    def patch_mask(self, shard: Shard, images: torch.Tensor, ratio: float
                   ) -> torch.Tensor | None:
        """This process's rows of the global batch's mask (padding rows unmasked)."""
        if ratio <= 0 or self.net.model_type != "heatmap_multiview_transformer":
            return None
        b, v, _, h, w = images.shape
        p = self.net.patch_size
        full = sample_patch_mask(shard.size, v, h // p, w // p, ratio,
                                 mask_generator(self.cfg.seed, self.step))
        if shard.real == b and shard.size == b:
            return full.to(self.device)
        mask = torch.zeros((b, *full.shape[1:]), dtype=torch.bool)
        mask[:shard.real] = full[shard.start:shard.start + shard.real]
        return mask.to(self.device)

    def validate(self) -> dict[str, float]:
        n = len(self.val_set)
        if n == 0:
            return {}
        cfg, ctx = self.cfg, self.ctx
        lo, hi = n * ctx.rank // ctx.world_size, n * (ctx.rank + 1) // ctx.world_size
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(self.val_set, range(lo, hi)),
            batch_size=cfg.val_batch_size, **self.loader_options)
        weights = term_weights(cfg, 1.0)
        sums = torch.zeros(2 * len(weights), dtype=torch.float64, device=self.device)
        self.net.eval()
        with torch.no_grad():
            for batch in loader:
                batch = to_device(batch, self.device)
                with self._oom("training.val_batch_size", cfg.val_batch_size, batch):
                    terms = loss_terms(self.net, batch, cfg,
                                       amp=autocast(self.device, cfg.precision))
                sums += term_sums(terms)
        self.net.train()
        values = term_values(weights, self.ctx.all_reduce_sum(sums))
        return {f"val_{k}": v for k, v in values.items()}

    def _oom(self, key: str, size: int, batch: dict[str, torch.Tensor]):
        _, v, _, h, w = batch["images"].shape
        per = size // self.ctx.world_size if key.endswith("train_batch_size") else size
        return oom_hint(key, size, per, v, h, w)

    def _train_step(self, shard: Shard, batch: dict[str, torch.Tensor], ratio: float,
                    anneal: float) -> dict[str, float]:
        cfg = self.cfg
        with self._oom("training.train_batch_size", cfg.train_batch_size, batch):
            mask = self.patch_mask(shard, batch["images"], ratio)
            self.optimizer.zero_grad(set_to_none=True)
            terms = loss_terms(self.model, batch, cfg, mask,
                               autocast(self.device, cfg.precision))
            total, values = combine(terms, term_weights(cfg, anneal), self.ctx)
            if self.scaler is None:
                total.backward()
                torch.nn.utils.clip_grad_norm_(self.net.parameters(), cfg.grad_clip)
                self.optimizer.step()
            else:
                self.scaler.scale(total).backward()
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.net.parameters(), cfg.grad_clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
        self.scheduler.step()
        return values

    def fit(self) -> dict[str, float]:
        """Train to total_steps (every process runs the same number of steps, so they all
        stop together); returns the last row's float values."""
        main = self.ctx.is_main
        self.net.train()
        if self.step == 0:
            self._start_fresh()
        if main:
            self.scalars = ScalarLog(self.out_dir / "tensorboard",
                                     purge_step=self.step + 1 if self.step else None)
        progress = tqdm(total=self.total_steps, initial=self.step, desc="train",
                        disable=None if main else True)
        try:
            self._loop(progress)
        finally:
            progress.close()
            if self.scalars is not None:
                self.scalars.close()
        self.ctx.barrier()
        last = self.rows[-1] if self.rows else {}
        return {k: v for k, v in last.items() if isinstance(v, float)}

    def _loop(self, progress: tqdm) -> None:
        cfg = self.cfg
        while self.step < self.total_steps:
            epoch, skip = divmod(self.step, self.steps_per_epoch)
            tick = time.perf_counter()
            for shard, batch in self.batches(epoch, skip):
                data_time = time.perf_counter() - tick
                batch = to_device(batch, self.device)
                # patch masking applies to the multi-view transformer only: 0 is what the
                # single-view model sees, and what metrics.csv then says
                ratio = mask_ratio(self.step, self.steps_per_epoch, cfg.patch_mask) \
                    if self.net.model_type == "heatmap_multiview_transformer" else 0.0
                anneal = cfg.anneal_weight(self.step / self.steps_per_epoch)
                terms = self._train_step(shard, batch, ratio, anneal)
                self.step += 1
                row = {"step": self.step, "epoch": epoch, **terms, "mask_ratio": ratio,
                       "anneal_weight": anneal, "lr": self.optimizer.param_groups[1]["lr"],
                       "lr_backbone": self.optimizer.param_groups[0]["lr"],
                       "data_time": data_time, "step_time": time.perf_counter() - tick}
                end_of_epoch = self.step % self.steps_per_epoch == 0
                validated = end_of_epoch and (epoch + 1) % cfg.check_val_every_n_epoch == 0 \
                    or self.step == self.total_steps
                if validated:
                    row.update(self.validate())
                self.rows.append(row)
                if self.scalars is not None:
                    self.scalars.add(row)
                val = row.get("val_loss", terms["loss"])
                if validated and val < self.best_val:
                    self.best_val = val
                    self.save("best.pt")
                progress.update(1)
                progress.set_postfix(loss=f"{terms['loss']:.4f}", mask=f"{ratio:.2f}")
                if self.step % cfg.ckpt_every_n_steps == 0 or self.step == self.total_steps:
                    self.save("last.pt")
                if self.step >= self.total_steps:
                    break
                tick = time.perf_counter()
