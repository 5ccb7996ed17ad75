"""Torch Dataset over an HDF5 augmentation cache, with per-view photometric augmentation.

The file is checked when the Dataset is made (format, config hash) and the small arrays (keypoints,
cameras, names) are read once; the images are read one sample (= one HDF5 chunk) at a time through
a handle opened lazily in each process, so DataLoader workers (fork or spawn) never share an HDF5
handle; the chunk's bytes are checked and inflated by `pipeline.data.cache.chunks` (libdeflate when
installed), not by HDF5's filter pipeline. For speed use `normalize=False` and normalise the uint8
batch on the device (`normalize_images`): float32 items cost about as much again as reading and
augmenting the sample (bench/RESULTS.md). Items (a DataLoader batch adds a leading B):

  images            float32 (V, 3, H, W)  RGB, ImageNet mean/std normalised (after the
                                          photometric augmentation); uint8 0..255 RGB with
                                          `normalize=False` (then call `normalize_images` per
                                          batch, e.g. on the GPU)
  keypoints_2d      float32 (V, K, 2)     model pixels, 0 where missing: clicks, and for
                                          hidden keypoints the projection of their 3D point
  keypoints_valid   bool    (V, K)        clicked (label_source 1)
  hidden_valid      bool    (V, K)        not clicked in this view, target = projection of the
                                          triangulated point (label_source 2)
  visible           int8    (V, K)        LP 0/1/2 where given, else 2 where labelled, 0 missing
  keypoints_3d      float32 (K, 3)        world units (augmented pose), 0 where missing
  keypoints_3d_valid bool   (K,)
  frame_from_model  float32 (V, 2, 3)     p_frame = A[:, :2] @ p_model + A[:, 2]; for an
                                          augmented sample the camera frame in which
                                          keypoints_3d projects onto keypoints_2d
  intrinsics (V, 3, 3), extrinsics (V, 3, 4) [R|t], distortions (V, 8) float32,
  fisheye (V,) bool, has_calibration bool (identity cameras when False), index int64 (row in
  the file)
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.core.errors import ParallaxError
from pipeline.data.cache.chunks import ChunkError, ChunkReader
from pipeline.data.cache.format import decode_strings, open_checked, read_dataset
from pipeline.data.images import normalized_rgb, rgb_planes
from pipeline.data.photometric import PhotometricConfig, photometric

#: the items that say which targets count; all zero = a sample that contributes nothing to any
#: loss or metric (padding of a data-parallel batch, pipeline/training/distributed.py)
MASK_KEYS = ("keypoints_valid", "hidden_valid", "visible", "keypoints_3d_valid",
             "has_calibration")

METADATA = ("keypoints_2d", "visible", "label_source", "keypoints_3d", "frame_from_model",
            "calibration_index",
            "frame_index", "copy", "fit_residual_px", "cam_intrinsics", "cam_extrinsics",
            "cam_distortions", "cam_fisheye")


class CacheDataset(Dataset):
    """Samples of one cache file.

    expected_config_hash: refuse a cache built with another config (see
        `pipeline.core.hashing.config_hash`).
    expected_images_hash: refuse a cache built from other labelled images (the first part of
        its `input_hash`, `pipeline.core.hashing.images_digest`; the train rule passes it).
    photometric: None = off (evaluation); else drawn per view from a generator seeded by
        (seed, epoch, row), so an epoch is reproducible whatever the workers and order.
    sets: keep only samples of these sets (e.g. ("val",) from eval.h5); None = all.
    """

    def __init__(self, path: str | Path, *, expected_config_hash: str | None = None,
                 photometric: PhotometricConfig | None = None, seed: int = 0,
                 sets: tuple[str, ...] | None = None, normalize: bool = True,
                 expected_images_hash: str | None = None) -> None:
        self.path = Path(path)
        self.photometric = photometric
        self.seed = seed
        self.normalize = normalize
        self.epoch = 0
        with open_checked(self.path, expected_config_hash) as h5:
            self.view_names = [str(v) for v in h5.attrs["view_names"]]
            self.keypoint_names = [str(k) for k in h5.attrs["keypoint_names"]]
            self.image_size = tuple(int(s) for s in h5.attrs["image_size"])
            self.config_hash = str(h5.attrs["config_hash"])
            check_images_hash(self.path, str(h5.attrs.get("input_hash", "")),
                              expected_images_hash)
            meta = {name: read_dataset(h5, name, self.path) for name in METADATA}
            for name in ("set", "image"):
                meta[name] = decode_strings(read_dataset(h5, name, self.path))
        keep = np.ones(len(meta["set"]), bool) if sets is None else np.isin(
            meta["set"].astype(str), list(sets))
        self.rows = np.flatnonzero(keep)
        self.meta = meta
        self.tensors = item_tensors(meta)
        self._h5: h5py.File | None = None
        self._reader: ChunkReader | None = None
        self._pid = -1

    def __len__(self) -> int:
        return int(self.rows.size)

    def set_epoch(self, epoch: int) -> None:
        """Change the photometric augmentation stream (call once per epoch)."""
        self.epoch = epoch

    def _images(self, row: int) -> np.ndarray:
        if self._h5 is None or self._pid != os.getpid():
            try:
                self._h5 = h5py.File(self.path, "r")
                self._reader = ChunkReader(self._h5["images"])
            except (OSError, KeyError) as err:
                raise ParallaxError(f"{self.path}: cannot open the cache: {err}") from None
            self._pid = os.getpid()
        try:
            return self._reader.read(row)
        except (ChunkError, OSError, RuntimeError, ValueError) as err:
            raise ParallaxError(f"{self.path}: sample {row} is corrupt (checksum or "
                                f"decompression failed): {err}; rerun cache_augmentations"
                                ) from None

    def cameras(self, row: int) -> dict[str, np.ndarray]:
        """The sample's cameras (identity cameras when it has no calibration)."""
        meta, calib = self.meta, int(self.meta["calibration_index"][row])
        views = meta["keypoints_2d"].shape[1]
        if calib >= 0:
            return {key: meta[f"cam_{key}"][calib]
                    for key in ("intrinsics", "extrinsics", "distortions", "fisheye")}
        return {"intrinsics": np.broadcast_to(np.eye(3), (views, 3, 3)),
                "extrinsics": np.broadcast_to(np.eye(3, 4), (views, 3, 4)),
                "distortions": np.zeros((views, 8)), "fisheye": np.zeros(views, bool)}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = int(self.rows[index])
        images = self._images(row)  # (V, H, W, 3) BGR uint8
        if self.photometric is not None:
            rng = np.random.default_rng(np.random.SeedSequence((self.seed, self.epoch, row)))
            images = photometric(images, rng, self.photometric)
        pixels = normalized_rgb(images) if self.normalize else rgb_planes(images)
        item = {name: values[row].clone() for name, values in self.tensors.items()}
        item["images"] = torch.from_numpy(pixels)
        return item

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        # h5py handles do not cross processes: each one opens its own
        state["_h5"], state["_reader"], state["_pid"] = None, None, -1
        return state

    def __del__(self) -> None:
        handle = getattr(self, "_h5", None)
        if handle is not None and self._pid == os.getpid():
            try:
                handle.close()
            except Exception:  # interpreter shutdown: nothing useful to do
                pass


