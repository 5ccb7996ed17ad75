"""The torch device a stage runs on."""

from __future__ import annotations

import torch

from pipeline.core.errors import ParallaxError


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ParallaxError("training.device is cuda but no CUDA device is available")
    return torch.device(name)
