"""Content digests: config values (canonical JSON) and files (names and bytes)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def config_hash(config: dict[str, Any]) -> str:
    """Digest of the config values that shape the cache (canonical JSON)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def files_hash(paths: Iterable[Path], root: Path) -> str:
    """Digest of the files' names (relative to root, else the bare name) and bytes, sorted by
    name so that the result does not depend on where the outputs live."""
    named = {}
    for path in map(Path, paths):
        try:
            name = str(path.absolute().relative_to(root.absolute()))
        except ValueError:
            name = path.name
        named[name] = path
    digest = hashlib.sha256()
    for name in sorted(named):
        digest.update(name.encode() + b"\0" + named[name].read_bytes())
    return digest.hexdigest()[:16]
