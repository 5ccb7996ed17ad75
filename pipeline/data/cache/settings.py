"""The cache stage's settings: the `--config-json` values checked and turned into a CacheSpec."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.core.errors import ParallaxError
from pipeline.data import augment3d as aug
from pipeline.data.cache.build import CacheSpec
from pipeline.data.cache.format import IMAGE_COMPRESSION
from pipeline.data.cache.keys import CACHE_KEYS

AUGMENTATION_KEYS = ("copies_per_frame", "scale_range", "translate_frac", "rotate_deg",
                     "vertical_axis")


def check_number(value: Any, key: str, low: float | None = None, high: float | None = None,
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
    missing = [key for key in CACHE_KEYS if key not in config]
    if missing:
        raise ParallaxError(f"--config-json lacks key(s) {missing}")
    dims = config["data.image_resize_dims"]
    if not isinstance(dims, dict) or set(dims) != {"height", "width"}:
        raise ParallaxError("--config-json: data.image_resize_dims must be {height, width}")
    for name in ("height", "width"):
        check_number(dims[name], f"data.image_resize_dims.{name}", 8, 4096, integer=True)
    augmentation = config["augmentation"]
    if not isinstance(augmentation, dict) or not (
            set(AUGMENTATION_KEYS) <= set(augmentation) <= {*AUGMENTATION_KEYS,
                                                            "image_compression"}):
        raise ParallaxError(f"--config-json: augmentation must have the keys "
                            f"{list(AUGMENTATION_KEYS)} (and optionally image_compression)")
    if augmentation.get("image_compression", "gzip") not in IMAGE_COMPRESSION:
        raise ParallaxError(f"--config-json: augmentation.image_compression must be one of "
                            f"{list(IMAGE_COMPRESSION)}")
    check_number(augmentation["copies_per_frame"], "augmentation.copies_per_frame", 0, 100,
            integer=True)
    scale = augmentation["scale_range"]
    if not (isinstance(scale, list) and len(scale) == 2):
        raise ParallaxError(f"--config-json: augmentation.scale_range must be [low, high], "
                            f"got {scale!r}")
    low = check_number(scale[0], "augmentation.scale_range[0]", 1e-3)
    check_number(scale[1], "augmentation.scale_range[1]", low)
    check_number(augmentation["translate_frac"], "augmentation.translate_frac", 0, 10)
    check_number(augmentation["rotate_deg"], "augmentation.rotate_deg", 0, 180)
    axis = augmentation["vertical_axis"]
    if not (isinstance(axis, list) and len(axis) == 3):
        raise ParallaxError(f"--config-json: augmentation.vertical_axis must be [x, y, z], "
                            f"got {axis!r}")
    if np.linalg.norm([check_number(a, "augmentation.vertical_axis", None) for a in axis]) == 0:
        raise ParallaxError("--config-json: augmentation.vertical_axis must not be zero")
    if not isinstance(config["training.imgaug_3d"], bool):
        raise ParallaxError("--config-json: training.imgaug_3d must be true or false")
    check_number(config["training.rng_seed_data_pt"], "training.rng_seed_data_pt", 0, 2**63 - 1,
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
