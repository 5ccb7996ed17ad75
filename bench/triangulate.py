"""Benchmark: N-view triangulation speed and accuracy on a synthetic 6-camera ring.

    .venv/bin/python bench/triangulate.py [--points 100000 --views 6 --missing 0.2 --repeats 3]
                                          [--threads 1] [--write]

Methods, all from the same noisy frame pixels (NaN = missing):
  (a) CameraGroup.triangulate: Newton undistortion + closed-form DLT + reprojection errors
  (a') its DLT core alone (triangulate_dlt_normalized on already undistorted points)
  (b) cv2.undistortPoints alone on every observation (the cost floor)
  (c) LP-style: cv2.undistortPoints, cv2.triangulatePoints for every camera pair, nanmedian
  (d) cv2.undistortPoints + homogeneous DLT by batched np.linalg.svd (the LAPACK reference)
  (e) JAX vectorized DLT, only if `import jax` works
With --write the table replaces the "## Triangulation (bench/triangulate.py)" section of
bench/RESULTS.md (other sections are left alone).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from results import write_section

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Triangulation (bench/triangulate.py)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--points", type=int, default=100_000)
    parser.add_argument("--views", type=int, default=6)
    parser.add_argument("--missing", type=float, default=0.2, help="fraction of NaN observations")
    parser.add_argument("--noise", type=float, default=0.5, help="pixel noise (std, px)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="BLAS/OpenMP and OpenCV threads (set before numpy is imported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", action="store_true", help="write the table to RESULTS.md")
    return parser.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:  # thread pools are sized when numpy / OpenCV load
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)
sys.path.insert(0, str(REPO))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.geometry.cameras import Camera, CameraGroup  # noqa: E402
from pipeline.geometry.dlt import triangulate_dlt_normalized  # noqa: E402


def make_scene(args: argparse.Namespace) -> tuple[CameraGroup, np.ndarray, np.ndarray]:
    """Cameras on a ring looking at the origin, random points, noisy pixels with NaN holes."""
    rng = np.random.default_rng(args.seed)
    cams = []
    for i in range(args.views):
        angle = 2 * np.pi * i / args.views + rng.normal(scale=0.05)
        center = np.array([1500 * np.cos(angle), 1500 * np.sin(angle), rng.uniform(300, 700)])
        z = -center / np.linalg.norm(center)
        x = np.cross(z, [0.0, 0.0, 1.0])
        x /= np.linalg.norm(x)
        R = np.stack([x, np.cross(z, x), z])
        f = rng.uniform(1000, 1500)
        K = np.array([[f, 0.0, 639.5 + rng.normal(scale=8)],
                      [0.0, f * rng.uniform(0.995, 1.005), 511.5 + rng.normal(scale=8)],
                      [0.0, 0.0, 1.0]])
        dist = np.array([rng.uniform(-0.3, -0.15), rng.uniform(0.05, 0.12),
                         rng.normal(scale=5e-4), rng.normal(scale=5e-4), rng.uniform(-0.02, 0.0)])
        cams.append(Camera(name=f"cam{i}", size=(1280, 1024), matrix=K, dist=dist,
                           rvec=cv2.Rodrigues(R)[0][:, 0], tvec=-R @ center))
    group = CameraGroup(cameras=tuple(cams), metadata={})
    truth = rng.uniform(-300, 300, size=(args.points, 3))
    pixels = group.project(truth)
    pixels += rng.normal(scale=args.noise, size=pixels.shape)
    pixels[rng.random(pixels.shape[:2]) < args.missing] = np.nan
    return group, truth, pixels


def cv2_undistort(group: CameraGroup, pixels: np.ndarray) -> np.ndarray:
    """(V, N, 2) pixels -> (V, N, 2) normalized with OpenCV's default 5-step undistortion."""
    return np.stack([cv2.undistortPoints(pixels[v][:, None], cam.matrix, cam.dist)[:, 0]
                     for v, cam in enumerate(group.cameras)])


