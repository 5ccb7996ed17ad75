"""What the benchmarks share: the machine, writing their section of bench/RESULTS.md, a cache
of the synthetic example."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def write_section(section: str, body: str, path: Path = RESULTS) -> None:
    """Replace `section` ("## Title" line and everything up to the next "## ") in RESULTS.md
    with the section and `body`, in place; append it when absent. Atomic."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{section}\n\n{body.strip()}\n"
    start = text.find(section)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + block
    else:
        end = text.find("\n## ", start + len(section))
        text = text[:start] + block + (text[end:] if end >= 0 else "")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    print(f"wrote {section} to {path}")


def cache_config(size: int, copies: int) -> dict:
    """Config of cache_augmentations for a benchmark: size x size model input, `copies`
    augmented copies per training frame, the default 3D augmentation and split."""
    return {
        "data.image_resize_dims": {"height": size, "width": size},
        "augmentation": {"copies_per_frame": copies, "scale_range": [0.8, 1.2],
                         "translate_frac": 0.25, "rotate_deg": 0.0,
                         "vertical_axis": [0.0, 0.0, 1.0], "image_compression": "gzip"},
        "training.imgaug_3d": True, "training.train_prob": 0.8, "training.val_prob": 0.1,
        "training.rng_seed_data_pt": 0, "training.test_sessions": [],
    }


def machine() -> dict[str, str]:
    import torch

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"model name\s*:\s*(.*)", info)
    flags = set((re.search(r"flags\s*:\s*(.*)", info) or re.search("()", "")).group(1).split())
    bf16 = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return {
        "cpu": model.group(1).strip() if model else platform.processor(),
        "cores": str(len(os.sched_getaffinity(0))),
        "bf16": ", ".join(bf16) if bf16 else "none (no avx512_bf16 / amx_bf16)",
        "torch": torch.__version__,
        "date": str(datetime.date.today()),
        "commit": commit(),
    }


def machine_lines() -> list[str]:
    """`machine()` as one Markdown list line for a RESULTS.md section."""
    return ["- " + "; ".join(f"{key}: {value}" for key, value in machine().items())]


def commit() -> str:
    """The repository's HEAD commit (short), with '+changes' when the tree is dirty."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=RESULTS.parent, capture_output=True,
                              text=True).stdout.strip()
    dirty = "+changes" if git("status", "--porcelain", "--untracked-files=no") else ""
    return (git("rev-parse", "--short", "HEAD") or "unknown") + dirty


def vm_kib(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", status).group(1))


def build_cache(root: Path, views: int, size: int, frames: int = 16) -> Path:
    """Synthetic example (1 session, 640x512 frames) -> triangulation -> cache at size x size."""
    from pipeline.stages import cache_augmentations, triangulate_labels
    from pipeline.synthetic.generate import generate_example
    from pipeline.synthetic.scene import view_names_for

    data = root / f"example_v{views}"
    names = list(view_names_for(views))
    args = ["--data-dir", str(data), "--view-names", *names,
            "--csv-files", *[f"CollectedData_{v}.csv" for v in names]]
    if not (data / "labels_3d.csv").exists():
        generate_example(data, n_sessions=1, frames_per_session=frames, n_views=views,
                         image_size=(640, 512), label_noise_px=0.5)
        code = triangulate_labels.main([*args, "--points", str(data / "labels_3d.csv"),
                                        "--outliers", str(data / "o.csv"),
                                        "--summary", str(data / "s.json")])
        assert code == 0, "triangulate_labels failed"
    out = root / f"cache_v{views}_{size}"
    config = cache_config(size, 1)
    outputs = []
    for key, name in (("splits", "splits.csv"), ("train", "train.h5"), ("eval", "eval.h5"),
                      ("picture", "a.png")):
        outputs += [f"--{key}", str(out / name)]
    code = cache_augmentations.main([*args, "--labels-3d", str(data / "labels_3d.csv"),
                                     "--config-json", json.dumps(config), *outputs])
    assert code == 0, "cache_augmentations failed"
    return out / "train.h5"
