"""Predict a session's synchronised videos (one per view), streamed in batches."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from tqdm import tqdm

from pipeline.core.errors import ParallaxError
from pipeline.core.views import check_view_names
from pipeline.geometry.cameras import CameraGroup
from pipeline.inference.consensus import frame_scale
from pipeline.inference.ensemble import Ensemble, combine, predict_members
from pipeline.inference.predictor import LoadedModel, prepare_views
from pipeline.io.video import VideoInfo, check_synchronised, iter_batches, split_name


class FrameSink(Protocol):
    """Receives every batch as it is predicted (e.g. a labelled-video writer)."""

    def write(self, frames: list[list[np.ndarray]], points: np.ndarray,
              confidence: np.ndarray) -> None: ...


@dataclass
class VideoPredictions:
    """points (V, N, K, 2) frame px and confidence (V, N, K): the members' mean for an
    ensemble; variance (V, N, K, 2) px² across members (None for one model); member_points
    (M, V, N, K, 2), member_confidence (M, V, N, K); scale (V,) frame px per model px; seconds
    spent per step."""

    points: np.ndarray
    confidence: np.ndarray
    fps: float
    scale: np.ndarray
    variance: np.ndarray | None = None
    member_points: np.ndarray | None = None
    member_confidence: np.ndarray | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def n_frames(self) -> int:
        return self.points.shape[1]


def check_videos(videos: Sequence[Path], view_names: Sequence[str], session: str) -> None:
    """Video i must be `<session>_<view i>.<ext>`: views are matched by name, not position
    (the longest view name ending the stem; ambiguous view names are refused)."""
    check_view_names(view_names)
    if len(videos) != len(view_names):
        raise ParallaxError(f"session '{session}': {len(videos)} video(s) for "
                            f"{len(view_names)} views {list(view_names)}")
    for path, view in zip(videos, view_names, strict=True):
        if split_name(Path(path), view_names) != (session, view):
            raise ParallaxError(f"{path}: expected the video of session '{session}' view "
                                f"'{view}', named {session}_{view}.<ext> (videos must be "
                                "given in view order)")


def check_calibration(group: CameraGroup, path: Path, infos: Sequence[VideoInfo],
                      videos: Sequence[Path]) -> None:
    """Each camera's calibrated image size must be its video's frame size."""
    for cam, info, video in zip(group.cameras, infos, videos, strict=True):
        if tuple(cam.size) != (info.width, info.height):
            raise ParallaxError(f"{path}: camera '{cam.name}' is calibrated for "
                                f"{cam.size[0]}x{cam.size[1]} images but {video} is "
                                f"{info.width}x{info.height}")


def predict_session(model: LoadedModel | Ensemble, videos: Sequence[Path], *,
                    batch_size: int = 8,
                    infos: Sequence[VideoInfo] | None = None,
                    labeled: FrameSink | None = None,
                    progress: str = "") -> VideoPredictions:
    """Run the model (every member of an ensemble) over synchronised videos (in the model's
    view order), batch by batch; each frame is decoded once."""
    ensemble = model if isinstance(model, Ensemble) else Ensemble((model,), (model.name,))
    loaded = ensemble.first
    infos = list(infos) if infos is not None else check_synchronised(videos)
    timings = dict.fromkeys(("decode", "prepare", "model", "draw"), 0.0)
    points, confidence = [], []
    scale = np.full(len(loaded.view_names), np.nan)
    batches = iter_batches(videos, batch_size, infos)
    bar = tqdm(total=infos[0].frame_count, unit="frame", desc=progress or None, disable=None,
               leave=False)
    try:
        while True:
            tic = time.perf_counter()
            item = next(batches, None)
            timings["decode"] += time.perf_counter() - tic
            if item is None:
                break
            frames = item[1]
            tic = time.perf_counter()
            # one prepare_views call per frame instant (it warps V views with OpenCV)
            prepared = [prepare_views([view[i] for view in frames], None, loaded.image_size)
                        for i in range(len(frames[0]))]
            images = np.stack([p[0] for p in prepared])  # (b, V, H, W, 3)
            frame_from_model = np.stack([p[1] for p in prepared])  # (b, V, 2, 3)
            scale = frame_scale(frame_from_model[0])  # the same for every frame of a video
            timings["prepare"] += time.perf_counter() - tic
            tic = time.perf_counter()
            member_xy, member_conf = predict_members(ensemble, images, frame_from_model)
            xy, conf, _ = combine(member_xy, member_conf)  # (b, V, K, 2), (b, V, K)
            timings["model"] += time.perf_counter() - tic
            if labeled is not None:
                tic = time.perf_counter()
                labeled.write(frames, xy, conf)
                timings["draw"] += time.perf_counter() - tic
            points.append(member_xy)  # (M, b, V, K, 2)
            confidence.append(member_conf)
            bar.update(len(images))
            del item, frames, prepared  # hold at most one batch of frames
    finally:
        bar.close()
        batches.close()
    m, v, k = len(ensemble), len(loaded.view_names), len(loaded.keypoint_names)
    all_xy = np.concatenate(points, 1) if points else np.zeros((m, 0, v, k, 2))
    all_conf = np.concatenate(confidence, 1) if confidence else np.zeros((m, 0, v, k))
    member_xy, member_conf = all_xy.swapaxes(1, 2), all_conf.swapaxes(1, 2)  # (M, V, N, ...)
    mean, conf, variance = combine(member_xy, member_conf)
    return VideoPredictions(points=mean, confidence=conf, fps=infos[0].fps, scale=scale,
                            variance=variance, member_points=member_xy,
                            member_confidence=member_conf, timings=timings)
