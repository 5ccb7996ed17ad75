"""Stage `cache_augmentations`: split the frames, 3D-augment the training frames, cache to HDF5.

Reads the dataset, its calibrations and `labels_3d.csv` (triangulate_labels); writes
`splits.csv` (image, session, set), `train.h5` (train frames: originals + augmented copies),
`eval.h5` (validation + test frames, resized only) and a PNG of augmented samples. All outputs
appear together or not at all. Every result-affecting setting comes in `--config-json`, a JSON
object with the keys listed in CONFIG_KEYS (the rule passes exactly these config values, and
the caches record their hash).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import h5py
import numpy as np

from pipeline import augment3d as aug
from pipeline.cache import IMAGE_COMPRESSION, config_hash, decode_strings, files_hash
from pipeline.cache_build import NOT_AUGMENTED, BuildStats, CacheSpec, build_cache
from pipeline.cli import add_dataset_args, load_dataset, setup_logging
from pipeline.dataset import MultiviewLabels, frame_keys, read_frame_table
from pipeline.errors import ParallaxError, run_main
from pipeline.io_utils import atomic_paths, writing
from pipeline.splits import make_splits
from pipeline.triangulation import load_calibrations

log = logging.getLogger("parallax.cache_augmentations")

CONFIG_KEYS = ("data.image_resize_dims", "augmentation", "training.imgaug_3d",
               "training.train_prob", "training.val_prob", "training.rng_seed_data_pt",
               "training.test_sessions")
AUGMENTATION_KEYS = ("copies_per_frame", "scale_range", "translate_frac", "rotate_deg",
                     "vertical_axis")


def read_points_3d(path: Path, labels: MultiviewLabels) -> np.ndarray:
    """(frames, keypoints, 3) from triangulate_labels' CSV, checked against the dataset."""
    table = read_frame_table(path, frame_keys(labels), "triangulate_labels")
    columns = [f"{k}_{axis}" for k in labels.keypoint_names for axis in "xyz"]
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ParallaxError(f"{path}: missing column(s) {missing[:3]}; rerun triangulate_labels")
    try:
        return table[columns].to_numpy(float).reshape(len(table), labels.n_keypoints, 3)
    except ValueError as err:
        raise ParallaxError(f"{path}: non-numeric 3D coordinates: {err}") from None


def _number(value: Any, key: str, low: float | None = None, high: float | None = None,
            integer: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value)
    if ok and integer:
        ok = float(value).is_integer()
    if not ok or (low is not None and value < low) or (high is not None and value > high):
        kind = "an integer" if integer else "a number"
        bounds = f" in [{low}, {high}]" if low is not None or high is not None else ""
        raise ParallaxError(f"--config-json: {key} must be {kind}{bounds}, got {value!r}")
    return int(value) if integer else float(value)


