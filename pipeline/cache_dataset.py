"""Torch Dataset over an HDF5 augmentation cache, with per-view photometric augmentation.

The file is opened lazily in each process (so DataLoader workers each get their own handle);
small arrays (keypoints, cameras) are read once. Items are ready for the model:

  images (V, 3, H, W) uint8 RGB: normalise batches with `normalize_images` (cheaper in torch,
    and on the GPU, than per sample in the loader)
  keypoints_2d (V, K, 2) float32 model pixels, 0 where missing; keypoints_valid (V, K) bool
  visible (V, K) int8; keypoints_3d (K, 3) float32, 0 where missing; keypoints_3d_valid (K,)
  frame_from_model (V, 2, 3); intrinsics (V, 3, 3); extrinsics (V, 3, 4); distortions (V, 8)
  fisheye (V,) bool; has_calibration bool; index int
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.cache import open_checked
from pipeline.errors import ParallaxError
from pipeline.photometric import PhotometricConfig, photometric

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB (..., 3, H, W) -> float32 normalised with ImageNet mean/std."""
    mean = torch.as_tensor(IMAGENET_MEAN, device=images.device).view(3, 1, 1)
    std = torch.as_tensor(IMAGENET_STD, device=images.device).view(3, 1, 1)
    return images.float().div_(255.0).sub_(mean).div_(std)


class CacheDataset(Dataset):
    """Samples of one cache file; `photometric` (None = off) is seeded by (seed, epoch, index)."""

    def __init__(self, path: str | Path, *, expected_config_hash: str | None = None,
                 photometric: PhotometricConfig | None = None, seed: int = 0,
                 sets: tuple[str, ...] | None = None) -> None:
        self.path = Path(path)
        self.photometric = photometric
        self.seed = seed
        self.epoch = 0
        with open_checked(self.path, expected_config_hash) as h5:
            try:
                self.view_names = [str(v) for v in h5.attrs["view_names"]]
                self.keypoint_names = [str(k) for k in h5.attrs["keypoint_names"]]
                meta = {name: h5[name][...] for name in (
                    "keypoints_2d", "visible", "keypoints_3d", "frame_from_model",
                    "calibration_index", "cam_intrinsics", "cam_extrinsics", "cam_distortions",
                    "cam_fisheye", "set", "image", "frame_index", "copy")}
            except OSError as err:
                raise ParallaxError(
                    f"{self.path}: corrupt cache (checksum failed): {err}") from None
        keep = np.ones(len(meta["set"]), bool) if sets is None else np.isin(
            meta["set"].astype(str), list(sets))
        self.rows = np.flatnonzero(keep)
        self.meta = meta
        self._h5: h5py.File | None = None
        self._pid = -1

    def __len__(self) -> int:
        return int(self.rows.size)

    def set_epoch(self, epoch: int) -> None:
        """Change the photometric augmentation stream (call once per epoch)."""
        self.epoch = epoch

    def _images(self, row: int) -> np.ndarray:
        if self._h5 is None or self._pid != os.getpid():
            self._h5 = h5py.File(self.path, "r")
            self._pid = os.getpid()
        try:
            return self._h5["images"][row]
        except OSError as err:
            raise ParallaxError(f"{self.path}: sample {row} is corrupt: {err}") from None

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = int(self.rows[index])
        images = self._images(row)  # (V, H, W, 3) BGR uint8
        if self.photometric is not None:
            rng = np.random.default_rng(np.random.SeedSequence((self.seed, self.epoch, row)))
            images = photometric(images, rng, self.photometric)
        rgb = np.ascontiguousarray(images[..., ::-1].transpose(0, 3, 1, 2))
        meta = self.meta
        kp2d = meta["keypoints_2d"][row]
        kp3d = meta["keypoints_3d"][row]
        calib = int(meta["calibration_index"][row])
        views = kp2d.shape[0]
        if calib >= 0:
            cams = {key: meta[f"cam_{key}"][calib] for key in (
                "intrinsics", "extrinsics", "distortions", "fisheye")}
        else:
            cams = {"intrinsics": np.broadcast_to(np.eye(3), (views, 3, 3)),
                    "extrinsics": np.broadcast_to(np.eye(3, 4), (views, 3, 4)),
                    "distortions": np.zeros((views, 8)), "fisheye": np.zeros(views, bool)}
        valid_2d = np.isfinite(kp2d).all(-1)
        valid_3d = np.isfinite(kp3d).all(-1)
        return {
            "images": torch.from_numpy(rgb),
            "keypoints_2d": torch.from_numpy(np.nan_to_num(kp2d).astype(np.float32)),
            "keypoints_valid": torch.from_numpy(valid_2d),
            "visible": torch.from_numpy(meta["visible"][row]),
            "keypoints_3d": torch.from_numpy(np.nan_to_num(kp3d).astype(np.float32)),
            "keypoints_3d_valid": torch.from_numpy(valid_3d),
            "frame_from_model": torch.from_numpy(meta["frame_from_model"][row].astype(np.float32)),
            "intrinsics": torch.from_numpy(np.array(cams["intrinsics"], np.float32)),
            "extrinsics": torch.from_numpy(np.array(cams["extrinsics"], np.float32)),
            "distortions": torch.from_numpy(np.array(cams["distortions"], np.float32)),
            "fisheye": torch.from_numpy(np.array(cams["fisheye"], bool)),
            "has_calibration": torch.tensor(calib >= 0),
            "index": torch.tensor(row),
        }

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_h5"] = None  # h5py handles do not cross process boundaries
        return state
