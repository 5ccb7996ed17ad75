"""Content digests: config values (canonical JSON), files (names and bytes) and the labelled
images of a dataset (standard library only: the workflow computes the same digest at start)."""

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


def images_digest(data_dir: str | Path, image_paths: Iterable[str]) -> str:
    """Digest of the labelled images: each distinct path (as written in the label CSVs,
    relative to data_dir) and its bytes, in sorted order; a missing file counts as missing.

    The cache rule's params (`workflow/rules/common.smk`) and the cache's `input_hash` (its
    first part) use this one function, so replacing or editing an image, even keeping its
    mtime, reruns cache_augmentations and makes the trainer refuse the old cache.
    """
    digest = hashlib.sha256()
    for name in sorted({str(p).replace("\\", "/") for p in image_paths}):
        digest.update(name.encode() + b"\0")
        try:
            with open(Path(data_dir) / name, "rb") as handle:
                digest.update(hashlib.file_digest(handle, "sha256").digest())
        except OSError:
            digest.update(b"<missing>")
    return digest.hexdigest()[:16]
