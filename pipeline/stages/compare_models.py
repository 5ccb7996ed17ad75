"""Stage `compare_models`: one table and one grouped bar plot of several models' evaluations.

Reads each model's `metrics.json` (written by `evaluate`) and writes, atomically and together,
a CSV with one row per model, the same table as HTML (shown inline by `snakemake --report`) and
a PNG of grouped bars. By default each model's headline set is used (test, or validation when
the test set is empty); `--set` picks one set for all models.

    python -m pipeline.stages.compare_models \
        --metrics singleview=results/models/singleview/evaluation/metrics.json \
        mvt=... --out-csv results/comparison.csv --out-png results/comparison.png \
        --out-html results/comparison.html
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.core.atomic import atomic_paths
from pipeline.core.cli import StageParser, setup_logging
from pipeline.core.errors import run_main
from pipeline.evaluation import plots
from pipeline.evaluation.comparison import (
    PLOTTED,
    comparison_table,
    parse_metrics_args,
    read_summary,
)
from pipeline.evaluation.report_tables import write_html_tables

log = logging.getLogger("parallax.compare_models")


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(_main, argv)


def _main(argv: Sequence[str] | None) -> None:
    parser = StageParser(description=__doc__.split("\n")[0])
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
