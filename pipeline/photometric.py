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
    """images: (V, H, W, 3) uint8 -> augmented copy, each view drawn independently."""
    out = images.astype(np.float32)
    views, height, width, _ = out.shape
    gain = rng.uniform(1 - cfg.contrast, 1 + cfg.contrast, views)
    bias = rng.uniform(-cfg.brightness, cfg.brightness, views) * 255
    mean = out.mean(axis=(1, 2, 3))
    out = (out - mean[:, None, None, None]) * gain[:, None, None, None] \
        + (mean + bias)[:, None, None, None]
    for view in np.flatnonzero(rng.random(views) < cfg.blur_prob):
        out[view] = cv2.GaussianBlur(out[view], (0, 0), rng.uniform(0.5, 1.5))
    noisy = rng.random(views) < cfg.noise_prob
    if noisy.any():
        out[noisy] += rng.normal(0, cfg.noise_std, out[noisy].shape).astype(np.float32)
    for view in np.flatnonzero(rng.random(views) < cfg.dropout_prob):
        h = max(1, int(rng.uniform(0.03, cfg.dropout_size) * height))
        w = max(1, int(rng.uniform(0.03, cfg.dropout_size) * width))
        y, x = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
        out[view, y:y + h, x:x + w] = out[view].mean(axis=(0, 1))
    return np.clip(out, 0, 255).astype(np.uint8)
