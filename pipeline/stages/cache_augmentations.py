"""Stage `cache_augmentations`: split the frames, 3D-augment the training frames, cache to HDF5.

Reads the dataset, its calibrations and `labels_3d.csv` (triangulate_labels); writes
`splits.csv` (image, session, set), `train.h5` (train frames: originals + augmented copies),
`eval.h5` (validation + test frames, resized only) and a PNG of augmented samples. All outputs
appear together or not at all. Every result-affecting setting comes in `--config-json`, a JSON
object with the keys listed in CACHE_KEYS (the rule passes exactly these config values, and
the caches record their hash). The caches' `input_hash` is `<images digest>.<other inputs
digest>` (`pipeline.core.hashing.images_digest` of the labelled images, then the label CSVs,
bbox CSVs, calibrations and labels_3d.csv), so a replaced or edited image is detected.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.core.atomic import atomic_paths, writing
from pipeline.core.cli import StageParser, add_dataset_args, setup_logging
from pipeline.core.errors import ParallaxError, run_main
from pipeline.core.hashing import config_hash, files_hash, images_digest
from pipeline.data.cache.build import NOT_AUGMENTED, build_cache
from pipeline.data.cache.settings import CACHE_KEYS, check_config, check_number, spec_from_config
from pipeline.data.project import MultiviewLabels, frame_keys, load_dataset
from pipeline.data.splits import make_splits
from pipeline.data.tables import read_points_3d
from pipeline.data.triangulate import load_calibrations
from pipeline.evaluation.drawing import draw_picture

log = logging.getLogger("parallax.cache_augmentations")


def build_parser() -> argparse.ArgumentParser:
    parser = StageParser(prog="python -m pipeline.stages.cache_augmentations",
                         description=__doc__.splitlines()[0])
    add_dataset_args(parser)
    parser.add_argument("--labels-3d", type=Path, required=True,
                        help="labels_3d.csv from triangulate_labels")
    parser.add_argument("--config-json", required=True,
                        help="JSON object with the config values " + ", ".join(CACHE_KEYS))
    parser.add_argument("--splits", type=Path, required=True, help="output splits.csv")
    parser.add_argument("--train", type=Path, required=True, help="output train.h5")
    parser.add_argument("--eval", type=Path, required=True, help="output eval.h5")
    parser.add_argument("--picture", type=Path, required=True, help="output PNG")
    return parser


def input_files(args: argparse.Namespace, calibrations) -> list[Path]:
    """Every file but the images whose bytes shape the cache (for the input hash)."""
    files = [args.data_dir / f for f in args.csv_files]
    files += [args.data_dir / f for f in (args.bbox_files or [])]
    if args.camera_params_file:
        files.append(args.data_dir / args.camera_params_file)
    return [*files, *map(Path, calibrations), args.labels_3d]


def input_hash(args: argparse.Namespace, labels: MultiviewLabels, calibrations) -> str:
    """`<images digest>.<other inputs digest>`: the first part is `images_digest` of the
    labelled images, which the workflow computes too and the trainer checks (a replaced or
    edited image makes the cache stale); the whole string goes into the resume hash."""
    images = images_digest(labels.data_dir, labels.image_paths.ravel())
    return f"{images}.{files_hash(input_files(args, calibrations), args.data_dir)}"


def _body(argv: Sequence[str] | None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        config = json.loads(args.config_json)
    except json.JSONDecodeError as err:
        raise ParallaxError(f"--config-json is not valid JSON: {err}") from None
    spec = spec_from_config(check_config(config))
    labels = load_dataset(args)
    groups = load_calibrations(labels)
    points_3d = read_points_3d(args.labels_3d, labels)
    splits = make_splits(frame_keys(labels), labels.sessions,
                         train_prob=check_number(config["training.train_prob"],
                                            "training.train_prob"),
                         val_prob=check_number(config["training.val_prob"], "training.val_prob"),
                         seed=spec.seed, test_sessions=config["training.test_sessions"])
    sets = splits["set"].to_numpy(dtype=object)
    log.info("split: %s", {name: int((sets == name).sum()) for name in ("train", "val", "test")})
    hashes = {"config_hash": config_hash(config),
              "input_hash": input_hash(args, labels, groups)}
    with atomic_paths(args.splits, args.train, args.eval, args.picture) as tmp:
        with writing(args.splits):
            splits.to_csv(tmp[0], index=False)
        with writing(args.train):
            train = build_cache(tmp[1], labels, points_3d, sets, np.flatnonzero(sets == "train"),
                                groups, spec, kind="train", **hashes)
        with writing(args.eval):
            evaluation = build_cache(tmp[2], labels, points_3d, sets,
                                     np.flatnonzero(sets != "train"), groups, spec, kind="eval",
                                     **hashes)
        with writing(args.picture):
            draw_picture(tmp[3], tmp[1], train)
    copies = train.samples - int((sets == "train").sum())
    log.info("train.h5: %d samples (%d augmented copies); eval.h5: %d samples", train.samples,
             copies, evaluation.samples)
    log.info("frames stored un-augmented: %s", {NOT_AUGMENTED[k]: v for k, v in sorted(
        train.not_augmented.items())} or "none")
    log.info("similarity-fit residual per sample and view (model px): median %.4f, p95 %.4f, "
             "max %.4f", *train.residual_summary())


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(_body, argv)


if __name__ == "__main__":
    sys.exit(main())
