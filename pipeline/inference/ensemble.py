"""Ensembles: the same variant trained with several seeds (`training.ensemble_seeds`, one
Snakemake job each), predicting together.

Every member predicts the same frames; the ensemble's prediction is the members' mean position
(frame px) and mean confidence, and its uncertainty the members' variance of x and y (px²,
population variance), which the smoother (`pipeline.inference.smoothing`) takes as observation
noise. An ensemble of one is the member itself, with no variance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from pipeline.core.errors import ParallaxError
from pipeline.inference.predictor import LoadedModel, load_model, predict


@dataclass(frozen=True)
class Ensemble:
    """Loaded members sharing views, keypoints and input size; `names` label their files."""

    members: tuple[LoadedModel, ...]
    names: tuple[str, ...]

    @property
    def first(self) -> LoadedModel:
        return self.members[0]

    def __len__(self) -> int:
        return len(self.members)


def model_name(checkpoint: Path) -> str:
    """The variant's name: `results/models/<name>/best.pt`, or for an ensemble member
    `results/models/<name>/members/<member>/best.pt`."""
    checkpoint = Path(checkpoint)
    if checkpoint.parent.parent.name == "members":
        return checkpoint.parent.parent.parent.name
    return checkpoint.parent.name


def load_ensemble(checkpoints: Sequence[Path], device: str = "auto", *,
                  view_names: Sequence[str] | None = None,
                  keypoint_names: Sequence[str] | None = None) -> Ensemble:
    """Load every member; they must agree on views, keypoints and input size."""
    if not checkpoints:
        raise ParallaxError("no checkpoint given")
    members = tuple(load_model(Path(c), device, view_names=view_names,
                               keypoint_names=keypoint_names) for c in checkpoints)
    first = members[0]
    for path, member in zip(checkpoints[1:], members[1:], strict=True):
        if (member.view_names, member.keypoint_names, tuple(member.image_size)) != \
                (first.view_names, first.keypoint_names, tuple(first.image_size)):
            raise ParallaxError(f"{path}: an ensemble member with other views, keypoints or "
                                f"input size than {checkpoints[0]}")
    name = model_name(checkpoints[0])
    members = tuple(replace(m, name=name) for m in members)
    names = tuple(Path(c).parent.name for c in checkpoints)
    return Ensemble(members=members, names=names)


def predict_members(ensemble: Ensemble, images: np.ndarray, frame_from_model: np.ndarray,
                    **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Every member's `predictor.predict`: points (M, B, V, K, 2), confidence (M, B, V, K)."""
    out = [predict(member, images, frame_from_model, **kwargs) for member in ensemble.members]
    return np.stack([o[0] for o in out]), np.stack([o[1] for o in out])


def combine(points: np.ndarray, confidence: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Members' points (M, ..., 2) and confidence (M, ...) -> the ensemble's mean points
    (..., 2), mean confidence (...) and variance (..., 2) px² (None for one member)."""
    if len(points) == 1:
        return points[0], confidence[0], None
    with np.errstate(invalid="ignore"):
        return points.mean(0), confidence.mean(0), points.var(0)
