"""The bundled synthetic example: a calibrated multi-view dataset in Lightning Pose's layout.

`generate_example` writes, deterministically from a seed:
  CollectedData_<view>.csv              DLC 3-header labels, rows aligned across views
  labeled-data/<session>_<view>/img%08d.png
  calibrations/<session>.toml           anipose calibration, cameras nudged per session
  videos/<session>_<view>.mp4           optional, `video_frames` frames per session
  ground_truth.npz                      the generator's truth (not an LP file; for tests)
An articulated animal walks in an arena watched by 2-8 distorting cameras; two pillars occlude
it in some views (labels missing there). Each keypoint is drawn as a small Gaussian marker in
its own colour centred exactly on its projection, so image warps can be checked on pixels.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.cli import setup_logging
from pipeline.errors import ParallaxError, run_main
from pipeline.example_scene import BONES, KEYPOINTS, PILLARS, make_cameras, make_session
from pipeline.example_scene import view_names_for as view_names_for
from pipeline.labels_io import write_label_csv

log = logging.getLogger("parallax.example")

MARKER_SIGMA = 1.2
_MARKER_RADIUS = 5
KEYPOINT_COLOURS = np.array([  # BGR, saturated and distinct
    cv2.cvtColor(np.uint8([[[int(180 * i / len(KEYPOINTS)), 255, 255]]]), cv2.COLOR_HSV2BGR)[0, 0]
    for i in range(len(KEYPOINTS))
], dtype=float)


@dataclass(frozen=True)
class ExampleSummary:
    frames: int
    views: tuple[str, ...]
    keypoints: tuple[str, ...]
    missing_fraction: float
    single_view_points: int


def background(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """A smooth noise texture with a faint grid (uint8 BGR, height x width x 3)."""
    width, height = size
    coarse = rng.uniform(60, 140, (height // 16 + 2, width // 16 + 2)).astype(np.float32)
    gray = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    image = gray[..., None] * np.array([0.75, 0.9, 1.0], np.float32)  # a sandy floor (BGR)
    image += rng.normal(0, 5, image.shape).astype(np.float32)
    image[::24] *= 0.85
    image[:, ::24] *= 0.85
    return np.clip(image, 0, 255).astype(np.uint8)


def _draw_pillars(image: np.ndarray, cam, colour: float) -> None:
    angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    for x, y, radius, height in PILLARS:
        ring = np.stack([x + radius * np.cos(angles), y + radius * np.sin(angles)], -1)
        solid = np.concatenate([np.c_[ring, np.zeros(24)], np.c_[ring, np.full(24, height)]])
        hull = cv2.convexHull(cam.project(solid).astype(np.float32)).astype(np.int32)
        cv2.fillConvexPoly(image, hull, (colour, colour * 0.95, colour * 0.9), cv2.LINE_AA)


def _pillar_depth(cam) -> float:
    return float(np.min((cam.R @ np.c_[PILLARS[:, :2], PILLARS[:, 3] / 2].T).T[:, 2]
                        + cam.tvec[2]))


def draw_markers(image: np.ndarray, points: np.ndarray, show: np.ndarray) -> np.ndarray:
    """Alpha-blend a Gaussian dot per shown keypoint at its sub-pixel position (float image)."""
    out = image.astype(np.float32)
    offsets = np.arange(-_MARKER_RADIUS, _MARKER_RADIUS + 1)
    for k in np.flatnonzero(show):
        cx, cy = np.round(points[k]).astype(int)
        xs, ys = cx + offsets, cy + offsets
        alpha = np.exp(-((ys[:, None] - points[k, 1]) ** 2 + (xs[None] - points[k, 0]) ** 2)
                       / (2 * MARKER_SIGMA**2))
        keep_y = (ys >= 0) & (ys < image.shape[0])
        keep_x = (xs >= 0) & (xs < image.shape[1])
        alpha = alpha[keep_y][:, keep_x, None]
        rows, cols = ys[keep_y][:, None], xs[keep_x][None]
        out[rows, cols] = out[rows, cols] * (1 - alpha) + KEYPOINT_COLOURS[k] * alpha
    return out


def render(base: np.ndarray, cam, points_3d: np.ndarray, points_2d: np.ndarray,
           show: np.ndarray) -> np.ndarray:
    """One camera image: background, pillars and body by depth, then keypoint markers."""
    image = base.copy()
    idx = {name: i for i, name in enumerate(KEYPOINTS)}
    depth = (cam.R @ points_3d.T).T[:, 2] + cam.tvec[2]
    focal = cam.matrix[0, 0]
    pillars_in_front = _pillar_depth(cam) < np.median(depth)
    if not pillars_in_front:
        _draw_pillars(image, cam, 200.0)
    order = sorted(BONES, key=lambda bone: -(depth[idx[bone[0]]] + depth[idx[bone[1]]]))
    near, far = depth.min(), depth.max() + 1e-6
    for a, b, thickness in order:
        shade = 150 + 80 * (far - (depth[idx[a]] + depth[idx[b]]) / 2) / (far - near)
        width = max(1, int(round(thickness * focal / depth[idx[a]])))
        p, q = (np.round(points_2d[[idx[a], idx[b]]] * 16).astype(int))
        cv2.line(image, tuple(p), tuple(q), (shade * 0.75, shade * 0.8, shade), width,
                 cv2.LINE_AA, shift=4)
    if pillars_in_front:
        _draw_pillars(image, cam, 200.0)
    return np.clip(np.rint(draw_markers(image, points_2d, show)), 0, 255).astype(np.uint8)


def generate_example(
    out_dir: str | Path,
    *,
    seed: int = 0,
    n_sessions: int = 2,
    frames_per_session: int = 60,
    n_views: int = 4,
    image_size: tuple[int, int] = (320, 256),
    label_noise_px: float = 0.0,
    video_frames: int = 0,
) -> ExampleSummary:
    """Write the synthetic dataset into `out_dir` (replaced atomically); see the module doc."""
    if not 2 <= n_views <= 8:
        raise ParallaxError(f"example views must be between 2 and 8 (3 or more recommended), "
                            f"got {n_views}")
    if n_sessions < 1 or frames_per_session < 1:
        raise ParallaxError("example needs at least 1 session and 1 frame per session")
    if min(image_size) < 32:
        raise ParallaxError(f"example image size {image_size} is too small (min 32 px)")
    out_dir = Path(out_dir)
    views = view_names_for(n_views)
    root = np.random.SeedSequence(seed)
    rng_cams, *rng_sessions = (np.random.default_rng(s) for s in root.spawn(1 + n_sessions))
    base = make_cameras(rng_cams, n_views, image_size)
    tmp = out_dir.parent / f".{out_dir.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        truth = _write_dataset(tmp, views, base, rng_sessions, frames_per_session, label_noise_px,
                               video_frames)
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old{os.getpid()}"
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    labelled = truth["visible"]
    counts = labelled.sum(axis=0)
    summary = ExampleSummary(frames=labelled.shape[1], views=views, keypoints=KEYPOINTS,
                             missing_fraction=float(1 - labelled.mean()),
                             single_view_points=int((counts == 1).sum()))
    log.info("example: %d frames x %d views x %d keypoints, %.1f%% of labels missing, %d "
             "keypoints labelled in a single view -> %s", summary.frames, n_views,
             len(KEYPOINTS), 100 * summary.missing_fraction, summary.single_view_points, out_dir)
    return summary


def _write_dataset(out: Path, views: tuple[str, ...], base, rngs, n_frames: int, noise: float,
                   video_frames: int) -> dict[str, np.ndarray]:
    total = max(n_frames, video_frames)
    index: list[list[str]] = [[] for _ in views]
    parts: dict[str, list[np.ndarray]] = {"points_3d": [], "points_2d": [], "visible": [],
                                          "labels": []}
    sessions: list[str] = []
    for s, rng in enumerate(rngs):
        session = f"session{s}"
        scene = make_session(rng, base, total)
        scene.cameras.dump(out / "calibrations" / f"{session}.toml")
        # a labeller sometimes skips a keypoint: 2% of visible points stay unlabelled
        labelled = scene.visible & (rng.random(scene.visible.shape) > 0.02)
        labels = scene.points_2d + rng.normal(0, noise, scene.points_2d.shape) * (noise > 0)
        backgrounds = [background(rng, cam.size) for cam in scene.cameras.cameras]
        writers = [_video_writer(out / "videos" / f"{session}_{view}.mp4", base.cameras[0].size)
                   for view in views] if video_frames else []
        for f in range(total):
            for v, (view, cam) in enumerate(zip(views, scene.cameras.cameras, strict=True)):
                image = render(backgrounds[v], cam, scene.points_3d[f], scene.points_2d[v, f],
                               scene.visible[v, f])
                if f < n_frames:
                    rel = f"labeled-data/{session}_{view}/img{f:08d}.png"
                    (out / rel).parent.mkdir(parents=True, exist_ok=True)
                    cv2.imwrite(str(out / rel), image)
                    index[v].append(rel)
                if f < video_frames:
                    writers[v].write(image)
        for writer in writers:
            writer.release()
        sessions += [session] * n_frames
        parts["points_3d"].append(scene.points_3d[:n_frames])
        parts["points_2d"].append(scene.points_2d[:, :n_frames])
        parts["visible"].append(labelled[:, :n_frames])
        parts["labels"].append(np.where(labelled[..., None], labels, np.nan)[:, :n_frames])
    labels = np.concatenate(parts["labels"], axis=1)
    for v, view in enumerate(views):
        write_label_csv(out / f"CollectedData_{view}.csv", index[v], KEYPOINTS, labels[v],
                        scorer="parallax-synthetic")
    truth = {
        "points_3d": np.concatenate(parts["points_3d"]),
        "points_2d": np.concatenate(parts["points_2d"], axis=1),
        "visible": np.concatenate(parts["visible"], axis=1),
        "sessions": np.array(sessions), "keypoint_names": np.array(KEYPOINTS),
        "view_names": np.array(views),
    }
    with open(out / "ground_truth.npz", "wb") as handle:
        np.savez(handle, **truth)
    return truth


def _video_writer(path: Path, size: tuple[int, int]) -> cv2.VideoWriter:
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 30.0, size)
    if not writer.isOpened():
        raise ParallaxError(f"{path}: OpenCV cannot write mp4 (mp4v) videos on this machine")
    return writer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.example",
                                     description="Write the synthetic example dataset.")
    parser.add_argument("--out", type=Path, required=True, help="dataset folder (replaced)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sessions", type=int, default=2)
    parser.add_argument("--frames", type=int, default=60, help="labelled frames per session")
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--noise", type=float, default=0.0, help="label noise std (px)")
    parser.add_argument("--video-frames", type=int, default=0, help="video frames per session")
    return parser


def _body(argv: Sequence[str] | None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging()
    generate_example(args.out, seed=args.seed, n_sessions=args.sessions,
                     frames_per_session=args.frames, n_views=args.views,
                     image_size=(args.width, args.height), label_noise_px=args.noise,
                     video_frames=args.video_frames)


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(_body, argv)


if __name__ == "__main__":
    sys.exit(main())