def check_config(config: Any) -> dict[str, Any]:
    """The parsed `--config-json`, every key present and in range (else ParallaxError)."""
    if not isinstance(config, dict):
        raise ParallaxError("--config-json must be a JSON object")
    missing = [key for key in CONFIG_KEYS if key not in config]
    if missing:
        raise ParallaxError(f"--config-json lacks key(s) {missing}")
    dims = config["data.image_resize_dims"]
    if not isinstance(dims, dict) or set(dims) != {"height", "width"}:
        raise ParallaxError("--config-json: data.image_resize_dims must be {height, width}")
    for name in ("height", "width"):
        _number(dims[name], f"data.image_resize_dims.{name}", 8, 4096, integer=True)
    augmentation = config["augmentation"]
    if not isinstance(augmentation, dict) or not (
            set(AUGMENTATION_KEYS) <= set(augmentation) <= {*AUGMENTATION_KEYS,
                                                            "image_compression"}):
        raise ParallaxError(f"--config-json: augmentation must have the keys "
                            f"{list(AUGMENTATION_KEYS)} (and optionally image_compression)")
    if augmentation.get("image_compression", "gzip") not in IMAGE_COMPRESSION:
        raise ParallaxError(f"--config-json: augmentation.image_compression must be one of "
                            f"{list(IMAGE_COMPRESSION)}")
    _number(augmentation["copies_per_frame"], "augmentation.copies_per_frame", 0, 100,
            integer=True)
    scale = augmentation["scale_range"]
    if not (isinstance(scale, list) and len(scale) == 2):
        raise ParallaxError(f"--config-json: augmentation.scale_range must be [low, high], "
                            f"got {scale!r}")
    low = _number(scale[0], "augmentation.scale_range[0]", 1e-3)
    _number(scale[1], "augmentation.scale_range[1]", low)
    _number(augmentation["translate_frac"], "augmentation.translate_frac", 0, 10)
    _number(augmentation["rotate_deg"], "augmentation.rotate_deg", 0, 180)
    axis = augmentation["vertical_axis"]
    if not (isinstance(axis, list) and len(axis) == 3):
        raise ParallaxError(f"--config-json: augmentation.vertical_axis must be [x, y, z], "
                            f"got {axis!r}")
    if np.linalg.norm([_number(a, "augmentation.vertical_axis", None) for a in axis]) == 0:
        raise ParallaxError("--config-json: augmentation.vertical_axis must not be zero")
    if not isinstance(config["training.imgaug_3d"], bool):
        raise ParallaxError("--config-json: training.imgaug_3d must be true or false")
    _number(config["training.rng_seed_data_pt"], "training.rng_seed_data_pt", 0, 2**63 - 1,
            integer=True)
    sessions = config["training.test_sessions"]
    if not (isinstance(sessions, list) and all(isinstance(s, str) for s in sessions)):
        raise ParallaxError("--config-json: training.test_sessions must be a list of names")
    return config


def spec_from_config(config: dict) -> CacheSpec:
    """The cache's settings from the (checked) config sections passed by the rule."""
    dims = config["data.image_resize_dims"]
    augmentation = config["augmentation"]
    return CacheSpec(
        image_size=(int(dims["height"]), int(dims["width"])),
        augment=aug.AugmentConfig(
            copies_per_frame=int(augmentation["copies_per_frame"]),
            scale_range=tuple(float(s) for s in augmentation["scale_range"]),
            translate_frac=float(augmentation["translate_frac"]),
            rotate_deg=float(augmentation["rotate_deg"]),
            vertical_axis=tuple(float(a) for a in augmentation["vertical_axis"]),
        ),
        imgaug_3d=bool(config["training.imgaug_3d"]),
        seed=int(config["training.rng_seed_data_pt"]),
        image_compression=augmentation.get("image_compression", "gzip"),
    )


def _text(image: np.ndarray, text: str, origin: tuple[int, int], scale: float = 0.4) -> None:
    """White text with a dark outline, readable on any background."""
    x, y = origin
    for dx, dy in ((-1, -1), (-1, 1), (1, -1), (1, 1), (0, 0)):
        colour = (255, 255, 255) if dx == dy == 0 else (0, 0, 0)
        cv2.putText(image, text, (x + dx, y + dy), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, 1,
                    cv2.LINE_AA)


def keypoint_colours(n: int) -> np.ndarray:
    """n distinct BGR colours (hue wheel)."""
    hsv = np.uint8([[[int(180 * i / max(n, 1)), 220, 255] for i in range(n)]])
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0].astype(int)


