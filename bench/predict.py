"""Benchmark: video prediction throughput on CPU and where the time goes.

    .venv/bin/python bench/predict.py [--threads 2 --repeats 3 --sizes 128 256 --batch-size 8]
                                      [--synthetic-frames 48 --session-frames 24] [--write]

Model: a ViT-S/16 multi-view transformer (`vit_small_patch16_224`, dynamic image size, random
init, 4 views, heatmap stride 4), saved as a checkpoint and loaded with
`pipeline.inference.predictor.load_model`, so the stage's own code runs:
`pipeline.inference.video.predict_session` (decode, prepare, predict) and
`pipeline.stages.predict_video.write_outputs` (3D consensus, CSV writing).
Videos: ../shared/data/mouse-4cam/videos (4 x 1280x1024 H.264, the first --max-frames of its
120 frames; skipped with a message when absent) and a synthetic example (4 x 640x512 mp4v,
`pipeline.synthetic.generate`). Steps, per frame instant (all 4 views): decode (OpenCV), prepare
(`prepare_views`: anti-alias blur + warpAffine to the model size), forward (normalisation + the
network), heatmap decode (`decoding.decode_heatmaps`), 3D (`pipeline.inference.consensus`), CSV
(2D + pose-3d tables). Best run of --repeats after a warm-up.
Throughput vs number of sessions: 1, 2, 4 synthetic sessions run one after the other in one
process with the model loaded once (what one `predict_video` job per session does, minus the
model loading and process start that each job pays; the load time is reported separately).
With --write the table replaces the "## Video prediction (bench/predict.py)" section of
bench/RESULTS.md (other sections are left alone).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from results import write_section

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Video prediction (bench/predict.py)"
MOUSE = REPO.parent / "shared" / "data" / "mouse-4cam"
MOUSE_VIEWS = ["back", "mid", "side", "top"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-frames", type=int, default=32,
                        help="frames read from each real video (the first ones)")
    parser.add_argument("--synthetic-frames", type=int, default=32)
    parser.add_argument("--session-frames", type=int, default=16,
                        help="frames per synthetic session in the sessions row")
    parser.add_argument("--sessions-size", type=int, default=128,
                        help="model input size of the sessions row")
    parser.add_argument("--write", action="store_true", help="write the table to RESULTS.md")
    return parser.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:  # thread pools are sized when numpy / torch load
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)
sys.path.insert(0, str(REPO))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.inference import predictor  # noqa: E402
from pipeline.inference import video as video_inference  # noqa: E402
from pipeline.inference.video import predict_session  # noqa: E402
from pipeline.io.calibration_toml import read_calibration  # noqa: E402
from pipeline.io.labels_csv import read_label_csv  # noqa: E402
from pipeline.io.video import check_synchronised  # noqa: E402
from pipeline.models.model import MultiviewTransformer  # noqa: E402
from pipeline.stages.predict_video import output_paths, write_outputs  # noqa: E402
from pipeline.synthetic.generate import generate_example  # noqa: E402

STEPS = ("decode", "prepare", "forward", "heatmaps", "triangulate", "write")


class DecodeTimer:
    """Wraps `predictor.decode_heatmaps` to add up its time (split out of predict's time)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.original = predictor.decode_heatmaps

    def __call__(self, *args, **kwargs):
        tic = time.perf_counter()
        out = self.original(*args, **kwargs)
        self.seconds += time.perf_counter() - tic
        return out


def limit_frames(limit: int) -> None:
    """Make the stage read only the first `limit` frames of each video (bench time budget)."""
    stream = video_inference.iter_batches

    def first_frames(paths, batch_size, infos=None):
        for start, batch in stream(paths, batch_size, infos):
            if start >= limit:
                return
            yield start, [frames[: limit - start] for frames in batch]

    video_inference.iter_batches = first_frames


def make_checkpoint(folder: Path, size: int, views: list[str], keypoints: list[str]) -> Path:
    """A random-init ViT-S/16 MVT checkpoint in the trainer's format."""
    torch.manual_seed(0)
    model = MultiviewTransformer("vit_small_patch16_224", len(views), len(keypoints),
                                 (size, size), downsample_factor=2)
    path = folder / f"vits_{size}" / "best.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "init_args": model.init_args,
                "model_type": model.model_type, "view_names": views,
                "keypoint_names": keypoints}, path)
    return path


