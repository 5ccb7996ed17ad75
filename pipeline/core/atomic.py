"""Atomic output writing: every stage output appears complete or not at all.

An output is written to a hidden sibling `.<name>.tmp<pid><suffix>` and renamed onto its name
only when the block succeeds. A process killed with `kill -9` cannot clean up: the next write of
the same output removes such siblings left by processes that no longer run. And a stage whose
parent died (Snakemake killed or gone: the stage was re-parented) has been given up on: it
refuses to rename its outputs into place (:class:`ParallaxError`), so that an orphan never
overwrites what a newer run writes. A stage deliberately left running on its own (started by
hand with `nohup ... &` from a shell that then exits) needs `PARALLAX_ALLOW_ORPHAN=1`.
"""

from __future__ import annotations

import errno
import json
import os
import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.core.errors import ParallaxError

#: errno values that mean "the output cannot be written here", not a bug
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES}


#: (pid, parent pid) when this module was first imported: at a stage's start
_ORIGIN = (os.getpid(), os.getppid())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale(path: Path) -> list[Path]:
    """Remove the temporary siblings of `path` (`.<name>.tmp<pid><suffix>`) whose process no
    longer runs (killed with `kill -9` mid-write); returns them."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.tmp(\d+){re.escape(path.suffix)}")
    removed = []
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return removed
    for sibling in siblings:
        match = pattern.fullmatch(sibling.name)
        if match and int(match[1]) != os.getpid() and not _alive(int(match[1])):
            try:
                sibling.unlink()
                removed.append(sibling)
            except (FileNotFoundError, IsADirectoryError, PermissionError):
                pass
    return removed


def check_not_orphaned() -> None:
    """Raise ParallaxError if this process was re-parented since it started (its parent, e.g.
    Snakemake, died or gave up on it): an orphaned stage must not write outputs."""
    pid, parent = _ORIGIN
    if os.environ.get("PARALLAX_ALLOW_ORPHAN") == "1":
        return
    if os.getpid() == pid and parent != 1 and os.getppid() != parent:
        raise ParallaxError(f"this stage's parent process (pid {parent}) is gone: the stage was "
                            "orphaned (Snakemake was killed or gave up on it), so it writes no "
                            "outputs; rerun the workflow (PARALLAX_ALLOW_ORPHAN=1 lets a stage "
                            "started by hand outlive its shell)")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; rename it onto `path` only if the block succeeds
    and the process was not orphaned meanwhile (stale siblings of dead processes are removed
    first)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        check_not_orphaned()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_paths(*paths: str | Path) -> Iterator[list[Path]]:
    """Like :func:`atomic_path` for several outputs: all are renamed only if the block succeeds."""
    with ExitStack() as stack:
        yield [stack.enter_context(atomic_path(path)) for path in paths]
        check_not_orphaned()  # before the first rename: all outputs or none


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
