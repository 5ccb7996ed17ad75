"""Atomic output writing: every stage output appears complete or not at all."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.core.errors import ParallaxError

#: errno values that mean "the output cannot be written here", not a bug
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES}


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_paths(*paths: str | Path) -> Iterator[list[Path]]:
    """Like :func:`atomic_path` for several outputs: all are renamed only if the block succeeds."""
    with ExitStack() as stack:
        yield [stack.enter_context(atomic_path(path)) for path in paths]


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write `data` as indented, key-sorted JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, allow_nan=True) + "\n")


def write_table(path: str | Path, table: pd.DataFrame) -> None:
    """Write a CSV table without the pandas index, atomically."""
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn a disk-full / quota / read-only error raised while writing `path` into one
    ParallaxError naming it (HDF5 reports ENOSPC as an OSError with the errno only in its
    text)."""
    try:
        yield
    except OSError as err:
        text = str(err)
        if err.errno in WRITE_ERRNOS or "No space left" in text or "errno = 28" in text:
            reason = os.strerror(err.errno) if err.errno else text
            raise ParallaxError(f"{path}: cannot write it: {reason}; free some space (or point "
                                "the output elsewhere) and rerun; nothing was written") from None
        raise
