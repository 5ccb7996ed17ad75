"""Stage `predict_labeled`: run a trained model on every labelled frame; 2D, 3D and view dropout.

Every labelled frame (all sets of `splits.csv`) is read at its original resolution, resized for
the model exactly like the cache's evaluation samples (`inference.prepare_views`), predicted, and
mapped back to frame pixels. Writes into `--out-dir`:

- `predictions_<view>.csv` (DLC layout, likelihood = confidence, `set` column) and
  `predictions_<view>_pixel_error.csv` (Euclidean error vs the label, NaN where unlabelled);
- `predictions_3d.csv` (anipose pose-3d layout + `frame`, `set`): confidence-weighted DLT of
  the predictions with the frame's calibration; frames without calibration get NaN (counted in
  the log);
- `error_3d.csv`: per frame and keypoint, the distance to the ground-truth triangulation
  (`labels_3d.csv`), the mean reprojection error and the number of views used;
- `view_dropout.csv`: on the test frames (val if there are none), every view blanked in turn
  (input = the normalised mean, as patch masking does) with the others intact; error of every
  view vs its label per keypoint. `blanked_view = none` is the intact run. For the multi-view
  transformer the blanked view's keypoints come from cross-view attention; for the single-view
  model the blanked view simply fails. `--no-view-dropout` keeps only the `none` rows.

All outputs appear together or not at all.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from pipeline.cache_augmentations import read_points_3d
from pipeline.cache_build import frame_from_image, read_image
from pipeline.cameras import CameraGroup
from pipeline.cli import add_dataset_args, load_dataset, setup_logging
from pipeline.dataset import MultiviewLabels, frame_keys
from pipeline.errors import ParallaxError, run_main
from pipeline.inference import (
    LoadedModel,
    load_model,
    predict,
    prepare_views,
    triangulate_predictions,
)
from pipeline.io_utils import atomic_paths
from pipeline.predictions_io import write_pixel_error, write_pose_3d, write_predictions_2d
from pipeline.splits import read_splits

log = logging.getLogger("parallax.predict_labeled")


def load_frame(labels: MultiviewLabels, frame: int,
               size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One labelled frame's model images (V, H, W, 3) and frame_from_model (V, 2, 3)."""
    images = [read_image(labels.data_dir / p) for p in labels.image_paths[:, frame]]
    if labels.bboxes is None:
        return prepare_views(images, None, size)
    return prepare_views(images, labels.bboxes[:, frame], size,
                         image_to_frame=frame_from_image(labels, frame, images))


