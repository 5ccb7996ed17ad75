"""Stage `train`: train a heatmap model on the augmentation cache.

Writes `best.pt` (lowest validation loss), `last.pt` (every `training.ckpt_every_n_steps`
steps, atomically), `metrics.csv` (one row per step: every loss term, weights, lr, mask ratio,
data/step time, validation metrics), the `config.yaml` used and, when the `tensorboard`
package is installed, the same scalars under `tensorboard/`.

`--resume` continues from `last.pt` only if it was written with the same training
configuration and caches (else it starts from scratch and says so), so a rule can always pass
it. Multi-GPU: `torchrun --standalone --nproc_per_node N -m pipeline.stages.train ...` (one process
per GPU, `training.train_batch_size` is the global batch; see `pipeline.training.distributed`);
only
process 0 writes files and logs at INFO level.
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

from pipeline.core.atomic import atomic_path
from pipeline.core.cli import StageParser, setup_logging
from pipeline.core.errors import ParallaxError, run_main
from pipeline.core.hashing import config_hash
from pipeline.training.config import TrainConfig
from pipeline.training.distributed import destroy_process_group, env_context
from pipeline.training.trainer import OUTPUTS, Trainer

log = logging.getLogger("parallax.train")


def build_parser() -> argparse.ArgumentParser:
    parser = StageParser(prog="python -m pipeline.stages.train",
                         description=__doc__.splitlines()[0])
    parser.add_argument("--train-h5", type=Path, required=True, help="results/cache/train.h5")
    parser.add_argument("--eval-h5", type=Path, required=True, help="results/cache/eval.h5")
    parser.add_argument("--config-json", required=True,
                        help="JSON with the model, data, training, losses and callbacks sections")
    parser.add_argument("--cache-config-json", default=None,
                        help="the JSON the cache was built with (its hash is checked)")
    parser.add_argument("--images-hash", default=None,
                        help="digest of the labelled images (pipeline.core.hashing."
                             "images_digest): a cache built from other images is refused")
    parser.add_argument("--out-dir", type=Path, required=True,
                        help="results/models/<name>/ (best.pt, last.pt, metrics.csv, config.yaml)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads of the job (rule {threads}), shared by the processes")
    parser.add_argument("--resume", action="store_true",
                        help="continue from <out-dir>/last.pt if it was written with this "
                             "configuration (else start from scratch)")
    return parser


def _body(argv: Sequence[str] | None) -> None:
    args = build_parser().parse_args(argv)
    ctx = env_context()
    setup_logging()
    if not ctx.is_main:  # one copy of the log: the other processes only warn
        logging.getLogger().setLevel(logging.WARNING)
    try:
        config = json.loads(args.config_json)
        cache_config = json.loads(args.cache_config_json) if args.cache_config_json else None
    except json.JSONDecodeError as err:
        raise ParallaxError(f"--config-json is not valid JSON: {err}") from None
    threads = max(1, args.threads // ctx.world_size)
    torch.set_num_threads(threads)
    cfg = TrainConfig.from_config(config)
    expected = config_hash(cache_config) if cache_config is not None else None
    try:
        trainer = Trainer(cfg, args.train_h5, args.eval_h5, args.out_dir, expected, ctx=ctx,
                          threads=threads, expected_images_hash=args.images_hash or None)
        log.info("device %s, %d process(es), %d training samples, global batch %d, "
                 "%d steps/epoch, %d steps, precision %s, %d data workers per process",
                 trainer.device, ctx.world_size, len(trainer.train_set), cfg.train_batch_size,
                 trainer.steps_per_epoch, trainer.total_steps, cfg.precision,
                 trainer.loader_options["num_workers"])
        if args.resume:
            trainer.resume()
        try:
            final = trainer.fit()
        except BaseException:
            if ctx.is_main:  # a failed run leaves no outputs, only resume/ for the next run
                for name in (*OUTPUTS, "config.yaml"):
                    (args.out_dir / name).unlink(missing_ok=True)
            raise
        if ctx.is_main:
            with atomic_path(args.out_dir / "config.yaml") as tmp:
                tmp.write_text(yaml.safe_dump(config, sort_keys=True))
        log.info("done at step %d: %s", trainer.step, final)
    finally:
        destroy_process_group()


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(_body, argv)


if __name__ == "__main__":
    sys.exit(main())
