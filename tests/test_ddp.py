"""Data-parallel training: batch sharding, and a 2-process CPU (gloo) torchrun run that ends
with the weights and metrics of the single-process run with the same global batch."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from pipeline.core.errors import ParallaxError
from pipeline.stages import cache_augmentations, train, triangulate_labels
from pipeline.training.distributed import (
    DistContext,
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


@pytest.mark.slow
def test_two_process_run_equals_single_process(odd_cache, tmp_path):
    config = json.loads(json.dumps(TINY))
    config["training"].update(train_batch_size=8, max_epochs=1, ckpt_every_n_steps=100,
                              device="cpu", num_gpus=2)
    args = ["--train-h5", str(odd_cache["train"]), "--eval-h5", str(odd_cache["eval"]),
            "--config-json", json.dumps(config), "--resume"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
         "2", "-m", "pipeline.stages.train", *args, "--out-dir", str(tmp_path / "ddp"),
         "--threads", "2"], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    seconds = time.perf_counter() - start
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    torch.set_num_threads(1)
    assert train.main([*args, "--out-dir", str(tmp_path / "single"), "--threads", "1"]) == 0

    files = {p.name for p in (tmp_path / "ddp").iterdir()}
    assert {"best.pt", "last.pt", "metrics.csv", "config.yaml"} <= files
    assert not any(name.endswith(".tmp") or name.startswith(".") for name in files)
    # process 1 logs warnings only: one "done" line in the shared log
    assert ddp.stderr.count("done at step 5") == 1, ddp.stderr[-3000:]
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
