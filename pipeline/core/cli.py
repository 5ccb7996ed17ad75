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


def setup_logging(verbose: bool = False) -> None:
    """Log to stderr (a rule redirects it to its log file), timestamped."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
