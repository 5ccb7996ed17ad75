"""The augmentation cache: samples built once (3D augmentation + warp + resize) into HDF5.

Layout of `train.h5` / `eval.h5` (N samples, V views, K keypoints, model size H×W; flat
datasets, no groups, every one chunked per sample, LZF-compressed, Fletcher-32 checksummed,
written without timestamps so equal inputs give byte-identical files):

  images            uint8   (N, V, H, W, 3)  BGR, warped + resized
  keypoints_2d      float64 (N, V, K, 2)     model pixels, NaN = missing
  visible           int8    (N, V, K)        LP 0/1/2 (2 where labelled without a visible column)
  keypoints_3d      float64 (N, K, 3)        world units (the augmented pose), NaN = missing
  frame_from_model  float64 (N, V, 2, 3)     model pixels -> camera frame pixels
  warp              float64 (N, V, 2, 3)     original frame -> augmented frame (identity if copy 0)
  fit_residual_px   float32 (N, V)           max |S·proj(X) − proj(X')| over keypoints, model px
  calibration_index int32   (N,)             row of the camera tables, −1 = no calibration
  frame_index, copy int32   (N,)             labelled row (labels order) and copy (0 = original)
  scale, shift, rotation_deg                 augmentation parameters
  image             str     (N,)             frame key labeled-data/<session>/<file>
  source_paths      str     (N, V)           each view's source image, relative to data_dir
  set               str     (N,)             train / val / test
  cam_intrinsics (C, V, 3, 3), cam_extrinsics (C, V, 3, 4), cam_distortions (C, V, 8),
  cam_fisheye (C, V) bool, cam_files (C,) str
Attributes: format_version, kind, config_hash, input_hash, view_names, keypoint_names,
image_size (H, W).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.cameras import CameraGroup
from pipeline.errors import ParallaxError

FORMAT_VERSION = 1
PER_SAMPLE = {
    "images": np.uint8, "keypoints_2d": np.float64, "visible": np.int8,
    "keypoints_3d": np.float64, "frame_from_model": np.float64, "warp": np.float64,
    "fit_residual_px": np.float32, "calibration_index": np.int32, "frame_index": np.int32,
    "copy": np.int32, "scale": np.float64, "shift": np.float64, "rotation_deg": np.float64,
}
STRINGS = ("image", "set", "source_paths")


def config_hash(config: dict[str, Any]) -> str:
    """Digest of the config values that shape the cache (canonical JSON)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def files_hash(paths: Iterable[Path], root: Path) -> str:
    """Digest of the files' names (relative to root, else the bare name) and bytes, sorted by
    name so that the result does not depend on where the outputs live."""
    named = {}
    for path in map(Path, paths):
        try:
            name = str(path.absolute().relative_to(root.absolute()))
        except ValueError:
            name = path.name
        named[name] = path
    digest = hashlib.sha256()
    for name in sorted(named):
        digest.update(name.encode() + b"\0" + named[name].read_bytes())
    return digest.hexdigest()[:16]


def camera_tables(groups: dict[str, CameraGroup]) -> dict[str, np.ndarray]:
    """Stacked camera parameters of every calibration, in the order of `groups`."""
    def dist8(cam) -> np.ndarray:
        out = np.zeros(8)
        out[: cam.dist.size] = cam.dist
        return out

    cams = [group.cameras for group in groups.values()]
    return {
        "cam_intrinsics": np.array([[c.matrix for c in g] for g in cams]),
        "cam_extrinsics": np.array([[c.extrinsic for c in g] for g in cams]),
        "cam_distortions": np.array([[dist8(c) for c in g] for g in cams]),
        "cam_fisheye": np.array([[c.fisheye for c in g] for g in cams], dtype=bool),
    }


class CacheWriter:
    """Creates every dataset up front (N known), then fills one sample at a time."""

    def __init__(self, h5: h5py.File, n: int, views: int, keypoints: int,
                 size: tuple[int, int]) -> None:
        height, width = size
        shapes = {
            "images": (views, height, width, 3), "keypoints_2d": (views, keypoints, 2),
            "visible": (views, keypoints), "keypoints_3d": (keypoints, 3),
            "frame_from_model": (views, 2, 3), "warp": (views, 2, 3),
            "fit_residual_px": (views,), "calibration_index": (), "frame_index": (), "copy": (),
            "scale": (), "shift": (3,), "rotation_deg": (),
        }
        self.data = {}
        for name, dtype in PER_SAMPLE.items():
            shape = (n, *shapes[name])
            chunks = (1, *shapes[name]) if name == "images" else None
            self.data[name] = h5.create_dataset(
                name, shape=shape, dtype=dtype, chunks=chunks or (max(1, min(n, 4096)),
                                                                   *shapes[name]),
                compression="lzf", fletcher32=True, track_times=False,
            )
        for name in STRINGS:
            shape = (n, views) if name == "source_paths" else (n,)
            self.data[name] = h5.create_dataset(name, shape=shape, dtype=h5py.string_dtype(),
                                                track_times=False)

    def write(self, index: int, sample: dict[str, Any]) -> None:
        for name, dataset in self.data.items():
            dataset[index] = sample[name]


def write_tables(h5: h5py.File, tables: dict[str, np.ndarray], files: list[str]) -> None:
    for name, values in tables.items():
        h5.create_dataset(name, data=values, track_times=False)
    h5.create_dataset("cam_files", data=np.array(files, dtype=object),
                      dtype=h5py.string_dtype(), track_times=False)


def open_checked(path: str | Path, expected_config_hash: str | None = None) -> h5py.File:
    """Open a cache file read-only after checking its format and (optionally) config hash."""
    path = Path(path)
    try:
        h5 = h5py.File(path, "r")
    except FileNotFoundError:
        raise ParallaxError(f"{path}: cache file not found; run cache_augmentations") from None
    except OSError as err:
        raise ParallaxError(f"{path}: not a readable HDF5 cache (truncated or corrupt?): "
                            f"{err}") from None
    try:
        version = h5.attrs.get("format_version")
        if version != FORMAT_VERSION:
            raise ParallaxError(f"{path}: cache format version {version}, expected "
                                f"{FORMAT_VERSION}; rebuild it")
        missing = [name for name in (*PER_SAMPLE, *STRINGS) if name not in h5]
        if missing:
            raise ParallaxError(f"{path}: cache lacks dataset(s) {missing}; rebuild it")
        if expected_config_hash is not None and h5.attrs["config_hash"] != expected_config_hash:
            raise ParallaxError(
                f"{path}: built with another configuration (config hash "
                f"{h5.attrs['config_hash']}, current {expected_config_hash}); rerun "
                "cache_augmentations"
            )
    except ParallaxError:
        h5.close()
        raise
    except (OSError, KeyError) as err:
        h5.close()
        raise ParallaxError(f"{path}: corrupt cache file: {err}") from None
    return h5


def verify(path: str | Path) -> int:
    """Read every dataset once (checksums verified); return the number of samples."""
    with open_checked(path) as h5:
        try:
            for name in (*PER_SAMPLE, *STRINGS):
                h5[name][...]
        except OSError as err:
            raise ParallaxError(f"{path}: dataset '{name}' fails its checksum: {err}") from None
        return int(h5["images"].shape[0])
