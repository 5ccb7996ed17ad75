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
import h5py
import numpy as np

from pipeline.core.errors import ParallaxError
from pipeline.data.cache.build import NOT_AUGMENTED, BuildStats
from pipeline.data.cache.format import decode_strings

log = logging.getLogger(__name__)

EDGE_COLOUR = (230, 230, 230)  # BGR


def parse_skeleton(names: Sequence[str], keypoint_names: Sequence[str]) -> np.ndarray:
    """Skeleton edges as a flat list of keypoint names, two per edge (`--skeleton a b c d` =
    edges a-b and c-d; data.skeleton flattened) -> (E, 2) keypoint indices."""
    index = {name: k for k, name in enumerate(keypoint_names)}
    if len(names) % 2:
        raise ParallaxError(f"--skeleton needs keypoint names in pairs (data.skeleton), got an "
                            f"odd number: {list(names)}")
    unknown = [name for name in names if name not in index]
    if unknown:
        raise ParallaxError(f"data.skeleton names unknown keypoint(s) {unknown}; keypoints: "
                            f"{list(keypoint_names)}")
    return np.array([index[name] for name in names], int).reshape(-1, 2)


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


def _text(image: np.ndarray, text: str, origin: tuple[int, int], scale: float = 0.4) -> None:
    """White text with a dark outline, readable on any background."""
    x, y = origin
    for dx, dy in ((-1, -1), (-1, 1), (1, -1), (1, 1), (0, 0)):
        colour = (255, 255, 255) if dx == dy == 0 else (0, 0, 0)
        cv2.putText(image, text, (x + dx, y + dy), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, 1,
                    cv2.LINE_AA)


def draw_picture(path: Path, train_h5: Path, stats: BuildStats, max_frames: int = 2,
                 max_copies: int = 2) -> None:
    """PNG grid: rows = a few training frames, each original then its augmented copies;
    columns = views. Clicked labels drawn as dots in keypoint colours, projected targets of
    keypoints hidden in a view as rings; augmented tiles give the view's
    similarity-fit residual; the footer summarises the residuals over the whole cache."""
    with h5py.File(train_h5, "r") as h5:
        copies, frames = h5["copy"][...], h5["frame_index"][...]
        augmented = np.unique(frames[copies > 0])
        if augmented.size:
            chosen = augmented[np.linspace(0, augmented.size - 1, min(max_frames, augmented.size)
                                           ).round().astype(int)]
        else:
            chosen = np.unique(frames)[:max_frames]
        rows = [r for f in np.unique(chosen) for r in np.flatnonzero(frames == f)
                if copies[r] <= max_copies]
        views = [str(v) for v in h5.attrs["view_names"]]
        names = decode_strings(h5["image"][...])
        height, width = (int(s) for s in h5.attrs["image_size"])
        up = max(1, int(round(192 / max(height, width))))
        colours = keypoint_colours(h5["keypoints_2d"].shape[2])
        tiles = []
        for row in rows:
            row_tiles = []
            sources = h5["label_source"][row]
            for view, (image, points) in enumerate(zip(h5["images"][row],
                                                       h5["keypoints_2d"][row], strict=True)):
                image = cv2.resize(image, None, fx=up, fy=up, interpolation=cv2.INTER_NEAREST)
                for k in np.flatnonzero(np.isfinite(points).all(-1)):
                    centre = tuple(int(round(c)) for c in (points[k] + 0.5) * up * 16 - 8)
                    colour = tuple(int(c) for c in colours[k])
                    cv2.circle(image, centre, 3 * 16, (0, 0, 0), 2, cv2.LINE_AA, shift=4)
                    # clicked: filled dot; projected (hidden in this view): ring
                    cv2.circle(image, centre, 3 * 16, colour, -1 if sources[view, k] == 1 else 1,
                               cv2.LINE_AA, shift=4)
                _text(image, views[view], (4, image.shape[0] - 6))
                if copies[row] > 0:
                    _text(image, f"fit residual {h5['fit_residual_px'][row, view]:.2f} px",
                          (4, 28))
                cv2.rectangle(image, (0, 0), (image.shape[1] - 1, image.shape[0] - 1),
                              (40, 40, 40), 1)
                row_tiles.append(image)
            tile = np.hstack(row_tiles)
            if copies[row] == 0:
                label = f"{names[row]}: original"
            else:
                label = (f"copy {copies[row]}: scale {h5['scale'][row]:.2f}, "
                         f"rotation {h5['rotation_deg'][row]:.0f} deg, "
                         f"shift {np.array2string(h5['shift'][row], precision=2)}")
            _text(tile, label, (4, 14))
            tiles.append(tile)
    picture = np.vstack(tiles)
    median, p95, worst = stats.residual_summary()
    lines = [f"similarity-fit residual over {len(stats.residuals)} augmented samples x views "
             f"(model px): median {median:.3f}, p95 {p95:.3f}, max {worst:.3f}",
             "frames stored un-augmented: " + (", ".join(
                 f"{NOT_AUGMENTED[k]}: {v}" for k, v in sorted(stats.not_augmented.items()))
                 or "none")]
    footer = np.zeros((18 * len(lines) + 6, picture.shape[1], 3), np.uint8)
    for i, line in enumerate(lines):
        _text(footer, line, (4, 16 + 18 * i))
    ok, png = cv2.imencode(".png", np.vstack([picture, footer]))
    path.write_bytes(png.tobytes())
