"""Stage `generate_example`: the bundled synthetic example, a calibrated multi-view dataset in
Lightning Pose's layout (`pipeline.synthetic.generate.generate_example`).

It writes, deterministically from a seed:
  CollectedData_<view>.csv              DLC 3-header labels, rows aligned across views
  labeled-data/<session>_<view>/img%08d.png
  calibrations/<session>.toml           anipose calibration, cameras nudged per session
  videos/<session>_<view>.mp4           optional, `video_frames` frames per session
  ground_truth.npz                      the generator's truth (not an LP file; for tests)
An articulated rodent walks in a round arena (300 mm across) watched by 2-8 distorting cameras
(views cam0, cam1, ...); two pillars occlude it in some views. A keypoint behind a pillar or
outside the image is neither drawn nor labelled (empty CSV cells) in that view. Every other
keypoint is drawn as a Gaussian dot in its own colour on a small black disc, centred exactly on
its projection (see `pipeline.synthetic.render`), so image warps can be checked on pixels.
Geometry and motion: `pipeline.synthetic.scene`; rendering: `pipeline.synthetic.render`.

CLI: python -m pipeline.stages.generate_example --out DIR [--seed 0 --sessions 2 --frames 60
     --views 4 --width 320 --height 256 --noise 0.0 --video-frames 0]
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.core.cli import StageParser, setup_logging
from pipeline.core.errors import run_main
from pipeline.synthetic.generate import generate_example
from pipeline.synthetic.scene import OCCLUSION

log = logging.getLogger("parallax.example")


def build_parser() -> argparse.ArgumentParser:
    parser = StageParser(prog="python -m pipeline.stages.generate_example",
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
    parser.add_argument("--occlusion", default="normal", choices=sorted(OCCLUSION),
                        help="occlusion preset (heavy: more pillars and self-occlusion)")
    return parser


def _body(argv: Sequence[str] | None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging()
    generate_example(args.out, seed=args.seed, n_sessions=args.sessions,
                     frames_per_session=args.frames, n_views=args.views,
                     image_size=(args.width, args.height), label_noise_px=args.noise,
                     video_frames=args.video_frames, occlusion=args.occlusion)


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(_body, argv)


if __name__ == "__main__":
    sys.exit(main())
