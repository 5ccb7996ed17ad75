"""DLC-style label/prediction CSVs: 3 header rows (scorer, bodyparts, coords), one row per image.

Reading (:func:`read_label_csv`) accepts
  - a path index (first column) or DLC's newer split index (leading columns such as
    `labeled-data, <video>, <file>`, recognised by their empty header cells, joined with '/');
  - coords `x, y` per keypoint, optionally `visible` (LP, 0/1/2) and/or `likelihood` (predictions)
    and `x_var, y_var` (an ensemble's variance of predictions, px²);
  - empty cells as missing (NaN);
  - trailing plain columns (e.g. LP's `set`), whose header cells are `(name, "", "")` as pandas
    writes them, `(name, name, name)`, or pandas' `Unnamed: ...` placeholders; read as strings.
Everything else is an error naming the file, the line and the column; nothing is dropped
silently. Writing (:func:`write_label_csv`) produces the same layout, atomically, with `repr`
floats so that a round trip is exact.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.core.atomic import atomic_path
from pipeline.core.errors import ParallaxError

HEADER_ROWS = ("scorer", "bodyparts", "coords")
COORDS = ("x", "y", "visible", "likelihood", "x_var", "y_var")
_UNNAMED = re.compile(r"^Unnamed: \d+(_level_\d+)?$")  # pandas' placeholder for empty headers


@dataclass(frozen=True)
class LabelTable:
    """One view's labels, rows in file order.

    index: the row keys (image paths, split indices joined with '/')
    points: (rows, keypoints, 2) float64, NaN where missing
    visible: (rows, keypoints) float64 (0/1/2, NaN where missing), None without a `visible` coord
    likelihood: (rows, keypoints) float64, None without a `likelihood` coord (unused for labels)
    variance: (rows, keypoints, 2) float64 px², the `x_var`, `y_var` coords of an ensemble's
    predictions, None without them
    extra_columns: trailing plain columns by name, one string per row ("" for an empty cell)
    lines: the 1-based CSV line number of each row (for error messages)
    """

    path: Path
    index: tuple[str, ...]
    keypoint_names: tuple[str, ...]
    points: np.ndarray
    visible: np.ndarray | None = None
    likelihood: np.ndarray | None = None
    variance: np.ndarray | None = None
    extra_columns: dict[str, tuple[str, ...]] = field(default_factory=dict)
    lines: tuple[int, ...] = ()

    def line_of(self, row: int) -> int:
        """The CSV line number of data row `row` (0-based)."""
        return self.lines[row] if self.lines else row + len(HEADER_ROWS) + 1


def _read_rows(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, cells) for every line of a CSV."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            rows = []
            start = 1
            for row in reader:
                rows.append((start, row))
                start = reader.line_num + 1
            return rows
    except FileNotFoundError:
        raise ParallaxError(f"{path}: label CSV not found") from None
    except IsADirectoryError:
        raise ParallaxError(f"{path}: is a directory, expected a label CSV") from None
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ParallaxError(f"{path}: cannot read label CSV: {err}") from None


def _blank(cell: str) -> bool:
    cell = cell.strip()
    return not cell or bool(_UNNAMED.match(cell))


def _check_header(path: Path, rows: list[tuple[int, list[str]]]) -> None:
    if len(rows) >= 2 and rows[1][1] and rows[1][1][0].strip().lower() == "individuals":
        raise ParallaxError(
            f"{path}: multi-animal DLC CSV (4 header rows: scorer, individuals, bodyparts, "
            "coords) is not supported yet; export one animal per CSV (3 header rows)"
        )
    firsts = [row[0].strip() if row else "" for _, row in rows[:3]]
    if firsts != list(HEADER_ROWS):
        found = ", ".join(repr(f) for f in firsts) if firsts else "an empty file"
        raise ParallaxError(
            f"{path}: expected 3 header rows whose first cells are 'scorer', 'bodyparts', "
            f"'coords' (DLC single-animal layout), found {found}"
        )
    widths = {len(row) for _, row in rows[:3]}
    if len(widths) != 1:
        raise ParallaxError(
            f"{path}: the 3 header rows have different numbers of cells "
            f"({[len(row) for _, row in rows[:3]]})"
        )


def _index_width(header: list[list[str]]) -> int:
    """Number of leading index columns: 1 plus the split-index columns whose header is empty."""
    width = 1
    while width < len(header[2]) and all(_blank(row[width]) for row in header):
        width += 1
    return width


def _parse_columns(path: Path, header: list[list[str]], n_index: int):
    """Keypoint coord columns {keypoint: {coord: col}} (in order) and plain columns {name: col}."""
    keypoints: dict[str, dict[str, int]] = {}
    plain: dict[str, int] = {}
    for col in range(n_index, len(header[2])):
        scorer, bodypart, coord = (header[r][col].strip() for r in range(3))
        described = f"column {col + 1} ({scorer!r}, {bodypart!r}, {coord!r})"
        if coord in COORDS and not _blank(bodypart):
            cols = keypoints.setdefault(bodypart, {})
            if coord in cols:
                raise ParallaxError(f"{path}: keypoint '{bodypart}' has two '{coord}' columns "
                                    f"(columns {cols[coord] + 1} and {col + 1})")
            cols[coord] = col
            continue
        names = {c for c in (scorer, bodypart, coord) if not _blank(c)}
        if _blank(bodypart) and _blank(coord) or len(names) == 1 and bodypart == coord:
            # plain column: (name, "", "") as pandas writes a 1-level column, or (name, name, name)
            name = bodypart if not _blank(bodypart) else scorer
            if _blank(name):
                name = ""  # unnamed: allowed only if empty in every row (checked by the caller)
            if name in plain and name:
                raise ParallaxError(f"{path}: two plain columns named '{name}'")
            plain[name or f"#{col + 1}"] = col
            continue
        if _blank(bodypart):
            raise ParallaxError(f"{path}: {described} has coord '{coord}' but no bodypart name")
        raise ParallaxError(
            f"{path}: {described}: unknown coord '{coord}' for keypoint '{bodypart}' "
            f"(expected one of {', '.join(COORDS)})"
        )
    for name, cols in keypoints.items():
        if "x" not in cols or "y" not in cols:
            have = "x" if "x" in cols else "y" if "y" in cols else "neither x nor y"
            raise ParallaxError(f"{path}: keypoint '{name}' needs both x and y columns, "
                                f"has only {have}")
    if not keypoints:
        raise ParallaxError(f"{path}: no keypoint x/y columns in the header")
    for coord in ("visible", "likelihood", "x_var", "y_var"):
        with_coord = [k for k, cols in keypoints.items() if coord in cols]
        if with_coord and len(with_coord) != len(keypoints):
            lacking = next(k for k in keypoints if coord not in keypoints[k])
            raise ParallaxError(
                f"{path}: keypoint '{with_coord[0]}' has a '{coord}' column but '{lacking}' "
                f"does not; give every keypoint the same coords"
            )
    first = keypoints[next(iter(keypoints))]
    if ("x_var" in first) != ("y_var" in first):
        raise ParallaxError(f"{path}: x_var and y_var come together (an ensemble's variance); "
                            "found only one of them")
    return keypoints, plain


def read_label_csv(path: str | Path) -> LabelTable:
    """Read one DLC-style CSV (see the module docstring); every problem names file and line."""
    path = Path(path)
    rows = _read_rows(path)
    _check_header(path, rows)
    header = [row for _, row in rows[:3]]
    width = len(header[2])
    n_index = _index_width(header)
    keypoints, plain = _parse_columns(path, header, n_index)
    data = [(line, row) for line, row in rows[3:] if any(c.strip() for c in row)]
    numeric = [c for cols in keypoints.values() for c in cols.values()]
    values = np.full((len(data), width), np.nan)
    index: list[str] = []
    seen: dict[str, int] = {}
    for i, (line, row) in enumerate(data):
        if len(row) != width:
            raise ParallaxError(f"{path}: line {line} has {len(row)} cells, the header has "
                                f"{width}")
        key = "/".join(cell.strip() for cell in row[:n_index] if cell.strip())
        if not key:
            raise ParallaxError(f"{path}: line {line} has an empty image path (first column)")
        if key in seen:
            raise ParallaxError(f"{path}: image '{key}' appears twice (lines {seen[key]} and "
                                f"{line}); row keys must be unique")
        seen[key] = line
        index.append(key)
        for col in numeric:
            cell = row[col].strip()
            if not cell:
                continue
            try:
                value = float(cell)
            except ValueError:
                value = None
            if value is None or np.isinf(value):
                raise ParallaxError(
                    f"{path}: line {line}, column {col + 1} ({header[1][col].strip()} "
                    f"{header[2][col].strip()}): '{cell}' is not a finite number"
                )
            values[i, col] = value
    names = list(keypoints)

    def gather(coord: str) -> np.ndarray:
        return values[:, [keypoints[k][coord] for k in names]].reshape(len(data), len(names))

    points = np.stack([gather("x"), gather("y")], axis=-1)
    half = np.isnan(points).any(axis=-1) & ~np.isnan(points).all(axis=-1)
    if half.any():
        row, kp = np.argwhere(half)[0]
        raise ParallaxError(f"{path}: line {data[row][0]}: keypoint '{names[kp]}' has only one of "
                            "x, y (leave both empty for a missing label)")
    visible = gather("visible") if "visible" in keypoints[names[0]] else None
    if visible is not None:
        bad = ~np.isnan(visible) & ~np.isin(visible, (0.0, 1.0, 2.0))
        if bad.any():
            row, kp = np.argwhere(bad)[0]
            raise ParallaxError(f"{path}: line {data[row][0]}: keypoint '{names[kp]}' visible = "
                                f"{visible[row, kp]:g}, expected 0, 1 or 2")
    extra_columns: dict[str, tuple[str, ...]] = {}
    for name, col in plain.items():
        cells = tuple(row[col].strip() for _, row in data)
        if name.startswith("#"):
            filled = next((line for (line, _), c in zip(data, cells, strict=True) if c), None)
            if filled is not None:
                raise ParallaxError(f"{path}: line {filled}, column {col + 1} has a value but the "
                                    "column has no name in the header")
            continue
        extra_columns[name] = cells
    return LabelTable(
        path=path,
        index=tuple(index),
        keypoint_names=tuple(names),
        points=points,
        visible=visible,
        likelihood=gather("likelihood") if "likelihood" in keypoints[names[0]] else None,
        variance=(np.stack([gather("x_var"), gather("y_var")], axis=-1)
                  if {"x_var", "y_var"} <= set(keypoints[names[0]]) else None),
        extra_columns=extra_columns,
        lines=tuple(line for line, _ in data),
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
    """Write a DLC 3-header CSV atomically (temporary sibling, then rename).

    points: (rows, keypoints, 2); extra: more per-keypoint coords after x, y, each
    (rows, keypoints), e.g. {"likelihood": ...} or {"visible": ...}; extra_columns: trailing plain
    columns (e.g. {"set": [...]}) with header cells (name, "", ""), as pandas writes a 1-level
    column into a 3-level frame (LP's prediction CSVs). NaN -> empty cell; floats by repr().
    """
    points = np.asarray(points, dtype=float)
    extra = extra or {}
    extra_columns = extra_columns or {}
    n_rows, n_kp = len(index), len(keypoint_names)
    if points.shape != (n_rows, n_kp, 2):
        raise ValueError(f"points shape {points.shape} != ({n_rows}, {n_kp}, 2)")
    for name, value in extra.items():
        if np.shape(value) != (n_rows, n_kp):
            raise ValueError(f"extra '{name}' shape {np.shape(value)} != ({n_rows}, {n_kp})")
    for name, value in extra_columns.items():
        if len(value) != n_rows:
            raise ValueError(f"extra column '{name}' has {len(value)} values for {n_rows} rows")
    coords = ["x", "y", *extra]
    stacked = np.concatenate(
        [points] + [np.asarray(v, dtype=float).reshape(n_rows, n_kp, 1) for v in extra.values()],
        axis=-1,
    ).reshape(n_rows, n_kp * len(coords))
    blanks = [""] * len(extra_columns)
    header = [
        ["scorer"] + [scorer] * (n_kp * len(coords)) + list(extra_columns),
        ["bodyparts"] + [k for k in keypoint_names for _ in coords] + blanks,
        ["coords"] + coords * n_kp + blanks,
    ]

    def cell(value: float) -> str:
        return "" if np.isnan(value) else repr(float(value))

    columns = [list(values) for values in extra_columns.values()]
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerows(header)
        for i, key in enumerate(index):
            writer.writerow([key, *map(cell, stacked[i]), *(str(c[i]) for c in columns)])
