"""Stage `compare_models`: one table and one grouped bar plot of several models' evaluations.

Reads each model's `metrics.json` (written by `evaluate`) and writes, atomically and together,
a CSV with one row per model, the same table as HTML (shown inline by `snakemake --report`) and
a PNG of grouped bars. By default each model's headline set is used (test, or validation when
the test set is empty); `--set` picks one set for all models.

    python -m pipeline.compare_models \
        --metrics singleview=results/models/singleview/evaluation/metrics.json \
        mvt=... --out-csv results/comparison.csv --out-png results/comparison.png \
        --out-html results/comparison.html
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from pipeline import plots
from pipeline.cli import setup_logging
from pipeline.errors import ParallaxError, run_main
from pipeline.io_utils import atomic_paths
from pipeline.report_tables import write_html_tables

log = logging.getLogger("parallax.compare_models")

#: metric columns after the PCKs, read from metrics.json's set entry
TAIL = ("error_3d_mean", "reprojection_mean_px", "occluded_mean_px", "dropped_view_mean_px")
PLOTTED = ("mean_px", "median_px", "pck_10px", "error_3d_mean", "occluded_mean_px",
           "dropped_view_mean_px")


def parse_metrics_args(items: Sequence[str]) -> dict[str, Path]:
    """`name=path` items -> {name: path}, names unique and non-empty."""
    out: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ParallaxError(f"--metrics '{item}': expected name=path/to/metrics.json")
        if name in out:
            raise ParallaxError(f"--metrics: model name '{name}' given twice")
        out[name] = Path(path)
    return out


def read_summary(path: Path) -> dict:
    try:
        summary = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ParallaxError(f"{path}: metrics.json not found") from None
    except (OSError, ValueError) as err:
        raise ParallaxError(f"{path}: cannot read metrics.json: {err}") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("sets"), dict):
        raise ParallaxError(f"{path}: not an evaluate metrics.json (no 'sets' table)")
    return summary


def _pck_order(key: str) -> tuple[int, float]:
    """pck_<t>px by t, then pck_bbox_<fraction> by fraction."""
    try:
        if key.startswith("pck_bbox_"):
            return 1, float(key.removeprefix("pck_bbox_"))
        return 0, float(key.removeprefix("pck_").removesuffix("px"))
    except ValueError:
        return 2, 0.0


def comparison_table(summaries: dict[str, dict], paths: dict[str, Path],
                     which: str = "headline") -> pd.DataFrame:
    """One row per model: model, set, n_frames, n, mean_px, median_px, PCKs, TAIL."""
    pck = list(dict.fromkeys(
        key for s in summaries.values() for entry in s["sets"].values()
        if isinstance(entry, dict) for key in entry if key.startswith("pck_")))
    pck.sort(key=_pck_order)
    columns = ["model", "set", "n_frames", "n", "mean_px", "median_px", *pck, *TAIL]
    rows = []
    for name, summary in summaries.items():
        chosen = summary.get("headline_set", "test") if which == "headline" else which
        entry = summary["sets"].get(chosen)
        if not isinstance(entry, dict):
            raise ParallaxError(f"{paths[name]}: no set '{chosen}' in metrics.json")
        rows.append({"model": name, "set": chosen, **{c: entry.get(c) for c in columns[2:]}})
    if len({row["set"] for row in rows}) > 1:
        log.warning("the models are compared on different sets: %s",
                    ", ".join(f"{row['model']}: {row['set']}" for row in rows))
    table = pd.DataFrame(rows, columns=columns)
    numeric = columns[2:]
    table[numeric] = table[numeric].apply(pd.to_numeric, errors="coerce")
    return table


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(_main, argv)


def _main(argv: Sequence[str] | None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--metrics", nargs="+", required=True, help="name=path/metrics.json")
    parser.add_argument("--out-csv", type=Path, required=True)
    parser.add_argument("--out-png", type=Path, required=True)
    parser.add_argument("--out-html", type=Path, default=None)
    parser.add_argument("--set", default="headline", choices=["headline", "train", "val", "test"])
    args = parser.parse_args(argv)
    setup_logging()
    paths = parse_metrics_args(args.metrics)
    summaries = {name: read_summary(path) for name, path in paths.items()}
    table = comparison_table(summaries, paths, args.set)
    outputs = [args.out_csv, args.out_png] + ([args.out_html] if args.out_html else [])
    with atomic_paths(*outputs) as tmps:
        table.to_csv(tmps[0], index=False)
        plots.model_comparison(table, PLOTTED, tmps[1])
        if args.out_html:
            write_html_tables(tmps[2], "Model comparison", {"models": table})
    log.info("compared %d models: %s", len(table), ", ".join(table["model"]))


if __name__ == "__main__":
    sys.exit(main())
