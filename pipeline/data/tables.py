"""Per-frame tables written by earlier stages (labels_3d.csv, splits.csv), read back and
checked against the dataset's labelled frames."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core.errors import ParallaxError
from pipeline.data.project import MultiviewLabels, frame_keys


def read_frame_table(path: str | Path, keys: Sequence[str], stage: str) -> pd.DataFrame:
    """A per-frame CSV written by `stage` (its `image` column = `frame_keys`), checked to list
    exactly the dataset's labelled frames in order."""
    try:
        table = pd.read_csv(path)
    except (OSError, ValueError) as err:
        raise ParallaxError(f"{path}: cannot read: {err}") from None
    if list(table.get("image", [])) != list(keys):
        raise ParallaxError(f"{path}: its frames differ from the dataset's labelled frames; "
                            f"rerun {stage}")
    return table


def read_points_3d(path: Path, labels: MultiviewLabels) -> np.ndarray:
    """(frames, keypoints, 3) from triangulate_labels' CSV, checked against the dataset."""
    table = read_frame_table(path, frame_keys(labels), "triangulate_labels")
    columns = [f"{k}_{axis}" for k in labels.keypoint_names for axis in "xyz"]
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ParallaxError(f"{path}: missing column(s) {missing[:3]}; rerun triangulate_labels")
    try:
        return table[columns].to_numpy(float).reshape(len(table), labels.n_keypoints, 3)
    except ValueError as err:
        raise ParallaxError(f"{path}: non-numeric 3D coordinates: {err}") from None
