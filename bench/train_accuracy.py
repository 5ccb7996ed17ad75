"""Benchmark: a tiny multi-view ViT trained from scratch on CPU reaches sub-heatmap-cell error.

  .venv/bin/python bench/train_accuracy.py [--epochs 80] [--write]

Generates the demo example (2 sessions x 60 frames, 4 views, 320x256, 0.5 px label noise),
triangulates it, builds the cache at 128x128 (original + 2 3D-augmented copies per training
frame), then trains `vit_tiny_test` (2 transformer blocks, width 64) as a multi-view
transformer with the supervised heatmap loss, on 2 threads. Reports the validation pixel error
in model pixels against one heatmap cell (stride 4 at downsample_factor 2) and the wall time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from results import cache_config, write_section

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SECTION = "## Training accuracy (bench/train_accuracy.py)"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=80)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    import pandas as pd
    import torch

    from pipeline.stages import cache_augmentations, triangulate_labels
    from pipeline.synthetic.generate import generate_example
    from pipeline.synthetic.scene import view_names_for
    from pipeline.training.config import TrainConfig
    from pipeline.training.trainer import Trainer

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate_example(tmp / "data", label_noise_px=0.5)
        views = list(view_names_for(4))
        data = ["--data-dir", str(tmp / "data"), "--view-names", *views,
                "--csv-files", *[f"CollectedData_{v}.csv" for v in views]]
        assert triangulate_labels.main([*data, "--points", str(tmp / "l.csv"), "--outliers",
                                        str(tmp / "o.csv"), "--summary", str(tmp / "s.json")]) == 0
        cache = cache_config(128, 2)
        outputs = []
        for key, name in (("splits", "splits.csv"), ("train", "train.h5"), ("eval", "eval.h5"),
                          ("picture", "a.png")):
            outputs += [f"--{key}", str(tmp / name)]
        assert cache_augmentations.main([*data, "--labels-3d", str(tmp / "l.csv"),
                                         "--config-json", json.dumps(cache), *outputs]) == 0
        config = {
            "model": {"model_type": "heatmap_multiview_transformer", "backbone": "vit_tiny_test"},
            "data": {"image_resize_dims": {"height": 128, "width": 128}, "downsample_factor": 2},
            "training": {"max_epochs": args.epochs, "train_batch_size": 8,
                         "optimizer_params": {"learning_rate": 0.002},
                         "check_val_every_n_epoch": 10, "ckpt_every_n_steps": 10**6,
                         "imgaug": "dlc", "patch_mask": {"final_ratio": 0.0}},
            "losses": {"supervised_reprojection_heatmap_mse": {"log_weight": None}},
        }
        start = time.perf_counter()
        trainer = Trainer(TrainConfig.from_config(config), tmp / "train.h5", tmp / "eval.h5",
                          tmp / "model")
        trainer.fit()
        minutes = (time.perf_counter() - start) / 60
        metrics = pd.read_csv(tmp / "model" / "metrics.csv").dropna(subset=["val_loss"])
    final = metrics.iloc[-1]
    cell = 128 / trainer.model.heatmap_size[1]
    lines = [
        f"Demo example (4 views, 320x256 -> 128x128, 96 training frames x 3 cached samples), "
        f"`vit_tiny_test` MVT from scratch, heatmap loss only, AdamW lr 2e-3 cosine, batch 8, "
        f"{args.epochs} epochs ({trainer.total_steps} steps), 2 CPU threads, fp32.",
        "",
        "| epoch | step | val pixel error (model px) | train pixel error (model px) |",
        "|---:|---:|---:|---:|",
        *[f"| {int(r.epoch) + 1} | {int(r.step)} | {r.val_pixel_error_model:.2f} | "
          f"{r.pixel_error_model:.2f} |" for r in metrics.itertuples()],
        "",
        f"Result: validation error {final.val_pixel_error_model:.2f} model px vs one heatmap "
        f"cell = {cell:.0f} px, in {minutes:.1f} minutes of training "
        f"({'below' if final.val_pixel_error_model < cell else 'NOT below'} one cell).",
        f"- date: {datetime.date.today()}; {os.cpu_count()} cores; torch {torch.__version__}",
    ]
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_section(SECTION, table)


if __name__ == "__main__":
    main()
