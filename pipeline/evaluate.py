"""Stage `evaluate`: accuracy of one model's predictions on the labelled frames.

Inputs (explicit paths, see `--help`): the predictions folder of the model (predictions_<view>.csv,
predictions_<view>_pixel_error.csv, predictions_3d.csv, error_3d.csv, view_dropout.csv; formats in
docs/formats.md), the dataset, labels_3d.csv (ground-truth 3D), splits.csv and the model's
metrics.csv. Errors are recomputed here from the predictions and the labels (the predict stage's
pixel_error / error_3d files are cross-checked: differences are logged, ours are used).

Definitions (frame pixels; NaN never counted; n = number of finite errors):
  - pixel error: distance between the 2D prediction and the label of a labelled keypoint;
  - PCK@t px and PCK@bbox fraction: see `pipeline.metrics`;
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

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from pipeline import metrics as M
from pipeline import plots
from pipeline.cli import add_dataset_args, load_dataset, setup_logging
from pipeline.errors import ParallaxError, run_main
from pipeline.evaluate_inputs import EvalInputs, load_inputs
from pipeline.io_utils import atomic_paths
from pipeline.report_tables import write_html_tables

log = logging.getLogger("parallax.evaluate")

TABLES = ("per_keypoint.csv", "per_view.csv", "occlusion.csv", "view_dropout_summary.csv")
FIGURES = ("errors_per_keypoint.png", "errors_per_view.png", "pck.png",
           "training_curves.png", "overlays.png", "skeleton_3d.png", "view_dropout.png")
OUTPUTS = ("metrics.json", *TABLES, "tables.html", *FIGURES)
PCK_CURVE_PX = np.arange(0, 51)
STAT_COLUMNS = ("error_3d_n", "error_3d_mean", "error_3d_median", "reprojection_n",
                "reprojection_mean_px", "reprojection_median_px")


@dataclass
class Evaluation:
    """Tables, headline numbers and the per-point arrays the figures need."""

    per_keypoint: pd.DataFrame
    per_view: pd.DataFrame
    occlusion: pd.DataFrame
    dropout: pd.DataFrame
    summary: dict
    errors: np.ndarray  # (views, frames, keypoints) pixel error of labelled keypoints
    error_3d: np.ndarray  # (frames, keypoints)
    figure_set: str
    notes: list[str] = field(default_factory=list)


def parse_skeleton(pairs: Sequence[str], keypoints: Sequence[str]) -> list[tuple[int, int]]:
    """`a-b` strings -> keypoint index pairs; the split is the '-' that leaves two known names."""
    edges = []
    for pair in pairs:
        parts = pair.split("-")
        found = [(a, b) for i in range(1, len(parts))
                 if (a := "-".join(parts[:i])) in keypoints and (b := "-".join(parts[i:]))
                 in keypoints]
        if len(found) != 1:
            raise ParallaxError(f"--skeleton '{pair}': expected 'a-b' with two of the keypoints "
                                f"{list(keypoints)}")
        edges.append((keypoints.index(found[0][0]), keypoints.index(found[0][1])))
    return edges


def cross_check(name: str, ours: np.ndarray, theirs: np.ndarray) -> None:
    """Log how many values of the predict stage's table differ from ours (ours are used)."""
    same = (np.isnan(ours) & np.isnan(theirs)) | np.isclose(ours, theirs, rtol=1e-6, atol=1e-3)
    if not same.all():
        diff = np.nan_to_num(np.abs(ours - theirs), nan=np.inf)[~same]
        log.warning("%s: %d of %d values differ from the recomputed ones (max |diff| %.3g); "
                    "using the recomputed values", name, int((~same).sum()), same.size,
                    float(diff.max()))


def _stats(frame: pd.DataFrame, keys: list[str], thresholds, fraction, with_3d: bool,
           first_view: str) -> pd.DataFrame:
    px = M.error_stats(frame, keys, "error", thresholds, fraction)
    px = px.rename(columns={"mean": "mean_px", "median": "median_px"})
    rep = M.error_stats(frame, keys, "reprojection_px", prefix="reprojection_")
    out = px.merge(rep.rename(columns={"reprojection_mean": "reprojection_mean_px",
                                       "reprojection_median": "reprojection_median_px"}),
                   on=keys, how="left")
    if with_3d:  # the 3D error is per (frame, keypoint): count it once, on the first view's rows
        e3 = M.error_stats(frame[frame["view"] == first_view], keys, "error_3d",
                           prefix="error_3d_")
        out = out.merge(e3, on=keys, how="left")
    else:
        out = out.assign(error_3d_n=0, error_3d_mean=np.nan, error_3d_median=np.nan)
    return out


