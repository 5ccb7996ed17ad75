"""DLC-style label/prediction CSVs: 3 header rows (scorer, bodyparts, coords), one row per image.

Reading accepts coords `x, y` with optional `visible` (LP) or `likelihood` (predictions), the
newer DLC split index (3 leading columns joined back into one path) and empty cells as missing.
Writing produces the same layout, atomically, with full float precision.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import ParallaxError
from pipeline.io_utils import atomic_path

HEADER_ROWS = ("scorer", "bodyparts", "coords")


@dataclass(frozen=True)
class LabelTable:
    """One view's labels.

    points: (rows, keypoints, 2) float64, NaN where missing
    visible: (rows, keypoints) float64 (0/1/2, NaN where missing) or None without a `visible` coord
    likelihood: (rows, keypoints) or None
    """

    path: Path
    index: tuple[str, ...]
    keypoint_names: tuple[str, ...]
    points: np.ndarray
    visible: np.ndarray | None = None
    likelihood: np.ndarray | None = None


def _read_rows(path: Path) -> list[list[str]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            return [row for row in csv.reader(handle)]
    except FileNotFoundError:
        raise ParallaxError(f"{path}: label CSV not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ParallaxError(f"{path}: cannot read label CSV: {err}") from None


def _index_columns(rows: list[list[str]]) -> int:
    """1 for a path index; 3 for DLC's split index ('labeled-data', video, file)."""
    data = [row for row in rows[3:] if row]
    if data and len(data[0]) > 3 and data[0][0] == "labeled-data" and rows[2][1] == "":
        return 3
    return 1


def read_label_csv(path: str | Path) -> LabelTable:
    """Read one DLC-style CSV (see module docstring); every problem names the file and line."""
    path = Path(path)
    rows = _read_rows(path)
    firsts = [row[0].strip() if row else "" for row in rows[:3]]
    if len(rows) >= 2 and rows[1] and rows[1][0].strip() == "individuals":
        raise ParallaxError(
            f"{path}: multi-animal DLC CSV (4 header rows with 'individuals') is not supported; "
            "export one animal per CSV"
        )
    if len(rows) < 3 or firsts != list(HEADER_ROWS):
        found = ", ".join(repr(f) for f in firsts) or "nothing"
        raise ParallaxError(
            f"{path}: expected 3 header rows starting with 'scorer', 'bodyparts', 'coords' "
            f"(DLC layout), found {found}"
        )
    n_index = _index_columns(rows)
    bodyparts, coords = rows[1][n_index:], rows[2][n_index:]
    width = len(rows[2])
    keypoints: list[str] = []
    columns: dict[str, dict[str, int]] = {}
    extra: list[tuple[str, int]] = []
    for col, (bodypart, coord) in enumerate(zip(bodyparts, coords, strict=False), start=n_index):
        bodypart, coord = bodypart.strip(), coord.strip()
        if coord in ("x", "y", "visible", "likelihood") and bodypart:
            if bodypart not in columns:
                keypoints.append(bodypart)
                columns[bodypart] = {}
            if coord in columns[bodypart]:
                raise ParallaxError(f"{path}: keypoint '{bodypart}' has two '{coord}' columns")
            columns[bodypart][coord] = col
        else:
            extra.append((bodypart or coord, col))  # e.g. a trailing 'set' column
    for name, cols in columns.items():
        if "x" not in cols or "y" not in cols:
            raise ParallaxError(f"{path}: keypoint '{name}' needs both x and y columns")
    if not keypoints:
        raise ParallaxError(f"{path}: no keypoint x/y columns in the header")
    data = [
        (line, row) for line, row in enumerate(rows[3:], start=4) if any(c.strip() for c in row)
    ]
    index = []
    values = np.full((len(data), width), np.nan)
    for i, (line, row) in enumerate(data):
        if len(row) != width:
            raise ParallaxError(
                f"{path}: line {line} has {len(row)} cells, the header has {width}"
            )
        key = "/".join(cell.strip() for cell in row[:n_index])
        if not key:
            raise ParallaxError(f"{path}: line {line} has an empty image path")
        index.append(key)
        for col in (c for cols in columns.values() for c in cols.values()):
            cell = row[col].strip()
            if cell:
                try:
                    values[i, col] = float(cell)
                except ValueError:
                    raise ParallaxError(
                        f"{path}: line {line}, column {col + 1} ({rows[1][col]} {rows[2][col]}): "
                        f"'{cell}' is not a number"
                    ) from None
    seen: dict[str, int] = {}
    for i, key in enumerate(index):
        if key in seen:
            raise ParallaxError(f"{path}: image '{key}' appears twice (rows {seen[key] + 1} and "
                                f"{i + 1} after the header)")
        seen[key] = i

    def gather(coord: str) -> np.ndarray:
        return np.stack([values[:, columns[k][coord]] for k in keypoints], axis=1)

    points = np.stack([gather("x"), gather("y")], axis=-1)
    half = np.isnan(points).any(axis=-1) & ~np.isnan(points).all(axis=-1)
    if half.any():
        row, kp = np.argwhere(half)[0]
        raise ParallaxError(
            f"{path}: line {data[row][0]}: keypoint '{keypoints[kp]}' has only one of x, y"
        )
    has = {c: all(c in columns[k] for k in keypoints) for c in ("visible", "likelihood")}
    return LabelTable(
        path=path,
        index=tuple(index),
        keypoint_names=tuple(keypoints),
        points=points,
        visible=gather("visible") if has["visible"] else None,
        likelihood=gather("likelihood") if has["likelihood"] else None,
    )


def write_label_csv(
    path: str | Path,
    index: Sequence[str],
    keypoint_names: Sequence[str],
    points: np.ndarray,
    *,
    scorer: str = "parallax",
    extra: dict[str, np.ndarray] | None = None,
    extra_columns: dict[str, Sequence] | None = None,
) -> None:
    """Write a DLC 3-header CSV atomically.

    points: (rows, keypoints, 2); extra: more per-keypoint coords after x, y, each
    (rows, keypoints), e.g. {"likelihood": ...}; extra_columns: trailing plain columns (e.g.
    {"set": [...]}) whose three header cells are the name. NaN -> empty cell; floats by repr().
    """
    points = np.asarray(points, dtype=float)
    extra = extra or {}
    extra_columns = extra_columns or {}
    n_rows, n_kp = len(index), len(keypoint_names)
    if points.shape != (n_rows, n_kp, 2):
        raise ValueError(f"points shape {points.shape} != ({n_rows}, {n_kp}, 2)")
    coords = ["x", "y", *extra]
    stacked = np.concatenate(
        [points] + [np.asarray(v, dtype=float).reshape(n_rows, n_kp, 1) for v in extra.values()],
        axis=-1,
    ).reshape(n_rows, n_kp * len(coords))
    header = [
        ["scorer"] + [scorer] * (n_kp * len(coords)) + list(extra_columns),
        ["bodyparts"] + [k for k in keypoint_names for _ in coords] + list(extra_columns),
        ["coords"] + coords * n_kp + list(extra_columns),
    ]

    def cell(value: float) -> str:
        return "" if np.isnan(value) else repr(float(value))

    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerows(header)
        columns = [list(values) for values in extra_columns.values()]
        for i, key in enumerate(index):
            writer.writerow([key, *map(cell, stacked[i]), *(str(c[i]) for c in columns)])
