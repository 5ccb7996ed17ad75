"""Benchmark: one training step of the multi-view transformer on CPU (issue 4) and its scaling.

  .venv/bin/python bench/train.py [--repeats 3] [--write]            # step breakdown
  .venv/bin/python bench/train.py --scaling [--write]                # views x resolution grid

Model: `build_model` with model_type heatmap_multiview_transformer and backbone
`vit_small_patch16_224` (ViT-S/16, random init, dynamic image size), V=4 views, batch 2, both 3D
losses on (log_weight 0), patch masking at ratio 0.5, AdamW + grad clipping, i.e. the step of
`pipeline.training.trainer.Trainer.fit` built from its own pieces (`compute_losses`, `autocast`,
`param_groups`, `sample_patch_mask`). Data: a real HDF5 cache of the synthetic example read
through `CacheDataset` (photometric augmentation on) and a DataLoader with 0 workers, as the
trainer's default. Everything runs on 2 torch threads.

Phases: data (next batch from the loader), mask (sample the patch mask), forward
(`compute_losses` under autocast), backward, optimizer (zero_grad, clip_grad_norm_, AdamW step).
FLOPs: `torch.utils.flop_counter.FlopCounterMode` over forward + backward: it counts matrix
products only (mm/addmm/bmm, convolutions, and attention, for which the CPU flash kernels are
registered here with torch's own SDPA formulas: 2 GEMMs forward, 5 backward including the
recomputed scores); element-wise ops, norms, softmax and the losses count 0. The fp32 (bf16)
peak is the best rate of a 2048^3 matmul on the same threads, measured between the steps.
Peak memory: VmHWM (peak resident set) of a child process per configuration, with its RSS right
after building the model for reference.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results import build_cache, machine, vm_kib, write_section

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SECTION = "## Training step (bench/train.py)"
SCALING_SECTION = "## Scaling (bench/train.py --scaling)"
THREADS = 2
BACKBONE = "vit_small_patch16_224"
MASK_RATIO = 0.5
PHASES = ("data", "mask", "forward", "backward", "optimizer")


def batches(dataset, batch: int):
    """Endless batches of `batch` samples (new shuffle each pass), DataLoader with 0 workers."""
    import torch

    epoch = 0
    while True:
        dataset.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch, shuffle=True, drop_last=True,
            generator=torch.Generator().manual_seed(epoch))
        yield from loader
        epoch += 1


# ----------------------------------------------------------------------------- the step
class Step:
    """Model, optimizer and data of one configuration; `run()` does one timed training step."""

    def __init__(self, h5: Path, size: int, batch: int) -> None:
        import torch

        from pipeline.data.cache.torch_dataset import CacheDataset
        from pipeline.data.photometric import from_imgaug
        from pipeline.models.model import build_model, param_groups
        from pipeline.training.config import TrainConfig

        self.cfg = TrainConfig(
            model={"model_type": "heatmap_multiview_transformer", "backbone": BACKBONE},
            data={"image_resize_dims": {"height": size, "width": size}, "downsample_factor": 2},
            train_batch_size=batch, pairwise_log_weight=0.0, reprojection_log_weight=0.0)
        self.dataset = CacheDataset(h5, photometric=from_imgaug("dlc"))
        torch.manual_seed(0)
        self.views = len(self.dataset.view_names)
        self.model = build_model(self.cfg.model, self.cfg.data, self.views,
                                 len(self.dataset.keypoint_names)).train()
        groups = param_groups(self.model)
        self.optimizer = torch.optim.AdamW(
            [{"params": groups["backbone"]},
             {"params": groups["head"] + groups["view_embedding"]}], lr=1e-5)
        self.data = batches(self.dataset, batch)
        self.step = 0

    def run(self, precision: str = "fp32") -> dict[str, float]:
        import torch

        from pipeline.models.masking import mask_generator, sample_patch_mask

        model, clock = self.model, time.perf_counter
        t0 = clock()
        batch = next(self.data)
        t1 = clock()
        b, v, _, h, w = batch["images"].shape
        p = model.patch_size
        mask = sample_patch_mask(b, v, h // p, w // p, MASK_RATIO, mask_generator(0, self.step))
        t2 = clock()
        total = step_loss(model, batch, self.cfg, mask, precision)
        t3 = clock()
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        t4 = clock()
        torch.nn.utils.clip_grad_norm_(model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        t5 = clock()
        self.step += 1
        return dict(zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True))

    def flops(self) -> tuple[int, int]:
        """(forward, forward + backward) FLOPs of one step, as FlopCounterMode counts them."""
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        from pipeline.models.masking import mask_generator, sample_patch_mask

        aten = torch.ops.aten
        custom = {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_forward_flops,
                  aten._scaled_dot_product_flash_attention_for_cpu_backward:
                      _sdpa_backward_flops}
        batch = next(self.data)
        b, v, _, h, w = batch["images"].shape
        mask = sample_patch_mask(b, v, h // 16, w // 16, MASK_RATIO, mask_generator(0, 0))
        counter = FlopCounterMode(display=False, custom_mapping=custom)
        with counter:
            total = step_loss(self.model, batch, self.cfg, mask, "fp32")
            forward = counter.get_total_flops()
            total.backward()
        self.optimizer.zero_grad(set_to_none=True)
        return forward, counter.get_total_flops()


def step_loss(model, batch, cfg, mask, precision: str):
    """The trainer's loss: its forward under autocast, the 3D losses in fp32, one process."""
    import torch

    from pipeline.training.distributed import DistContext
    from pipeline.training.objective import combine, loss_terms, term_weights
    from pipeline.training.trainer import autocast

    terms = loss_terms(model, batch, cfg, mask, autocast(torch.device("cpu"), precision))
    return combine(terms, term_weights(cfg, 1.0), DistContext())[0]


