"""The augmentation cache file format: HDF5 layout, hashes, checked opening.

`train.h5` / `eval.h5` (N samples, V views, K keypoints, model size H×W) are flat: no groups,
every dataset chunked, gzip-compressed (level 4) and Fletcher-32 checksummed (so a flipped byte
anywhere is an error, never wrong data), written in a fixed order without timestamps
(`track_times=False`, no attribute/link creation-order tracking, `libver` pinned), so equal
inputs give byte-identical files. Not LZF: liblzf leaves its hash table uninitialised, so its
output (though always decodable) varies from run to run. Strings are fixed-length UTF-8
(covered by the checksums, unlike variable-length ones).

  images            uint8   (N, V, H, W, 3)  BGR, warped + resized; one sample per chunk
  keypoints_2d      float64 (N, V, K, 2)     model pixels, NaN = missing: the click, or for a
                                             keypoint hidden in the view the projection of its
                                             triangulated 3D point (see label_source)
  visible           int8    (N, V, K)        LP 0/1/2 where the CSV had it, else 2 where
                                             clicked; 0 elsewhere (also once off-image)
  label_source      int8    (N, V, K)        1 = clicked, 2 = projected (not clicked in this
                                             view, triangulated from the others, inside the
                                             image), 0 = no target
  keypoints_3d      float64 (N, K, 3)        world units (the augmented pose), NaN = missing
  frame_from_model  float64 (N, V, 2, 3)     model pixels -> camera frame pixels (crop/resize)
  warp              float64 (N, V, 2, 3)     original frame px -> augmented frame px
                                             (identity for copy 0)
  fit_residual_px   float32 (N, V)           max over keypoints of |S·proj(X) − proj(X')|,
                                             model px (0 for copy 0)
  calibration_index int32   (N,)             row of the cam_* tables, −1 = no calibration
  frame_index       int32   (N,)             row of the labels (CSV row order)
  copy              int32   (N,)             0 = the original, 1.. = augmented copies
  scale, rotation_deg float64 (N,), shift float64 (N, 3)   the augmentation parameters
  image             str     (N,)             frame key labeled-data/<session>/<file>
  source_paths      str     (N, V)           each view's source image, relative to data_dir
  set               str     (N,)             train / val / test
  cam_intrinsics (C, V, 3, 3), cam_extrinsics (C, V, 3, 4) [R|t], cam_distortions (C, V, 8)
  (OpenCV order, zero-padded; fisheye: k1..k4), cam_fisheye (C, V) bool, cam_files (C,) str
Per-sample metadata is chunked in blocks of up to 1024 samples: readers load it whole once,
while images are read one sample (one chunk) at a time. With `augmentation.image_compression:
none` the images are stored uncompressed (still checksummed): about 2-3.5x the disk space, but
gzip inflation is most of the reader's time (bench/RESULTS.md).

Attributes: format_version, kind (train | eval), config_hash, input_hash, view_names,
keypoint_names, image_size (H, W), and for train.h5 the build summary: residual_median_px,
residual_p95_px, not_augmented (JSON: reason -> frames).

`config_hash` is the digest of the `--config-json` the stage got (the rule passes the config
keys listed in `pipeline/data/cache/keys.py` `CACHE_KEYS`); a reader compares it with the hash
of the current config through `open_checked(path, expected_config_hash)`. `input_hash` is
`<images digest>.<other inputs digest>`: `pipeline.core.hashing.images_digest` of the labelled
images, then the label CSVs, calibrations and labels_3d.csv; the trainer compares the first part
with the images it is told of (`--images-hash`) and refuses a cache built from other images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.core.errors import ParallaxError
from pipeline.geometry.cameras import CameraGroup

FORMAT_VERSION = 3
METADATA_CHUNK = 1024
PER_SAMPLE = {  # name -> dtype, in creation order (images first)
    "images": np.uint8, "keypoints_2d": np.float64, "visible": np.int8, "label_source": np.int8,
    "keypoints_3d": np.float64, "frame_from_model": np.float64, "warp": np.float64,
    "fit_residual_px": np.float32, "calibration_index": np.int32, "frame_index": np.int32,
    "copy": np.int32, "scale": np.float64, "shift": np.float64, "rotation_deg": np.float64,
}
STRINGS = ("image", "source_paths", "set")
CAMERAS = ("cam_intrinsics", "cam_extrinsics", "cam_distortions", "cam_fisheye", "cam_files")
FILTERS = {"compression": "gzip", "compression_opts": 4, "fletcher32": True,
           "track_times": False}
IMAGE_COMPRESSION = ("gzip", "none")
LIBVER = ("earliest", "v110")  # object formats pinned: readable by HDF5 >= 1.10, stable bytes


def camera_tables(groups: dict[str, CameraGroup]) -> dict[str, np.ndarray]:
    """Stacked camera parameters of every calibration, in the order of `groups`."""
    def dist8(cam) -> np.ndarray:
        out = np.zeros(8)
        out[: cam.dist.size] = cam.dist
        return out

    cams = [group.cameras for group in groups.values()]
    return {
        "cam_intrinsics": np.array([[c.matrix for c in g] for g in cams], float),
        "cam_extrinsics": np.array([[c.extrinsic for c in g] for g in cams], float),
        "cam_distortions": np.array([[dist8(c) for c in g] for g in cams], float),
        "cam_fisheye": np.array([[c.fisheye for c in g] for g in cams], dtype=bool),
    }


def create_images(h5: h5py.File, n: int, views: int, size: tuple[int, int],
                  compression: str = "gzip") -> h5py.Dataset:
    """The images dataset, one sample per chunk (filled by the caller, sample by sample);
    compression "none" stores them uncompressed (still checksummed)."""
    if compression not in IMAGE_COMPRESSION:
        raise ValueError(f"image compression {compression!r} not in {IMAGE_COMPRESSION}")
    shape = (views, size[0], size[1], 3)
    if n == 0:  # an empty dataset cannot be chunked (nor needs a checksum)
        return h5.create_dataset("images", shape=(0, *shape), dtype=np.uint8,
                                 track_times=False)
    filters = FILTERS if compression == "gzip" else {"fletcher32": True, "track_times": False}
    return h5.create_dataset("images", shape=(n, *shape), dtype=np.uint8,
                             chunks=(1, *shape), **filters)


def write_array(h5: h5py.File, name: str, data: np.ndarray) -> None:
    """A checksummed dataset, chunked along its first axis in blocks of METADATA_CHUNK."""
    data = np.asarray(data)
    if data.size == 0:  # an empty dataset cannot be chunked (nor needs a checksum)
        h5.create_dataset(name, data=data, track_times=False)
        return
    chunks = (min(len(data), METADATA_CHUNK), *data.shape[1:])
    h5.create_dataset(name, data=data, chunks=chunks, **FILTERS)


def encode_strings(values: Any) -> np.ndarray:
    """Strings -> fixed-length UTF-8 bytes (h5py stores `S` arrays as fixed-length strings)."""
    array = np.asarray(values, dtype=object)
    encoded = np.array([str(v).encode() for v in array.ravel()], dtype=object)
    width = max([1, *(len(b) for b in encoded)])
    return encoded.astype(f"S{width}").reshape(array.shape)


def decode_strings(data: np.ndarray) -> np.ndarray:
    """The inverse of `encode_strings`: an object array of str."""
    flat = [b.decode() if isinstance(b, bytes) else str(b) for b in np.asarray(data).ravel()]
    return np.array(flat, dtype=object).reshape(np.shape(data))


def write_metadata(h5: h5py.File, samples: dict[str, list], strings: dict[str, list],
                   cameras: dict[str, np.ndarray], cam_files: list[str]) -> None:
    """Every dataset but the images, in a fixed order."""
    for name in PER_SAMPLE:
        if name != "images":
            write_array(h5, name, np.asarray(samples[name], dtype=PER_SAMPLE[name]))
    for name in STRINGS:
        write_array(h5, name, encode_strings(strings[name]))
    for name, values in cameras.items():
        write_array(h5, name, values)
    write_array(h5, "cam_files", encode_strings(cam_files))


def open_checked(path: str | Path, expected_config_hash: str | None = None) -> h5py.File:
    """Open a cache file read-only after checking its format and (optionally) config hash.

    Raises ParallaxError naming the file when it is missing, not HDF5 (e.g. truncated), of
    another format version, lacks datasets, or was built with another configuration.
    """
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
                                f"{FORMAT_VERSION}; rerun cache_augmentations")
        missing = [name for name in (*PER_SAMPLE, *STRINGS, *CAMERAS) if name not in h5]
        if missing:
            raise ParallaxError(f"{path}: cache lacks dataset(s) {missing}; rerun "
                                "cache_augmentations")
        found = str(h5.attrs["config_hash"])
        if expected_config_hash is not None and found != expected_config_hash:
            raise ParallaxError(
                f"{path}: built with another configuration (config hash {found}, current "
                f"{expected_config_hash}); rerun cache_augmentations"
            )
    except ParallaxError:
        h5.close()
        raise
    except (OSError, KeyError, RuntimeError, ValueError) as err:
        h5.close()
        raise ParallaxError(f"{path}: corrupt cache file: {err}") from None
    return h5


def read_dataset(h5: h5py.File, name: str, path: str | Path) -> np.ndarray:
    """A whole dataset; a checksum or decompression failure becomes a ParallaxError."""
    try:
        return h5[name][...]
    except (OSError, KeyError, RuntimeError, ValueError) as err:
        raise ParallaxError(f"{path}: dataset '{name}' is corrupt (checksum or decompression "
                            f"failed): {err}; rerun cache_augmentations") from None


def verify(path: str | Path, expected_config_hash: str | None = None) -> int:
    """Read every dataset once (checksums verified); return the number of samples."""
    with open_checked(path, expected_config_hash) as h5:
        for name in (*PER_SAMPLE, *STRINGS, *CAMERAS):
            read_dataset(h5, name, path)
        return int(h5["images"].shape[0])
