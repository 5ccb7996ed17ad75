"""Model inference core: load a trained checkpoint, prepare frames, predict (3D:
`pipeline.inference.consensus`).

Used by the stages `predict_labeled` and `predict_video`. The chain from a camera frame to a
prediction in that frame is exactly the one the cache uses for its evaluation samples:

  frame (H_v, W_v, 3) BGR uint8
    --prepare_views-->   model image (H, W, 3): `augment3d.model_from_frame` of the LP bbox
                         (or the whole frame) + `pipeline.data.images.warp_image`
                         (anti-alias blur when shrinking, one bilinear warpAffine);
                         `frame_from_model` (2, 3) its inverse
    --predict-->         heatmaps -> keypoints in model pixels -> `frame_from_model` -> frame px

Decoding and confidence (`decoding.decode_heatmaps`): the keypoint is the local soft-argmax, i.e.
the expectation of the softmaxed heatmap over the 5×5 cells around its arg-max (robust to a
second mode elsewhere in the map, unlike the whole-map expectation the training loss uses), and
the confidence is the heatmap mass inside that window, in [0, 1]: 1 when the model puts all its
probability near one point, about 25/(h·w) for a flat (clueless) map. This is LP's "likelihood"
up to the upsampling LP applies first.

View dropout: `blank_views` replaces those views' normalised input by 0 (the ImageNet mean),
exactly what patch masking does to masked patches during training.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.core.device import pick_device
from pipeline.core.errors import ParallaxError
from pipeline.data import augment3d as aug
from pipeline.data.images import full_frame_boxes, normalize_images, warp_image
from pipeline.models.decoding import decode_heatmaps
from pipeline.models.model import MODEL_CLASSES

log = logging.getLogger(__name__)

CHECKPOINT_KEYS = ("model", "init_args", "model_type", "view_names", "keypoint_names")
#: half-width (heatmap cells) of the window used for the local soft-argmax and the confidence
DECODE_RADIUS = 2


@dataclass
class LoadedModel:
    """A trained model ready for inference (eval mode, on `device`)."""

    model: torch.nn.Module
    device: torch.device
    view_names: list[str]
    keypoint_names: list[str]
    image_size: tuple[int, int]  # model input (H, W)
    model_type: str
    name: str


def _read_checkpoint(path: Path) -> dict[str, Any]:
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # our own trainer's pickles; retry without the safe loader
            if "weights_only" not in str(err) and "Unsupported global" not in str(err):
                raise
            state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ParallaxError(f"{path}: cannot read the checkpoint (corrupt or not a "
                            f"torch file): {err}") from None
    if not isinstance(state, dict):
        raise ParallaxError(f"{path}: not a Parallax checkpoint (no state dict)")
    missing = [key for key in CHECKPOINT_KEYS if key not in state]
    if missing:
        raise ParallaxError(f"{path}: not a Parallax training checkpoint: missing "
                            f"{missing} (written by `python -m pipeline.stages.train`?)")
    return state


def load_model(checkpoint: Path, device: str = "auto", *,
               view_names: Sequence[str] | None = None,
               keypoint_names: Sequence[str] | None = None) -> LoadedModel:
    """The model in a `best.pt` / `last.pt` written by `pipeline.training.trainer.Trainer.save`.

    With `view_names` / `keypoint_names`, the checkpoint's must equal them (same order), else a
    ParallaxError names the file and both lists. The model's name is its folder's name
    (`results/models/<name>/best.pt`).
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise ParallaxError(f"{checkpoint}: checkpoint not found")
    state = _read_checkpoint(checkpoint)
    views, keypoints = list(state["view_names"]), list(state["keypoint_names"])
    for what, ours, wanted in (("view names", views, view_names),
                               ("keypoint names", keypoints, keypoint_names)):
        if wanted is not None and list(wanted) != ours:
            raise ParallaxError(f"{checkpoint}: the model was trained with {what} {ours}, but "
                                f"the dataset has {list(wanted)} (same names in the same order "
                                "needed)")
    model_type = state["model_type"]
    if model_type not in MODEL_CLASSES:
        raise ParallaxError(f"{checkpoint}: unknown model_type {model_type!r}")
    init_args = dict(state["init_args"] or {})
    try:
        model = MODEL_CLASSES[model_type](**init_args, pretrained=False)
        model.load_state_dict(state["model"])
    except (TypeError, RuntimeError, KeyError) as err:
        raise ParallaxError(f"{checkpoint}: the weights do not fit the recorded architecture "
                            f"{init_args}: {err}") from None
    if model.num_views != len(views) or model.num_keypoints != len(keypoints):
        raise ParallaxError(f"{checkpoint}: the model has {model.num_views} views and "
                            f"{model.num_keypoints} keypoints but lists {len(views)} views and "
                            f"{len(keypoints)} keypoint names")
    torch_device = pick_device(device)
    model.to(torch_device).eval()
    return LoadedModel(model=model, device=torch_device, view_names=views,
                       keypoint_names=keypoints, image_size=tuple(model.img_size),
                       model_type=model_type, name=checkpoint.parent.name)