def _ordered(table: pd.DataFrame, views: Sequence[str], keypoints: Sequence[str],
             columns: list[str]) -> pd.DataFrame:
    order = {"set": list(M.SETS), "view": [*views, "all"], "keypoint": [*keypoints, "all"],
             "category": ["labelled", "occluded"]}
    keys = [c for c in order if c in columns]
    table = table.reindex(columns=columns)
    if table.empty:
        return table
    rank = pd.DataFrame({c: table[c].map({v: i for i, v in enumerate(order[c])}) for c in keys})
    return table.iloc[np.lexsort([rank[c].to_numpy() for c in reversed(keys)])] \
        .reset_index(drop=True)


def compute(inp: EvalInputs, thresholds: Sequence[float], fraction: float) -> Evaluation:
    """All tables and headline numbers (see the module docstring)."""
    labels = inp.labels
    views, kps, n_views = list(labels.view_names), list(labels.keypoint_names), labels.n_views
    truth = labels.points_2d
    errors = M.distances(inp.pred_2d, truth)
    cross_check("predictions_<view>_pixel_error.csv", errors, inp.pixel_error_file)
    bbox = np.broadcast_to(fraction * M.bbox_diagonals(truth)[..., None], errors.shape)
    cal = labels.calibration_files
    gt_proj, in_view = M.project_frames(inp.gt_3d, cal, inp.groups, n_views)
    pred_proj, _ = M.project_frames(inp.pred_3d, cal, inp.groups, n_views)
    reproj = M.distances(pred_proj, inp.pred_2d)
    error_3d = M.distances(inp.pred_3d, inp.gt_3d)
    cross_check("error_3d.csv", error_3d, inp.error_3d_file)
    labelled = np.isfinite(truth).all(-1)
    has_gt = np.isfinite(inp.gt_3d).all(-1)[None]
    occluded = ~labelled & has_gt & in_view
    outside = ~labelled & has_gt & ~in_view
    log.info("unlabelled (view, frame, keypoint): %d occluded (triangulated from the other "
             "views, evaluated), %d project outside the image or have no calibration (left "
             "out), %d without ground-truth 3D (left out)", int(occluded.sum()),
             int(outside.sum()), int((~labelled & ~has_gt).sum()))
    category = np.where(labelled, 0, np.where(occluded, 1, -1))
    occ_error = np.where(labelled, errors, np.where(occluded, M.distances(inp.pred_2d, gt_proj),
                                                    np.nan))
    frame = M.long_table({"error": errors, "bbox_threshold": bbox, "reprojection_px": reproj,
                          "error_3d": error_3d, "category": category, "occ_error": occ_error},
                         inp.sets, views, kps)
    frame = frame[frame["set"].notna()]
    pcks = M.pck_columns(thresholds, fraction)
    columns = ["set", "view", "keypoint", "n", "mean_px", "median_px", *pcks, *STAT_COLUMNS]
    first = views[0]
    per_keypoint = _ordered(pd.concat([
        _stats(frame, ["set", "view", "keypoint"], thresholds, fraction, False, first),
        _stats(frame, ["set", "keypoint"], thresholds, fraction, True, first).assign(view="all"),
    ]), views, kps, columns)
    per_view = _ordered(pd.concat([
        _stats(frame, ["set", "view"], thresholds, fraction, False, first).assign(keypoint="all"),
        _stats(frame, ["set"], thresholds, fraction, True, first).assign(view="all",
                                                                         keypoint="all"),
    ]), views, kps, columns)
    occ = frame[frame["category"] >= 0].assign(
        category=lambda t: pd.Categorical.from_codes(t["category"], ["labelled", "occluded"]))
    occ_columns = ["set", "view", "category", "n", "mean_px", "median_px", *pcks]
    occlusion = _ordered(pd.concat([
        M.error_stats(occ, ["set", "view", "category"], "occ_error", thresholds, fraction),
        M.error_stats(occ, ["set", "category"], "occ_error", thresholds, fraction)
        .assign(view="all"),
    ]).rename(columns={"mean": "mean_px", "median": "median_px"}), views, kps, occ_columns)
    dropout = M.dropout_summary(inp.view_dropout)
    present = [s for s in ("test", "val", "train") if (inp.sets == s).any()]
    ev = Evaluation(per_keypoint, per_view, occlusion, dropout, {}, errors, error_3d,
                    present[0] if present else "test")
    if not present or present[0] != "test":
        ev.notes.append(f"no test frames: figures show the {ev.figure_set} frames"
                        if present else "no labelled frames in any set")
    if not inp.groups:
        ev.notes.append("no calibration: no 3D, reprojection or occluded-keypoint errors")
    ev.summary = headline(ev, inp, thresholds, fraction, outside)
    for note in ev.notes:
        log.warning("%s", note)
    return ev