def predict_frames(loaded: LoadedModel, labels: MultiviewLabels, dropout: np.ndarray,
                   batch_size: int, threads: int, view_dropout: bool
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Predict every frame, a batch of frames at a time.

    dropout: (N,) bool, the frames of the view-dropout run. Returns points (V, N, K, 2) frame
    px, confidence (V, N, K) and the dropout predictions (V_blanked, V, N_d, K, 2) (empty
    first axis without `view_dropout`).
    """
    n, v, k = labels.n_frames, labels.n_views, labels.n_keypoints
    points, confidence = np.full((n, v, k, 2), np.nan), np.full((n, v, k), np.nan)
    blanked = np.full((v if view_dropout else 0, n, v, k, 2), np.nan)
    eye = np.eye(v, dtype=bool)
    starts = range(0, n, batch_size)
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for start in tqdm(starts, desc="predict", unit="batch", disable=None):
            frames = np.arange(start, min(start + batch_size, n))
            loaded_frames = list(pool.map(lambda f: load_frame(labels, int(f),
                                                               loaded.image_size), frames))
            images = np.stack([item[0] for item in loaded_frames])  # (b, V, H, W, 3)
            to_frame = np.stack([item[1] for item in loaded_frames])  # (b, V, 2, 3)
            points[frames], confidence[frames] = predict(loaded, images, to_frame,
                                                         batch_size=batch_size)
            chosen = np.flatnonzero(dropout[frames])
            if view_dropout and chosen.size:
                # every chosen frame once per blanked view, in one batched call: (V·c, V, ...)
                reps = np.repeat(chosen[None], v, axis=0).ravel()
                mask = np.repeat(eye, chosen.size, axis=0)
                xy, _ = predict(loaded, images[reps], to_frame[reps], blank_mask=mask,
                                batch_size=batch_size)
                blanked[:, frames[chosen]] = xy.reshape(v, chosen.size, v, k, 2)
    return (points.transpose(1, 0, 2, 3), confidence.transpose(1, 0, 2),
            blanked[:, dropout].transpose(0, 2, 1, 3, 4))


def pixel_errors(points: np.ndarray, labels_2d: np.ndarray) -> np.ndarray:
    """(..., 2) predictions and labels (NaN = unlabelled) -> (...) distances, NaN unlabelled."""
    return np.linalg.norm(points - labels_2d, axis=-1)


def load_groups(labels: MultiviewLabels) -> dict[str, CameraGroup]:
    """Each calibration file used by a frame, cameras checked against the view names."""
    files = sorted({path for path in labels.calibration_files if path})
    return {path: CameraGroup.load(Path(path), view_names=labels.view_names) for path in files}


def triangulate_all(labels: MultiviewLabels, points: np.ndarray, confidence: np.ndarray,
                    min_confidence: float, min_views: int) -> dict[str, np.ndarray]:
    """3D of the predictions of every calibrated frame (NaN elsewhere), per calibration."""
    n, k = labels.n_frames, labels.n_keypoints
    out = {"points_3d": np.full((n, k, 3), np.nan), "error": np.full((n, k), np.nan),
           "n_views": np.zeros((n, k), int), "score": np.full((n, k), np.nan)}
    for path, group in load_groups(labels).items():
        frames = np.flatnonzero(labels.calibration_files == path)
        tri = triangulate_predictions(points[:, frames], confidence[:, frames], group,
                                      min_confidence, min_views)
        out["points_3d"][frames] = tri.points_3d
        out["error"][frames] = tri.mean_error
        out["n_views"][frames] = tri.n_views
        out["score"][frames] = tri.score
    return out


def error_3d_table(keys: Sequence[str], sets: np.ndarray, keypoint_names: Sequence[str],
                   tri: dict[str, np.ndarray], truth: np.ndarray) -> pd.DataFrame:
    """Long table frame x keypoint: error_3d, reprojection_error_px, n_views."""
    n, k = truth.shape[:2]
    frame, kp = np.divmod(np.arange(n * k), k)
    return pd.DataFrame({
        "frame": np.asarray(keys, dtype=object)[frame],
        "set": sets[frame],
        "keypoint": np.asarray(keypoint_names, dtype=object)[kp],
        "error_3d": np.linalg.norm(tri["points_3d"] - truth, axis=-1).ravel(),
        "reprojection_error_px": tri["error"].ravel(),
        "n_views": tri["n_views"].ravel(),
    })


def dropout_table(errors: np.ndarray, names: Sequence[str], view_names: Sequence[str],
                  keypoint_names: Sequence[str], set_name: str) -> pd.DataFrame:
    """errors (B, V, N, K) px (B = blanked runs named `names`) -> the long view_dropout table."""
    b, v, _, k = errors.shape
    finite = np.isfinite(errors)
    count = finite.sum(axis=2)  # (B, V, K)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # unlabelled everywhere -> NaN
        mean, median = np.nanmean(errors, axis=2), np.nanmedian(errors, axis=2)
    blank, view, kp = (idx.ravel() for idx in np.indices((b, v, k)))
    return pd.DataFrame({
        "blanked_view": np.asarray(names, dtype=object)[blank],
        "view": np.asarray(view_names, dtype=object)[view],
        "keypoint": np.asarray(keypoint_names, dtype=object)[kp],
        "set": set_name, "n": count.ravel(), "mean_px": mean.ravel(),
        "median_px": median.ravel(),
    })


def dropout_frames(sets: np.ndarray) -> tuple[str, np.ndarray]:
    """The set used for view dropout (test, else val) and its frame mask."""
    for name in ("test", "val"):
        if (sets == name).any():
            return name, sets == name
    log.warning("no test or val frames: view_dropout.csv will be empty")
    return "test", np.zeros(sets.shape, bool)


def _median(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(np.median(finite)) if finite.size else float("nan")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.predict_labeled",
                                     description=__doc__.splitlines()[0])
    add_dataset_args(parser)
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="results/models/<model>/best.pt (the folder name is the scorer)")
    parser.add_argument("--splits", type=Path, required=True, help="results/cache/splits.csv")
    parser.add_argument("--labels-3d", type=Path, required=True,
                        help="results/triangulation/labels_3d.csv (ground-truth 3D)")
    parser.add_argument("--out-dir", type=Path, required=True,
                        help="results/models/<model>/predictions/")
    parser.add_argument("--batch-size", type=int, default=8, help="frames per batch")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (torch and image loading; rule {threads})")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--min-confidence", type=float, default=0.0,
                        help="views below this confidence are left out of the 3D")
    parser.add_argument("--min-views", type=int, default=2, help="triangulation.min_views")
    parser.add_argument("--no-view-dropout", action="store_true",
                        help="skip the view-dropout runs (view_dropout.csv: intact rows only)")
    return parser


def output_paths(out_dir: Path, view_names: Sequence[str]) -> list[Path]:
    """Every output, in the order `_body` writes them."""
    per_view = [out_dir / f"predictions_{v}{suffix}.csv" for v in view_names
                for suffix in ("", "_pixel_error")]
    return [*per_view, *(out_dir / f"{name}.csv" for name in
                         ("predictions_3d", "error_3d", "view_dropout"))]


def _body(argv: Sequence[str] | None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging()
    if args.batch_size < 1 or args.min_views < 2:
        raise ParallaxError("--batch-size must be >= 1 and --min-views >= 2")
    torch.set_num_threads(max(1, args.threads))
    labels = load_dataset(args)
    loaded = load_model(args.checkpoint, args.device, view_names=labels.view_names,
                        keypoint_names=labels.keypoint_names)
    keys = frame_keys(labels)
    sets = read_splits(args.splits, keys)
    truth = read_points_3d(args.labels_3d, labels)
    load_groups(labels)  # calibration problems surface before the long part
    dropout_set, dropout = dropout_frames(sets)
    view_dropout = not args.no_view_dropout
    log.info("model %s (%s, input %dx%d) on %s: %d frames, %d views; view dropout on %d %s "
             "frames%s", loaded.name, loaded.model_type, *loaded.image_size, loaded.device,
             labels.n_frames, labels.n_views, int(dropout.sum()), dropout_set,
             "" if view_dropout else " (off)")
    points, confidence, blanked = predict_frames(loaded, labels, dropout, args.batch_size,
                                                 args.threads, view_dropout)
    errors = pixel_errors(points, labels.points_2d)  # (V, N, K)
    tri = triangulate_all(labels, points, confidence, args.min_confidence, args.min_views)
    uncalibrated = int((labels.calibration_files == "").sum())
    if uncalibrated:
        log.warning("%d of %d frames have no calibration: their 3D is NaN", uncalibrated,
                    labels.n_frames)
    runs = np.concatenate([points[None, :, dropout], blanked])  # (1 + V, V, N_d, K, 2)
    drop_errors = pixel_errors(runs, labels.points_2d[None, :, dropout])
    names = ["none", *labels.view_names][:len(runs)]
    drop_table = dropout_table(drop_errors, names, labels.view_names, labels.keypoint_names,
                               dropout_set)
    # both 3D tables name a frame by its first view's label-CSV key
    error_3d = error_3d_table(labels.image_paths[0], sets, labels.keypoint_names, tri, truth)
    for name in ("train", "val", "test"):
        chosen = sets == name
        if chosen.any():
            log.info("%s: median pixel error %.2f px over %d labelled points; median 3D error "
                     "%.3f", name, _median(errors[:, chosen]),
                     int(np.isfinite(errors[:, chosen]).sum()),
                     _median(error_3d["error_3d"].to_numpy()[np.repeat(chosen,
                                                                       labels.n_keypoints)]))
    for b, name in enumerate(names[1:], start=1):
        log.info("view dropout, %s blanked: median error in %s %.2f px (intact %.2f px), "
                 "other views %.2f px (intact %.2f px)", name, name,
                 _median(drop_errors[b, b - 1]), _median(drop_errors[0, b - 1]),
                 _median(np.delete(drop_errors[b], b - 1, axis=0)),
                 _median(np.delete(drop_errors[0], b - 1, axis=0)))
    paths = output_paths(args.out_dir, labels.view_names)
    with atomic_paths(*paths) as tmp:
        for v in range(labels.n_views):
            index = list(labels.image_paths[v])
            write_predictions_2d(tmp[2 * v], index, labels.keypoint_names, points[v],
                                 confidence[v], loaded.name, sets)
            write_pixel_error(tmp[2 * v + 1], index, labels.keypoint_names, errors[v], sets)
        write_pose_3d(tmp[-3], labels.keypoint_names, tri["points_3d"], tri["error"],
                      tri["n_views"], tri["score"], {"frame": list(labels.image_paths[0]),
                                                      "set": sets})
        error_3d.to_csv(tmp[-2], index=False)
        drop_table.to_csv(tmp[-1], index=False)
    log.info("wrote %d files to %s", len(paths), args.out_dir)


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(_body, argv)


if __name__ == "__main__":
    sys.exit(main())
