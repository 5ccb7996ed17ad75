"""Stage `train`: train a heatmap model on the augmentation cache.

Writes `best.pt` (lowest validation loss), `last.pt` (every `training.ckpt_every_n_steps`
steps, atomically; `--resume` continues from it), `metrics.csv` (one row per step: every loss
term, weights, lr, mask ratio, data/step time, validation metrics) and the `config.yaml` used.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml

from pipeline.cache import config_hash
from pipeline.cli import setup_logging
from pipeline.errors import ParallaxError, run_main
from pipeline.io_utils import atomic_path
from pipeline.trainer import TrainConfig, Trainer

log = logging.getLogger("parallax.train")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.train",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--train-h5", type=Path, required=True, help="results/cache/train.h5")
    parser.add_argument("--eval-h5", type=Path, required=True, help="results/cache/eval.h5")
    parser.add_argument("--config-json", required=True,
                        help="JSON with the model, data, training and losses sections")
    parser.add_argument("--cache-config-json", default=None,
                        help="the JSON the cache was built with (its hash is checked)")
    parser.add_argument("--out-dir", type=Path, required=True,
                        help="results/models/<name>/ (best.pt, last.pt, metrics.csv, config.yaml)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (rule {threads})")
    parser.add_argument("--resume", action="store_true", help="continue from <out-dir>/last.pt")
    return parser


def _body(argv: Sequence[str] | None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        config = json.loads(args.config_json)
        cache_config = json.loads(args.cache_config_json) if args.cache_config_json else None
    except json.JSONDecodeError as err:
        raise ParallaxError(f"--config-json is not valid JSON: {err}") from None
    torch.set_num_threads(max(1, args.threads))
    cfg = TrainConfig.from_config(config)
    expected = config_hash(cache_config) if cache_config is not None else None
    trainer = Trainer(cfg, args.train_h5, args.eval_h5, args.out_dir, expected)
    log.info("device %s, %d training samples, %d steps/epoch, %d steps, precision %s",
             trainer.device, len(trainer.train_set), trainer.steps_per_epoch,
             trainer.total_steps, cfg.precision)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out_dir / "config.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(config, sort_keys=True))
    if args.resume:
        trainer.resume()
    final = trainer.fit()
    log.info("done at step %d: %s", trainer.step, final)


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(_body, argv)


if __name__ == "__main__":
    sys.exit(main())