def run_sessions(loaded, sessions: list[tuple[str, list[Path], Path]], out: Path,
                 batch_size: int, timer: DecodeTimer) -> tuple[float, int, dict[str, float]]:
    """Predict + write every session in turn; (seconds, frames, per-step seconds)."""
    timer.seconds = 0.0
    steps = dict.fromkeys(STEPS, 0.0)
    frames = 0
    tic = time.perf_counter()
    for name, videos, calibration in sessions:
        infos = check_synchronised(videos)
        group = read_calibration(calibration, loaded.view_names)
        result = predict_session(loaded, videos, batch_size=batch_size, infos=infos)
        paths = output_paths(out, name, loaded.view_names, with_3d=True, labeled=False)
        write_outputs(paths, loaded, result, group)
        frames += result.n_frames
        for key in ("decode", "prepare", "triangulate", "write"):
            steps[key] += result.timings[key]
        steps["forward"] += result.timings["model"]
    seconds = time.perf_counter() - tic
    steps["heatmaps"] = timer.seconds
    steps["forward"] -= timer.seconds
    return seconds, frames, steps


def best_of(repeats: int, fn):
    runs = [fn() for _ in range(repeats)]
    return min(runs, key=lambda run: run[0])


def bench_dataset(label: str, sessions, keypoints: list[str], views: list[str], folder: Path,
                  args: argparse.Namespace, timer: DecodeTimer) -> list[dict]:
    rows = []
    for size in args.sizes:
        tic = time.perf_counter()
        loaded = predictor.load_model(make_checkpoint(folder, size, views, keypoints), "cpu")
        load_s = time.perf_counter() - tic
        warm = np.zeros((1, len(views), size, size, 3), np.uint8)
        predictor.predict(loaded, warm, predictor.aug.identity(len(views))[None])
        seconds, frames, steps = best_of(
            args.repeats,
            lambda loaded=loaded: run_sessions(loaded, sessions, folder / "out",
                                               args.batch_size, timer))
        rows.append({"dataset": label, "size": size, "frames": frames, "seconds": seconds,
                     "steps": steps, "load_s": load_s})
        print(f"{label} {size}px: {frames / seconds:.2f} frames/s "
              + " ".join(f"{k}={1000 * v / frames:.1f}ms" for k, v in steps.items()),
              flush=True)
    return rows


def synthetic(folder: Path, n_sessions: int, frames: int) -> tuple[Path, list[str], list[str]]:
    data = folder / "synthetic"
    generate_example(data, seed=0, n_sessions=n_sessions, frames_per_session=2, n_views=4,
                     image_size=(640, 512), video_frames=frames)
    truth = np.load(data / "ground_truth.npz")
    return data, [str(v) for v in truth["view_names"]], [str(k) for k in truth["keypoint_names"]]


def session_list(data: Path, views: list[str], names: list[str], calibration=None):
    return [(s, [data / "videos" / f"{s}_{v}.mp4" for v in views],
             calibration or data / "calibrations" / f"{s}.toml") for s in names]