def lp_style(group: CameraGroup, pixels: np.ndarray) -> np.ndarray:
    """Undistort, triangulate every camera pair with cv2.triangulatePoints, nanmedian."""
    normalized = cv2_undistort(group, pixels)
    ext = [cam.extrinsic for cam in group.cameras]
    finite = np.isfinite(normalized).all(axis=-1)
    pairs = list(itertools.combinations(range(len(group)), 2))
    out = np.full((len(pairs), pixels.shape[1], 3), np.nan)
    for k, (i, j) in enumerate(pairs):
        both = np.flatnonzero(finite[i] & finite[j])
        hom = cv2.triangulatePoints(ext[i], ext[j], normalized[i, both].T, normalized[j, both].T)
        out[k, both] = (hom[:3] / hom[3]).T
    with warnings.catch_warnings():  # points seen by fewer than 2 views: all-NaN, stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(out, axis=0)


def svd_dlt(group: CameraGroup, pixels: np.ndarray) -> np.ndarray:
    """Undistort, then the homogeneous DLT by batched SVD (missing views as zero rows)."""
    normalized = cv2_undistort(group, pixels)
    x, y = normalized[..., 0], normalized[..., 1]
    ok = np.isfinite(x) & np.isfinite(y)
    P = np.stack([cam.extrinsic for cam in group.cameras])[:, None]  # (V, 1, 3, 4)
    rows = np.stack([np.where(ok, x, 0)[..., None] * P[..., 2, :] - P[..., 0, :],
                     np.where(ok, y, 0)[..., None] * P[..., 2, :] - P[..., 1, :]], axis=1)
    rows *= ok[:, None, :, None]
    A = rows.reshape(-1, x.shape[1], 4).transpose(1, 0, 2)  # (N, 2V, 4)
    vh = np.linalg.svd(A, full_matrices=False)[2][:, -1]
    out = vh[:, :3] / vh[:, 3:]
    out[ok.sum(axis=0) < 2] = np.nan
    return out


def jax_method() -> tuple[Callable | None, str]:
    try:
        import jax  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any import failure means "skip"
        return None, f"{type(err).__name__}: {err}"
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)

    @jax.jit
    def dlt(normalized, P, ok):
        x = jnp.where(ok, normalized[..., 0], 0.0)[..., None]
        y = jnp.where(ok, normalized[..., 1], 0.0)[..., None]
        P = P[:, None]
        rows = jnp.stack([x * P[..., 2, :] - P[..., 0, :], y * P[..., 2, :] - P[..., 1, :]], 1)
        rows = rows * ok[:, None, :, None]
        A = rows.reshape(-1, x.shape[1], 4).transpose(1, 0, 2)
        vh = jnp.linalg.svd(A, full_matrices=False)[2][:, -1]
        return vh[:, :3] / vh[:, 3:]

    def run(group, pixels):
        normalized = cv2_undistort(group, pixels)
        ok = np.isfinite(normalized).all(axis=-1)
        P = np.stack([cam.extrinsic for cam in group.cameras])
        out = np.array(dlt(normalized, P, ok).block_until_ready())
        out[ok.sum(axis=0) < 2] = np.nan
        return out

    return run, f"jax {jax.__version__}"


def best_time(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    result, best = fn(), float("inf")  # warm-up run (also the result)
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def machine_info(threads: int) -> list[str]:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                      if line.startswith("Model name")), "unknown")
    except OSError:
        model = platform.processor() or "unknown"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return [
        f"- date: {datetime.date.today().isoformat()}; CPU: {model}, {cores} cores available",
        f"- python {platform.python_version()}, numpy {np.__version__}, "
        f"opencv {cv2.__version__}",
        f"- threads: numpy/OpenBLAS {threads} (OPENBLAS_NUM_THREADS={threads}; our undistortion "
        f"and DLT are elementwise numpy, single-threaded; the only BLAS call is one small GEMM), "
        f"OpenCV {cv2.getNumThreads()}",
    ]


