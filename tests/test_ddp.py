"""Data-parallel training: batch sharding, and a 2-process CPU (gloo) torchrun run that ends
with the weights and metrics of the single-process run with the same global batch."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from pipeline.core.errors import ParallaxError
from pipeline.data.cache.torch_dataset import MASK_KEYS
from pipeline.stages import cache_augmentations, train, triangulate_labels
from pipeline.training.distributed import (
    DistContext,
    PaddedDataset,
    env_context,
    per_rank_batch,
    rank_device,
    shard_batches,
)
from pipeline.training.distributed import check_num_gpus as check
from tests.conftest import REPO, dataset_cli_args
from tests.test_trainer import CONFIG, TINY

# 11 of the 20 example frames x 3 (original + 2 copies) = 33 samples: with a global batch of 8
# on 2 processes the last batch holds 1 sample, so process 1 trains on padding only there
ODD_CACHE = {**CONFIG, "training.train_prob": 0.55,
             "augmentation": {**CONFIG["augmentation"], "copies_per_frame": 2}}


def test_shards_partition_every_global_batch():
    order = list(torch.randperm(33, generator=torch.Generator().manual_seed(1)))
    order = [int(i) for i in order]
    for world in (1, 2, 4):
        per_rank = [shard_batches(order, 8, DistContext(r, world, r)) for r in range(world)]
        assert {len(s) for s in per_rank} == {5}
        for step in range(5):
            shards = [s[step] for s in per_rank]
            # the same number of items on every process; the real ones, in rank order, are
            # exactly the global batch (disjoint, nothing lost, nothing repeated)
            assert len({len(s.items) for s in shards}) == 1
            real = [i for s in shards for i, pad in s.items if not pad]
            assert real == order[8 * step:8 * step + 8]
            for s in shards:
                assert [pad for _, pad in s.items] == [False] * s.real + [True] * (
                    len(s.items) - s.real)
                assert [i for i, _ in s.items[:s.real]] == real[s.start:s.start + s.real]
    last = [shard_batches(order, 8, DistContext(r, 2, r))[-1] for r in range(2)]
    assert [(s.real, s.start, s.size, len(s.items)) for s in last] == [(1, 0, 1, 1),
                                                                        (0, 1, 1, 1)]


def test_rank_layout_errors(caplog):
    assert env_context({}) == DistContext(0, 1, 0)
    assert env_context({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}).is_main is False
    with pytest.raises(ParallaxError, match="RANK=2, WORLD_SIZE=2"):
        env_context({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(ParallaxError, match="divisible by the number of processes"):
        per_rank_batch(6, DistContext(0, 4, 0))
    assert per_rank_batch(8, DistContext(0, 4, 0)) == 2
    assert rank_device(DistContext(1, 2, 1), "cpu") == torch.device("cpu")
    caplog.set_level(logging.WARNING)
    check(2, DistContext(), torch.device("cuda", 0))
    assert "num_gpus is 2 but this is a single process" in caplog.text
    caplog.clear()
    check(4, DistContext(0, 2, 0), torch.device("cuda", 0))
    assert "torchrun started 2 processes" in caplog.text
    caplog.clear()
    check(4, DistContext(), torch.device("cpu"))  # num_gpus means nothing on the CPU
    check(2, DistContext(0, 2, 0), torch.device("cuda", 0))
    assert caplog.text == ""


@pytest.fixture(scope="module")
def odd_cache(example_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("odd")
    data = dataset_cli_args(example_dir)
    assert triangulate_labels.main([*data, "--points", str(out / "l.csv"), "--outliers",
                                    str(out / "o.csv"), "--summary", str(out / "s.json")]) == 0
    argv = [*data, "--labels-3d", str(out / "l.csv"), "--config-json", json.dumps(ODD_CACHE)]
    names = {"splits": "splits.csv", "train": "train.h5", "eval": "eval.h5", "picture": "a.png"}
    for key, name in names.items():
        argv += [f"--{key}", str(out / name)]
    assert cache_augmentations.main(argv) == 0
    return {"train": out / "train.h5", "eval": out / "eval.h5"}


def _snapshot(folder: Path) -> tuple:
    """(name, size, mtime) of every file under `folder`: changes whenever a process writes."""
    if not folder.is_dir():
        return ()
    return tuple(sorted((str(path), path.stat().st_size, path.stat().st_mtime_ns)
                        for path in folder.rglob("*") if path.is_file()))


def run_watched(cmd: list[str], log: Path, watch: Path, stall_seconds: float = 300,
                total_seconds: float = 900, **kwargs) -> tuple[int, str]:
    """Run `cmd` (stdout and stderr into `log`) until it exits: no deadline on the work itself,
    only hang guards. It is killed (with its children) and the test fails when neither `log`
    nor any file under `watch` changed for `stall_seconds` (e.g. a deadlocked collective), or
    after `total_seconds` in all. Returns the exit code and the log."""
    with open(log, "w") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True, **kwargs)
    start = last_change = time.monotonic()
    state = None
    while True:
        try:
            process.wait(timeout=1.0)
            break
        except subprocess.TimeoutExpired:
            pass
        now, current = time.monotonic(), (log.stat().st_size, _snapshot(watch))
        if current != state:
            state, last_change = current, now
        if now - last_change > stall_seconds or now - start > total_seconds:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            why = (f"no progress (log, {watch}) for {stall_seconds:.0f} s"
                   if now - last_change > stall_seconds else f"over {total_seconds:.0f} s")
            pytest.fail(f"{' '.join(cmd[:6])} ... killed: {why}\n{log.read_text()[-3000:]}")
    return process.returncode, log.read_text()


@pytest.mark.slow
def test_two_process_run_equals_single_process(odd_cache, tmp_path):
    """How CI runs it: in the full suite (`make test`, marked slow) on 2 CPU cores that other
    tests share; it takes 20-60 s there (3 interpreters importing torch, 5 steps). There is no
    wall-clock limit on the run: it writes a checkpoint every step (ckpt_every_n_steps 1, a
    runtime value that changes no result), and only a run whose log and output folder stay
    unchanged for 5 minutes (a hang: a deadlocked collective, a stuck rendezvous) or that
    exceeds 15 minutes in total is killed and fails the test, with its log."""
    config = json.loads(json.dumps(TINY))
    # every loss term, the hidden-keypoint one included (padding samples must not count there)
    config["training"].update(train_batch_size=8, max_epochs=1, ckpt_every_n_steps=1,
                              device="cpu", num_gpus=2, hidden_keypoints="projected")
    args = ["--train-h5", str(odd_cache["train"]), "--eval-h5", str(odd_cache["eval"]),
            "--config-json", json.dumps(config), "--resume"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    code, output = run_watched(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
         "2", "-m", "pipeline.stages.train", *args, "--out-dir", str(tmp_path / "ddp"),
         "--threads", "2"], tmp_path / "ddp.log", tmp_path / "ddp", cwd=REPO, env=env)
    seconds = time.perf_counter() - start
    assert code == 0, output[-3000:]
    torch.set_num_threads(1)
    assert train.main([*args, "--out-dir", str(tmp_path / "single"), "--threads", "1"]) == 0

    files = {p.name for p in (tmp_path / "ddp").iterdir()}
    assert {"best.pt", "last.pt", "metrics.csv", "config.yaml"} <= files
    assert not any(name.endswith(".tmp") or name.startswith(".") for name in files)
    # process 1 logs warnings only: one "done" line in the shared log
    assert output.count("done at step 5") == 1, output[-3000:]
    a = torch.load(tmp_path / "ddp" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "single" / "last.pt", weights_only=False)
    assert a["step"] == b["step"] == 5 and a["world_size"] == 2 and b["world_size"] == 1
    worst = max(float((a["model"][k] - v).abs().max()) for k, v in b["model"].items())
    assert worst < 1e-5, worst
    metrics_a = pd.read_csv(tmp_path / "ddp" / "metrics.csv")
    metrics_b = pd.read_csv(tmp_path / "single" / "metrics.csv")
    assert len(metrics_a) == len(metrics_b) == 5
    for column in ("loss", "heatmap_mse", "pairwise_projection", "reprojection_heatmap_mse",
                   "pixel_error_model", "mask_ratio", "val_loss", "val_pixel_error_model"):
        assert metrics_a[column].tolist() == pytest.approx(metrics_b[column].tolist(),
                                                           rel=1e-4, abs=1e-6, nan_ok=True), column
    print(f"2-process run {seconds:.1f} s; max weight difference {worst:.2e}")


def test_hang_guard(tmp_path):
    """run_watched lets a slow run that keeps writing finish, and kills a silent one (with its
    child processes) once its stall limit passes, failing with its log."""
    chatty = "import time\nfor i in range(6):\n    print(i, flush=True)\n    time.sleep(0.5)"
    code, log = run_watched([sys.executable, "-c", chatty], tmp_path / "a.log", tmp_path,
                            stall_seconds=2)
    assert code == 0 and log.split() == [str(i) for i in range(6)]
    silent = ("import subprocess, sys, time\nprint('started', flush=True)\n"
              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
              "time.sleep(60)")
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="no progress .* for 2 s(.|\n)*started"):
        run_watched([sys.executable, "-c", silent], tmp_path / "b.log", tmp_path / "none",
                    stall_seconds=2)
    assert time.monotonic() - start < 30


def test_padding_sample_counts_for_nothing():
    """A padding item (a data-parallel batch that does not divide evenly) has every mask zero,
    the hidden-keypoint targets included; a real item is untouched."""
    # every mask a loss or metric reads (pipeline/training/objective.py, losses.py), named here
    # rather than taken from MASK_KEYS, so that a mask dropped from that list fails this test
    masks = ("keypoints_valid", "hidden_valid", "visible", "keypoints_3d_valid",
             "has_calibration")
    assert set(masks) <= set(MASK_KEYS)
    sample = {key: torch.ones(2, 3, dtype=torch.bool) for key in masks}
    sample["visible"] = torch.full((2, 3), 2, dtype=torch.int8)
    sample["images"] = torch.ones(2, 3, 4, 4)

    class One(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, index):
            return {key: value.clone() for key, value in sample.items()}

    padded = PaddedDataset(One())
    real, padding = padded[(0, False)], padded[(0, True)]
    assert all(bool(real[key].all()) for key in masks)
    assert not any(bool(padding[key].any()) for key in masks)
    assert bool(padding["images"].all())  # only the masks change