def table(rows: list[dict], session_rows: list[dict], args: argparse.Namespace) -> str:
    head = ("| videos | model input | frames | frames/s | decode | prepare | forward | "
            "heatmap decode | triangulation | CSV writing |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    lines = []
    for row in rows:
        n, total = row["frames"], row["seconds"]
        cells = [f"{1000 * row['steps'][k] / n:.1f} ({100 * row['steps'][k] / total:.0f}%)"
                 for k in STEPS]
        lines.append(f"| {row['dataset']} | {row['size']}x{row['size']} | {n} | "
                     f"{n / total:.2f} | " + " | ".join(cells) + " |")
    sessions = ("\n\nThroughput vs number of sessions (synthetic 4 x 640x512, "
                f"{args.session_frames} frames each, {args.sessions_size} px, run one after "
                "the other in one process, model loaded once):\n\n"
                "| sessions | frames | seconds | frames/s |\n|---:|---:|---:|---:|\n")
    sessions += "\n".join(f"| {r['sessions']} | {r['frames']} | {r['seconds']:.1f} | "
                          f"{r['frames'] / r['seconds']:.2f} |" for r in session_rows)
    loads = ", ".join(f"{r['size']} px {r['load_s']:.1f} s" for r in rows
                      if r["dataset"].startswith("synthetic"))
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return (
        "Stage code path (`pipeline.inference.video.predict_session` + `write_outputs`) on CPU, "
        f"{args.threads} threads (torch, OpenCV, BLAS), batch {args.batch_size} frame "
        "instants, ViT-S/16 MVT (`vit_small_patch16_224`, random init, dynamic image size, 4 "
        "views, heatmaps at 1/4 of the input). Per step: ms per frame instant (4 views), share "
        f"of the wall time in brackets. Best of {args.repeats} runs after a warm-up.\n\n"
        + head + "\n".join(lines) + sessions + "\n\n"
        f"- model load (checkpoint -> eval model), paid once per job: {loads}.\n"
        f"- date: {datetime.date.today().isoformat()}; CPU: {cpu}, {os.cpu_count()} cores, "
        "**shared with other helpers running tests and benchmarks at the same time** (numbers "
        "are the best of the runs; expect noise of tens of percent).\n"
        f"- python {platform.python_version()}, numpy {np.__version__}, torch "
        f"{torch.__version__}, opencv {cv2.__version__}\n"
    )


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    timer = DecodeTimer()
    predictor.decode_heatmaps = timer
    limit_frames(args.max_frames)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if (MOUSE / "videos").is_dir() and (MOUSE / "calibration.toml").is_file():
            keypoints = list(read_label_csv(MOUSE / "CollectedData_back.csv").keypoint_names)
            sessions = session_list(MOUSE, MOUSE_VIEWS, ["session0"], MOUSE / "calibration.toml")
            rows += bench_dataset("mouse-4cam 4 x 1280x1024 (H.264)", sessions, keypoints,
                                  MOUSE_VIEWS, folder, args, timer)
        else:
            print(f"{MOUSE}/videos not found: skipping the real-video rows")
        n_sessions = 4
        data, views, keypoints = synthetic(folder, n_sessions,
                                           max(args.synthetic_frames, args.session_frames))
        sessions = session_list(data, views, ["session0"])
        rows += bench_dataset("synthetic 4 x 640x512 (mp4v)", sessions, keypoints, views,
                              folder, args, timer)
        short, _, _ = synthetic(folder / "short", n_sessions, args.session_frames)
        loaded = predictor.load_model(make_checkpoint(folder, args.sessions_size, views,
                                                      keypoints), "cpu")
        session_rows = []
        for k in (1, 2, 4):
            chosen = session_list(short, views, [f"session{i}" for i in range(k)])
            run_sessions(loaded, chosen[:1], folder / "out", args.batch_size, timer)  # warm
            seconds, frames, _ = best_of(args.repeats, lambda chosen=chosen: run_sessions(
                loaded, chosen, folder / "out", args.batch_size, timer))
            session_rows.append({"sessions": k, "frames": frames, "seconds": seconds})
            print(f"{k} session(s): {frames / seconds:.2f} frames/s", flush=True)
    text = table(rows, session_rows, args)
    print(text)
    if args.write:
        write_section(SECTION, text)


if __name__ == "__main__":
    main(ARGS)
