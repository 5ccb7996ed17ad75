"""Nested configuration mappings (standard library only: the workflow imports it at start)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any


def merge(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """The layers merged left to right, recursively for nested mappings (a later value wins;
    Snakemake's rule for layered config files); the inputs are not modified."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
                merged[key] = merge(merged[key], value)
            else:
                merged[key] = copy.deepcopy(value)
    return merged
