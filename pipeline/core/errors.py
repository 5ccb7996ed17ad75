"""The project's error type and the shared `main()` wrapper for stage scripts.

Every input problem a user can cause raises :class:`ParallaxError` with a message that names
the file, row, camera or key at fault. Stage entry points wrap their work in :func:`run_main`,
which turns the error into one line on stderr and exit code 2 (tracebacks are for bugs).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

EXIT_INPUT_ERROR = 2


class ParallaxError(Exception):
    """A problem with the user's inputs or configuration (not a bug in Parallax)."""


def run_main(body: Callable[[Sequence[str] | None], None], argv: Sequence[str] | None) -> int:
    """Run a stage body, mapping :class:`ParallaxError` to one stderr line and exit code 2."""
    try:
        body(argv)
    except ParallaxError as err:
        print(f"parallax error: {err}", file=sys.stderr)  # stderr is the rule's log
        return EXIT_INPUT_ERROR
    return 0
