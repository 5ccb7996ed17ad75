"""Stage `predict_labeled`: run a trained model on every labelled frame; 2D, 3D and view dropout.

Every labelled frame (all sets of `splits.csv`) is read at its original resolution, resized for
the model exactly like the cache's evaluation samples (`predictor.prepare_views`), predicted,
mapped back to frame pixels and made consistent in 3D with the frame's calibration
(`pipeline.inference.consensus`: robust triangulation over the confident views, and the
reprojection of that point where a view is unsure or disagrees). Writes into `--out-dir`:

- `predictions_<view>.csv` (DLC layout, likelihood = the network's confidence, `set` column):
  the final, 3D-consistent predictions, and `predictions_<view>_pixel_error.csv` (Euclidean
  error vs the label, NaN where unlabelled); `predictions_<view>_raw.csv` and
  `predictions_<view>_raw_pixel_error.csv`: the same for the network's own output;
- `predictions_3d.csv` (anipose pose-3d layout + `frame`, `set`): the consensus 3D point;
  frames without calibration get NaN (counted in the log) and keep the raw predictions;
- `error_3d.csv`: per frame and keypoint, the distance to the ground-truth triangulation
  (`labels_3d.csv`), the mean reprojection error and the number of views used;
- `view_dropout.csv`: on the test frames (val if there are none), every view blanked in turn
  (input = the normalised mean, as patch masking does) with the others intact; error of every
  view vs its label per keypoint. `blanked_view = none` is the intact run. For the multi-view
  transformer the blanked view's keypoints come from cross-view attention; for the single-view
  model the blanked view simply fails. Rows for the final (`predictions = final`: the blanked
  view gets the reprojection of the others' 3D point) and the raw predictions.
  `--no-view-dropout` keeps only the `none` rows.

All outputs appear together or not at all.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.core.atomic import atomic_paths
from pipeline.core.cli import StageParser, add_dataset_args, add_inference_args, setup_logging
from pipeline.core.errors import run_main
from pipeline.data.project import frame_keys, load_dataset
from pipeline.data.splits import read_splits
from pipeline.data.tables import read_points_3d
from pipeline.data.triangulate import load_calibrations
from pipeline.inference.consensus import ConsensusSettings
from pipeline.inference.ensemble import Ensemble, load_ensemble
from pipeline.inference.labeled import (
    consensus_all,
    dropout_frames,
    dropout_table,
    error_3d_table,
    nan_median,
    pixel_errors,
    predict_frames,
)
from pipeline.io.predictions_csv import write_pixel_error, write_pose_3d, write_predictions_2d

log = logging.getLogger("parallax.predict_labeled")


def build_parser() -> argparse.ArgumentParser:
    parser = StageParser(prog="python -m pipeline.stages.predict_labeled",
                         description=__doc__.splitlines()[0])
    add_dataset_args(parser)
    parser.add_argument("--checkpoint", type=Path, nargs="+", required=True,
                        help="results/models/<model>/best.pt, or every ensemble member's "
                             "results/models/<model>/members/<member>/best.pt")
    parser.add_argument("--members-dir", type=Path, default=None,
                        help="for an ensemble: each member's raw predictions go to "
                             "<members-dir>/<member>/predictions_<view>.csv")
    parser.add_argument("--splits", type=Path, required=True, help="results/cache/splits.csv")
    parser.add_argument("--labels-3d", type=Path, required=True,
                        help="results/triangulation/labels_3d.csv (ground-truth 3D)")
    parser.add_argument("--out-dir", type=Path, required=True,
                        help="results/models/<model>/predictions/")
    add_inference_args(parser, "frames per batch")
    parser.add_argument("--no-view-dropout", action="store_true",
                        help="skip the view-dropout runs (view_dropout.csv: intact rows only)")
    return parser


PER_VIEW = ("", "_pixel_error", "_raw", "_raw_pixel_error")


def member_paths(members_dir: Path | None, ensemble: Ensemble,
                 view_names: Sequence[str]) -> list[Path]:
    """Each member's raw predictions (an ensemble of one writes none)."""
    if members_dir is None or len(ensemble) < 2:
        return []
    return [members_dir / name / f"predictions_{v}.csv" for name in ensemble.names
            for v in view_names]


def output_paths(out_dir: Path, view_names: Sequence[str]) -> list[Path]:
    """Every output, in the order `_body` writes them."""
    per_view = [out_dir / f"predictions_{v}{suffix}.csv" for v in view_names
                for suffix in PER_VIEW]
    return [*per_view, *(out_dir / f"{name}.csv" for name in
                         ("predictions_3d", "error_3d", "view_dropout"))]


