"""What the benchmarks share: writing their section of bench/RESULTS.md, the cache config."""

from __future__ import annotations

import os
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