def main() -> None:
    args = ARGS or parse_args()
    cv2.setNumThreads(args.threads)
    group, truth, pixels = make_scene(args)
    n_obs = int(np.isfinite(pixels).all(axis=-1).sum())
    normalized = group.undistort(pixels)
    extrinsics = np.stack([cam.extrinsic for cam in group.cameras])
    methods: list[tuple[str, Callable[[], object] | None, str]] = [
        ("(a) ours: CameraGroup.triangulate (undistort + DLT + reproj. errors)",
         lambda: group.triangulate(pixels).points_3d, ""),
        ("(a') ours: DLT core only (triangulate_dlt_normalized)",
         lambda: triangulate_dlt_normalized(normalized, extrinsics), ""),
        ("(b) cv2.undistortPoints alone (cost floor, no 3D)",
         lambda: cv2_undistort(group, pixels), ""),
        ("(c) LP-style: cv2 undistort + cv2.triangulatePoints per pair + nanmedian",
         lambda: lp_style(group, pixels), ""),
        ("(d) cv2 undistort + homogeneous DLT, batched np.linalg.svd",
         lambda: svd_dlt(group, pixels), ""),
    ]
    jax_run, jax_note = jax_method()
    if jax_run is None:
        methods.append(("(e) JAX vectorized DLT", None, f"skipped: {jax_note}"))
        print(f"(e) JAX skipped: {jax_note}")
    else:
        methods.append((f"(e) cv2 undistort + JAX jit SVD DLT ({jax_note})",
                        lambda: jax_run(group, pixels), ""))
    rows = []
    for label, fn, note in methods:
        if fn is None:
            rows.append((label, None, None, None, note))
            continue
        seconds, result = best_time(fn, args.repeats)
        err = None
        if not label.startswith("(b)"):
            dist = np.linalg.norm(np.asarray(result) - truth, axis=1)
            err = (float(np.nanmedian(dist)), float(np.nanpercentile(dist, 90)),
                   float(np.isfinite(dist).mean()))
        rows.append((label, seconds, args.points / seconds, err, note))
        print(f"{label}: {seconds * 1e3:.1f} ms", flush=True)
    floor = rows[2][1]
    svd = rows[4][1]
    lines = [
        f"{args.points} points, {args.views} views, {args.missing:.0%} observations missing "
        f"({n_obs} observed), pixel noise {args.noise} px; best of {args.repeats} runs after a "
        "warm-up; 3D error in mm against the noise-free truth.",
        "",
        "| method | time (ms) | points/s | speed vs (b) | 3D err median (mm) | p90 (mm) "
        "| solved |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, seconds, rate, err, note in rows:
        if seconds is None:
            lines.append(f"| {label} | – | – | – | – | – | {note} |")
            continue
        errs = ("–", "–", "–") if err is None else (f"{err[0]:.3f}", f"{err[1]:.3f}",
                                                   f"{err[2]:.1%}")
        lines.append(f"| {label} | {seconds * 1e3:.1f} | {rate:,.0f} | {floor / seconds:.2f}x "
                     f"| {' | '.join(errs)} |")
    ours = rows[0][1]
    lines += [
        "",
        f"Targets: ours >= 0.5x the speed of (b): {floor / ours:.2f}x; ours >= 4x the SVD DLT "
        f"(d): {svd / ours:.1f}x (DLT core alone vs (d): {svd / rows[1][1]:.0f}x)"
        + (f"; ours vs the JAX DLT (e): {rows[5][1] / ours:.1f}x." if rows[5][1] else "."),
        "JAX is not a project dependency: to include (e), run this script with a Python that "
        "has jax installed and the repo on PYTHONPATH (XLA picks its own thread count).",
        "",
        *machine_info(args.threads),
    ]
    table = "\n".join(lines)
    print()
    print(table)
    if args.write:
        write_section(SECTION, table)


if __name__ == "__main__":
    main()
