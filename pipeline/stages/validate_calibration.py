"""Stage `validate_calibration`: catch broken, mis-ordered or inconsistent cameras early.

For every calibration file the labelled frames use: structural checks (done on load by
`pipeline.io.calibration_toml.read_calibration`, plus principal point, identical cameras, baselines
and image sizes here), then the labels are triangulated and each camera's reprojection error is
measured with the camera in and left out. Writes a summary JSON (with the `warnings`: a principal
point outside the image, a camera without labels), a per-camera CSV and a PNG; a fatal problem
exits 2 with a message naming the file and camera, and writes nothing
(`pipeline.data.calibration_check`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.core.atomic import atomic_paths, write_json
from pipeline.core.cli import StageParser, add_dataset_args, setup_logging
from pipeline.core.errors import run_main
from pipeline.core.views import check_min_views
from pipeline.data.calibration_check import validate
from pipeline.data.project import load_dataset
from pipeline.evaluation.plots import plot_errors

log = logging.getLogger("parallax.validate_calibration")


def build_parser() -> argparse.ArgumentParser:
    parser = StageParser(prog="python -m pipeline.stages.validate_calibration",
                         description=__doc__.splitlines()[0])
    add_dataset_args(parser)
    parser.add_argument("--max-median-reproj-px", type=float, default=15.0,
                        help="calibration.max_median_reproj_px")
    parser.add_argument("--min-views", type=int, default=2, help="triangulation.min_views")
    parser.add_argument("--summary", type=Path, required=True, help="output summary.json")
    parser.add_argument("--table", type=Path, required=True, help="output per_camera.csv")
    parser.add_argument("--plot", type=Path, required=True, help="output PNG")
    return parser


def _body(argv: Sequence[str] | None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging()
    check_min_views(args.min_views, args.view_names)
    labels = load_dataset(args)
    summary, table, arrays = validate(labels, args.max_median_reproj_px, args.min_views)
    with atomic_paths(args.table, args.plot, args.summary) as (table_tmp, plot_tmp, summary_tmp):
        table.to_csv(table_tmp, index=False)
        plot_errors(plot_tmp, arrays, args.max_median_reproj_px)
        write_json(summary_tmp, summary)
    log.info("calibration valid: %s", {k: v["all_view_median_px"]
                                       for k, v in summary["calibrations"].items()})


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(_body, argv)


if __name__ == "__main__":
    sys.exit(main())
