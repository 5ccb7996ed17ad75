"""The bundled synthetic example: a calibrated multi-view dataset in Lightning Pose's layout.

`generate_example` writes, deterministically from a seed:
  CollectedData_<view>.csv              DLC 3-header labels, rows aligned across views
  labeled-data/<session>_<view>/img%08d.png
  calibrations/<session>.toml           anipose calibration, cameras nudged per session
  videos/<session>_<view>.mp4           optional, `video_frames` frames per session
  ground_truth.npz                      the generator's truth (not an LP file; for tests)
An articulated rodent walks in a round arena (300 mm across) watched by 2-8 distorting cameras
(views cam0, cam1, ...); two pillars occlude it in some views. A keypoint behind a pillar or
outside the image is neither drawn nor labelled (empty CSV cells) in that view. Every other
keypoint is drawn as a Gaussian dot in its own colour on a small black disc, centred exactly on
its projection (see `pipeline.example_render`), so image warps can be checked on pixels.
Geometry and motion: `pipeline.example_scene`; rendering: `pipeline.example_render`.

CLI: python -m pipeline.example --out DIR [--seed 0 --sessions 2 --frames 60 --views 4
     --width 320 --height 256 --noise 0.0 --video-frames 0]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.cli import setup_logging
from pipeline.errors import ParallaxError, run_main
from pipeline.example_render import KEYPOINT_COLOURS as KEYPOINT_COLOURS
from pipeline.example_render import MARKER_RADIUS as MARKER_RADIUS
from pipeline.example_render import MARKER_SIGMA as MARKER_SIGMA
from pipeline.example_render import camera_scenes, render, self_occluded
from pipeline.example_scene import KEYPOINTS, make_cameras, make_session
from pipeline.example_scene import view_names_for as view_names_for
from pipeline.labels_io import write_label_csv

log = logging.getLogger("parallax.example")


@dataclass(frozen=True)
class ExampleSummary:
    """What `generate_example` wrote (counts over all sessions' labelled frames)."""

    frames: int
    views: tuple[str, ...]
    keypoints: tuple[str, ...]
    missing_fraction: float  # of (view, frame, keypoint) labels: occluded or outside the image
    occluded_fraction: float  # of labels: hidden by a pillar or the animal's body
    single_view_points: int  # (frame, keypoint) pairs labelled in exactly one view


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
    """Write the synthetic dataset into `out_dir` (replaced atomically); see the module doc.

    image_size is (width, height); label_noise_px is the std of Gaussian noise added to the CSV
    labels only (never to ground_truth.npz or to the drawn markers).
    """
    if not 2 <= n_views <= 8:
        raise ParallaxError(f"example views must be between 2 and 8 (3 or more recommended), "
                            f"got {n_views}")
    if n_sessions < 1 or frames_per_session < 1:
        raise ParallaxError(f"example needs at least 1 session and 1 frame per session, got "
                            f"{n_sessions} sessions of {frames_per_session} frames")
    if min(image_size) < 32:
        raise ParallaxError(f"example image size {image_size} is too small (min 32 px)")
    if not label_noise_px >= 0 or video_frames < 0:
        raise ParallaxError(f"example label noise ({label_noise_px}) and video frames "
                            f"({video_frames}) must be >= 0")
    out_dir = Path(out_dir)
    views = view_names_for(n_views)
    root = np.random.SeedSequence(seed)
    rng_cams, *rng_sessions = (np.random.default_rng(s) for s in root.spawn(1 + n_sessions))
    base = make_cameras(rng_cams, n_views, tuple(image_size))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        truth = _write_dataset(tmp, views, base, rng_sessions, frames_per_session,
                               float(label_noise_px), video_frames)
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old{os.getpid()}"
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    visible, counts = truth["visible"], truth["visible"].sum(axis=0)
    size = np.array(image_size) - 1
    inside = ((truth["points_2d"] >= 0) & (truth["points_2d"] <= size)).all(-1)
    summary = ExampleSummary(frames=visible.shape[1], views=views, keypoints=KEYPOINTS,
                             missing_fraction=float(1 - visible.mean()),
                             occluded_fraction=float((inside & ~visible).mean()),
                             single_view_points=int((counts == 1).sum()))
    log.info("example: %d frames x %d views x %d keypoints; %.1f%% of labels missing (%.1f%% "
             "hidden by a pillar or the body, the rest outside the image); %d frame keypoints "
             "seen by one view only, %d by none -> %s", summary.frames, n_views, len(KEYPOINTS),
             100 * summary.missing_fraction, 100 * summary.occluded_fraction,
             summary.single_view_points, int((counts == 0).sum()), out_dir)
    return summary


def _write_dataset(out: Path, views: tuple[str, ...], base, rngs, n_frames: int, noise: float,
                   video_frames: int) -> dict[str, np.ndarray]:
    """Render every session into `out`; returns the ground truth written to ground_truth.npz."""
    total = max(n_frames, video_frames)
    index: list[list[str]] = [[] for _ in views]
    parts: dict[str, list[np.ndarray]] = {"points_3d": [], "points_2d": [], "visible": [],
                                          "labels": []}
    sessions: list[str] = []
    for s, rng in enumerate(rngs):
        session = f"session{s}"
        scene = make_session(rng, base, total)
        scene.cameras.dump(out / "calibrations" / f"{session}.toml")
        statics = camera_scenes(rng, scene.cameras.cameras)
        centers = np.stack([cam.center for cam in scene.cameras.cameras])
        shown = scene.visible & ~self_occluded(centers, scene.points_3d)
        labels = scene.points_2d[:, :n_frames]
        if noise > 0:
            labels = labels + rng.normal(0, noise, labels.shape)
        videos = [out / "videos" / f"{session}_{view}.mp4" for view in views]
        writers = [_video_writer(path, base.cameras[0].size) for path in videos
                   ] if video_frames else []
        for view in views:
            (out / "labeled-data" / f"{session}_{view}").mkdir(parents=True, exist_ok=True)
        for f in range(total):
            for v, view in enumerate(views):
                image = render(statics[v], scene.points_3d[f], scene.points_2d[v, f],
                               shown[v, f])
                if f < n_frames:
                    rel = f"labeled-data/{session}_{view}/img{f:08d}.png"
                    if not cv2.imwrite(str(out / rel), image):
                        raise ParallaxError(f"{out / rel}: cannot write the image")
                    index[v].append(rel)
                if f < video_frames:
                    writers[v].write(image)
        for writer in writers:
            writer.release()
        for path in videos if video_frames else []:
            _check_video(path, video_frames)
        visible = shown[:, :n_frames]
        sessions += [session] * n_frames
        parts["points_3d"].append(scene.points_3d[:n_frames])
        parts["points_2d"].append(scene.points_2d[:, :n_frames])
        parts["visible"].append(visible)
        parts["labels"].append(np.where(visible[..., None], labels, np.nan))
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
    _save_npz(out / "ground_truth.npz", truth)
    return truth


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez with fixed zip timestamps, so equal arrays give equal bytes on any numpy."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


def _video_writer(path: Path, size: tuple[int, int]) -> cv2.VideoWriter:
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 30.0, size)
    if not writer.isOpened():
        raise ParallaxError(f"{path}: OpenCV cannot write mp4 (mp4v) videos on this machine; "
                            "generate the example with --video-frames 0")
    return writer


def _check_video(path: Path, expected: int) -> None:
    """Read the video back: OpenCV must decode exactly `expected` frames."""
    capture = cv2.VideoCapture(str(path))
    count = 0
    try:
        while capture.grab():
            count += 1
    finally:
        capture.release()
    if count != expected:
        raise ParallaxError(f"{path}: wrote {expected} frames but OpenCV reads back {count}; "
                            "mp4 (mp4v) video is not usable on this machine")


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
