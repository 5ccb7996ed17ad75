"""Stage `smooth_video`: one session's per-view 2D predictions -> smoothed 3D through the cameras.

Reads the session's per-view prediction CSVs (as predict_video writes them, in view order; x, y,
likelihood per keypoint, optionally x_var, y_var: an ensemble's variance in px²) and its anipose
calibration, and runs `pipeline.inference.smoothing.smooth_session` (a robust Kalman smoother
over the whole session; the model and its defaults are in that module's docstring). Optional
limb priors: --skeleton edges whose lengths come from --labels-3d (labels_3d.csv). Writes:

  --out-3d        anipose pose-3d CSV of the posterior mean: per keypoint x, y, z, error (mean
                  px distance from the views used to the reprojection), ncams (views used and
                  not flagged), score (their mean likelihood), std (posterior std of the 3D
                  point, calibration units: the expected 3D error); one row per frame, also
                  where no view saw the keypoint (the prior bridges the gap: check std)
  --out-2d        per view, DLC CSV of the smoothed 3D reprojected into that view; likelihood =
                  posterior probability that the true 2D lies within --outlier-threshold-px of
                  it, 1 - exp(-t² / (2 s²)), s = the reprojection's posterior std (px)
  --out-outliers  CSV frame, view, keypoint, residual_px, weight, flagged: one row per
                  prediction further than --outlier-threshold-px from the reprojection
                  (flagged true) or rejected by the smoother's robust weighting (weight < 0.1:
                  more than ~4.4 of its standard deviations away) while within the threshold
                  (flagged false); weight = the smoother's final robust weight (0..1)
  --out-figure    PNG: raw vs smoothed 3D of the keypoints smoothing changed most, and every
                  keypoint's posterior std over time

All outputs appear together or not at all. Bad input (a CSV that cannot be read, views with
different frames or keypoints, calibration cameras other than the views) is one
`parallax error:` line naming the file, exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from pipeline.core.atomic import atomic_paths  # noqa: E402
from pipeline.core.cli import StageParser, setup_logging  # noqa: E402
from pipeline.core.errors import ParallaxError, run_main  # noqa: E402
from pipeline.evaluation.drawing import parse_skeleton  # noqa: E402
from pipeline.inference.kalman import limb_lengths_from_points  # noqa: E402
from pipeline.inference.smoothing import (  # noqa: E402
    SmoothedSession,
    SmoothingSettings,
    smooth_session,
)
from pipeline.io.calibration_toml import read_calibration  # noqa: E402
from pipeline.io.labels_csv import LabelTable  # noqa: E402
from pipeline.io.predictions_csv import read_predictions_table, write_predictions_2d  # noqa: E402
from pipeline.io.smoothed_csv import (  # noqa: E402
    read_labelled_3d,
    write_smoothed_3d,
)

log = logging.getLogger("parallax.smooth_video")


def read_views(paths: Sequence[Path]) -> list[LabelTable]:
    """Every view's predictions, checked to share keypoints and frames (row keys)."""
    views = [read_predictions_table(p) for p in paths]
    first = views[0]
    for view in views[1:]:
        if view.keypoint_names != first.keypoint_names:
            raise ParallaxError(f"{view.path}: keypoints {list(view.keypoint_names)} differ from "
                                f"{first.path}'s {list(first.keypoint_names)}")
    counts = {len(v.index) for v in views}
    if len(counts) > 1:
        listing = ", ".join(f"{v.path} ({len(v.index)})" for v in views)
        raise ParallaxError(f"the views' predictions have different frame counts: {listing}")
    for view in views[1:]:
        if view.index != first.index:
            row = next(i for i, (a, b) in enumerate(zip(view.index, first.index, strict=True))
                       if a != b)
            raise ParallaxError(f"{view.path}: row {row + 1} is frame '{view.index[row]}' but "
                                f"{first.path} has '{first.index[row]}'")
    if not first.index:
        raise ParallaxError(f"{first.path}: no frames to smooth")
    return views


def summary_columns(result: SmoothedSession, confidence: np.ndarray) -> tuple[np.ndarray, ...]:
    """(N, K) mean px error, views used and not flagged, their mean likelihood."""
    used = np.isfinite(result.residual_px) & ~result.outlier
    count = used.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        error = np.where(used, result.residual_px, 0.0).sum(0) / count
        score = np.where(used, confidence, 0.0).sum(0) / count
    return error, count, score