def headline(ev: Evaluation, inp: EvalInputs, thresholds, fraction, outside) -> dict:
    """metrics.json content: per set the `all` row of per_view.csv, the labelled/occluded split
    and the dropped-view error (n-weighted over blanked views)."""
    sets = {}
    for name in M.SETS:
        mask = inp.sets == name
        entry: dict = {"n_frames": int(mask.sum()),
                       "n_outside_image": int(outside[:, mask].sum())}
        row = ev.per_view[(ev.per_view["set"] == name) & (ev.per_view["view"] == "all")]
        for column in ev.per_view.columns[3:]:
            entry[column] = row[column].iloc[0] if len(row) else None
        for category in ("labelled", "occluded"):
            row = ev.occlusion[(ev.occlusion["set"] == name) & (ev.occlusion["view"] == "all")
                               & (ev.occlusion["category"] == category)]
            for column in ("n", "mean_px", "median_px"):
                entry[f"{category}_{column}"] = row[column].iloc[0] if len(row) else None
        drop = ev.dropout[ev.dropout["set"] == name]
        for column in ("blanked_view", "blanked_view_intact", "other_views", "other_views_intact"):
            weights = drop["n_blanked_view" if "blanked" in column else "n_other_views"]
            key = column.replace("blanked_view", "dropped_view")
            entry[f"{key}_mean_px"] = M.weighted_mean(drop[f"mean_px_{column}"], weights) \
                if len(drop) else None
        entry["dropped_view_mean_px_per_view"] = dict(zip(drop["blanked_view"],
                                                          drop["mean_px_blanked_view"],
                                                          strict=True))
        sets[name] = entry
    return {"model": None, "headline_set": ev.figure_set, "pck_thresholds_px": list(thresholds),
            "pck_bbox_fraction": fraction, "sets": sets, "notes": ev.notes}


def json_ready(value):
    """NaN -> None and numpy scalars -> Python, recursively (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def overlay_inputs(inp: EvalInputs, errors: np.ndarray, frames: np.ndarray, n: int):
    """The `n` worst of `frames` (mean pixel error over views and keypoints, descending):
    (images [frame][view] RGB, labels, preds (views, n, keypoints, 2) in image pixels, titles)."""
    order, score = M.worst_frames(errors, frames, n)
    labels = inp.labels
    lab, pred = labels.points_2d[:, order].copy(), inp.pred_2d[:, order].copy()
    images = []
    for i, f in enumerate(order):
        row = []
        for v in range(labels.n_views):
            path = labels.data_dir / str(labels.image_paths[v, f])
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is None:
                log.warning("%s: cannot read image for the overlay", path)
            elif labels.bboxes is not None:  # show crop pixels: invert frame = xy + crop * scale
                x, y, h, w = labels.bboxes[v, f]
                scale = np.array([w / image.shape[1], h / image.shape[0]])
                lab[v, i] = (lab[v, i] - [x, y]) / scale
                pred[v, i] = (pred[v, i] - [x, y]) / scale
            row.append(None if image is None else image[..., ::-1])
        images.append(row)
    titles = [f"{labels.image_paths[0, f]}\nmean {s:.1f} px" for f, s in zip(order, score,
                                                                          strict=True)]
    return images, lab, pred, titles


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
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--predictions-dir", type=Path, required=True)
    add_dataset_args(parser)
    parser.add_argument("--labels-3d", type=Path, required=True)
    parser.add_argument("--splits", type=Path, required=True)
    parser.add_argument("--metrics-csv", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--model-name", required=True)
    parser.add_argument("--pck-thresholds", type=float, nargs="+", default=[5.0, 10.0, 20.0])
    parser.add_argument("--pck-bbox-fraction", type=float, default=0.1)
    parser.add_argument("--skeleton", nargs="*", default=[], help="keypoint pairs a-b")
    parser.add_argument("--n-overlay-frames", type=int, default=4)
    parser.add_argument("--n-skeleton-frames", type=int, default=3)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    if not args.pck_bbox_fraction > 0 or any(t < 0 for t in args.pck_thresholds):
        raise ParallaxError("--pck-thresholds must be >= 0 and --pck-bbox-fraction > 0")
    labels = load_dataset(args)
    edges = parse_skeleton(args.skeleton, list(labels.keypoint_names))
    inp = load_inputs(labels, args.predictions_dir, args.labels_3d, args.splits,
                      args.metrics_csv)
    ev = compute(inp, args.pck_thresholds, args.pck_bbox_fraction)
    write_outputs(ev, inp, args.out_dir, args.model_name, edges, args.n_overlay_frames,
                  args.n_skeleton_frames)


if __name__ == "__main__":
    sys.exit(main())
