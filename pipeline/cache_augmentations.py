"""Stage `cache_augmentations`: split the frames, 3D-augment the training frames, cache to HDF5.

Reads the dataset, the validated calibrations and `labels_3d.csv`; writes `splits.csv`,
`train.h5` (originals + augmented copies), `eval.h5` (validation + test, resized only) and a
picture of augmented samples. All outputs appear together or not at all.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from pipeline import augment3d as aug
from pipeline.cache import config_hash, files_hash
from pipeline.cache_build import BuildStats, CacheSpec, build_cache
from pipeline.cli import add_dataset_args, load_dataset, setup_logging
from pipeline.dataset import MultiviewLabels, frame_keys, read_frame_table
from pipeline.errors import ParallaxError, run_main
from pipeline.io_utils import atomic_paths
from pipeline.splits import make_splits
from pipeline.triangulation import load_calibrations

log = logging.getLogger("parallax.cache_augmentations")


def read_points_3d(path: Path, labels: MultiviewLabels) -> np.ndarray:
    """(frames, keypoints, 3) from triangulate_labels' CSV, checked against the dataset."""
    table = read_frame_table(path, frame_keys(labels), "triangulate_labels")
    columns = [f"{k}_{axis}" for k in labels.keypoint_names for axis in "xyz"]
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ParallaxError(f"{path}: missing column(s) {missing[:3]}")
    return table[columns].to_numpy(float).reshape(len(table), labels.n_keypoints, 3)


def spec_from_config(config: dict) -> CacheSpec:
    """The cache's settings from the config sections passed by the rule."""
    dims = config["data.image_resize_dims"]
    augmentation = config["augmentation"]
    return CacheSpec(
        image_size=(int(dims["height"]), int(dims["width"])),
        augment=aug.AugmentConfig(
            copies_per_frame=int(augmentation["copies_per_frame"]),
            scale_range=tuple(augmentation["scale_range"]),
            translate_frac=float(augmentation["translate_frac"]),
            rotate_deg=float(augmentation["rotate_deg"]),
            vertical_axis=tuple(augmentation["vertical_axis"]),
        ),
        imgaug_3d=bool(config["training.imgaug_3d"]),
        seed=int(config["training.rng_seed_data_pt"]),
    )


def draw_picture(path: Path, train_h5: Path, stats: BuildStats, max_rows: int = 4) -> None:
    """Rows: a frame's original and its augmented copies; columns: views; keypoints drawn."""
    import h5py

    with h5py.File(train_h5, "r") as h5:
        copies = h5["copy"][...]
        augmented = np.flatnonzero(copies > 0)
        first = int(h5["frame_index"][augmented[0]]) if augmented.size else None
        frames = h5["frame_index"][...]
        rows = np.flatnonzero(frames == first)[:max_rows] if first is not None else [0]
        tiles = []
        for row in rows:
            views = []
            for image, points in zip(h5["images"][row], h5["keypoints_2d"][row], strict=True):
                image = cv2.resize(image, None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
                for x, y in points[np.isfinite(points).all(-1)] * 2 + 0.5:
                    cv2.circle(image, (int(round(x)), int(round(y))), 3, (0, 255, 0), 1,
                               cv2.LINE_AA)
                views.append(image)
            tile = np.hstack(views)
            label = f"frame {first} copy {int(copies[row])}"
            cv2.putText(tile, label, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1)
            tiles.append(tile)
    picture = np.vstack(tiles)
    residuals = np.concatenate(stats.residuals) if stats.residuals else np.zeros(1)
    footer = np.zeros((22, picture.shape[1], 3), np.uint8)
    cv2.putText(footer, f"similarity-fit residual (model px): median {np.median(residuals):.3f}, "
                f"p95 {np.percentile(residuals, 95):.3f}", (4, 15), cv2.FONT_HERSHEY_SIMPLEX,
                0.45, (255, 255, 255), 1)
    path.write_bytes(cv2.imencode(".png", np.vstack([picture, footer]))[1].tobytes())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.cache_augmentations",
                                     description=__doc__.splitlines()[0])
    add_dataset_args(parser)
    parser.add_argument("--labels-3d", type=Path, required=True, help="labels_3d.csv")
    parser.add_argument("--config-json", required=True,
                        help="JSON with data.image_resize_dims, augmentation, training.imgaug_3d, "
                        "training.train_prob, training.val_prob, training.rng_seed_data_pt, "
                        "training.test_sessions")
    parser.add_argument("--splits", type=Path, required=True, help="output splits.csv")
    parser.add_argument("--train", type=Path, required=True, help="output train.h5")
    parser.add_argument("--eval", type=Path, required=True, help="output eval.h5")
    parser.add_argument("--picture", type=Path, required=True, help="output PNG")
    return parser


def _body(argv: Sequence[str] | None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        config = json.loads(args.config_json)
    except json.JSONDecodeError as err:
        raise ParallaxError(f"--config-json is not valid JSON: {err}") from None
    spec = spec_from_config(config)
    labels = load_dataset(args)
    groups = load_calibrations(labels)
    points_3d = read_points_3d(args.labels_3d, labels)
    splits = make_splits(frame_keys(labels), labels.sessions,
                         train_prob=config["training.train_prob"],
                         val_prob=config["training.val_prob"],
                         seed=config["training.rng_seed_data_pt"],
                         test_sessions=config["training.test_sessions"])
    sets = splits["set"].to_numpy(dtype=object)
    log.info("split: %s", splits["set"].value_counts().to_dict())
    inputs = [labels.data_dir / p for p in labels.image_paths.ravel()]
    inputs += [args.data_dir / f for f in args.csv_files] + [Path(p) for p in groups]
    inputs.append(args.labels_3d)
    hashes = {"config_hash": config_hash(config), "input_hash": files_hash(inputs, args.data_dir)}
    with atomic_paths(args.splits, args.train, args.eval, args.picture) as tmp:
        splits.to_csv(tmp[0], index=False)
        train = build_cache(tmp[1], labels, points_3d, sets, np.flatnonzero(sets == "train"),
                            groups, spec, kind="train", **hashes)
        evaluation = build_cache(tmp[2], labels, points_3d, sets,
                                 np.flatnonzero(sets != "train"), groups, spec, kind="eval",
                                 **hashes)
        draw_picture(tmp[3], tmp[1], train)
    residuals = np.concatenate(train.residuals) if train.residuals else np.full(1, np.nan)
    log.info("train.h5: %d samples; frames stored un-augmented: %s; eval.h5: %d samples",
             train.samples, train.not_augmented or "none", evaluation.samples)
    log.info("similarity-fit residual (model px): median %.4f, p95 %.4f, max %.4f",
             np.median(residuals), np.percentile(residuals, 95), np.max(residuals))


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(_body, argv)


if __name__ == "__main__":
    sys.exit(main())
