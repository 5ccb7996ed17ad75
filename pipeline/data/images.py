"""Images from disk to the model: reading, the frame -> model warp, and normalisation.

Every stage reads images through `read_image`, so all of them see the same pixel grid: the
stored one. An EXIF orientation tag (phones, some camera software) is ignored, as DLC and LP do
when labelling and as PIL's header size (`project.image_size`) reports it: labels are in the
stored pixel grid."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from pipeline.core.errors import ParallaxError
from pipeline.data import augment3d as aug
from pipeline.data.project import MultiviewLabels

if TYPE_CHECKING:  # torch is imported where it is used: reading images needs no torch
    import torch


def read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 BGR in the stored pixel grid (EXIF orientation not applied)."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None:
        raise ParallaxError(f"{path}: cannot read image (missing or corrupt)")
    return image


def antialias_sigma(frame_to_model: np.ndarray) -> tuple[float, float]:
    """Pre-blur σ (source px) along the frame's x and y axes for a (2, 3) affine."""
    gains = np.linalg.norm(frame_to_model[:, :2], axis=0)  # model px per frame px, per axis
    shrink = 1.0 / np.maximum(gains, 1e-9)
    return tuple(float(np.sqrt(max(f * f - 1.0, 0.0)) / 2) for f in shrink)


def warp_image(image: np.ndarray, to_model: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The (H, W, 3) model image: pre-blur if shrinking, then one bilinear warpAffine."""
    sigma_x, sigma_y = antialias_sigma(to_model)
    if max(sigma_x, sigma_y) > 0.1:
        image = cv2.GaussianBlur(image, (0, 0), sigmaX=max(sigma_x, 1e-3),
                                 sigmaY=max(sigma_y, 1e-3), borderType=cv2.BORDER_REFLECT_101)
    fill = tuple(float(c) for c in cv2.mean(image)[:3])
    return cv2.warpAffine(image, to_model, (size[1], size[0]), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=fill)


def model_boxes(labels: MultiviewLabels, frame: int, images: list[np.ndarray]) -> np.ndarray:
    """(V, 4) x, y, h, w: the part of each frame the model sees (bbox, else the whole image)."""
    if labels.bboxes is not None:
        return labels.bboxes[:, frame]
    return full_frame_boxes(images)


def full_frame_boxes(images: list[np.ndarray]) -> np.ndarray:
    """(V, 4) x, y, h, w boxes covering each whole image."""
    return np.array([[0, 0, im.shape[0], im.shape[1]] for im in images], float)


def frame_from_image(labels: MultiviewLabels, frame: int, images: list[np.ndarray]) -> np.ndarray:
    """(V, 2, 3) image file pixels -> camera frame pixels: identity, or for a bbox dataset (whose
    images are crops, possibly resized) the same map `pipeline.data.project.load_labels` applies to
    the labels: frame = (x, y) + crop · (w / crop width, h / crop height)."""
    if labels.bboxes is None:
        return aug.identity(labels.n_views)
    x, y, h, w = labels.bboxes[:, frame].T
    sx = w / np.array([im.shape[1] for im in images], float)
    sy = h / np.array([im.shape[0] for im in images], float)
    zero = np.zeros_like(sx)
    return np.stack([np.stack([sx, zero, x], -1), np.stack([zero, sy, y], -1)], axis=-2)


IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)


IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


# uint8 -> normalised float32 per RGB channel: x·scale + offset (numpy, single-threaded: torch's
# intra-op threads in a loader process only contend with the training loop for the cores)
_SCALE = (1.0 / (255.0 * IMAGENET_STD)).astype(np.float32)[None, :, None, None]


_OFFSET = (-IMAGENET_MEAN / IMAGENET_STD).astype(np.float32)[None, :, None, None]


def rgb_planes(bgr: np.ndarray) -> np.ndarray:
    """uint8 BGR (V, H, W, 3) -> uint8 RGB (V, 3, H, W), contiguous."""
    return np.ascontiguousarray(bgr[..., ::-1].transpose(0, 3, 1, 2))


def normalized_rgb(bgr: np.ndarray) -> np.ndarray:
    """uint8 BGR (V, H, W, 3) -> float32 RGB (V, 3, H, W) normalised with ImageNet mean/std."""
    out = np.ascontiguousarray(bgr[..., ::-1].transpose(0, 3, 1, 2)).astype(np.float32)
    out *= _SCALE
    out += _OFFSET
    return out


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB (..., 3, H, W) -> float32 normalised with ImageNet mean/std."""
    import torch

    mean = torch.as_tensor(IMAGENET_MEAN, device=images.device).view(3, 1, 1)
    std = torch.as_tensor(IMAGENET_STD, device=images.device).view(3, 1, 1)
    return images.float().div_(255.0).sub_(mean).div_(std)
