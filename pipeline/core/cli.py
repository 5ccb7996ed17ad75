"""Shared command-line plumbing for the stage scripts: the argument parser, dataset arguments
and logging."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import NoReturn

from pipeline.core.errors import ParallaxError


class StageParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors (unknown or missing arguments, a value of the wrong type)
    raise ParallaxError, so that `run_main` prints them as the one line `parallax error: ...`
    (exit code 2) instead of a usage dump; `--help` still prints the help."""

    def error(self, message: str) -> NoReturn:
        raise ParallaxError(f"{self.prog}: {message} (see --help)")


def add_dataset_args(parser: argparse.ArgumentParser) -> None:
    """The arguments every stage uses to describe an LP multiview dataset (LP config keys)."""
    group = parser.add_argument_group("dataset (Lightning Pose multiview layout)")
    group.add_argument("--data-dir", type=Path, required=True, help="data.data_dir")
    group.add_argument("--view-names", nargs="+", required=True, help="data.view_names")
    group.add_argument("--csv-files", nargs="+", required=True, help="data.csv_file")
    group.add_argument("--bbox-files", nargs="+", default=None, help="data.bbox_file")
    group.add_argument("--camera-params-file", default=None, help="data.camera_params_file")


def add_inference_args(parser: argparse.ArgumentParser, batch_help: str) -> None:
    """The arguments of the stages that run a trained network and make its predictions
    3D-consistent (`prediction.consensus.*`, `triangulation.min_views`); --batch-size must be
    >= 1 (`batch_help` says what one batch holds)."""
    group = parser.add_argument_group("inference and 3D consensus")
    group.add_argument("--batch-size", type=_positive_int, default=8, help=batch_help)
    group.add_argument("--threads", type=int, default=1,
                       help="CPU threads (torch, image and video decoding; rule {threads})")
    group.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    group.add_argument("--min-confidence", type=float, default=0.5,
                       help="prediction.consensus.min_confidence: views below it take no part "
                            "in the 3D and get the reprojection of the others' 3D point (and "
                            "are not drawn in labelled videos)")
    group.add_argument("--outlier-px", type=float, default=6.0,
                       help="prediction.consensus.outlier_px (model pixels): a view further "
                            "than this from the consensus reprojection gets the reprojection")
    group.add_argument("--min-views", type=int, default=2, help="triangulation.min_views")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def setup_logging(verbose: bool = False) -> None:
    """Log to stderr (a rule redirects it to its log file), timestamped."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