def draw_figure(path: Path, result: SmoothedSession, keypoint_names: Sequence[str],
                fps: float, title: str, shown: int = 3, span: int = 600) -> None:
    """Raw vs smoothed x, y, z of the `shown` keypoints that smoothing moved most (median
    distance), over the `span` frames around the largest move, and every keypoint's posterior
    std over the whole session; 1000 x (220 (shown + 1) + 60) px."""
    n = result.points_3d.shape[0]
    t = np.arange(n) / (fps if fps > 0 else 1.0)
    moved = np.linalg.norm(result.raw_3d - result.points_3d, axis=-1)  # (N, K)
    finite = np.isfinite(moved)
    typical = np.where(finite, moved, 0.0).sum(0) / np.maximum(finite.sum(0), 1)
    order = np.argsort(-typical)[:shown]
    centre = int(np.argmax(np.nan_to_num(moved[:, order], nan=-1.0).max(1))) if n else 0
    frames = slice(max(0, min(centre - span // 2, n - span)), max(0, centre - span // 2) + span)
    fig = Figure(figsize=(10, (220 * (len(order) + 1) + 60) / 100))
    axes = fig.subplots(len(order) + 1, 1, squeeze=False)[:, 0]
    for ax, k in zip(axes, order, strict=False):
        for i, (axis, colour) in enumerate(zip("xyz", ("tab:red", "tab:green", "tab:blue"),
                                               strict=True)):
            ax.plot(t[frames], result.raw_3d[frames, k, i], ".", ms=3, color=colour, alpha=0.4)
            ax.plot(t[frames], result.points_3d[frames, k, i], "-", lw=1, color=colour,
                    label=axis)
        ax.set_ylabel(f"{keypoint_names[k]}\n(calib. units)", fontsize=8)
        ax.legend(loc="upper right", fontsize=7, ncol=3, title="dots raw, lines smoothed",
                  title_fontsize=7)
    for k, name in enumerate(keypoint_names):
        axes[-1].plot(t, result.std[:, k], lw=0.8, label=name)
    if np.isfinite(result.std).any() and np.nanmin(result.std) > 0:
        axes[-1].set_yscale("log")
    axes[-1].set_ylabel("posterior std\n(calib. units)", fontsize=8)
    if len(keypoint_names) <= 20:
        axes[-1].legend(loc="upper right", fontsize=6, ncol=5)
    unit = "time (s)" if fps > 0 else "frame"
    axes[-2 if len(order) else -1].set_xlabel(unit)
    axes[-1].set_xlabel(f"{unit}, whole session")
    axes[0].set_title(title)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)


def build_parser() -> argparse.ArgumentParser:
    parser = StageParser(prog="python -m pipeline.stages.smooth_video",
                         description=__doc__.splitlines()[0])
    parser.add_argument("--predictions", type=Path, nargs="+", required=True,
                        help="the session's per-view prediction CSVs, in view order")
    parser.add_argument("--view-names", nargs="+", required=True, help="data.view_names")
    parser.add_argument("--calibration", type=Path, required=True,
                        help="the session's anipose calibration.toml")
    parser.add_argument("--labels-3d", type=Path, default=None,
                        help="labels_3d.csv (limb lengths for the --skeleton priors)")
    parser.add_argument("--skeleton", nargs="*", default=[],
                        help="data.skeleton: keypoint names, two per edge (limb priors)")
    parser.add_argument("--outlier-threshold-px", type=float, default=10.0,
                        help="flag predictions this far (px) from the smoothed reprojection")
    parser.add_argument("--min-confidence", type=float, default=0.05,
                        help="predictions below this likelihood are not used")
    parser.add_argument("--process-noise-scale", type=float, default=1.0,
                        help="x the estimated process noise (< 1: smoother, > 1: closer to raw)")
    parser.add_argument("--pixel-noise-px", type=float, default=None,
                        help="2D noise at likelihood 1 (default: estimated from the data)")
    parser.add_argument("--iterations", type=int, default=3, help="relinearisations")
    parser.add_argument("--fps", type=float, default=0.0, help="frame rate for the figure")
    parser.add_argument("--session", default="", help="session name (figure title, logs)")
    parser.add_argument("--out-3d", type=Path, required=True)
    parser.add_argument("--out-2d", type=Path, nargs="+", required=True,
                        help="one CSV per view, in view order")
    parser.add_argument("--out-outliers", type=Path, required=True)
    parser.add_argument("--out-figure", type=Path, required=True)
    return parser


def _body(argv: Sequence[str] | None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging()
    for name, paths in (("--predictions", args.predictions), ("--out-2d", args.out_2d)):
        if len(paths) != len(args.view_names):
            raise ParallaxError(f"{name}: {len(paths)} file(s) for {len(args.view_names)} views "
                                f"{args.view_names}")
    settings = SmoothingSettings(
        outlier_threshold_px=args.outlier_threshold_px, min_confidence=args.min_confidence,
        process_noise_scale=args.process_noise_scale, pixel_noise_px=args.pixel_noise_px,
        iterations=args.iterations)
    group = read_calibration(args.calibration, args.view_names)
    views = read_views(args.predictions)
    names = list(views[0].keypoint_names)
    edges = parse_skeleton(args.skeleton, names)
    lengths = std = None
    if len(edges) and args.labels_3d is None:
        log.warning("--skeleton without --labels-3d: no limb-length priors")
    elif len(edges):
        lengths, std = limb_lengths_from_points(read_labelled_3d(args.labels_3d, names), edges)
        log.info("limb priors: %s", ", ".join(
            f"{names[a]}-{names[b]} {m:.3g}±{s:.2g}"
            for (a, b), m, s in zip(edges, lengths, std, strict=True)))
    points = np.stack([v.points for v in views])
    confidence = np.stack([v.likelihood for v in views])
    variance = None
    if any(v.variance is not None for v in views):
        variance = np.stack([np.full(v.points.shape, np.nan) if v.variance is None
                             else v.variance for v in views])
    log.info("session %s: %d views x %d frames x %d keypoints, ensemble variance: %s",
             args.session or "?", *confidence.shape,
             "none" if variance is None else f"{sum(v.variance is not None for v in views)} "
             "view(s)")
    tic = time.perf_counter()
    result = smooth_session(points, variance, confidence, group, settings=settings,
                            limb_pairs=edges if lengths is not None else None,
                            limb_lengths=lengths, limb_std=std, progress=args.session or None)
    elapsed = time.perf_counter() - tic
    error, count, score = summary_columns(result, confidence)
    likelihood = result.reprojection_confidence(args.outlier_threshold_px)
    listed = result.outlier | (np.isfinite(result.residual_px) & (result.weight < 0.1))
    view_idx, frame_idx, kp_idx = np.nonzero(listed)
    order = np.lexsort((kp_idx, view_idx, frame_idx))
    index = np.asarray(views[0].index, dtype=object)
    outliers = pd.DataFrame({
        "frame": index[frame_idx[order]],
        "view": np.asarray(args.view_names, dtype=object)[view_idx[order]],
        "keypoint": np.asarray(names, dtype=object)[kp_idx[order]],
        "residual_px": result.residual_px[view_idx, frame_idx, kp_idx][order],
        "weight": result.weight[view_idx, frame_idx, kp_idx][order],
        "flagged": result.outlier[view_idx, frame_idx, kp_idx][order],
    })
    paths = [args.out_3d, *args.out_2d, args.out_outliers, args.out_figure]
    with atomic_paths(*paths) as tmps:
        write_smoothed_3d(tmps[0], names, result.points_3d, result.std, error, count, score)
        for v, tmp in enumerate(tmps[1:-2]):
            write_predictions_2d(tmp, views[0].index, names, result.reprojected[v],
                                 likelihood[v], scorer="parallax-smoothed")
        outliers.to_csv(tmps[-2], index=False)
        draw_figure(tmps[-1], result, names, args.fps,
                    f"{args.session or 'session'}: smoothed 3D ({len(index)} frames)")
    flagged = result.outlier.sum((1, 2))
    log.info("smoothed %d frames in %.1f s (%.2f µs per frame x keypoint x view); flagged per "
             "view: %s -> %s", len(index), elapsed,
             1e6 * elapsed / max(result.residual_px.size, 1),
             ", ".join(f"{v} {n}" for v, n in zip(args.view_names, flagged, strict=True)),
             args.out_3d)


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(_body, argv)


if __name__ == "__main__":
    sys.exit(main())
