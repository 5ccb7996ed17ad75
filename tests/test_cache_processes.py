"""Stage cache_augmentations across processes: equal inputs give byte-identical files (README,
"cache_augmentations"), whatever the interpreter, its hash seed, thread count, working directory
or output folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, dataset_cli_args
from tests.test_cache import CONFIG, OUTPUTS, build, differences, triangulate

NAMES = {"splits": "splits.csv", "train": "train.h5", "eval": "eval.h5", "picture": "augment.png"}


def stage_command(data_args: list[str], labels_3d: Path, out: Path) -> list[str]:
    """`python -m pipeline.stages.cache_augmentations ...` writing into `out` (as `build`)."""
    argv = [sys.executable, "-m", "pipeline.stages.cache_augmentations", *data_args,
            "--labels-3d", str(labels_3d), "--config-json", json.dumps(CONFIG)]
    for key in OUTPUTS:
        argv += [f"--{key}", str(out / NAMES[key])]
    return argv


def test_two_processes_write_byte_identical_caches(example_dir, tmp_path):
    """Two `python -m pipeline.stages.cache_augmentations` processes, started together with
    different PYTHONHASHSEED, OMP/OpenCV thread counts, working directories and output folders,
    write the same bytes, and the same as a build inside this interpreter."""
    data = dataset_cli_args(example_dir)
    labels_3d = triangulate(data, tmp_path)
    runs = []
    for i, (hash_seed, threads) in enumerate((("1", "1"), ("12345", "2"))):
        out, cwd = tmp_path / f"process{i}" / "cache", tmp_path / f"cwd{i}"
        out.mkdir(parents=True)
        cwd.mkdir()
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": threads,
               "OPENCV_FOR_THREADS_NUM": threads,
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                           os.environ.get("PYTHONPATH")]))}
        process = subprocess.Popen(stage_command(data, labels_3d, out), cwd=cwd, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        runs.append((process, out))
    for process, _ in runs:
        # a guard against a hung process only: the build takes about a second
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-3000:]
    code, here = build(data, tmp_path / "in_process", labels_3d=labels_3d)
    assert code == 0
    (_, first), (_, second) = runs
    for key in OUTPUTS:
        a, b = first / NAMES[key], second / NAMES[key]
        assert a.stat().st_size > 0
        detail = differences(a, b) if key in ("train", "eval") else ""
        assert a.read_bytes() == b.read_bytes(), (key, detail)
        assert a.read_bytes() == here[key].read_bytes(), key
