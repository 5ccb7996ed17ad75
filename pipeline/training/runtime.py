"""Training runtime: device, mixed precision, TF32, data-loader settings, out-of-memory hints
and the optional TensorBoard log.

CUDA path (torch docs, "CUDA semantics" and "Automatic Mixed Precision examples"):
- precision bf16 -> `torch.autocast(device_type, dtype=torch.bfloat16)`, no gradient scaling
  (bf16 has fp32's exponent range); fp16 (CUDA only) -> autocast float16 plus
  `torch.amp.GradScaler("cuda")`: scale(loss).backward(), unscale_ before clipping, step,
  update; its state is checkpointed for an exact resume.
- Only the model's forward runs under autocast; the losses (triangulation, projection) run in
  fp32 on the fp32-cast heatmaps.
- TF32 tensor cores for fp32 matmuls and convolutions on CUDA (`fp32_precision = "tf32"`, the
  API since torch 2.9; `allow_tf32` on older versions).
- Batches come from pinned memory and are copied with `non_blocking=True`; data-loader workers
  (`training.num_workers: auto`) = the process's share of `--threads` minus one on CUDA, 0 on
  the CPU (where the threads are better spent on the model).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from pipeline.core.errors import ParallaxError

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
OOM_MESSAGES = ("out of memory", "DefaultCPUAllocator: can't allocate memory",
                "DefaultCPUAllocator: not enough memory")


def check_precision(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype for training.precision on `device` (None = fp32, no autocast)."""
    if precision not in PRECISIONS:
        raise ParallaxError(f"training.precision must be fp32, bf16 or fp16, got {precision!r}")
    dtype = PRECISIONS[precision]
    if dtype == torch.float16 and device.type != "cuda":
        raise ParallaxError("training.precision fp16 needs a CUDA device; use bf16 on CPU")
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ParallaxError(f"training.precision bf16 is not supported by {device} "
                            f"({torch.cuda.get_device_name(device)}); use fp16")
    return dtype


def autocast(device: torch.device, precision: str):
    """bf16/fp16 autocast (bf16 also on CPU); fp32 = no autocast."""
    dtype = check_precision(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 on CUDA (the only case that needs one), else None."""
    if check_precision(device, precision) == torch.float16:
        return torch.amp.GradScaler("cuda")
    return None


def enable_tf32(device: torch.device) -> None:
    """Let fp32 matmuls and cuDNN convolutions use TF32 tensor cores (Ampere and later)."""
    if device.type != "cuda":
        return
    try:  # torch >= 2.9; mixing it with the legacy flags raises, so use one or the other
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    except (AttributeError, RuntimeError):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def loader_options(device: torch.device, num_workers: int | str, threads: int
                   ) -> dict[str, Any]:
    """DataLoader keyword arguments: workers (see the module docstring) and pinned memory."""
    if num_workers == "auto":
        workers = max(0, threads - 1) if device.type == "cuda" else 0
    elif isinstance(num_workers, int) and not isinstance(num_workers, bool) and num_workers >= 0:
        workers = num_workers
    else:
        raise ParallaxError(f"training.num_workers must be auto or an integer >= 0, "
                            f"got {num_workers!r}")
    return {"num_workers": workers, "pin_memory": device.type == "cuda"}


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device
              ) -> dict[str, torch.Tensor]:
    """Copy a batch to `device` (asynchronously from pinned memory on CUDA)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and any(m in str(err) for m in OOM_MESSAGES))


@contextlib.contextmanager
def oom_hint(batch_key: str, batch_size: int, per_process: int, views: int, height: int,
             width: int) -> Iterator[None]:
    """Turn an out-of-memory error (CUDA or CPU) into a ParallaxError telling what to lower."""
    try:
        yield
    except RuntimeError as err:
        if not is_out_of_memory(err):
            raise
        share = f" ({per_process} per process)" if per_process != batch_size else ""
        raise ParallaxError(
            f"out of memory at batch size {batch_size}{share}, {views} views, "
            f"{height}x{width}: lower {batch_key} or data.image_resize_dims "
            f"({str(err).splitlines()[0][:200]})") from None


class ScalarLog:
    """Every metrics.csv value as a TensorBoard scalar in `log_dir`, when the `tensorboard`
    package is installed (otherwise one info line and nothing else).

    purge_step: on resume, the first step logged again; TensorBoard hides the events of the
    killed run from that step on, so curves do not overlap.
    """

    def __init__(self, log_dir: Path, purge_step: int | None = None) -> None:
        self.writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            log.info("TensorBoard logging off (%s); metrics.csv has every value "
                     "(pip install tensorboard to get %s)", err, log_dir)
            return
        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)
        log.info("TensorBoard scalars in %s", log_dir)

    def add(self, row: Mapping[str, Any]) -> None:
        if self.writer is None:
            return
        step = int(row["step"])
        for key, value in row.items():
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(key, float(value), step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
