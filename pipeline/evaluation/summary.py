"""Evaluation of one model's predictions: per set x view x keypoint errors, PCK, 3D and
reprojection errors, visible vs occluded keypoints, view dropout, and the headline numbers."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from pipeline.core.errors import ParallaxError
from pipeline.data.images import read_image
from pipeline.evaluation import metrics as M
from pipeline.evaluation.inputs import EvalInputs

log = logging.getLogger(__name__)

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


def _view_stats(frame: pd.DataFrame, unlabelled: list[str], thresholds, fraction: float,
                first: str) -> pd.DataFrame:
    """Per set x view stats against the labels; a view without any label (DeepFly3D has one)
    is measured against the ground-truth 3D projected into it (`occ_error` of its occluded
    entries) instead, marked truth = projected_3d."""
    labelled = _stats(frame, ["set", "view"], thresholds, fraction, False, first)
    labelled = labelled[~labelled["view"].isin(unlabelled)].assign(truth="labels")
    if not unlabelled:
        return labelled
    rows = frame[frame["view"].isin(unlabelled)]
    rows = rows.assign(error=np.where(rows["category"] == 1, rows["occ_error"], np.nan))
    projected = _stats(rows, ["set", "view"], thresholds, fraction, False, first)
    return pd.concat([labelled, projected.assign(truth="projected_3d")])


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
    unlabelled = [views[v] for v in range(n_views) if not labelled[v].any()]
    per_view = _ordered(pd.concat([
        _view_stats(frame, unlabelled, thresholds, fraction, first).assign(keypoint="all"),
        _stats(frame, ["set"], thresholds, fraction, True, first).assign(view="all",
                                                                         keypoint="all",
                                                                         truth="labels"),
    ]), views, kps, [*columns, "truth"])
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
    if unlabelled:
        ev.notes.append(f"view(s) {unlabelled} have no labels: per_view.csv reports them apart "
                        "(truth = projected_3d: errors against the ground-truth 3D projected "
                        "into the view); the 'all' rows cover the labelled views only")
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
            if column != "truth":
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
            try:
                image = read_image(path)  # the stored grid, as the labels (no EXIF rotation)
            except ParallaxError:
                log.warning("%s: cannot read image for the overlay", path)
                row.append(None)
                continue
            if labels.bboxes is not None:  # show crop pixels: invert frame = xy + crop * scale
                x, y, h, w = labels.bboxes[v, f]
                scale = np.array([w / image.shape[1], h / image.shape[0]])
                lab[v, i] = (lab[v, i] - [x, y]) / scale
                pred[v, i] = (pred[v, i] - [x, y]) / scale
            row.append(image[..., ::-1])
        images.append(row)
    titles = [f"{labels.image_paths[0, f]}\nmean {s:.1f} px" for f, s in zip(order, score,
                                                                          strict=True)]
    return images, lab, pred, titles
