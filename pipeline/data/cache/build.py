"""Build cache samples: per frame and copy, move the pose in 3D, warp and resize every view.

See `pipeline.data.augment3d` for the math and `pipeline.data.cache.format` for the file layout.
Copy 0 of a frame is the original (resize only; labels = the clicks, `keypoints_3d` = the
triangulation). In `train.h5` each frame gets `copies_per_frame` augmented copies when `imgaug_3d`
is on and the frame has a calibration and >= 2 triangulated keypoints; otherwise (and for a copy
whose warp cannot be fitted in some view) only the original is stored, counted per reason in the
log. `eval.h5` holds originals.

Labels of an augmented copy, per view, where the keypoint was labelled in that view: the
projection of the moved 3D point (NaN if it lands behind the camera); a keypoint labelled but
not triangulated (too few views) has no 3D, so its click is mapped through the view's warp.

Hidden keypoints: where a keypoint was NOT clicked in a view but has a triangulated 3D point
(labelled in >= triangulation.min_views other views) in a calibrated frame, its target is the
projection of that 3D point (of the moved point in an augmented copy, so it stays consistent
through the 3D augmentation), stored with `label_source` 2 ("projected"); clicks have 1.
Then frame -> model pixels; a label outside the model image becomes missing (label_source 0,
visible 0), as does a projection behind the camera.

Images: each view goes from the image file to the model image in ONE cv2.warpAffine with the
composed affine resize ∘ warp ∘ (crop -> frame, for bbox datasets) (bilinear, border filled with
the image's mean colour).
When that shrinks the image, a Gaussian pre-blur with σ = sqrt(f² − 1)/2 source pixels along
each frame axis (f = shrink factor along it) removes aliasing; the kernel is symmetric, so it
moves no feature's centre.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from tqdm import tqdm

from pipeline.core.atomic import atomic_path
from pipeline.data import augment3d as aug
from pipeline.data.cache.format import (
    FORMAT_VERSION,
    LIBVER,
    PER_SAMPLE,
    camera_tables,
    create_images,
    write_metadata,
)
from pipeline.data.images import frame_from_image, model_boxes, read_image, warp_image
from pipeline.data.paths import relative_path
from pipeline.data.project import MultiviewLabels, frame_keys
from pipeline.geometry.cameras import CameraGroup

log = logging.getLogger(__name__)

NOT_AUGMENTED = {  # reason keys -> log wording
    "off": "3D augmentation off",
    "no_calibration": "no calibration",
    "few_3d": "fewer than 2 triangulated keypoints",
    "unfittable": "copy dropped: a view's warp could not be fitted",
}


@dataclass(frozen=True)
class CacheSpec:
    image_size: tuple[int, int]  # (height, width) of the model input
    augment: aug.AugmentConfig = field(default_factory=aug.AugmentConfig)
    imgaug_3d: bool = True
    seed: int = 0
    image_compression: str = "gzip"  # gzip | none (see `pipeline.data.cache.format`)


@dataclass
class BuildStats:
    samples: int = 0
    not_augmented: dict[str, int] = field(default_factory=dict)
    residuals: list[np.ndarray] = field(default_factory=list)  # per augmented sample, (V,)

    def skip(self, reason: str) -> None:
        self.not_augmented[reason] = self.not_augmented.get(reason, 0) + 1

    def residual_summary(self) -> tuple[float, float, float]:
        """(median, p95, max) of the per-view fit residuals in model px (NaN if none)."""
        if not self.residuals:
            return (float("nan"),) * 3
        values = np.concatenate(self.residuals)
        return (float(np.median(values)), float(np.percentile(values, 95)),
                float(np.max(values)))


@dataclass(frozen=True)
class Planned:
    frame: int
    copy: int
    augmentation: aug.FrameAugmentation | None  # None for copy 0


def plan(labels: MultiviewLabels, points_3d: np.ndarray, frames: np.ndarray,
         groups: dict[str, CameraGroup], spec: CacheSpec, augment: bool,
         stats: BuildStats) -> list[Planned]:
    """The samples to build, in frame order: each frame's original, then its copies."""
    samples = []
    for frame in map(int, frames):
        samples.append(Planned(frame, 0, None))
        if not augment:
            continue
        calibration = labels.calibration_files[frame]
        if not spec.imgaug_3d or spec.augment.copies_per_frame == 0:
            stats.skip("off")
            continue
        if calibration == "":
            stats.skip("no_calibration")
            continue
        if np.isfinite(points_3d[frame]).all(-1).sum() < 2:
            stats.skip("few_3d")
            continue
        for copy in range(1, spec.augment.copies_per_frame + 1):
            params = aug.sample_params(spec.seed, frame, copy, spec.augment)
            moved = aug.augment_frame(points_3d[frame], groups[calibration], params,
                                      spec.augment)
            if moved.fittable:
                samples.append(Planned(frame, copy, moved))
            else:
                stats.skip("unfittable")
    return samples


def projections(group: CameraGroup | None, pose: np.ndarray, n_views: int) -> np.ndarray:
    """(V, K, 2) frame px of `pose` (K, 3) in every camera, NaN behind a camera, for a missing
    3D point or without calibration (group None)."""
    if group is None:
        return np.full((n_views, len(pose), 2), np.nan)
    projected = group.project(pose)
    return np.where(aug.in_front(group, pose)[..., None], projected, np.nan)