def _sdpa_forward_flops(query, key, value, *args, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


def _sdpa_backward_flops(grad, query, key, value, *args, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad, query, key, value)


def best(rows: list[dict[str, float]]) -> dict[str, float]:
    """Per-phase minimum over repeats, plus the fastest whole step and fwd+bwd."""
    out = {k: min(r[k] for r in rows) for k in PHASES}
    out["step"] = min(sum(r[k] for k in PHASES) for r in rows)
    out["compute"] = min(r["forward"] + r["backward"] for r in rows)
    return out


def matmul_rate(dtype_name: str, n: int = 2048, repeats: int = 2) -> float:
    """Best FLOP/s of an n x n x n matmul in `dtype_name` on the current threads."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times)


def masking_ms(repeats: int = 200) -> dict[str, float]:
    """Best-of-5 mean ms of sample_patch_mask (incl. its generator) and of applying the mask
    in the model's embedding, at B=2, V=4, 256 px, ratio 0.5."""
    import torch

    from pipeline.models.masking import apply_patch_mask, mask_generator, sample_patch_mask

    images = torch.randn(2, 4, 3, 256, 256)
    masks = [sample_patch_mask(2, 4, 16, 16, MASK_RATIO, mask_generator(0, s)) for s in range(8)]
    sample, apply = [], []
    for _ in range(5):
        start = time.perf_counter()
        for step in range(repeats):
            sample_patch_mask(2, 4, 16, 16, MASK_RATIO, mask_generator(0, step))
        sample.append((time.perf_counter() - start) / repeats * 1e3)
        start = time.perf_counter()
        for step in range(repeats):
            apply_patch_mask(images, masks[step % 8], 16)
        apply.append((time.perf_counter() - start) / repeats * 1e3)
    return {"sample": min(sample), "apply": min(apply)}


# ----------------------------------------------------------------------------- children
def child(spec: dict) -> dict:
    """Run `spec` (h5, size, batch, precision, warmup, steps) and report times and memory."""
    import torch

    torch.set_num_threads(THREADS)
    step = Step(Path(spec["h5"]), spec["size"], spec["batch"])
    rss_model = vm_kib("VmRSS")
    for _ in range(spec["warmup"]):
        step.run(spec["precision"])
    rows = [step.run(spec["precision"]) for _ in range(spec["steps"])]
    return {**spec, "rows": rows, "rss_model_mib": rss_model / 1024,
            "peak_mib": vm_kib("VmHWM") / 1024}


def run_child(spec: dict) -> dict:
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": str(THREADS)}
    result = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                            capture_output=True, text=True, env=env)
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- benchmarks
def step_benchmark(root: Path, repeats: int, sizes: tuple[int, ...] = (128, 256)) -> dict:
    """fp32 vs bf16 steps at V=4, B=2, 128 and 256 px, interleaved with the matmul peaks."""
    import torch

    torch.set_num_threads(THREADS)
    out = {"peak": {"fp32": [], "bf16": []}, "sizes": {}}
    for size in sizes:
        h5 = build_cache(root, 4, size)
        step = Step(h5, size, 2)
        forward_flops, flops = step.flops()
        for precision in ("fp32", "bf16"):  # warm-up (allocations, oneDNN primitives)
            step.run(precision)
        rows: dict[str, list] = {"fp32": [], "bf16": []}
        for _ in range(repeats):
            for precision in ("fp32", "bf16"):
                out["peak"][precision].append(matmul_rate(precision))
                rows[precision].append(step.run(precision))
        out["sizes"][size] = {"forward_flops": forward_flops, "flops": flops, "h5": str(h5),
                              **{p: {"best": best(r), "rows": r} for p, r in rows.items()}}
        del step
    for size in sizes:  # peak memory: one child process per configuration
        for precision in ("fp32", "bf16"):
            spec = {"h5": out["sizes"][size]["h5"], "size": size, "batch": 2,
                    "precision": precision, "warmup": 1, "steps": 1}
            out["sizes"][size][precision]["memory"] = run_child(spec)
    out["peak"] = {p: max(v) for p, v in out["peak"].items()}
    out["masking"] = masking_ms()
    return out


