"""Write the synthetic example as an LP-layout dataset: label CSVs, images, per-session
calibrations, videos and the exact ground truth (`ground_truth.npz`)."""

from __future__ import annotations

import logging
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.core.errors import ParallaxError
from pipeline.io.calibration_toml import write_calibration
from pipeline.io.labels_csv import write_label_csv
from pipeline.synthetic.render import KEYPOINT_COLOURS as KEYPOINT_COLOURS
from pipeline.synthetic.render import MARKER_RADIUS as MARKER_RADIUS
from pipeline.synthetic.render import MARKER_SIGMA as MARKER_SIGMA
from pipeline.synthetic.render import camera_scenes, render, self_occluded
from pipeline.synthetic.scene import KEYPOINTS, OCCLUSION, Occlusion, make_cameras, make_session
from pipeline.synthetic.scene import view_names_for as view_names_for

log = logging.getLogger(__name__)


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
    occlusion: str = "normal",
) -> ExampleSummary:
    """Write the synthetic dataset into `out_dir` (replaced atomically); see the module doc.

    image_size is (width, height); label_noise_px is the std of Gaussian noise added to the CSV
    labels only (never to ground_truth.npz or to the drawn markers); occlusion: a preset of
    `pipeline.synthetic.scene.OCCLUSION` (normal | heavy: more pillars, more self-occlusion).
    """
    if occlusion not in OCCLUSION:
        raise ParallaxError(f"example.occlusion must be one of {list(OCCLUSION)}, got "
                            f"{occlusion!r}")
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
                               float(label_noise_px), video_frames, OCCLUSION[occlusion])
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
                   video_frames: int, occlusion: Occlusion) -> dict[str, np.ndarray]:
    """Render every session into `out`; returns the ground truth written to ground_truth.npz:
    points_3d (frames, K, 3), points_2d (V, frames, K, 2), visible (V, frames, K) of the
    labelled frames (all sessions, CSV row order), and of every video frame
    video_points_3d (sessions, video_frames, K, 3), video_visible (sessions, V, video_frames, K)
    (video frame f of a session is its labelled frame f while f < frames_per_session)."""
    total = max(n_frames, video_frames)
    hideable = np.isin(KEYPOINTS, occlusion.hideable)
    index: list[list[str]] = [[] for _ in views]
    parts: dict[str, list[np.ndarray]] = {"points_3d": [], "points_2d": [], "visible": [],
                                          "labels": []}
    sessions: list[str] = []
    for s, rng in enumerate(rngs):
        session = f"session{s}"
        scene = make_session(rng, base, total, occlusion.pillars)
        write_calibration(scene.cameras, out / "calibrations" / f"{session}.toml")
        statics = camera_scenes(rng, scene.cameras.cameras, occlusion.pillars)
        centers = np.stack([cam.center for cam in scene.cameras.cameras])
        shown = scene.visible & ~self_occluded(centers, scene.points_3d, occlusion.body_scale,
                                               hideable)
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
        parts.setdefault("video_points_3d", []).append(scene.points_3d[:video_frames])
        parts.setdefault("video_visible", []).append(shown[:, :video_frames])
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
        "video_points_3d": np.stack(parts["video_points_3d"]),
        "video_visible": np.stack(parts["video_visible"]),
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
