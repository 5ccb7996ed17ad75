"""LP's optional per-dataset files: calibrations.csv (`data.camera_params_file`) and the bbox
CSVs (`data.bbox_file`), read and matched to the labelled frames."""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.core.errors import ParallaxError
from pipeline.data.paths import folder_of, folder_session, posix_path
from pipeline.io.labels_csv import LabelTable

log = logging.getLogger(__name__)


def read_plain_csv(path: Path, what: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and (line, cells) rows of a simple one-header CSV; blank lines skipped."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            rows, start = [], 1
            for row in reader:
                if any(c.strip() for c in row):
                    rows.append((start, [c.strip() for c in row]))
                start = reader.line_num + 1
    except FileNotFoundError:
        raise ParallaxError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ParallaxError(f"{path}: cannot read {what}: {err}") from None
    if not rows:
        raise ParallaxError(f"{path}: {what} is empty")
    header = rows[0][1]
    for line, row in rows[1:]:
        if len(row) != len(header):
            raise ParallaxError(f"{path}: line {line} has {len(row)} cells, the header has "
                                f"{len(header)}")
    return header, rows[1:]


def params_file_calibrations(data_dir: Path, name: str, views: Sequence[str],
                              sessions: np.ndarray, frame_names: np.ndarray) -> np.ndarray:
    """LP calibrations.csv: match rows to frames by (session, basename); "" where not listed."""
    path = data_dir / name
    header, rows = read_plain_csv(path, "calibrations file (data.camera_params_file)")
    if "file" not in header[1:]:
        raise ParallaxError(f"{path}: needs an image-path first column and a 'file' column "
                            f"(header found: {header})")
    col = header.index("file", 1)
    lookup: dict[tuple[str, str], tuple[str, int]] = {}
    for line, row in rows:
        image, toml = row[0], row[col]
        if not image or not toml:
            raise ParallaxError(f"{path}: line {line}: needs an image path and a 'file' value")
        parts = posix_path(image).parts
        # tolerate paths that keep the view folder: the longest view name ending it is stripped
        folder = folder_session(folder_of(image), views)[0]
        toml_path = (data_dir / toml).absolute()
        if not toml_path.is_file():
            raise ParallaxError(f"{path}: line {line}: calibration file '{toml}' not found "
                                f"(looked for {toml_path})")
        key = (folder, parts[-1])
        if key in lookup and lookup[key][0] != str(toml_path):
            raise ParallaxError(f"{path}: line {line}: '{image}' is listed again (line "
                                f"{lookup[key][1]}) with a different calibration file")
        lookup[key] = (str(toml_path), line)
    keys = list(zip(sessions, frame_names, strict=True))
    unused = len(set(lookup) - set(keys))
    if unused:
        log.warning("%s: %d of %d rows match no labelled frame (matched by session folder and "
                    "image name)", path, unused, len(lookup))
    return np.array([lookup.get(k, ("", 0))[0] for k in keys], dtype=object)


def bbox_table(data_dir: Path, bbox_files: Sequence[str], tables: list[LabelTable]) -> np.ndarray:
    """(views, frames, 4) x, y, h, w from LP bbox CSVs whose index equals the label CSV's."""
    boxes = []
    for name, table in zip(bbox_files, tables, strict=True):
        path = data_dir / name
        header, rows = read_plain_csv(path, "bbox file (data.bbox_file)")
        missing = [c for c in ("x", "y", "h", "w") if c not in header[1:]]
        if missing:
            raise ParallaxError(f"{path}: bbox CSV lacks column(s) {missing} (expected header "
                                f"',x,y,h,w', found {header})")
        index = [row[0] for _, row in rows]
        if index != list(table.index):
            row = next((i for i, (a, b) in enumerate(zip(index, table.index, strict=False))
                        if a != b), min(len(index), len(table.index)))
            ours = f"'{index[row]}' (line {rows[row][0]})" if row < len(index) else "nothing"
            theirs = f"'{table.index[row]}'" if row < len(table.index) else "nothing"
            raise ParallaxError(
                f"{path}: row {row + 1} is {ours} but {table.path.name} row {row + 1} is {theirs}"
                f" ({len(index)} vs {len(table.index)} rows); bbox rows must list the same images"
                " in the same order as the label CSV"
            )
        values = np.empty((len(rows), 4))
        for i, (line, row) in enumerate(rows):
            for j, column in enumerate(("x", "y", "h", "w")):
                cell = row[header.index(column, 1)]
                try:
                    values[i, j] = float(cell)
                except ValueError:
                    values[i, j] = np.nan
                if not np.isfinite(values[i, j]) or (j >= 2 and values[i, j] <= 0):
                    raise ParallaxError(f"{path}: line {line}: {column} = '{cell}' is not a valid "
                                        "bbox value (finite; h and w > 0)")
        boxes.append(values)
    return np.stack(boxes)