def draw_picture(path: Path, train_h5: Path, stats: BuildStats, max_frames: int = 2,
                 max_copies: int = 2) -> None:
    """PNG grid: rows = a few training frames, each original then its augmented copies;
    columns = views. Labels drawn as dots in keypoint colours; augmented tiles give the view's
    similarity-fit residual; the footer summarises the residuals over the whole cache."""
    with h5py.File(train_h5, "r") as h5:
        copies, frames = h5["copy"][...], h5["frame_index"][...]
        augmented = np.unique(frames[copies > 0])
        if augmented.size:
            chosen = augmented[np.linspace(0, augmented.size - 1, min(max_frames, augmented.size)
                                           ).round().astype(int)]
        else:
            chosen = np.unique(frames)[:max_frames]
        rows = [r for f in np.unique(chosen) for r in np.flatnonzero(frames == f)
                if copies[r] <= max_copies]
        views = [str(v) for v in h5.attrs["view_names"]]
        names = decode_strings(h5["image"][...])
        height, width = (int(s) for s in h5.attrs["image_size"])
        up = max(1, int(round(192 / max(height, width))))
        colours = keypoint_colours(h5["keypoints_2d"].shape[2])
        tiles = []
        for row in rows:
            row_tiles = []
            for view, (image, points) in enumerate(zip(h5["images"][row],
                                                       h5["keypoints_2d"][row], strict=True)):
                image = cv2.resize(image, None, fx=up, fy=up, interpolation=cv2.INTER_NEAREST)
                for k in np.flatnonzero(np.isfinite(points).all(-1)):
                    centre = tuple(int(round(c)) for c in (points[k] + 0.5) * up * 16 - 8)
                    cv2.circle(image, centre, 3 * 16, (0, 0, 0), 2, cv2.LINE_AA, shift=4)
                    cv2.circle(image, centre, 3 * 16, tuple(int(c) for c in colours[k]), -1,
                               cv2.LINE_AA, shift=4)
                _text(image, views[view], (4, image.shape[0] - 6))
                if copies[row] > 0:
                    _text(image, f"fit residual {h5['fit_residual_px'][row, view]:.2f} px",
                          (4, 28))
                cv2.rectangle(image, (0, 0), (image.shape[1] - 1, image.shape[0] - 1),
                              (40, 40, 40), 1)
                row_tiles.append(image)
            tile = np.hstack(row_tiles)
            if copies[row] == 0:
                label = f"{names[row]}: original"
            else:
                label = (f"copy {copies[row]}: scale {h5['scale'][row]:.2f}, "
                         f"rotation {h5['rotation_deg'][row]:.0f} deg, "
                         f"shift {np.array2string(h5['shift'][row], precision=2)}")
            _text(tile, label, (4, 14))
            tiles.append(tile)
    picture = np.vstack(tiles)
    median, p95, worst = stats.residual_summary()
    lines = [f"similarity-fit residual over {len(stats.residuals)} augmented samples x views "
             f"(model px): median {median:.3f}, p95 {p95:.3f}, max {worst:.3f}",
             "frames stored un-augmented: " + (", ".join(
                 f"{NOT_AUGMENTED[k]}: {v}" for k, v in sorted(stats.not_augmented.items()))
                 or "none")]
    footer = np.zeros((18 * len(lines) + 6, picture.shape[1], 3), np.uint8)
    for i, line in enumerate(lines):
        _text(footer, line, (4, 16 + 18 * i))
    ok, png = cv2.imencode(".png", np.vstack([picture, footer]))
    path.write_bytes(png.tobytes())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.cache_augmentations",
                                     description=__doc__.splitlines()[0])
    add_dataset_args(parser)
    parser.add_argument("--labels-3d", type=Path, required=True,
                        help="labels_3d.csv from triangulate_labels")
    parser.add_argument("--config-json", required=True,
                        help="JSON object with the config values " + ", ".join(CONFIG_KEYS))
    parser.add_argument("--splits", type=Path, required=True, help="output splits.csv")
    parser.add_argument("--train", type=Path, required=True, help="output train.h5")
    parser.add_argument("--eval", type=Path, required=True, help="output eval.h5")
    parser.add_argument("--picture", type=Path, required=True, help="output PNG")
    return parser


def input_files(args: argparse.Namespace, labels: MultiviewLabels, calibrations) -> list[Path]:
    """Every file whose bytes shape the cache (for the input hash)."""
    files = [labels.data_dir / p for p in labels.image_paths.ravel()]
    files += [args.data_dir / f for f in args.csv_files]
    files += [args.data_dir / f for f in (args.bbox_files or [])]
    if args.camera_params_file:
        files.append(args.data_dir / args.camera_params_file)
    return [*files, *map(Path, calibrations), args.labels_3d]


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
                         train_prob=_number(config["training.train_prob"],
                                            "training.train_prob"),
                         val_prob=_number(config["training.val_prob"], "training.val_prob"),
                         seed=spec.seed, test_sessions=config["training.test_sessions"])
    sets = splits["set"].to_numpy(dtype=object)
    log.info("split: %s", {name: int((sets == name).sum()) for name in ("train", "val", "test")})
    hashes = {"config_hash": config_hash(config),
              "input_hash": files_hash(input_files(args, labels, groups), args.data_dir)}
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