def step_report(res: dict, repeats: int) -> str:
    peak = res["peak"]
    lines = [
        f"V=4 views, batch 2, `{BACKBONE}` MVT (random init, dynamic image size), both 3D "
        f"losses on, patch mask ratio {MASK_RATIO}, AdamW + clipping; data from a CacheDataset "
        f"over a cache of the synthetic example (photometric augmentation on, 0 workers). "
        f"{THREADS} torch threads. Times: best of {repeats} steps per phase after a warm-up "
        "step, fp32 and bf16 steps interleaved, each preceded by a 2048^3 matmul whose best "
        "rate is the peak (the machine is shared with other jobs: best-of filters their "
        "interference). FLOPs: FlopCounterMode (matmuls, convolutions and attention only; "
        "attention backward counted with the recomputed scores). Peak RSS: VmHWM of a child "
        "process running the configuration (1 warm-up + 1 step); RSS after model build in "
        "brackets.",
        "",
        "| size | precision | data | mask | forward | backward | optimizer | step (ms) | "
        "fwd+bwd GFLOP | GFLOP/s | % fp32 peak | peak RSS MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size, r in res["sizes"].items():
        for precision in ("fp32", "bf16"):
            b, mem = r[precision]["best"], r[precision]["memory"]
            rate = r["flops"] / b["compute"]
            lines.append(
                f"| {size} | {precision} | " + " | ".join(f"{b[k] * 1e3:.1f}" for k in PHASES)
                + f" | {b['step'] * 1e3:.0f} | {r['flops'] / 1e9:.1f} | {rate / 1e9:.1f} | "
                f"{100 * rate / peak['fp32']:.0f}% | {mem['peak_mib']:.0f} "
                f"({mem['rss_model_mib']:.0f}) |")
    large = max(res["sizes"])
    big = res["sizes"][large]
    fp32_rate = big["flops"] / big["fp32"]["best"]["compute"]
    bf16_rate = big["flops"] / big["bf16"]["best"]["compute"]
    speedup = big["fp32"]["best"]["compute"] / big["bf16"]["best"]["compute"]
    data_ratio = max(r[p]["best"]["data"] / r[p]["best"]["compute"]
                     for r in res["sizes"].values() for p in ("fp32", "bf16"))
    mask = res["masking"]
    lines += [
        "",
        f"- matmul peak ({THREADS} threads, 2048^3): fp32 {peak['fp32'] / 1e9:.1f} GFLOP/s, "
        f"bf16 {peak['bf16'] / 1e9:.1f} GFLOP/s.",
        f"- target fp32 fwd+bwd >= 85% of the fp32 matmul peak: {large} px "
        f"{100 * fp32_rate / peak['fp32']:.0f}% "
        f"({'met' if fp32_rate >= 0.85 * peak['fp32'] else 'NOT met'}); bf16 reaches "
        f"{100 * bf16_rate / peak['bf16']:.0f}% of the bf16 matmul peak.",
        f"- target bf16 >= 1.6x fp32 (fwd+bwd, {large} px): {speedup:.2f}x "
        f"({'met' if speedup >= 1.6 else 'NOT met'}); whole step "
        f"{big['fp32']['best']['step'] / big['bf16']['best']['step']:.2f}x.",
        f"- target patch masking <= 1 ms (B=2, V=4, 256 px): sample {mask['sample']:.3f} ms + "
        f"apply {mask['apply']:.3f} ms = {mask['sample'] + mask['apply']:.3f} ms "
        f"({'met' if mask['sample'] + mask['apply'] <= 1 else 'NOT met'}).",
        f"- target data loader never the bottleneck: data time is at most "
        f"{100 * data_ratio:.1f}% of forward+backward time "
        f"({'met' if data_ratio < 1 else 'NOT met'}; with 0 workers it adds to the step, a "
        "DataLoader worker would hide it).",
    ]
    return "\n".join(lines)


def scaling_benchmark(root: Path) -> list[dict]:
    """Step time and peak RSS vs views and resolution, one child process per configuration."""
    out = []
    for size, batch, warmup, steps in ((128, 2, 1, 3), (256, 2, 1, 2), (384, 1, 1, 2)):
        for views in (2, 4, 6, 8):
            h5 = build_cache(root, views, size, frames=8)
            spec = {"h5": str(h5), "size": size, "batch": batch, "precision": "fp32",
                    "warmup": warmup, "steps": steps, "views": views}
            start = time.perf_counter()
            result = run_child(spec)
            result["wall"] = time.perf_counter() - start
            print(f"{size} px, {views} views: {best(result['rows'])['step']:.2f} s, "
                  f"{result['peak_mib']:.0f} MiB", file=sys.stderr, flush=True)
            out.append(result)
    return out


def scaling_report(rows: list[dict]) -> str:
    lines = [
        f"fp32, `{BACKBONE}` MVT, both 3D losses, mask ratio {MASK_RATIO}, {THREADS} threads; "
        "one child process per configuration: step = best of the timed steps after 1 warm-up "
        "step; peak RSS = VmHWM of that process (RSS after building the model in brackets). "
        "Tokens = views x (patches + 1 CLS) per sample, all in one attention sequence.",
        "",
        "| size | views | batch | tokens/sample | steps timed | step (s) | fwd+bwd (s) | "
        "per sample (s) | peak RSS MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        b = best(r["rows"])
        tokens = r["views"] * ((r["size"] // 16) ** 2 + 1)
        lines.append(
            f"| {r['size']} | {r['views']} | {r['batch']} | {tokens} | {r['steps']} | "
            f"{b['step']:.2f} | {b['compute']:.2f} | {b['step'] / r['batch']:.2f} | "
            f"{r['peak_mib']:.0f} ({r['rss_model_mib']:.0f}) |")
    return "\n".join(lines)


def write_results(title: str, body: str, info: dict[str, str]) -> None:
    write_section(title, f"{body}\n- date: {info['date']}; CPU: {info['cpu']}, {info['cores']} "
                  f"cores available (shared); bf16 instructions: {info['bf16']}; torch "
                  f"{info['torch']}; python {platform.python_version()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scaling", action="store_true")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    import logging

    logging.disable(logging.INFO)
    info = machine()
    with tempfile.TemporaryDirectory() as tmp:
        if args.scaling:
            title, body = SCALING_SECTION, scaling_report(scaling_benchmark(Path(tmp)))
        else:
            res = step_benchmark(Path(tmp), args.repeats, tuple(args.sizes))
            title, body = SECTION, step_report(res, args.repeats)
    print(body)
    if args.write:
        write_results(title, body, info)


if __name__ == "__main__":
    main()
