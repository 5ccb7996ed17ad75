"""Synchronised multi-view video reading: find a session's videos, probe, check, stream.

Naming: one file per session and view, `<session>_<view>.<ext>` (Lightning Pose's convention),
e.g. `session0_back.mp4` or `day_1_cam_A.mp4` (views `cam_A`, `cam_B`). A file is resolved by the
known view names (`pipeline.core.views`: the longest `_<view>` ending the stem), never by
splitting at `_`; view names that make this ambiguous (`a` and `b_a`) are rejected.

Frame counts. The count a container reports (`CAP_PROP_FRAME_COUNT`) is an estimate: it can be
wrong for variable-frame-rate files, damaged indexes or truncated uploads. What we trust is the
number of frames OpenCV actually *decodes*. The container count is only used for a cheap early
check (:func:`check_synchronised`: when the reported counts disagree, every file is counted by
decoding before anything is refused) and for progress bars. :func:`iter_batches` streams every
view in lockstep and checks, when the first view runs out, that every other view ends on the
same frame; a view that stops before the frame count its container reports is reported as
corrupt or truncated at that frame number. Corruption that the decoder silently conceals (a
damaged macroblock decoded as a smeared picture) cannot be detected here.

Memory: :func:`iter_batches` holds one batch of frames per view, never a whole video.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.core.errors import ParallaxError
from pipeline.core.views import check_view_names, split_view

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv")


@dataclass(frozen=True)
class VideoInfo:
    """What a container reports about a video (frame_count may be an estimate; see module doc)."""

    frame_count: int
    fps: float
    width: int
    height: int


def split_name(path: Path, view_names: Sequence[str]) -> tuple[str, str] | None:
    """(session, view) for `<session>_<view>.<ext>`, longest matching view; None if none."""
    return split_view(Path(path).stem, view_names)


def find_sessions(video_dir: str | Path, view_names: Sequence[str],
                  extensions: Sequence[str] = VIDEO_EXTENSIONS) -> dict[str, list[Path]]:
    """Sessions in `video_dir` -> their video paths in `view_names` order.

    Files whose stem matches no view are logged (never silently ignored). A session with a view
    missing, or with two files for one view (`s_top.mp4` and `s_top.avi`), is a ParallaxError.
    """
    video_dir = Path(video_dir)
    check_view_names(view_names)
    if not video_dir.is_dir():
        raise ParallaxError(f"{video_dir}: video folder not found")
    files = sorted(p for p in video_dir.iterdir()
                   if p.is_file() and p.suffix.lower() in extensions)
    found: dict[str, dict[str, list[Path]]] = {}
    unmatched: list[str] = []
    for path in files:
        parts = split_name(path, view_names)
        if parts is None:
            unmatched.append(path.name)
            continue
        found.setdefault(parts[0], {}).setdefault(parts[1], []).append(path)
    if unmatched:
        log.warning("%s: %d video file(s) match no view name %s (expected <session>_<view>"
                    "%s) and are not used: %s", video_dir, len(unmatched), list(view_names),
                    extensions[0], ", ".join(unmatched))
    problems = []
    for session, views in sorted(found.items()):
        missing = [v for v in view_names if v not in views]
        doubled = {v: [p.name for p in paths] for v, paths in views.items() if len(paths) > 1}
        if missing:
            problems.append(f"session '{session}' has no video for view(s) {missing} "
                            f"(has {sorted(views)})")
        if doubled:
            problems.append(f"session '{session}' has several videos for one view: {doubled}")
    if problems:
        raise ParallaxError(f"{video_dir}: " + "; ".join(problems))
    if not found:
        raise ParallaxError(f"{video_dir}: no videos named <session>_<view> for views "
                            f"{list(view_names)} (found {len(files)} video file(s))")
    sessions = {s: [views[v][0] for v in view_names] for s, views in sorted(found.items())}
    log.info("%s: %d session(s) x %d views", video_dir, len(sessions), len(view_names))
    return sessions


@contextmanager
def open_video(path: str | Path) -> Iterator[cv2.VideoCapture]:
    """An opened cv2.VideoCapture, released on exit; ParallaxError if it cannot be opened."""
    path = Path(path)
    if not path.is_file():
        raise ParallaxError(f"{path}: video file not found")
    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            raise ParallaxError(f"{path}: OpenCV cannot open this video (not a video, "
                                "truncated or an unsupported codec)")
        yield capture
    finally:
        capture.release()


def probe(path: str | Path) -> VideoInfo:
    """Container-reported (frame_count, fps, width, height); the first frame must decode.

    A file that cannot be opened or decodes no frame is a ParallaxError naming it. A container
    that reports no frame count (<= 0) gets its frames counted by decoding.
    """
    path = Path(path)
    with open_video(path) as capture:
        count = int(round(capture.get(cv2.CAP_PROP_FRAME_COUNT)))
        fps = float(capture.get(cv2.CAP_PROP_FPS))
        ok, frame = capture.read()
        if not ok or frame is None:
            raise ParallaxError(f"{path}: no frame can be decoded (corrupt, truncated or "
                                "empty video)")
        height, width = frame.shape[:2]
    if count <= 0:
        count = count_frames(path)
    return VideoInfo(frame_count=count, fps=fps, width=int(width), height=int(height))


def count_frames(path: str | Path) -> int:
    """The number of frames OpenCV decodes from `path` (exact, but reads the whole file)."""
    with open_video(path) as capture:
        count = 0
        while capture.grab():
            count += 1
    return count


def check_synchronised(paths: Sequence[str | Path]) -> list[VideoInfo]:
    """Probe every view's video; all must have the same number of frames.

    Reported counts are compared first; only when they disagree is every file counted by
    decoding (containers can lie), and a real difference is one ParallaxError naming every
    file with its count. Returns the infos (frame_count = the agreed count).
    """
    paths = [Path(p) for p in paths]
    infos = [probe(p) for p in paths]
    counts = [info.frame_count for info in infos]
    if len(set(counts)) > 1:
        log.info("container frame counts differ (%s); counting decoded frames",
                 ", ".join(f"{p.name}: {c}" for p, c in zip(paths, counts, strict=True)))
        decoded = [count_frames(p) for p in paths]
        if len(set(decoded)) > 1:
            listing = "; ".join(f"{p}: {d} frames" for p, d in zip(paths, decoded, strict=True))
            raise ParallaxError(f"videos are not synchronised (every view must have the same "
                                f"number of frames): {listing}")
        log.warning("container frame counts (%s) were wrong: every view decodes %d frames",
                    counts, decoded[0])
        infos = [VideoInfo(decoded[0], i.fps, i.width, i.height) for i in infos]
    return infos


def _read_batch(capture: cv2.VideoCapture, out: np.ndarray, path: Path, start: int) -> int:
    """Decode up to len(out) frames into `out` (b, H, W, 3); returns how many were decoded."""
    for i in range(len(out)):  # one decoder call per frame: the codec API is per frame
        ok, frame = capture.read(out[i])
        if not ok or frame is None:
            return i
        if not np.shares_memory(frame, out[i]):  # OpenCV allocated: size or type differ
            if frame.shape != out[i].shape:
                raise ParallaxError(f"{path}: frame {start + i} is {frame.shape[1]}x"
                                    f"{frame.shape[0]}, the first frame was {out.shape[2]}x"
                                    f"{out.shape[1]} (frame size changes mid-stream)")
            out[i] = frame
    return len(out)


def _new_batch(infos: Sequence[VideoInfo], batch_size: int) -> list[np.ndarray]:
    """Frame buffers for one batch: V arrays (batch_size, H_v, W_v, 3) uint8."""
    return [np.empty((batch_size, i.height, i.width, 3), np.uint8) for i in infos]


def iter_batches(paths: Sequence[str | Path], batch_size: int,
                 infos: Sequence[VideoInfo] | None = None,
                 ) -> Iterator[tuple[int, list[np.ndarray]]]:
    """Stream all views in lockstep: yields (start_frame, [V arrays (b, H_v, W_v, 3) BGR uint8]).

    Every batch has `batch_size` frames except the last. Holds one batch per view. When a view
    runs out, every other view must end on the same frame (else a ParallaxError naming every
    file and its decoded count); a view ending before its container's frame count is reported as
    corrupt or truncated at that frame. `infos` (from :func:`check_synchronised`) saves a probe.
    """
    if batch_size < 1:
        raise ParallaxError(f"batch size must be >= 1, got {batch_size}")
    paths = [Path(p) for p in paths]
    infos = list(infos) if infos is not None else [probe(p) for p in paths]
    with ExitStack() as stack:
        captures = [stack.enter_context(open_video(p)) for p in paths]
        start = 0
        while True:
            batch = _new_batch(infos, batch_size)
            got = [_read_batch(c, b, p, start)
                   for c, b, p in zip(captures, batch, paths, strict=True)]
            n = min(got)
            if n < batch_size:
                _check_end(paths, infos, captures, [start + g for g in got])
                if n:
                    yield start, [b[:n] for b in batch]
                return
            yield start, batch
            del batch  # the next batch is allocated only once the consumer let go of this one
            start += n


def _check_end(paths: list[Path], infos: list[VideoInfo], captures: list[cv2.VideoCapture],
               decoded: list[int]) -> None:
    """At the end of the shortest view: all views must end together, at their reported count."""
    total = list(decoded)
    if len(set(total)) > 1:  # count what is left of the longer views for the message
        for v, capture in enumerate(captures):
            if total[v] > min(decoded):
                while capture.grab():
                    total[v] += 1
    problems = []
    for path, info, n in zip(paths, infos, total, strict=True):
        if n < info.frame_count:
            problems.append(f"{path}: decoding failed at frame {n} of the {info.frame_count} "
                            "frames its container reports (corrupt or truncated video)")
    if problems or len(set(total)) > 1:
        listing = "; ".join(f"{p}: {n} frames decoded" for p, n in zip(paths, total,
                                                                         strict=True))
        raise ParallaxError("; ".join(problems) + ("; " if problems else "") +
                            f"videos are not synchronised or not readable to the end: {listing}")
    if total[0] > infos[0].frame_count:
        log.warning("every view decoded %d frames, more than the %d its container reports",
                    total[0], infos[0].frame_count)
