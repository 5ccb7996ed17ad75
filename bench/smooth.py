"""Benchmark: the 3D smoother (pipeline.inference.smoothing) vs per-frame triangulation.

    .venv/bin/python bench/smooth.py --predictions-dir results/models/<model>/videos \\
        --data-dir results/example --view-names cam0 cam1 cam2 cam3 [--synthetic] [--write]
    .venv/bin/python bench/smooth.py --synthetic [--frames 60000 --views 8 --keypoints 20]
    .venv/bin/python bench/smooth.py --simulate --predictions-dir /tmp/p --data-dir /tmp/d \\
        --view-names cam0 cam1 cam2 cam3      (dry run: example + simulated predictions)

Predictions mode: every session with a `<session>_<view>_raw.csv` per view in
--predictions-dir (predict_video's raw network output, what the smooth_video rule smooths; an
ensemble's with its variance) is smoothed with its calibration (`find_calibration`:
calibrations/<session>.toml, else calibration.toml) from --data-dir and compared with the exact
3D of every video frame of the synthetic example (`ground_truth.npz` `video_points_3d`,
`video_visible`, one row per session in session order). Raw = the confidence-weighted
per-frame N-view DLT of every view with a prediction (`SmoothedSession.raw_3d`); consensus =
predict_video's robust 3D (`<session>_3d.csv`, `pipeline.inference.consensus`). Measures:
median and p95 3D error over the frame keypoints the raw DLT triangulated, the same on frame
keypoints hidden in at least one view (`visible` False), jitter (median norm of the
frame-to-frame second difference), coverage, the fraction of observations flagged, smoothing
time per frame x keypoint x view.
Synthetic mode: a --frames x --views x --keypoints session (1280x1024 cameras around an arena,
a body walking and turning, its keypoints swinging at 1-5 Hz, 100 fps; 3 px noise, 5% of the
observations missing, every view 40 px off for 1% of its frames in 100-frame stretches),
timed, with the peak RSS of the smoothing alone. --write puts the tables in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from results import machine_lines, vm_kib, write_section

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Smoothing (bench/smooth.py)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--predictions-dir", type=Path)
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--view-names", nargs="+")
    parser.add_argument("--synthetic", action="store_true", help="time a long synthetic session")
    parser.add_argument("--frames", type=int, default=60_000)
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--keypoints", type=int, default=20)
    parser.add_argument("--simulate", action="store_true",
                        help="write an example (if absent) and simulated predictions first")
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads")
    parser.add_argument("--write", action="store_true", help="write the tables to RESULTS.md")
    return parser.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:  # thread pools are sized when numpy loads
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline.core.cli import setup_logging  # noqa: E402
from pipeline.data.paths import find_calibration  # noqa: E402
from pipeline.geometry.cameras import CameraGroup  # noqa: E402
from pipeline.inference.smoothing import smooth_session  # noqa: E402
from pipeline.io.calibration_toml import read_calibration  # noqa: E402
from pipeline.io.predictions_csv import (  # noqa: E402
    read_predictions_table,
    write_predictions_2d,
)

COLUMNS = ("session", "frames", "median raw", "median smoothed", "p95 raw", "p95 smoothed",
           "hidden median raw", "hidden median smoothed", "jitter raw", "jitter smoothed",
           "jitter truth", "coverage raw", "flagged", "µs / frame·kp·view")


def jitter(points: np.ndarray) -> float:
    """Median norm of the second difference over frames (N, K, 3); NaN triplets skipped."""
    d2 = np.linalg.norm(points[2:] - 2 * points[1:-1] + points[:-2], axis=-1)
    return float(np.nanmedian(d2)) if np.isfinite(d2).any() else float("nan")


def compare(name: str, group: CameraGroup, points: np.ndarray, conf: np.ndarray,
            variance: np.ndarray | None, truth: np.ndarray,
            hidden: np.ndarray | None, consensus: np.ndarray | None = None
            ) -> dict[str, float | str]:
    """Smooth and score one session (points (V, N, K, 2), truth (N, K, 3), hidden (N, K),
    consensus (N, K, 3) or None)."""
    tic = time.perf_counter()
    result = smooth_session(points, variance, conf, group, progress=name)
    seconds = time.perf_counter() - tic
    raw = result.raw_3d
    err_raw = np.linalg.norm(raw - truth, axis=-1)
    err = np.linalg.norm(result.points_3d - truth, axis=-1)
    both = np.isfinite(err_raw) & np.isfinite(err)
    hid = both & (hidden if hidden is not None else False)

    def stat(e: np.ndarray, mask: np.ndarray, q: float) -> float:
        return float(np.percentile(e[mask], q)) if mask.any() else float("nan")

    return {"session": name, "frames": points.shape[1],
            "median raw": stat(err_raw, both, 50), "median smoothed": stat(err, both, 50),
            "p95 raw": stat(err_raw, both, 95), "p95 smoothed": stat(err, both, 95),
            "hidden median raw": stat(err_raw, hid, 50),
            "hidden median smoothed": stat(err, hid, 50),
            **({} if consensus is None else consensus_stats(consensus, truth, both, stat)),
            "jitter raw": jitter(raw), "jitter smoothed": jitter(result.points_3d),
            "jitter truth": jitter(truth), "coverage raw": float(np.isfinite(err_raw).mean()),
            "flagged": float(result.outlier.sum() / max(np.isfinite(result.residual_px).sum(),
                                                        1)),
            "µs / frame·kp·view": 1e6 * seconds / points[..., 0].size,
            "output MiB": sum(getattr(result, f).nbytes for f in (
                "points_3d", "std_3d", "reprojected", "reprojected_std_px", "residual_px",
                "outlier", "weight", "raw_3d")) / 2**20}


def consensus_stats(consensus: np.ndarray, truth: np.ndarray, both: np.ndarray, stat
                    ) -> dict[str, float]:
    """predict_video's consensus 3D (N, K, 3), NaN where fewer than min_views views agreed:
    its errors over the frame keypoints it has (of those `both` scores), and that coverage."""
    err = np.linalg.norm(consensus - truth, axis=-1)
    has = both & np.isfinite(err)
    return {"median consensus": stat(err, has, 50), "p95 consensus": stat(err, has, 95),
            "coverage consensus": float(has.sum() / max(both.sum(), 1)),
            "jitter consensus": jitter(consensus)}


def simulate(args: argparse.Namespace) -> None:
    """An example dataset (if absent) and predictions made from its exact 2D: 3 px noise where
    visible, 15 px and confidence x 0.3 where hidden, 2% gross errors (40 px)."""
    from pipeline.synthetic.generate import generate_example

    if not (args.data_dir / "ground_truth.npz").exists():
        generate_example(args.data_dir, n_sessions=2, frames_per_session=20,
                         n_views=len(args.view_names), image_size=(320, 256), video_frames=300)
    truth = np.load(args.data_dir / "ground_truth.npz")
    rng = np.random.default_rng(0)
    names = [str(k) for k in truth["keypoint_names"]]
    for s, session in enumerate(dict.fromkeys(str(x) for x in truth["sessions"])):
        group = read_calibration(find_calibration(args.data_dir, session), args.view_names)
        exact = group.project(truth["video_points_3d"][s])  # (V, N, K, 2)
        visible = truth["video_visible"][s]
        rows = np.ones(exact.shape[1], bool)
        noise = np.where(visible[..., None], 3.0, 15.0) * rng.normal(size=exact.shape)
        gross = rng.random(visible.shape) < 0.02
        noise[gross] += rng.choice([-40.0, 40.0], size=(gross.sum(), 2))
        conf = np.clip(rng.uniform(0.6, 1.0, visible.shape) * np.where(visible, 1.0, 0.3), 0, 1)
        for v, view in enumerate(args.view_names):
            write_predictions_2d(args.predictions_dir / f"{session}_{view}_raw.csv",
                                 range(rows.sum()), names, exact[v] + noise[v], conf[v],
                                 scorer="simulated")


def predictions_rows(args: argparse.Namespace) -> list[dict]:
    truth = np.load(args.data_dir / "ground_truth.npz")
    names = [str(k) for k in truth["keypoint_names"]]
    rows = []
    for s, session in enumerate(dict.fromkeys(str(x) for x in truth["sessions"])):
        paths = [args.predictions_dir / f"{session}_{v}_raw.csv" for v in args.view_names]
        if not all(p.exists() for p in paths):
            continue
        views = [read_predictions_table(p) for p in paths]
        group = read_calibration(find_calibration(args.data_dir, session), args.view_names)
        n = min(truth["video_points_3d"].shape[1], len(views[0].index))
        if n == 0:
            print(f"{session}: no ground truth, skipped")
            continue
        points = np.stack([v.points for v in views])[:, :n]
        conf = np.stack([v.likelihood for v in views])[:, :n]
        variance = None
        if all(v.variance is not None for v in views):
            variance = np.stack([v.variance for v in views])[:, :n]
        hidden = ~truth["video_visible"][s][:, :n].all(0)
        consensus = None
        pose = args.predictions_dir / f"{session}_3d.csv"
        if pose.exists():
            table = pd.read_csv(pose)
            consensus = table[[f"{k}_{a}" for k in names for a in "xyz"]].to_numpy(float)
            consensus = consensus.reshape(len(table), len(names), 3)[:n]
        rows.append(compare(session, group, points, conf, variance,
                            truth["video_points_3d"][s][:n], hidden, consensus))
    return rows


def synthetic_session(frames: int, views: int, keypoints: int, seed: int = 0):
    """Cameras, exact 3D (N, K, 3), noisy 2D (V, N, K, 2) and confidence (V, N, K)."""
    from pipeline.synthetic.scene import make_cameras

    rng = np.random.default_rng(seed)
    group = make_cameras(rng, views, (1280, 1024))
    t = np.arange(frames) / 100.0  # 100 fps
    freq, phase = rng.uniform(0.03, 0.3, (4, 2)), rng.uniform(0, 2 * np.pi, (4, 2))
    walk = (40 * np.sin(2 * np.pi * freq * t[:, None, None] + phase)).sum(1)  # (N, 2)
    heading = (np.array([2.0, 0.7]) * np.sin(2 * np.pi * np.array([0.04, 0.15]) * t[:, None]
                                               + rng.uniform(0, 6, 2))).sum(1)  # smooth turns
    body = rng.normal(0, 25, (keypoints, 3))
    body[:, 2] = np.abs(body[:, 2]) + 10
    swing = 5 * np.sin(2 * np.pi * rng.uniform(1, 5, keypoints) * t[:, None]
                       + rng.uniform(0, 6, keypoints))
    local = body + swing[..., None] * rng.normal(0, 1, (keypoints, 3))
    cos, sin = np.cos(heading)[:, None], np.sin(heading)[:, None]
    truth = np.stack([walk[:, None, 0] + cos * local[..., 0] - sin * local[..., 1],
                      walk[:, None, 1] + sin * local[..., 0] + cos * local[..., 1],
                      local[..., 2]], -1)
    points = group.project(truth)
    points += rng.normal(0, 3.0, points.shape)
    points[rng.random(points.shape[:-1]) < 0.05] = np.nan
    for v in range(views):  # 40 px off for 100-frame stretches, 1% of the frames
        for start in rng.choice(frames // 100, max(1, frames // 10_000), replace=False):
            points[v, start * 100:start * 100 + 100] += 40.0
    conf = rng.uniform(0.4, 1.0, points.shape[:-1])
    return group, truth, points, conf


def clear_peak() -> bool:
    """Reset this process's VmHWM (Linux: 5 > /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def markdown(rows: list[dict]) -> list[str]:
    def cell(value) -> str:
        return value if isinstance(value, str) else f"{value:,}" if isinstance(value, int) \
            else f"{value:.3g}"

    columns = [c for c in rows[0] if c != "output MiB"]  # COLUMNS, + consensus when present
    return ["| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1),
            *["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]]


def verdict(rows: list[dict]) -> str:
    pooled = {c: np.nanmedian([r[c] for r in rows]) for c in COLUMNS[2:]}
    median = pooled["median smoothed"] / pooled["median raw"]
    p95 = pooled["p95 smoothed"] / pooled["p95 raw"]
    jit = pooled["jitter raw"] / pooled["jitter smoothed"]
    return (f"targets (median over sessions): median error {median:.2f}x raw (<= 0.8x "
            f"{'met' if median <= 0.8 else 'NOT met'}), p95 {p95:.2f}x raw (<= 0.6x "
            f"{'met' if p95 <= 0.6 else 'NOT met'}), jitter {jit:.1f}x lower (>= 3x "
            f"{'met' if jit >= 3 else 'NOT met'})")


def main() -> None:
    args = ARGS or parse_args()
    setup_logging()
    body: list[str] = []
    if args.predictions_dir is not None:
        if not args.data_dir or not args.view_names:
            raise SystemExit("--predictions-dir needs --data-dir and --view-names")
        if args.simulate:
            args.predictions_dir.mkdir(parents=True, exist_ok=True)
            simulate(args)
        rows = predictions_rows(args)
        if not rows:
            raise SystemExit(f"no sessions with every view's CSV in {args.predictions_dir}")
        kind = "simulated predictions (--simulate)" if args.simulate else "predictions"
        body += [f"Example sessions, {kind} from {args.predictions_dir}; 3D errors in the "
                 "calibration's units against ground_truth.npz; hidden = frame keypoints "
                 "not visible in at least one view.", "", *markdown(rows), "",
                 f"- {verdict(rows)}", ""]
    if args.synthetic:
        group, truth, points, conf = synthetic_session(args.frames, args.views, args.keypoints)
        cleared = clear_peak()
        before = vm_kib("VmRSS")
        row = compare(f"synthetic {args.views} views", group, points, conf, None, truth, None)
        peak = (vm_kib("VmHWM") - before) / 1024 if cleared else float("nan")
        seconds = row["µs / frame·kp·view"] * points[..., 0].size / 1e6
        inputs = (points.nbytes + conf.nbytes) / 2**20
        outputs = row["output MiB"]
        body += [f"Synthetic session: {args.frames:,} frames (100 fps) x {args.views} views x "
                 f"{args.keypoints} keypoints, 3 px noise, 5% missing, 40 px-wrong stretches; "
                 f"units mm.", "", *markdown([row]), "",
                 f"- smoothing took {seconds:.1f} s; peak RSS during smoothing {peak:.0f} MiB "
                 f"above the {before / 1024:.0f} MiB before it (inputs {inputs:.0f} MiB, "
                 f"the SmoothedSession {outputs:.0f} MiB)", ""]
    if not body:
        raise SystemExit("nothing to do: give --predictions-dir ... and/or --synthetic")
    text = "\n".join(body + [*machine_lines(), f"- BLAS threads: {args.threads}"])
    print(text)
    if args.write:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()
