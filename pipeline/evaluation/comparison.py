"""The model comparison: every variant's headline metrics (metrics.json) in one table."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from pipeline.core.errors import ParallaxError

log = logging.getLogger(__name__)

#: metric columns after the PCKs, read from metrics.json's set entry
TAIL = ("error_3d_mean", "reprojection_mean_px", "labelled_median_px", "occluded_median_px",
        "dropped_view_mean_px", "raw_median_px", "raw_occluded_median_px",
        "raw_dropped_view_mean_px")


PLOTTED = ("median_px", "pck_10px", "error_3d_mean", "occluded_median_px",
           "dropped_view_mean_px", "raw_occluded_median_px")


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