def prepare_views(images: Sequence[np.ndarray], boxes: np.ndarray | None,
                  size: tuple[int, int],
                  image_to_frame: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """V BGR uint8 images -> model images (V, H, W, 3) uint8 and frame_from_model (V, 2, 3).

    boxes: (V, 4) LP bbox x, y, h, w in frame pixels (the part of the frame the model sees),
    or None for the whole frame. image_to_frame: optional (V, 2, 3) map from the given images'
    pixels to camera frame pixels, for datasets whose stored images are bbox crops
    (`pipeline.data.images.frame_from_image`); None = the images are the frames.
    The resize is the cache's (eval samples), so the model sees what it saw at validation.
    """
    n_views = len(images)
    if image_to_frame is None:
        image_to_frame = aug.identity(n_views)
    if boxes is None:
        if not np.allclose(image_to_frame, aug.identity(n_views)):
            raise ValueError("boxes are required when image_to_frame is not the identity")
        boxes = full_frame_boxes(images)
    boxes = np.asarray(boxes, float)
    if boxes.shape != (n_views, 4):
        raise ValueError(f"boxes must be ({n_views}, 4), got {boxes.shape}")
    model_from_frame = aug.model_from_frame(boxes, size)  # (V, 2, 3)
    to_model = aug.compose(model_from_frame, image_to_frame)
    out = np.stack([warp_image(im, m, size) for im, m in zip(images, to_model, strict=True)])
    return out, aug.invert(model_from_frame)


def _normalised(loaded: LoadedModel, images: np.ndarray, blank: np.ndarray) -> torch.Tensor:
    """(b, V, H, W, 3) uint8 BGR -> (b, V, 3, H, W) float normalised; blank (b, V) views -> 0."""
    rgb = torch.from_numpy(np.ascontiguousarray(images[..., ::-1])).to(loaded.device)
    pixels = normalize_images(rgb.permute(0, 1, 4, 2, 3))
    keep = torch.from_numpy(~blank).to(loaded.device)
    return pixels * keep[:, :, None, None, None].to(pixels.dtype)


def predict(loaded: LoadedModel, images: np.ndarray, frame_from_model: np.ndarray,
            blank_views: Sequence[int] = (), *, blank_mask: np.ndarray | None = None,
            batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Keypoints (B, V, K, 2) in frame pixels and confidence (B, V, K) in [0, 1].

    images: (B, V, H, W, 3) uint8 BGR at the model's input size; frame_from_model: (B, V, 2, 3)
    or (V, 2, 3) for all samples. blank_views: view indices blanked in every sample;
    blank_mask: optional (B, V) bool, per-sample blanking (combined with blank_views).
    batch_size: samples per forward pass (default: all B at once).
    """
    images = np.asarray(images)
    b, v = images.shape[:2]
    if images.ndim != 5 or images.dtype != np.uint8 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 (B, V, H, W, 3), got {images.dtype} "
                         f"{images.shape}")
    if v != len(loaded.view_names) or tuple(images.shape[2:4]) != tuple(loaded.image_size):
        raise ValueError(f"images {images.shape[1:4]} do not match the model's "
                         f"{len(loaded.view_names)} views of {loaded.image_size}")
    frame_from_model = np.broadcast_to(np.asarray(frame_from_model, float), (b, v, 2, 3))
    blank = np.zeros((b, v), bool) if blank_mask is None else np.array(blank_mask, bool)
    blank[:, list(blank_views)] = True
    model = loaded.model
    step = b if not batch_size else int(batch_size)
    xy, conf = [], []
    with torch.inference_mode():
        for start in range(0, b, max(step, 1)):
            chunk = slice(start, start + step)
            out = model(_normalised(loaded, images[chunk], blank[chunk]))
            keypoints, confidence = decode_heatmaps(out["heatmaps"], model.stride,
                                                    DECODE_RADIUS)
            xy.append(keypoints.float().cpu().numpy())
            conf.append(confidence.float().cpu().numpy())
    k = len(loaded.keypoint_names)
    model_px = np.concatenate(xy).astype(float) if xy else np.zeros((0, v, k, 2))
    confidence = np.concatenate(conf).astype(float) if conf else np.zeros((0, v, k))
    return aug.apply_affine(frame_from_model, model_px), np.clip(confidence, 0.0, 1.0)


__all__ = ["LoadedModel", "load_model", "predict", "prepare_views"]
