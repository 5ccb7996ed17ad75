"""Build cache samples: per frame and copy, move the pose in 3D, warp and resize every view.

See `augment3d` for the math and `cache` for the file layout. Copy 0 of a frame is the original
(resize only). Training frames get `copies_per_frame` augmented copies when 3D augmentation is on
and the frame has a calibration and >= 2 triangulated keypoints; other frames are stored
un-augmented and counted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import h5py
import numpy as np
from tqdm import tqdm

from pipeline import augment3d as aug
from pipeline.cache import FORMAT_VERSION, CacheWriter, camera_tables, write_tables
from pipeline.cameras import CameraGroup
from pipeline.dataset import MultiviewLabels, frame_keys, relative_path
from pipeline.errors import ParallaxError
from pipeline.io_utils import atomic_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheSpec:
    image_size: tuple[int, int]  # (height, width) of the model input
    augment: aug.AugmentConfig = field(default_factory=aug.AugmentConfig)
    imgaug_3d: bool = True
    seed: int = 0


@dataclass
class BuildStats:
    samples: int = 0
    not_augmented: dict[str, int] = field(default_factory=dict)
    residuals: list[np.ndarray] = field(default_factory=list)

    def skip(self, reason: str) -> None:
        self.not_augmented[reason] = self.not_augmented.get(reason, 0) + 1


def read_image(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ParallaxError(f"{path}: cannot read image (missing or corrupt)")
    return image


def warp_image(image: np.ndarray, frame_to_model: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """One interpolation from the frame to the model image; a symmetric Gaussian pre-blur
    against aliasing when shrinking (it moves no feature's centre)."""
    sx, sy = np.linalg.norm(frame_to_model[:, :2], axis=0)
    sigma_x, sigma_y = max(0.0, (1 / sx - 1) / 2), max(0.0, (1 / sy - 1) / 2)
    if sigma_x > 0.1 or sigma_y > 0.1:
        image = cv2.GaussianBlur(image, (0, 0), sigmaX=max(sigma_x, 1e-3),
                                 sigmaY=max(sigma_y, 1e-3))
    fill = tuple(float(c) for c in image.reshape(-1, 3).mean(axis=0))
    return cv2.warpAffine(image, frame_to_model, (size[1], size[0]), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=fill)


def plan(labels: MultiviewLabels, points_3d: np.ndarray, frames: np.ndarray, spec: CacheSpec,
         augment: bool, stats: BuildStats) -> list[tuple[int, int]]:
    """(frame, copy) pairs to build, copy 0 = original."""
    pairs = []
    for frame in frames:
        pairs.append((int(frame), 0))
        if not augment:
            continue
        if not spec.imgaug_3d or spec.augment.copies_per_frame == 0:
            stats.skip("3D augmentation off")
        elif labels.calibration_files[frame] == "":
            stats.skip("no calibration")
        elif np.isfinite(points_3d[frame]).all(-1).sum() < 2:
            stats.skip("fewer than 2 triangulated keypoints")
        else:
            pairs += [(int(frame), c) for c in range(1, spec.augment.copies_per_frame + 1)]
    return pairs


def build_sample(labels: MultiviewLabels, points_3d: np.ndarray, frame: int, copy: int,
                 images: list[np.ndarray], group: CameraGroup | None, spec: CacheSpec
                 ) -> dict[str, Any]:
    """One sample (see `cache` for the fields); images: the frame's original view images."""
    n_views, n_kp = labels.n_views, labels.n_keypoints
    if labels.bboxes is not None:
        boxes = labels.bboxes[:, frame]
    else:
        boxes = np.array([[0, 0, im.shape[0], im.shape[1]] for im in images], float)
    resize = aug.model_from_frame(boxes, spec.image_size)  # (V, 2, 3)
    clicks = labels.points_2d[:, frame]  # (V, K, 2) frame px
    pose = points_3d[frame]
    warp = np.broadcast_to(np.array([[1.0, 0, 0], [0, 1.0, 0]]), (n_views, 2, 3)).copy()
    residual = np.zeros(n_views, np.float32)
    params = aug.AugmentParams(scale=1.0, shift=np.zeros(3), rotation_deg=0.0)
    targets = clicks
    if copy > 0:
        params = aug.sample_params(spec.seed, frame, copy, spec.augment)
        moved = aug.augment_points(pose, params, spec.augment)
        has_3d = np.isfinite(pose).all(-1)
        before, after = group.project(pose), group.project(moved)  # (V, K, 2)
        fit_ok = np.broadcast_to(has_3d, (n_views, n_kp)) & np.isfinite(before).all(-1) & \
            np.isfinite(after).all(-1)
        warp = aug.fit_similarity(before, after, fit_ok)
        mapped = aug.apply_affine(warp, before)
        miss = np.where(fit_ok[..., None], aug.apply_affine(resize, mapped)
                        - aug.apply_affine(resize, after), 0.0)
        residual = np.linalg.norm(miss, axis=-1).max(axis=1).astype(np.float32)
        # labels: projections of the moved pose where it exists, else the warped click
        targets = np.where(has_3d[None, :, None], after, aug.apply_affine(warp, clicks))
        targets = np.where(np.isfinite(clicks), targets, np.nan)
        pose = moved
    frame_to_model = aug.compose(resize, warp)
    keypoints = aug.apply_affine(resize, targets)
    keypoints[~aug.inside(keypoints, spec.image_size)] = np.nan
    if labels.visible is not None:
        visible = np.nan_to_num(labels.visible[:, frame], nan=0.0)
    else:
        visible = np.isfinite(clicks).all(-1) * 2.0
    visible = np.where(np.isfinite(keypoints).all(-1), visible, 0).astype(np.int8)
    return {
        "images": np.stack([warp_image(im, m, spec.image_size)
                            for im, m in zip(images, frame_to_model, strict=True)]),
        "keypoints_2d": keypoints, "visible": visible, "keypoints_3d": pose,
        "frame_from_model": aug.invert(resize), "warp": warp, "fit_residual_px": residual,
        "frame_index": frame, "copy": copy, "scale": params.scale, "shift": params.shift,
        "rotation_deg": params.rotation_deg,
    }


def build_cache(path: Path, labels: MultiviewLabels, points_3d: np.ndarray, sets: np.ndarray,
                frames: np.ndarray, groups: dict[str, CameraGroup], spec: CacheSpec, *,
                kind: str, config_hash: str, input_hash: str) -> BuildStats:
    """Write the cache of `frames` (augmented when kind == "train") to `path`, atomically."""
    stats = BuildStats()
    pairs = plan(labels, points_3d, frames, spec, kind == "train", stats)
    calib_index = {name: i for i, name in enumerate(groups)}
    keys = np.asarray(frame_keys(labels), dtype=object)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        for name, value in (("format_version", FORMAT_VERSION), ("kind", kind),
                            ("config_hash", config_hash), ("input_hash", input_hash),
                            ("view_names", list(labels.view_names)),
                            ("keypoint_names", list(labels.keypoint_names)),
                            ("image_size", list(spec.image_size))):
            h5.attrs[name] = value
        writer = CacheWriter(h5, len(pairs), labels.n_views, labels.n_keypoints, spec.image_size)
        write_tables(h5, camera_tables(groups),
                     [relative_path(name, labels.data_dir) for name in groups])
        cached: tuple[int, list[np.ndarray]] | None = None
        for index, (frame, copy) in enumerate(tqdm(pairs, desc=f"cache {kind}", disable=None)):
            if cached is None or cached[0] != frame:
                cached = (frame, [read_image(labels.data_dir / p)
                                  for p in labels.image_paths[:, frame]])
            calibration = labels.calibration_files[frame]
            sample = build_sample(labels, points_3d, frame, copy, cached[1],
                                  groups.get(calibration), spec)
            sample.update(calibration_index=calib_index.get(calibration, -1),
                          image=keys[frame], set=sets[frame],
                          source_paths=list(labels.image_paths[:, frame]))
            writer.write(index, sample)
            if copy > 0:
                stats.residuals.append(sample["fit_residual_px"])
        stats.samples = len(pairs)
    return stats
