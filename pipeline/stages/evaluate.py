"""Stage `evaluate`: accuracy of one model's predictions on the labelled frames.

Inputs (explicit paths, see `--help`): the predictions folder of the model (predictions_<view>.csv,
predictions_<view>_pixel_error.csv, predictions_3d.csv, error_3d.csv, view_dropout.csv; formats in
README.md), the dataset, labels_3d.csv (ground-truth 3D), splits.csv and the model's
metrics.csv. Errors are recomputed here from the predictions and the labels (the predict stage's
pixel_error / error_3d files are cross-checked: differences are logged, ours are used).

Definitions (frame pixels; NaN never counted; n = number of finite errors):
  - pixel error: distance between the 2D prediction and the label of a labelled keypoint;
  - PCK@t px and PCK@bbox fraction: see `pipeline.evaluation.metrics`;
  - 3D error: distance between predictions_3d and labels_3d (calibration units);
  - reprojection error (per view): distance between the projection of the predicted 3D point
    into the view (the frame's calibration) and the view's 2D prediction;
  - occluded keypoint: not labelled in a view but triangulated from the others (labels_3d) and
    projecting inside that view's image, in front of the camera; its target is that projection.
    Unlabelled points projecting outside the image are counted in the log and left out.
Rows `all` aggregate over views (3D error: over frames x keypoints) or over keypoints.

Outputs (a fixed list, all or none): metrics.json, per_keypoint.csv, per_view.csv,
occlusion.csv, view_dropout_summary.csv, tables.html (the four tables for the report) and the
PNGs in FIGURES. Figures use the test frames (the validation frames if there are none).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.core.atomic import atomic_paths
from pipeline.core.cli import StageParser, add_dataset_args, setup_logging
from pipeline.core.errors import ParallaxError, run_main
from pipeline.data.project import load_dataset
from pipeline.evaluation import metrics as M
from pipeline.evaluation import plots
from pipeline.evaluation.drawing import parse_skeleton
from pipeline.evaluation.inputs import EvalInputs, load_inputs
from pipeline.evaluation.report_tables import write_html_tables
from pipeline.evaluation.summary import (
    PCK_CURVE_PX,
    Evaluation,
    compute,
    json_ready,
    overlay_inputs,
)

log = logging.getLogger("parallax.evaluate")

TABLES = ("per_keypoint.csv", "per_view.csv", "occlusion.csv", "view_dropout_summary.csv")
FIGURES = ("errors_per_keypoint.png", "errors_per_view.png", "pck.png",
           "training_curves.png", "overlays.png", "skeleton_3d.png", "view_dropout.png")
OUTPUTS = ("metrics.json", *TABLES, "tables.html", *FIGURES)
#: headline numbers also given for the network's raw predictions (prefix raw_ in metrics.json)
RAW_KEYS = ("mean_px", "median_px", "labelled_median_px", "occluded_mean_px",
            "occluded_median_px", "dropped_view_mean_px")


def add_raw_headline(summary: dict, raw: dict) -> None:
    """Put the raw predictions' headline numbers (RAW_KEYS) into each set of `summary` as
    raw_<key>: the report then shows what the 3D consensus added."""
    for name, entry in summary["sets"].items():
        for key in RAW_KEYS:
            entry[f"raw_{key}"] = raw["sets"][name].get(key)


def write_outputs(ev: Evaluation, inp: EvalInputs, out_dir: Path, model_name: str,
                  edges: list[tuple[int, int]], n_overlay: int, n_skeleton: int) -> None:
    """Every file of OUTPUTS, all renamed into place only if all succeed."""
    labels, fig_set = inp.labels, ev.figure_set
    frames = np.flatnonzero(inp.sets == fig_set)
    views = list(labels.view_names)
    ev.summary["model"] = model_name
    with atomic_paths(*(out_dir / name for name in OUTPUTS)) as tmps:
        out = dict(zip(OUTPUTS, tmps, strict=True))
        out["metrics.json"].write_text(json.dumps(json_ready(ev.summary), indent=2,
                                                  sort_keys=True) + "\n")
        tables = dict(zip(TABLES, (ev.per_keypoint, ev.per_view, ev.occlusion, ev.dropout),
                          strict=True))
        for name, table in tables.items():
            table.to_csv(out[name], index=False)
        write_html_tables(out["tables.html"], f"Evaluation of {model_name}",
                          {name.removesuffix(".csv"): t for name, t in tables.items()}, ev.notes)
        plots.error_bars(ev.per_keypoint[ev.per_keypoint["view"] == "all"], "keypoint",
                         out["errors_per_keypoint.png"], f"{model_name}: error per keypoint")
        plots.error_bars(ev.per_view[ev.per_view["keypoint"] == "all"], "view",
                         out["errors_per_view.png"], f"{model_name}: error per view")
        plots.pck_curves(M.pck_curves(ev.errors[:, frames], PCK_CURVE_PX), PCK_CURVE_PX, views,
                         out["pck.png"], f"{model_name}: PCK, {fig_set} frames")
        plots.training_curves(inp.training, out["training_curves.png"])
        images, lab, pred, titles = overlay_inputs(inp, ev.errors, frames, n_overlay)
        plots.overlays(images, lab, pred, views, titles, out["overlays.png"])
        both = (np.isfinite(inp.pred_3d).all(-1) & np.isfinite(inp.gt_3d).all(-1))[frames]
        best = frames[np.argsort(-both.sum(axis=1), kind="stable")][:n_skeleton]
        best = best[both[np.searchsorted(frames, best)].any(axis=1)]
        plots.skeleton_3d(inp.pred_3d[best], inp.gt_3d[best], edges,
                          [f"{labels.image_paths[0, f]}" for f in best], out["skeleton_3d.png"])
        drop = ev.dropout[ev.dropout["set"].isin(["test", "val"])]
        drop = drop[drop["set"] == drop["set"].iloc[0]] if len(drop) else drop
        plots.view_dropout(drop, out["view_dropout.png"], f"{model_name}: view dropout")
    log.info("wrote %d files to %s", len(OUTPUTS), out_dir)


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(_main, argv)


def _main(argv: Sequence[str] | None) -> None:
    parser = StageParser(description=__doc__.split("\n")[0])
    parser.add_argument("--predictions-dir", type=Path, required=True)
    add_dataset_args(parser)
    parser.add_argument("--labels-3d", type=Path, required=True)
    parser.add_argument("--splits", type=Path, required=True)
    parser.add_argument("--metrics-csv", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--model-name", required=True)
    parser.add_argument("--pck-thresholds", type=float, nargs="+", default=[5.0, 10.0, 20.0])
    parser.add_argument("--pck-bbox-fraction", type=float, default=0.1)
    parser.add_argument("--skeleton", nargs="*", default=[],
                        help="data.skeleton: keypoint names, two per edge")
    parser.add_argument("--n-overlay-frames", type=int, default=4)
    parser.add_argument("--n-skeleton-frames", type=int, default=3)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    if not args.pck_bbox_fraction > 0 or any(t < 0 for t in args.pck_thresholds):
        raise ParallaxError("--pck-thresholds must be >= 0 and --pck-bbox-fraction > 0")
    labels = load_dataset(args)
    edges = parse_skeleton(args.skeleton, list(labels.keypoint_names)).tolist()
    inp = load_inputs(labels, args.predictions_dir, args.labels_3d, args.splits,
                      args.metrics_csv)
    ev = compute(inp, args.pck_thresholds, args.pck_bbox_fraction)
    raw = compute(inp.raw(), args.pck_thresholds, args.pck_bbox_fraction)
    add_raw_headline(ev.summary, raw.summary)
    write_outputs(ev, inp, args.out_dir, args.model_name, edges, args.n_overlay_frames,
                  args.n_skeleton_frames)


if __name__ == "__main__":
    sys.exit(main())