def check_images_hash(path: Path, input_hash: str, expected: str | None) -> None:
    """The cache's input_hash starts with the digest of the images it was built from."""
    found = input_hash.split(".")[0]
    if expected and found != expected:
        raise ParallaxError(f"{path}: built from other images (images digest {found}, the "
                            f"labelled images now give {expected}): an image was replaced or "
                            "edited since; rerun cache_augmentations")


def item_tensors(meta: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Every row's item fields but the images (N, ...), converted once: an item indexes them."""
    kp2d, kp3d = meta["keypoints_2d"], meta["keypoints_3d"]
    source, valid_3d = meta["label_source"], np.isfinite(kp3d).all(-1)
    valid_2d = np.isfinite(kp2d).all(-1)
    calib = meta["calibration_index"].astype(np.int64)
    n, views = kp2d.shape[:2]
    calibrated = calib >= 0
    cams = {"intrinsics": np.broadcast_to(np.eye(3), (n, views, 3, 3)).copy(),
            "extrinsics": np.broadcast_to(np.eye(3, 4), (n, views, 3, 4)).copy(),
            "distortions": np.zeros((n, views, 8)), "fisheye": np.zeros((n, views), bool)}
    for key, values in cams.items():  # identity cameras where a sample has no calibration
        values[calibrated] = meta[f"cam_{key}"][calib[calibrated]]
    fields = {
        "keypoints_2d": np.where(valid_2d[..., None], kp2d, 0.0).astype(np.float32),
        "keypoints_valid": valid_2d & (source == 1),
        "hidden_valid": valid_2d & (source == 2), "visible": meta["visible"].astype(np.int8),
        "keypoints_3d": np.where(valid_3d[..., None], kp3d, 0.0).astype(np.float32),
        "keypoints_3d_valid": valid_3d,
        "frame_from_model": meta["frame_from_model"].astype(np.float32),
        "intrinsics": cams["intrinsics"].astype(np.float32),
        "extrinsics": cams["extrinsics"].astype(np.float32),
        "distortions": cams["distortions"].astype(np.float32),
        "fisheye": cams["fisheye"].astype(bool), "has_calibration": calibrated,
        "index": np.arange(n, dtype=np.int64),
    }
    return {name: torch.from_numpy(np.ascontiguousarray(values))
            for name, values in fields.items()}
