"""Stage `triangulate_labels`: ground-truth 3D of every labelled frame, with label outliers.

Writes an anipose pose-3d-like CSV (one row per frame; per keypoint x, y, z, error, ncams), a
CSV of labels whose reprojection error exceeds a threshold (worst first) and a summary JSON
with median reprojection error per view and per keypoint. A keypoint labelled in fewer than
`min_views` views keeps empty 3D; such cases are counted, never dropped silently.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.cli import add_dataset_args, load_dataset, setup_logging
from pipeline.dataset import MultiviewLabels, frame_keys, relative_path
from pipeline.errors import run_main
from pipeline.io_utils import atomic_paths, write_json
from pipeline.triangulation import (
    LabelTriangulation,
    load_calibrations,
    triangulate_labels,
    view_counts,
)

log = logging.getLogger("parallax.triangulate_labels")


def points_table(labels: MultiviewLabels, tri: LabelTriangulation) -> pd.DataFrame:
    """One row per frame: image, session, calibration, then per keypoint x, y, z, error, ncams."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices stay NaN
        mean_error = np.nanmean(tri.reproj_error, axis=0)
    columns: dict[str, np.ndarray | list] = {
        "image": frame_keys(labels),
        "session": list(labels.sessions),
        "calibration": [relative_path(p, labels.data_dir) if p else ""
                        for p in labels.calibration_files],
    }
    for k, name in enumerate(labels.keypoint_names):
        for axis, suffix in enumerate("xyz"):
            columns[f"{name}_{suffix}"] = tri.points_3d[:, k, axis]
        columns[f"{name}_error"] = mean_error[:, k]
        columns[f"{name}_ncams"] = tri.n_views[:, k]
    return pd.DataFrame(columns)


def outliers_table(
    labels: MultiviewLabels, tri: LabelTriangulation, threshold: float
) -> pd.DataFrame:
    """Labels reprojecting further than `threshold` px from their 3D point, worst first."""
    view, frame, kp = np.nonzero(np.nan_to_num(tri.reproj_error, nan=-1.0) > threshold)
    keys = np.asarray(frame_keys(labels), dtype=object)
    table = pd.DataFrame(
        {
            "image": keys[frame],
            "view": np.asarray(labels.view_names, dtype=object)[view],
            "keypoint": np.asarray(labels.keypoint_names, dtype=object)[kp],
            "reprojection_px": tri.reproj_error[view, frame, kp],
            "label_x": labels.points_2d[view, frame, kp, 0],
            "label_y": labels.points_2d[view, frame, kp, 1],
            "ncams": tri.n_views[frame, kp],
        }
    )
    return table.sort_values("reprojection_px", ascending=False, kind="stable")


def _median(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(np.median(finite)) if finite.size else None


def summarize(labels: MultiviewLabels, tri: LabelTriangulation, min_views: int,
              n_outliers: int, threshold: float) -> dict:
    """Counts and median reprojection errors per view and per keypoint."""
    counts = view_counts(labels)
    calibrated = tri.calibrated[:, None]
    return {
        "frames": int(labels.n_frames),
        "frames_without_calibration": int((~tri.calibrated).sum()),
        "keypoints": list(labels.keypoint_names),
        "views": list(labels.view_names),
        "labelled_points": int(np.isfinite(labels.points_2d).all(axis=-1).sum()),
        "triangulated": int(np.isfinite(tri.points_3d).all(axis=-1).sum()),
        "too_few_views": int(((counts > 0) & (counts < min_views) & calibrated).sum()),
        "too_few_views_explained": f"keypoints labelled in 1..{min_views - 1} views: no 3D",
        "unlabelled": int((counts == 0).sum()),
        "no_calibration": int(((counts > 0) & ~calibrated).sum()),
        "median_reprojection_px": _median(tri.reproj_error),
        "median_reprojection_px_per_view": {
            view: _median(tri.reproj_error[v]) for v, view in enumerate(labels.view_names)
        },
        "median_reprojection_px_per_keypoint": {
            kp: _median(tri.reproj_error[:, :, k]) for k, kp in enumerate(labels.keypoint_names)
        },
        "outlier_threshold_px": threshold,
        "outliers": n_outliers,
        "units": "calibration units (as in calibration.toml translation)",
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.triangulate_labels",
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
    with atomic_paths(args.points, args.outliers, args.summary) as (points, out, summ):
        points_table(labels, tri).to_csv(points, index=False)
        outliers.to_csv(out, index=False)
        write_json(summ, summary)


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(_body, argv)


if __name__ == "__main__":
    sys.exit(main())
