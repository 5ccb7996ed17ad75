"""Cheap per-view photometric augmentation, applied on the fly to cached uint8 images.

Geometry is untouched (the 3D augmentation already moved the animal consistently across views);
each view independently may get brightness/contrast, blur, noise and coarse dropout. LP names for
`training.imgaug`: `none` turns it off, `default` and `dlc` turn it on.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class PhotometricConfig:
    brightness: float = 0.2  # +- fraction of the intensity range
    contrast: float = 0.25  # contrast factor in [1 - c, 1 + c]
    blur_prob: float = 0.2
    noise_prob: float = 0.3
    noise_std: float = 6.0  # grey levels
    dropout_prob: float = 0.3
    dropout_size: float = 0.12  # max fraction of the image side


def from_imgaug(name: str) -> PhotometricConfig | None:
    """`training.imgaug` -> a config (None = off)."""
    return None if name == "none" else PhotometricConfig()


def photometric(images: np.ndarray, rng: np.random.Generator,
                cfg: PhotometricConfig) -> np.ndarray:
    """images: (V, H, W, 3) uint8 -> augmented uint8 copy, each view drawn independently.

    Works in uint8 throughout (a lookup table for brightness/contrast, integer noise), so it
    costs a few milliseconds per 4-view sample.
    """
    views, height, width, _ = images.shape
    gain = rng.uniform(1 - cfg.contrast, 1 + cfg.contrast, views)
    bias = rng.uniform(-cfg.brightness, cfg.brightness, views) * 255
    blur = rng.random(views) < cfg.blur_prob
    sigma = rng.uniform(0.5, 1.5, views)
    noisy = rng.random(views) < cfg.noise_prob
    dropout = rng.random(views) < cfg.dropout_prob
    out = np.empty_like(images)
    levels = np.arange(256, dtype=np.float32)
    for view in range(views):  # V <= 8; every step below is a whole-image OpenCV/numpy call
        image = images[view]
        mean = float(np.mean(cv2.mean(image)[:3]))
        table = np.clip((levels - mean) * gain[view] + mean + bias[view], 0, 255)
        image = cv2.LUT(image, table.astype(np.uint8))
        if blur[view]:
            image = cv2.GaussianBlur(image, (0, 0), sigma[view])
        if noisy[view]:
            half = int(round(cfg.noise_std * np.sqrt(3)))  # uniform noise with that std
            noise = rng.integers(-half, half + 1, image.shape, dtype=np.int16)
            image = np.clip(image.astype(np.int16) + noise, 0, 255).astype(np.uint8)
        if dropout[view]:
            h = max(1, int(rng.uniform(0.03, cfg.dropout_size) * height))
            w = max(1, int(rng.uniform(0.03, cfg.dropout_size) * width))
            y, x = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
            image[y:y + h, x:x + w] = np.round(cv2.mean(image)[:3]).astype(np.uint8)
        out[view] = image
    return out
