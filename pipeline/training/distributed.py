"""Data-parallel training under `torchrun`: process group, device per rank, batch sharding.

`torchrun --standalone --nproc_per_node N -m pipeline.stages.train ...` starts N processes with
RANK, WORLD_SIZE and LOCAL_RANK set. Each process trains on cuda:LOCAL_RANK (CUDA) or on the
CPU (gloo), with the model wrapped in DistributedDataParallel. Without these variables (or with
WORLD_SIZE 1) everything is one plain process and nothing here touches torch.distributed.

Sharding: `training.train_batch_size` is the *global* batch. Every rank draws the same
permutation per epoch (seeded by (seed, epoch)), cuts it into the same global batches and takes
its own contiguous slice of each: rank r gets samples [r·b, (r+1)·b) of the batch, with
b = train_batch_size / world_size (it must divide). A short last batch is split as evenly as
possible and the ranks that get fewer samples are padded with copies whose keypoints are all
marked invalid, so they add nothing to any loss (see `PaddedDataset`). Loss terms are
re-weighted by the valid counts all-reduced over ranks
(`pipeline.training.objective.combine`), so
the averaged DDP gradient equals the single-process gradient of the same global batch.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from pipeline.core.errors import ParallaxError
from pipeline.data.cache.torch_dataset import MASK_KEYS

log = logging.getLogger(__name__)

#: how long a rank waits for the others at a collective (validation, checkpoint writing)
TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: rank, world size, local rank (one GPU per local rank)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of `tensor` over ranks (a new tensor; the input itself when single-process)."""
        if not self.enabled:
            return tensor
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def env_context(environ: dict[str, str] | None = None) -> DistContext:
    """The rank layout from torchrun's environment variables (single process when absent)."""
    env = os.environ if environ is None else environ
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError as err:
        raise ParallaxError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers: {err}") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ParallaxError(f"inconsistent torchrun environment: RANK={rank}, "
                            f"WORLD_SIZE={world}, LOCAL_RANK={local}")
    return DistContext(rank, world, local)


def rank_device(ctx: DistContext, device_name: str) -> torch.device:
    """cuda:LOCAL_RANK when training on CUDA (device auto with a GPU, or cuda), else the CPU."""
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if not use_cuda:
        return torch.device("cpu" if device_name == "auto" else device_name)
    if not torch.cuda.is_available():
        raise ParallaxError("training.device is cuda but no CUDA device is available")
    count = torch.cuda.device_count()
    if ctx.local_rank >= count:
        raise ParallaxError(f"process LOCAL_RANK={ctx.local_rank} needs GPU {ctx.local_rank} "
                            f"but only {count} are visible; lower training.num_gpus to {count}")
    return torch.device("cuda", ctx.local_rank)


def check_num_gpus(num_gpus: int, ctx: DistContext, device: torch.device) -> None:
    """Warn when training.num_gpus and the process layout disagree (results do not depend on
    it: the global batch is the same, see the module docstring)."""
    if device.type != "cuda" or num_gpus < 1 or num_gpus == ctx.world_size:
        return
    if ctx.world_size == 1:
        log.warning("training.num_gpus is %d but this is a single process (no torchrun): "
                    "training on %s only; launch `torchrun --standalone --nproc_per_node %d "
                    "-m pipeline.stages.train ...` to use %d GPUs", num_gpus, device, num_gpus,
                    num_gpus)
    else:
        log.warning("training.num_gpus is %d but torchrun started %d processes: using %d GPUs",
                    num_gpus, ctx.world_size, ctx.world_size)


def init_process_group(ctx: DistContext, device: torch.device) -> None:
    """Join torchrun's process group (nccl on CUDA, gloo on the CPU); no-op when single."""
    if not ctx.enabled or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=TIMEOUT, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=TIMEOUT)
    log.info("rank %d of %d on %s (backend %s)", ctx.rank, ctx.world_size, device,
             dist.get_backend())


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def per_rank_batch(batch_size: int, ctx: DistContext) -> int:
    """train_batch_size / world_size; an error naming the key when it does not divide."""
    if batch_size % ctx.world_size:
        raise ParallaxError(
            f"training.train_batch_size {batch_size} is the global batch and must be divisible "
            f"by the number of processes ({ctx.world_size}, training.num_gpus); use e.g. "
            f"{max(ctx.world_size, batch_size - batch_size % ctx.world_size)}")
    return batch_size // ctx.world_size


@dataclass(frozen=True)
class Shard:
    """This rank's part of one global batch.

    items: (dataset index, is_padding) pairs, the same count on every rank; the real samples
    come first and are samples [start, start + real) of the global batch of `size` samples.
    """

    items: list[tuple[int, bool]]
    real: int
    start: int
    size: int


def shard_batches(order: Sequence[int], batch_size: int, ctx: DistContext) -> list[Shard]:
    """The global batches of `order` (consecutive chunks of batch_size), this rank's slices."""
    shards = []
    for begin in range(0, len(order), batch_size):
        batch = list(order[begin:begin + batch_size])
        per = -(-len(batch) // ctx.world_size)
        start = min(ctx.rank * per, len(batch))
        mine = batch[start:start + per]
        items = [(i, False) for i in mine] + [(batch[0], True)] * (per - len(mine))
        shards.append(Shard(items, len(mine), start, len(batch)))
    return shards


class PaddedDataset(Dataset):
    """A dataset indexed by (index, is_padding); padding items have every mask of `MASK_KEYS`
    zero (no keypoint, hidden target or calibration), so that they contribute nothing to the
    losses or metrics."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, bool]) -> dict[str, torch.Tensor]:
        index, padding = item
        sample = self.base[index]
        if padding:
            for key in MASK_KEYS:
                sample[key] = torch.zeros_like(sample[key])
        return sample