def build_sample(labels: MultiviewLabels, points_3d: np.ndarray, item: Planned,
                 images: list[np.ndarray], spec: CacheSpec,
                 group: CameraGroup | None = None) -> dict[str, Any]:
    """One sample's per-sample fields (see `pipeline.data.cache.format`); images: the frame's
    original views; group: the frame's cameras (None = uncalibrated: no projected targets)."""
    frame = item.frame
    resize = aug.model_from_frame(model_boxes(labels, frame, images), spec.image_size)
    clicks = labels.points_2d[:, frame]  # (V, K, 2) frame px
    labelled = np.isfinite(clicks).all(-1)
    pose = points_3d[frame]
    warp = aug.identity(labels.n_views)
    residual = np.zeros(labels.n_views, np.float32)
    params = aug.IDENTITY_PARAMS
    targets = clicks
    moved = item.augmentation
    projected = projections(group, pose, labels.n_views)
    if moved is not None:
        warp, params = moved.warp, moved.params
        has_3d = np.isfinite(pose).all(-1)
        gap = aug.apply_affine(resize, aug.apply_affine(warp, moved.before)) - \
            aug.apply_affine(resize, moved.after)
        gap = np.where(moved.fit_points[..., None], gap, 0.0)
        residual = np.linalg.norm(gap, axis=-1).max(axis=1).astype(np.float32)
        targets = np.where(has_3d[None, :, None], moved.after, aug.apply_affine(warp, clicks))
        projected = moved.after
        pose = moved.moved
    hidden = ~labelled & np.isfinite(projected).all(-1)
    targets = np.where(labelled[..., None], targets, projected)
    keypoints = aug.apply_affine(resize, targets)
    keypoints[~aug.inside(keypoints, spec.image_size)] = np.nan
    found = np.isfinite(keypoints).all(-1)
    source = np.where(found & labelled, 1, np.where(found & hidden, 2, 0)).astype(np.int8)
    if labels.visible is not None:
        visible = np.nan_to_num(labels.visible[:, frame], nan=0.0)
    else:
        visible = labelled * 2.0
    visible = np.where(source == 1, visible, 0).astype(np.int8)
    from_image = frame_from_image(labels, frame, images)
    image_to_model = aug.compose(aug.compose(resize, warp), from_image)
    return {
        "images": np.stack([warp_image(im, m, spec.image_size)
                            for im, m in zip(images, image_to_model, strict=True)]),
        "keypoints_2d": keypoints, "visible": visible, "label_source": source,
        "keypoints_3d": pose,
        "frame_from_model": aug.invert(resize), "warp": warp, "fit_residual_px": residual,
        "frame_index": frame, "copy": item.copy, "scale": params.scale,
        "shift": params.shift, "rotation_deg": params.rotation_deg,
    }


def build_cache(path: Path, labels: MultiviewLabels, points_3d: np.ndarray, sets: np.ndarray,
                frames: np.ndarray, groups: dict[str, CameraGroup], spec: CacheSpec, *,
                kind: str, config_hash: str, input_hash: str) -> BuildStats:
    """Write the cache of `frames` (augmented when kind == "train") to `path`, atomically."""
    stats = BuildStats()
    planned = plan(labels, points_3d, frames, groups, spec, kind == "train", stats)
    calib_index = {name: i for i, name in enumerate(groups)}
    keys = np.asarray(frame_keys(labels), dtype=object)
    samples: dict[str, list] = {}
    strings: dict[str, list] = {"image": [], "source_paths": [], "set": []}
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w", track_order=False, libver=LIBVER) as h5:
            images = create_images(h5, len(planned), labels.n_views, spec.image_size,
                                   spec.image_compression)
            current: tuple[int, list[np.ndarray]] | None = None
            for index, item in enumerate(tqdm(planned, desc=f"cache {kind}", disable=None)):
                if current is None or current[0] != item.frame:
                    current = (item.frame, [read_image(labels.data_dir / p)
                                            for p in labels.image_paths[:, item.frame]])
                calibration = labels.calibration_files[item.frame]
                sample = build_sample(labels, points_3d, item, current[1], spec,
                                      groups.get(calibration))
                images[index] = sample.pop("images")
                sample["calibration_index"] = calib_index.get(calibration, -1)
                for name, value in sample.items():
                    samples.setdefault(name, []).append(value)
                strings["image"].append(keys[item.frame])
                strings["source_paths"].append(list(labels.image_paths[:, item.frame]))
                strings["set"].append(sets[item.frame])
                if item.copy > 0:
                    stats.residuals.append(sample["fit_residual_px"])
            if not planned:
                samples = empty_metadata(labels.n_views, labels.n_keypoints)
                strings["source_paths"] = np.zeros((0, labels.n_views), dtype=object)
            write_metadata(h5, samples, strings, camera_tables(groups),
                           [relative_path(name, labels.data_dir) for name in groups])
            median, p95, _ = stats.residual_summary()
            attrs = {
                "format_version": FORMAT_VERSION, "kind": kind, "config_hash": config_hash,
                "input_hash": input_hash, "view_names": list(labels.view_names),
                "keypoint_names": list(labels.keypoint_names),
                "image_size": list(spec.image_size), "residual_median_px": median,
                "residual_p95_px": p95,
                "not_augmented": json.dumps(stats.not_augmented, sort_keys=True),
            }
            for name, value in attrs.items():
                h5.attrs[name] = value
        stats.samples = len(planned)
    return stats


def empty_metadata(views: int, keypoints: int) -> dict[str, np.ndarray]:
    """Zero-length per-sample arrays (a cache with no frames, e.g. val_prob 0 and no test)."""
    shapes = {"keypoints_2d": (views, keypoints, 2), "visible": (views, keypoints),
              "label_source": (views, keypoints),
              "keypoints_3d": (keypoints, 3), "frame_from_model": (views, 2, 3),
              "warp": (views, 2, 3), "fit_residual_px": (views,), "shift": (3,)}
    return {name: np.zeros((0, *shapes.get(name, ())), dtype)
            for name, dtype in PER_SAMPLE.items() if name != "images"}
