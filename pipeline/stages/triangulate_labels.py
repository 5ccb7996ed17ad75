"""Stage `triangulate_labels`: ground-truth 3D of every labelled frame, with label outliers.

Writes an anipose pose-3d-like CSV (one row per frame; per keypoint x, y, z, error, ncams), a
CSV of labels whose reprojection error exceeds a threshold (worst first) and a summary JSON
with median reprojection error per view and per keypoint. A keypoint labelled in fewer than
`min_views` views keeps empty 3D; such cases are counted, never dropped silently. Labels outside
their image are counted with an example CSV line (log and summary.json); those further out than
one image size are left out of the 3D.
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
from pipeline.data.project import load_dataset
from pipeline.data.triangulate import (
    load_calibrations,
    outliers_table,
    points_table,
    summarize,
    triangulate_labels,
)

log = logging.getLogger("parallax.triangulate_labels")


def build_parser() -> argparse.ArgumentParser:
    parser = StageParser(prog="python -m pipeline.stages.triangulate_labels",
                         description=__doc__.splitlines()[0])
    add_dataset_args(parser)
    parser.add_argument("--min-views", type=int, default=2, help="triangulation.min_views")
    parser.add_argument("--outlier-threshold-px", type=float, default=10.0,
                        help="triangulation.outlier_threshold_px")
    parser.add_argument("--points", type=Path, required=True, help="output labels_3d.csv")
    parser.add_argument("--outliers", type=Path, required=True, help="output outliers.csv")
    parser.add_argument("--summary", type=Path, required=True, help="output summary.json")
    return parser


def _body(argv: Sequence[str] | None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging()
    check_min_views(args.min_views, args.view_names)
    labels = load_dataset(args)
    tri = triangulate_labels(labels, load_calibrations(labels), min_views=args.min_views)
    outliers = outliers_table(labels, tri, args.outlier_threshold_px)
    summary = summarize(labels, tri, args.min_views, len(outliers), args.outlier_threshold_px)
    log.info(
        "%d frames, %d keypoints triangulated, %d labelled in too few views (no 3D), "
        "%d without calibration, %d outliers > %g px; median reprojection %.3f px",
        summary["frames"], summary["triangulated"], summary["too_few_views"],
        summary["no_calibration"], summary["outliers"], args.outlier_threshold_px,
        float("nan") if summary["median_reprojection_px"] is None
        else summary["median_reprojection_px"],
    )
    outside = summary["labels_outside_image"]
    if outside["count"]:
        log.warning("%d labels lie outside their image (%d further out than one image size, "
                    "left out of the 3D), e.g. %s", outside["count"], outside["left_out_of_3d"],
                    outside["example"])
    with atomic_paths(args.points, args.outliers, args.summary) as (points, out, summ):
        points_table(labels, tri).to_csv(points, index=False)
        outliers.to_csv(out, index=False)
        write_json(summ, summary)


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(_body, argv)


if __name__ == "__main__":
    sys.exit(main())