def _body(argv: Sequence[str] | None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging()
    settings = ConsensusSettings(args.min_confidence, args.outlier_px, args.min_views)
    torch.set_num_threads(max(1, args.threads))
    labels = load_dataset(args)
    ensemble = load_ensemble(args.checkpoint, args.device, view_names=labels.view_names,
                             keypoint_names=labels.keypoint_names)
    loaded = ensemble.first
    keys = frame_keys(labels)
    sets = read_splits(args.splits, keys)
    truth = read_points_3d(args.labels_3d, labels)
    load_calibrations(labels, required=False)  # calibration problems surface before the long part
    dropout_set, dropout = dropout_frames(sets)
    view_dropout = not args.no_view_dropout
    log.info("model %s (%s, input %dx%d) on %s: %d frames, %d views; view dropout on %d %s "
             "frames%s", loaded.name, loaded.model_type, *loaded.image_size, loaded.device,
             labels.n_frames, labels.n_views, int(dropout.sum()), dropout_set,
             "" if view_dropout else " (off)")
    if len(ensemble) > 1:
        log.info("ensemble of %d members: %s", len(ensemble), ", ".join(ensemble.names))
    pred = predict_frames(ensemble, labels, dropout, args.batch_size, args.threads,
                          view_dropout)
    tri = consensus_all(labels, pred.points, pred.confidence, pred.scale, settings)
    points = tri["final"]
    errors = pixel_errors(points, labels.points_2d)  # (V, N, K)
    raw_errors = pixel_errors(pred.points, labels.points_2d)
    log.info("3D consensus (min confidence %.2f, outlier %.1f model px): %d of %d predictions "
             "replaced by the reprojection of the other views' 3D point", settings.min_confidence,
             settings.outlier_px, int(tri["replaced"].sum()),
             int(np.isfinite(pred.points).all(-1).sum()))
    uncalibrated = int((labels.calibration_files == "").sum())
    if uncalibrated:
        log.warning("%d of %d frames have no calibration: their 3D is NaN", uncalibrated,
                    labels.n_frames)
    names = ["none", *labels.view_names][:1 + len(pred.dropout_points)]
    drop_tables = []
    for kind in ("final", "raw"):
        runs = [pred.points[:, dropout] if kind == "raw" else points[:, dropout]]
        for b in range(len(pred.dropout_points)):
            if kind == "raw":
                runs.append(pred.dropout_points[b])
            else:
                runs.append(consensus_all(labels, pred.dropout_points[b],
                                          pred.dropout_confidence[b], pred.scale[:, dropout],
                                          settings, np.flatnonzero(dropout))["final"])
        drop_errors = pixel_errors(np.stack(runs), labels.points_2d[None, :, dropout])
        table = dropout_table(drop_errors, names, labels.view_names, labels.keypoint_names,
                              dropout_set)
        table.insert(0, "predictions", kind)
        drop_tables.append(table)
        if kind == "final":
            final_drop_errors = drop_errors
    drop_table = pd.concat(drop_tables, ignore_index=True)
    drop_errors = final_drop_errors
    # both 3D tables name a frame by its first view's label-CSV key
    error_3d = error_3d_table(labels.image_paths[0], sets, labels.keypoint_names, tri, truth)
    for name in ("train", "val", "test"):
        chosen = sets == name
        if chosen.any():
            log.info("%s: median pixel error %.2f px over %d labelled points; median 3D error "
                     "%.3f", name, nan_median(errors[:, chosen]),
                     int(np.isfinite(errors[:, chosen]).sum()),
                     nan_median(error_3d["error_3d"].to_numpy()[np.repeat(chosen,
                                                                       labels.n_keypoints)]))
    for b, name in enumerate(names[1:], start=1):
        log.info("view dropout, %s blanked: median error in %s %.2f px (intact %.2f px), "
                 "other views %.2f px (intact %.2f px)", name, name,
                 nan_median(drop_errors[b, b - 1]), nan_median(drop_errors[0, b - 1]),
                 nan_median(np.delete(drop_errors[b], b - 1, axis=0)),
                 nan_median(np.delete(drop_errors[0], b - 1, axis=0)))
    paths = output_paths(args.out_dir, labels.view_names)
    n_files = len(PER_VIEW)
    members = member_paths(args.members_dir, ensemble, labels.view_names)
    with atomic_paths(*paths, *members) as tmp:
        if args.members_dir is not None:  # the rule's directory output, even for one model
            args.members_dir.mkdir(parents=True, exist_ok=True)
        for v in range(labels.n_views):
            index = list(labels.image_paths[v])
            for i, (xy, err) in enumerate(((points[v], errors[v]),
                                           (pred.points[v], raw_errors[v]))):
                write_predictions_2d(tmp[n_files * v + 2 * i], index, labels.keypoint_names, xy,
                                     pred.confidence[v], loaded.name, sets,
                                     variance=pred.variance[v] if i and pred.variance is not None
                                     else None)
                write_pixel_error(tmp[n_files * v + 2 * i + 1], index, labels.keypoint_names,
                                  err, sets)
        for i, path in enumerate(tmp[len(paths):]):
            m, v = divmod(i, labels.n_views)
            write_predictions_2d(path, list(labels.image_paths[v]), labels.keypoint_names,
                                 pred.member_points[m, v], pred.member_confidence[m, v],
                                 loaded.name, sets)
        write_pose_3d(tmp[len(paths) - 3], labels.keypoint_names, tri["points_3d"], tri["error"],
                      tri["n_views"], tri["score"], {"frame": list(labels.image_paths[0]),
                                                      "set": sets})
        error_3d.to_csv(tmp[len(paths) - 2], index=False)
        drop_table.to_csv(tmp[len(paths) - 1], index=False)
    log.info("wrote %d files to %s", len(paths), args.out_dir)


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(_body, argv)


if __name__ == "__main__":
    sys.exit(main())
