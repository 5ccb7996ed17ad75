"""Stage `predict_video`: one session's synchronised videos -> 2D per view and 3D predictions.

One job per session: the rule passes that session's videos (one per view, in view order, named
`<session>_<view>.<ext>`), the trained checkpoint and, when the dataset has one, the session's
anipose calibration. Writes into --out-dir (README.md, stage predict_video):

  <session>_<view>.csv          DLC 3-header CSV per view, index = frame number, x, y,
                                likelihood per keypoint in frame pixels (one row per decoded
                                frame): with --calibration the 3D-consistent predictions
                                (`pipeline.inference.consensus`), else the network's output
  <session>_<view>_raw.csv      the network's own output (only with --calibration)
  <session>_3d.csv              anipose pose-3d table of the consensus 3D (only with
                                --calibration)
  <session>_trajectories.png    confidence per view and 3D keypoint traces over time (report)
  <session>_<view>_labeled.mp4  only with --labeled-video: keypoints and --skeleton drawn

All outputs appear together or not at all: a desynchronised set of videos, a video that stops
decoding mid-stream, calibration cameras that do not match the views, ... leave no file behind.
Frames are streamed in batches of --batch-size per view (see `pipeline.io.video`), so memory
does not grow with the video length; only the predictions (V x N x K x 3 floats) are kept.
Without --calibration there is no 3D file (the rule passes one whenever the dataset has it).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from pipeline.core.atomic import atomic_paths
from pipeline.core.cli import StageParser, add_inference_args, setup_logging
from pipeline.core.errors import run_main
from pipeline.evaluation import plots
from pipeline.evaluation.drawing import LabeledVideoWriter, parse_skeleton
from pipeline.geometry.cameras import CameraGroup
from pipeline.inference.consensus import ConsensusSettings, consensus
from pipeline.inference.ensemble import load_ensemble
from pipeline.inference.predictor import LoadedModel
from pipeline.inference.video import (
    VideoPredictions,
    check_calibration,
    check_videos,
    predict_session,
)
from pipeline.io.calibration_toml import read_calibration
from pipeline.io.predictions_csv import write_pose_3d, write_predictions_2d
from pipeline.io.video import check_synchronised

log = logging.getLogger("parallax.predict_video")


def output_paths(out_dir: Path, session: str, view_names: Sequence[str], *, with_3d: bool,
                 labeled: bool, members: Sequence[str] = (),
                 members_dir: Path | None = None) -> dict[str, Path]:
    """Every output of one session, keyed `2d:<view>`, `traces`, `3d`, `raw:<view>`,
    `labeled:<view>` and, for an ensemble with `members_dir`, `member:<member>:<view>`
    (<members_dir>/<member>/<session>_<view>.csv)."""
    paths = {f"2d:{v}": out_dir / f"{session}_{v}.csv" for v in view_names}
    paths["traces"] = out_dir / f"{session}_trajectories.png"
    if with_3d:
        paths["3d"] = out_dir / f"{session}_3d.csv"
        paths.update({f"raw:{v}": out_dir / f"{session}_{v}_raw.csv" for v in view_names})
    if labeled:
        paths.update({f"labeled:{v}": out_dir / f"{session}_{v}_labeled.mp4"
                      for v in view_names})
    if len(members) > 1 and members_dir is not None:
        paths.update({f"member:{m}:{v}": members_dir / m / f"{session}_{v}.csv"
                      for m in members for v in view_names})
    return paths


def write_outputs(paths: dict[str, Path], loaded: LoadedModel, result: VideoPredictions,
                  group: CameraGroup | None, *, settings: ConsensusSettings | None = None,
                  timings: dict[str, float] | None = None, session: str = "") -> None:
    """Write the 2D CSVs (and with a calibration the raw 2D and the 3D CSV) to `paths` (already
    temporary)."""
    timings = timings if timings is not None else result.timings
    index = np.arange(result.n_frames)
    final = result.points
    if group is not None:
        tic = time.perf_counter()
        tri = consensus(result.points, result.confidence, group, result.scale[:, None, None],
                        settings)
        final = tri.final
        timings["triangulate"] = time.perf_counter() - tic
        missing = int((~np.isfinite(tri.points_3d).all(-1)).sum())
        log.info("3D consensus: %d of %d predictions replaced by the reprojection of the other "
                 "views' 3D point; %d of %d frame keypoints without 3D (fewer than 2 views)",
                 int(tri.replaced.sum()), tri.replaced.size, missing,
                 tri.points_3d.shape[0] * tri.points_3d.shape[1])
    tic = time.perf_counter()
    for v, view in enumerate(loaded.view_names):
        write_predictions_2d(paths[f"2d:{view}"], index, loaded.keypoint_names,
                             final[v], result.confidence[v], scorer=loaded.name)
        if group is not None:
            write_predictions_2d(paths[f"raw:{view}"], index, loaded.keypoint_names,
                                 result.points[v], result.confidence[v], scorer=loaded.name,
                                 variance=None if result.variance is None
                                 else result.variance[v])
    members = [key.split(":")[1] for key in paths if key.startswith("member:")]
    for m, member in enumerate(dict.fromkeys(members)):
        for v, view in enumerate(loaded.view_names):
            write_predictions_2d(paths[f"member:{member}:{view}"], index, loaded.keypoint_names,
                                 result.member_points[m, v], result.member_confidence[m, v],
                                 scorer=loaded.name)
    if group is not None:
        write_pose_3d(paths["3d"], loaded.keypoint_names, tri.points_3d, tri.mean_error,
                      tri.n_views, tri.score)
    if "traces" in paths:
        plots.video_traces(result.confidence, tri.points_3d if group is not None else None,
                           loaded.view_names, loaded.keypoint_names, result.fps,
                           paths["traces"], f"{session} ({loaded.name})")
    timings["write"] = time.perf_counter() - tic


def build_parser() -> argparse.ArgumentParser:
    parser = StageParser(prog="python -m pipeline.stages.predict_video",
                         description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, nargs="+", required=True,
                        help="results/models/<model>/best.pt, or every ensemble member's "
                             "results/models/<model>/members/<member>/best.pt")
    parser.add_argument("--videos", type=Path, nargs="+", required=True,
                        help="the session's videos, one per view, in view order")
    parser.add_argument("--members-dir", type=Path, default=None,
                        help="for an ensemble: each member's predictions go to "
                             "<members-dir>/<member>/<session>_<view>.csv")
    parser.add_argument("--view-names", nargs="+", required=True, help="data.view_names")
    parser.add_argument("--session", required=True, help="session name (videos' prefix)")
    parser.add_argument("--calibration", type=Path, default=None,
                        help="the session's anipose calibration.toml (without it: no 3D)")
    parser.add_argument("--out-dir", type=Path, required=True,
                        help="results/models/<model>/videos/")
    add_inference_args(parser, "frame instants per batch")
    parser.add_argument("--labeled-video", action="store_true",
                        help="also write <session>_<view>_labeled.mp4")
    parser.add_argument("--skeleton", nargs="*", default=[],
                        help="data.skeleton: keypoint names, two per edge to draw")
    return parser


def _body(argv: Sequence[str] | None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging()
    settings = ConsensusSettings(args.min_confidence, args.outlier_px, args.min_views)
    torch.set_num_threads(max(1, args.threads))
    cv2.setNumThreads(max(1, args.threads))
    check_videos(args.videos, args.view_names, args.session)
    group = None
    if args.calibration is not None:
        group = read_calibration(args.calibration, args.view_names)
    else:
        log.warning("no --calibration: writing 2D predictions only (no %s_3d.csv)",
                    args.session)
    infos = check_synchronised(args.videos)
    if group is not None:
        check_calibration(group, args.calibration, infos, args.videos)
    ensemble = load_ensemble(args.checkpoint, args.device, view_names=args.view_names)
    loaded = ensemble.first
    edges = parse_skeleton(args.skeleton, loaded.keypoint_names)
    paths = output_paths(args.out_dir, args.session, loaded.view_names,
                         with_3d=group is not None, labeled=args.labeled_video,
                         members=ensemble.names, members_dir=args.members_dir)
    log.info("session %s: %d views x %d frames (%s) at %.2f fps, model %s (%s, %dx%d) on %s",
             args.session, len(infos), infos[0].frame_count,
             ", ".join(f"{i.width}x{i.height}" for i in infos), infos[0].fps, loaded.name,
             loaded.model_type, *loaded.image_size, loaded.device)
    tic = time.perf_counter()
    with atomic_paths(*paths.values()) as tmps:
        tmp = dict(zip(paths, tmps, strict=True))
        labeled = None
        if args.labeled_video:
            labeled = LabeledVideoWriter([tmp[f"labeled:{v}"] for v in loaded.view_names],
                                         [(i.width, i.height) for i in infos], infos[0].fps,
                                         edges, args.min_confidence)
        try:
            result = predict_session(ensemble, args.videos, batch_size=args.batch_size,
                                     infos=infos, labeled=labeled, progress=args.session)
        finally:
            if labeled is not None:
                labeled.close()
        write_outputs(tmp, loaded, result, group, settings=settings, session=args.session)
        if args.members_dir is not None:  # the rule's directory output, even for one model
            args.members_dir.mkdir(parents=True, exist_ok=True)
    elapsed = time.perf_counter() - tic
    log.info("session %s: %d frames x %d views in %.1f s = %.2f frames/s (%s) -> %s",
             args.session, result.n_frames, len(infos), elapsed, result.n_frames / elapsed,
             ", ".join(f"{k} {v:.2f} s" for k, v in result.timings.items()), args.out_dir)


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(_body, argv)


if __name__ == "__main__":
    sys.exit(main())
