"""Study: do multi-view reasoning, hidden-keypoint targets, patch masking and the 3D losses pay
off where one camera cannot see? (issue 15)

  .venv/bin/python bench/occlusion.py --phase precision [--write]   # fp32 vs bf16, one variant
  .venv/bin/python bench/occlusion.py --phase variants [--seeds 0 1] [--precision bf16] [--write]
  .venv/bin/python bench/occlusion.py --phase variants --split frames [...]  # same sessions
  .venv/bin/python bench/occlusion.py --phase mouse --variants A B [--write]  # real recording
  .venv/bin/python bench/occlusion.py --phase report [--write]       # tables from finished runs

Data: the synthetic example with `example.occlusion: heavy` (5 pillars, the body hides ears,
paws, nose and tail), 3 sessions x 80 frames, 4 views, 320x256, 0.5 px label noise; session2
is held out entirely as the test set (80 frames), so nothing is tuned on it. Every variant is
trained by the workflow itself (`snakemake` on a layered config in bench/runs/occlusion/), with
the same budget (epochs, batch, backbone, images) for all, and scored here against the
generator's exact ground truth (`ground_truth.npz`): per test frame, view and keypoint the exact
projection and whether the keypoint is visible in that view.

Reported per variant and seed, for the network's raw output and for the final 3D-consistent
predictions (`pipeline.inference.consensus`): median pixel error on visible keypoints, on hidden
keypoints (inside the image but not visible: behind a pillar or the body), the 3D error of the
consensus point (mm), and the dropped-view error (each view blanked in turn, error on it, from
evaluate's metrics.json; against the 0.5 px-noise labels).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from results import machine_lines, write_section

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from pipeline.core.mappings import merge  # noqa: E402
from pipeline.io.predictions_csv import read_predictions_2d  # noqa: E402

RUNS = REPO / "bench" / "runs"
BIN = Path(sys.executable).parent  # the venv running this script
SECTION = "## Hidden keypoints (bench/occlusion.py)"

BASE = {
    "example": {"generate": True, "seed": 7, "sessions": 3, "frames_per_session": 80,
                "views": 4, "width": 320, "height": 256, "label_noise_px": 0.5,
                "video_frames": 0, "occlusion": "heavy"},
    "data": {"data_dir": "results/example", "image_resize_dims": {"height": 128, "width": 128}},
    "training": {"test_sessions": ["session2"], "train_prob": 0.9, "val_prob": 0.1,
                 "max_epochs": 120, "train_batch_size": 8, "check_val_every_n_epoch": 10,
                 "optimizer_params": {"learning_rate": 0.002}, "ckpt_every_n_steps": 500,
                 "patch_mask": {"init_epoch": 30, "final_epoch": 100, "init_ratio": 0.0,
                                "final_ratio": 0.0}},
    "prediction": {"videos": False},
}
#: --split frames: test frames drawn at random from every session (the cameras and sessions
#: the networks train on, as when a lab labels frames of the recordings it will predict)
FRAMES_SPLIT = {"training": {"test_sessions": [], "train_prob": 0.72, "val_prob": 0.08}}
PM = {"training": {"patch_mask": {"final_ratio": 0.3}}}
HIDDEN = {"training": {"hidden_keypoints": "projected"}}
NO_HIDDEN = {"training": {"hidden_keypoints": "ignore"}}
HOLD = {"callbacks": {"anneal_weight": {"init_val": 0.0, "freeze_until_epoch": 40,
                                        "increase_factor": 0.025, "final_val": 1.0}}}
WARMUP = {"callbacks": {"anneal_weight": {"init_val": 0.0, "freeze_until_epoch": 0,
                                          "increase_factor": 0.05, "final_val": 1.0}}}
PAIRWISE = {"losses": {"supervised_pairwise_projections": {"log_weight": 4.0, "scale": "pose"}}}
REPROJECTION = {"losses": {"supervised_reprojection_heatmap_mse": {"log_weight": 1.0}}}


VARIANTS = {
    "singleview": merge({"model": {"model_type": "heatmap"}}, NO_HIDDEN),
    "mvt": NO_HIDDEN,
    "mvt_pm": merge(PM, NO_HIDDEN),
    "mvt_hidden": HIDDEN,
    "mvt_pm_hidden": merge(PM, HIDDEN),
    "mvt_pm_hidden_pairwise": merge(PM, HIDDEN, PAIRWISE, HOLD),
    "mvt_pm_hidden_reproj": merge(PM, HIDDEN, REPROJECTION, HOLD),
    "mvt_pm_hidden_both": merge(PM, HIDDEN, PAIRWISE, REPROJECTION, HOLD),
    "mvt_pm_hidden_pairwise_warmup": merge(PM, HIDDEN, PAIRWISE, WARMUP),
    "mvt_pm_hidden_reproj_warmup": merge(PM, HIDDEN, REPROJECTION, WARMUP),
    "mvt_pm_hidden_both_warmup": merge(PM, HIDDEN, PAIRWISE, REPROJECTION, WARMUP),
}


def run_workflow(workdir: Path, config: dict, log_name: str) -> float:
    """Run the whole workflow in `workdir` on config.yaml + `config`; returns seconds."""
    workdir.mkdir(parents=True, exist_ok=True)
    base = workdir / "config.yaml"  # the Snakefile's `configfile:` is read from the workdir
    if not base.exists():
        base.symlink_to(REPO / "config.yaml")
    layered = workdir / f"{log_name}.yaml"
    layered.write_text(yaml.safe_dump(config, sort_keys=True))
    # PYTHONPATH: every stage imports this checkout's package, whatever the venv points at
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "TQDM_DISABLE": "1",
           "PYTHONPATH": str(REPO)}
    tic = time.perf_counter()
    with open(workdir / f"{log_name}.log", "w") as log:
        code = subprocess.run(
            [str(BIN / "snakemake"), "--snakefile", str(REPO / "Snakefile"), "--directory",
             str(workdir), "--cores", "2", "--configfile", str(REPO / "config.yaml"),
             str(layered), "--rerun-triggers", "mtime", "params", "input", "--keep-going"],
            cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if code:
        raise SystemExit(f"snakemake failed ({code}); see {workdir / (log_name + '.log')}")
    return time.perf_counter() - tic


def score(workdir: Path, model: str) -> dict:
    """Errors of one trained variant against the exact ground truth, test frames only."""
    data = workdir / "results" / "example"
    truth = np.load(data / "ground_truth.npz")
    splits = pd.read_csv(workdir / "results" / "cache" / "splits.csv")
    test = (splits["set"] == "test").to_numpy()
    views = [str(v) for v in truth["view_names"]]
    exact_2d, visible = truth["points_2d"][:, test], truth["visible"][:, test]
    size = np.array([BASE["example"]["width"], BASE["example"]["height"]]) - 1
    inside = ((exact_2d >= 0) & (exact_2d <= size)).all(-1)
    hidden = inside & ~visible
    pred_dir = workdir / "results" / "models" / model / "predictions"
    row: dict = {"model": model, "n_visible": int(visible.sum()), "n_hidden": int(hidden.sum())}
    for kind, suffix in (("raw", "_raw"), ("final", "")):
        pred = np.stack([read_predictions_2d(pred_dir / f"predictions_{v}{suffix}.csv")[2][test]
                         for v in views])
        error = np.linalg.norm(pred - exact_2d, axis=-1)
        row[f"{kind}_visible_px"] = float(np.nanmedian(error[visible]))
        row[f"{kind}_hidden_px"] = float(np.nanmedian(error[hidden]))
        row[f"{kind}_hidden_p90_px"] = float(np.nanpercentile(error[hidden], 90))
    pose = pd.read_csv(pred_dir / "predictions_3d.csv")
    names = [str(k) for k in truth["keypoint_names"]]
    pred_3d = pose[[f"{k}_{a}" for k in names for a in "xyz"]].to_numpy(float)
    pred_3d = pred_3d.reshape(len(pose), len(names), 3)[test]
    row["error_3d_mm"] = float(np.nanmedian(np.linalg.norm(pred_3d - truth["points_3d"][test],
                                                           axis=-1)))
    metrics = json.loads((workdir / "results" / "models" / model / "evaluation"
                          / "metrics.json").read_text())["sets"]["test"]
    row["raw_dropped_view_px"] = metrics.get("raw_dropped_view_mean_px")
    row["final_dropped_view_px"] = metrics.get("dropped_view_mean_px")
    timing = workdir / "benchmarks" / "train" / model / "train.tsv"
    if not timing.exists():  # the layout before ensembles
        timing = workdir / "benchmarks" / "train" / f"{model}.tsv"
    train = pd.read_csv(timing, sep="\t")
    row["train_s"] = float(train["s"].iloc[0])
    return row


def study(workdir: Path, variants: dict[str, dict], seeds: list[int], precision: str,
          extra: dict | None = None) -> pd.DataFrame:
    rows = []
    for seed in seeds:
        models = {f"{name}_s{seed}": merge(cfg, {"training": {"rng_seed_model_pt": seed,
                                                              "precision": precision}})
                  for name, cfg in variants.items()}
        # the variants of config.yaml are switched off: a layered config cannot delete them
        base_variants = yaml.safe_load((REPO / "config.yaml").read_text()).get("models") or {}
        config = merge(BASE, extra or {}, {"models": {**dict.fromkeys(base_variants, False),
                                                      **models}})
        seconds = run_workflow(workdir, config, f"seed{seed}")
        print(f"seed {seed}: workflow {seconds / 60:.1f} min", flush=True)
        for name in models:
            rows.append({**score(workdir, name), "seed": seed,
                         "variant": name.rsplit("_s", 1)[0], "precision": precision})
    return pd.DataFrame(rows)


def mouse(variants: dict[str, dict], precision: str) -> pd.DataFrame:
    """The chosen variants on the real recording (examples/mouse-4cam.yaml: its split and
    budget), scored by evaluate against the labels (hidden keypoints: unlabelled in a view,
    against the projection of the labels' triangulation, as the report does)."""
    workdir = RUNS / "mouse"
    example = yaml.safe_load((REPO / "examples" / "mouse-4cam.yaml").read_text())
    example["data"]["data_dir"] = str(REPO.parent / "shared" / "data" / "mouse-4cam")
    example["prediction"] = {"videos": False}
    base_variants = yaml.safe_load((REPO / "config.yaml").read_text()).get("models") or {}
    models = {name: merge(cfg, {"training": {"precision": precision}})
              for name, cfg in variants.items()}
    config = merge(example, {"models": {**dict.fromkeys(base_variants, False), **models}})
    seconds = run_workflow(workdir, config, "mouse")
    print(f"mouse-4cam: workflow {seconds / 60:.1f} min", flush=True)
    rows = []
    for name in models:
        entry = json.loads((workdir / "results" / "models" / name / "evaluation"
                            / "metrics.json").read_text())["sets"]["test"]
        timing = workdir / "benchmarks" / "train" / name / "train.tsv"
        rows.append({"variant": name, "precision": precision, "seed": 0,
                     "raw_visible_px": entry.get("raw_labelled_median_px"),
                     "raw_hidden_px": entry.get("raw_occluded_median_px"),
                     "final_visible_px": entry.get("labelled_median_px"),
                     "final_hidden_px": entry.get("occluded_median_px"),
                     "final_hidden_p90_px": float("nan"),
                     "error_3d_mm": entry.get("error_3d_median"),
                     "raw_dropped_view_px": entry.get("raw_dropped_view_mean_px"),
                     "final_dropped_view_px": entry.get("dropped_view_mean_px"),
                     "train_s": float(pd.read_csv(timing, sep="\t")["s"].iloc[0])})
    return pd.DataFrame(rows)


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    columns = ["raw_visible_px", "raw_hidden_px", "final_visible_px", "final_hidden_px",
               "final_hidden_p90_px", "error_3d_mm", "raw_dropped_view_px",
               "final_dropped_view_px", "train_s"]
    grouped = table.groupby(["variant", "precision"], sort=False)
    out = grouped[columns].mean()
    out.insert(0, "seeds", grouped["seed"].nunique())
    return out.reset_index()


def markdown(table: pd.DataFrame) -> str:
    header = "| " + " | ".join(table.columns) + " |"
    rule = "|" + "|".join("---" if c in ("variant", "precision") else "---:"
                          for c in table.columns) + "|"
    lines = [header, rule]
    for _, row in table.iterrows():
        cells = [f"{v:.2f}" if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", choices=["precision", "variants", "mouse", "report"],
                        required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--split", choices=["session", "frames"], default="session",
                        help="test set: the held-out session2 (default), or a random 20%% of "
                             "the frames of all three sessions (FRAMES_SPLIT)")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    tag = "" if args.split == "session" else "_frames"
    workdir = RUNS / f"occlusion{tag}"
    results = RUNS / f"occlusion_{args.phase}{tag}.csv"
    extra = FRAMES_SPLIT if args.split == "frames" else None
    if args.phase == "precision":
        table = pd.concat([study(workdir, {f"mvt_pm_hidden_{p}": VARIANTS["mvt_pm_hidden"]},
                                 args.seeds, p) for p in ("fp32", "bf16")])
    elif args.phase == "variants":
        chosen = {name: VARIANTS[name] for name in args.variants}
        table = study(workdir, chosen, args.seeds, args.precision, extra)
        if results.exists():  # runs of other seeds / variants kept
            old = pd.read_csv(results)
            keep = ~(old["seed"].isin(args.seeds) & old["variant"].isin(chosen))
            table = pd.concat([old[keep], table], ignore_index=True)
    elif args.phase == "mouse":
        table = mouse({name: VARIANTS[name] for name in args.variants}, args.precision)
    else:
        table = pd.read_csv(results) if results.exists() else pd.DataFrame()
    if args.phase != "report":
        table.to_csv(results, index=False)
    print(markdown(summarise(table)) if len(table) else "no results yet")
    if args.write:
        body = [markdown(summarise(table)), "", *machine_lines()]
        write_section(f"{SECTION[:-1]}, {args.phase}{tag})", "\n".join(body))


if __name__ == "__main__":
    main()
