"""Labelled videos: keypoints and a skeleton painted onto batches of frames, vectorized.

Painting is plain numpy fancy indexing on the whole batch (b, H, W, 3) at once: every dot is a
filled disc of pixel offsets around the rounded keypoint, every skeleton edge a run of sampled
points (one per pixel of the longest edge in the batch), thickened by a small square of offsets.
Points that are not finite, below the confidence threshold or outside the frame are not drawn
(edges need both ends drawn).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from pipeline.errors import ParallaxError

log = logging.getLogger("parallax.video_draw")

EDGE_COLOUR = (230, 230, 230)  # BGR


def parse_skeleton(pairs: Sequence[str], keypoint_names: Sequence[str]) -> np.ndarray:
    """`["Nose-Head", "Head-Neck"]` -> (E, 2) keypoint indices; names may contain '-'."""
    index = {name: k for k, name in enumerate(keypoint_names)}
    edges = []
    for pair in pairs:
        splits = [(pair[:i], pair[i + 1:]) for i, c in enumerate(pair) if c == "-"]
        found = [(index[a], index[b]) for a, b in splits if a in index and b in index]
        if len(found) != 1:
            why = "is ambiguous" if found else "does not name two keypoints"
            raise ParallaxError(f"skeleton edge '{pair}' {why} (write <keypoint>-<keypoint>; "
                                f"keypoints: {list(keypoint_names)})")
        edges.append(found[0])
    return np.array(edges, int).reshape(-1, 2)


def keypoint_colours(n: int) -> np.ndarray:
    """(n, 3) uint8 BGR colours, hues evenly spread."""
    hsv = np.stack([np.arange(n) * 180 // max(n, 1), np.full(n, 255), np.full(n, 255)], -1)
    return cv2.cvtColor(hsv.astype(np.uint8)[None], cv2.COLOR_HSV2BGR)[0]


def _disc(radius: int) -> np.ndarray:
    """(D, 2) integer (dx, dy) offsets of a filled disc."""
    r = np.arange(-radius, radius + 1)
    dx, dy = np.meshgrid(r, r)
    keep = dx**2 + dy**2 <= radius**2 + radius
    return np.stack([dx[keep], dy[keep]], -1)


def _paint(frames: np.ndarray, xy: np.ndarray, valid: np.ndarray, colour: np.ndarray) -> None:
    """frames (b, H, W, 3) in place; xy (b, ..., 2) float px, valid (b, ...), colour (..., 3)."""
    b, h, w = frames.shape[:3]
    ix = np.rint(np.nan_to_num(xy[..., 0], nan=-1.0)).astype(np.int64)
    iy = np.rint(np.nan_to_num(xy[..., 1], nan=-1.0)).astype(np.int64)
    ok = valid & (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
    frame = np.broadcast_to(np.arange(b).reshape((b,) + (1,) * (ix.ndim - 1)), ix.shape)
    colours = np.broadcast_to(colour, ix.shape + (3,))
    frames[frame[ok], iy[ok], ix[ok]] = colours[ok]


def draw_keypoints(frames: np.ndarray, points: np.ndarray, confidence: np.ndarray,
                   edges: np.ndarray, min_confidence: float = 0.0,
                   radius: int | None = None) -> np.ndarray:
    """Paint keypoints and skeleton edges onto frames (b, H, W, 3) BGR uint8, in place.

    points: (b, K, 2) frame px; confidence: (b, K); edges: (E, 2) keypoint indices.
    """
    b, h, w = frames.shape[:3]
    k = points.shape[1]
    radius = radius if radius is not None else max(2, round(min(h, w) / 160))
    with np.errstate(invalid="ignore"):
        shown = np.isfinite(points).all(-1) & (confidence >= min_confidence)  # (b, K)
    if len(edges):
        start, end = points[:, edges[:, 0]], points[:, edges[:, 1]]  # (b, E, 2)
        both = shown[:, edges[:, 0]] & shown[:, edges[:, 1]]
        lengths = np.linalg.norm(np.where(both[..., None], end - start, 0.0), axis=-1)
        steps = int(min(np.ceil(lengths.max(initial=0.0)), 4 * max(h, w))) + 1
        t = np.linspace(0.0, 1.0, steps)[None, None, :, None]
        line = start[:, :, None] + t * (end - start)[:, :, None]  # (b, E, T, 2)
        thick = _disc(max(radius // 3, 0))  # (D, 2)
        xy = line[:, :, :, None] + thick  # (b, E, T, D, 2)
        _paint(frames, xy, both[:, :, None, None], np.array(EDGE_COLOUR, np.uint8))
    disc = _disc(radius)
    xy = points[:, :, None] + disc  # (b, K, D, 2)
    _paint(frames, xy, shown[:, :, None], keypoint_colours(k)[:, None])
    return frames


class LabeledVideoWriter:
    """One labelled video per view; `write(frames, points, confidence)` per batch."""

    def __init__(self, paths: Sequence[Path], sizes: Sequence[tuple[int, int]], fps: float,
                 edges: np.ndarray, min_confidence: float = 0.0) -> None:
        self.edges, self.min_confidence = edges, min_confidence
        self.writers: list[cv2.VideoWriter] = []
        fourcc = cv2.VideoWriter_fourcc(*"mp4v")
        for path, (width, height) in zip(paths, sizes, strict=True):
            writer = cv2.VideoWriter(str(path), fourcc, fps if fps > 0 else 30.0,
                                     (width, height))
            if not writer.isOpened():
                self.close()
                raise ParallaxError(f"{path}: OpenCV cannot write an mp4 (mp4v) video here; "
                                    "run without --labeled-video")
            self.writers.append(writer)

    def write(self, frames: Sequence[np.ndarray], points: np.ndarray,
              confidence: np.ndarray) -> None:
        """frames: V arrays (b, H, W, 3), painted in place; points (b, V, K, 2); conf (b, V, K)."""
        for v, (writer, batch) in enumerate(zip(self.writers, frames, strict=True)):
            draw_keypoints(batch, points[:, v], confidence[:, v], self.edges,
                           self.min_confidence)
            for frame in batch:  # the encoder API takes one frame at a time
                writer.write(frame)

    def close(self) -> None:
        for writer in self.writers:
            writer.release()
        self.writers = []
