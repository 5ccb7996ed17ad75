"""Lightning Pose multiview datasets: one DLC-style CSV per view, rows aligned across views.

Layout (docs: formats.md §2): `CollectedData_<view>.csv` per view, images in
`labeled-data/<session>_<view>/<frame>.<ext>`, calibration per frame from (1) the optional
`data.camera_params_file` (LP's calibrations.csv), (2) `calibrations/<session>.toml`,
(3) `calibration.toml`. Optional per-view bbox CSVs (`,x,y,h,w`) map crop pixels to frame
pixels. Everything returned is in frame pixels of the original camera image.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from pipeline.errors import ParallaxError
from pipeline.labels_io import LabelTable, read_label_csv, write_label_csv

__all__ = [
    "LabelTable",
    "MultiviewLabels",
    "find_calibration",
    "frame_keys",
    "image_size",
    "load_labels",
    "read_frame_table",
    "read_label_csv",
    "relative_path",
    "session_of",
    "write_label_csv",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MultiviewLabels:
    """All views' labels, aligned by row (= frame = one instant).

    image_paths: (views, frames) the CSV row keys, relative to data_dir
    points_2d: (views, frames, keypoints, 2) frame pixels, NaN where missing
    visible: (views, frames, keypoints) LP visibility (0/1/2, NaN where missing) or None
    sessions, frame_names: (frames,) session name and image basename of each row
    bboxes: (views, frames, 4) x, y, h, w in frame pixels (LP order) or None
    calibration_files: (frames,) absolute path of the frame's calibration TOML, "" if none
    """

    data_dir: Path
    view_names: tuple[str, ...]
    keypoint_names: tuple[str, ...]
    image_paths: np.ndarray
    points_2d: np.ndarray
    visible: np.ndarray | None
    sessions: np.ndarray
    frame_names: np.ndarray
    bboxes: np.ndarray | None
    calibration_files: np.ndarray

    @property
    def n_views(self) -> int:
        return len(self.view_names)

    @property
    def n_frames(self) -> int:
        return int(self.points_2d.shape[1])

    @property
    def n_keypoints(self) -> int:
        return len(self.keypoint_names)

    def select(self, frames: np.ndarray | Sequence[int]) -> MultiviewLabels:
        """The subset of frames given by indices or a boolean mask."""
        frames = np.asarray(frames)
        if frames.dtype == bool:
            frames = np.flatnonzero(frames)
        per_view = {"image_paths", "points_2d", "visible", "bboxes"}
        per_frame = {"sessions", "frame_names", "calibration_files"}
        changes = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if value is not None and field.name in per_view:
                changes[field.name] = value[:, frames]
            elif field.name in per_frame:
                changes[field.name] = value[frames]
        return MultiviewLabels(**{**{f.name: getattr(self, f.name) for f in fields(self)},
                                  **changes})


def session_of(image_path: str, view: str) -> str:
    """`labeled-data/sess1_cam0/img5.png`, `cam0` -> `sess1`; a folder without `_<view>` is
    returned whole."""
    parts = PurePosixPath(image_path.replace("\\", "/")).parts
    folder = parts[-2] if len(parts) >= 2 else ""
    suffix = f"_{view}"
    return folder[: -len(suffix)] if folder.endswith(suffix) and folder != suffix else folder


def frame_keys(labels: MultiviewLabels) -> list[str]:
    """A view-independent name per frame: `labeled-data/<session>/<image>` (LP style)."""
    return [
        f"labeled-data/{session}/{name}"
        for session, name in zip(labels.sessions, labels.frame_names, strict=True)
    ]


def read_frame_table(path: str | Path, keys: Sequence[str], stage: str) -> pd.DataFrame:
    """A per-frame CSV written by `stage` (its `image` column = `frame_keys`), checked to list
    exactly the dataset's labelled frames in order."""
    try:
        table = pd.read_csv(path)
    except (OSError, ValueError) as err:
        raise ParallaxError(f"{path}: cannot read: {err}") from None
    if list(table.get("image", [])) != list(keys):
        raise ParallaxError(f"{path}: its frames differ from the dataset's labelled frames; "
                            f"rerun {stage}")
    return table


def relative_path(path: str | Path, data_dir: Path) -> str:
    """`path` relative to the dataset folder when inside it, else unchanged (for portable
    tables and summaries)."""
    try:
        return str(Path(path).absolute().relative_to(Path(data_dir).absolute()))
    except ValueError:
        return str(path)


def find_calibration(data_dir: Path, session: str) -> Path | None:
    """`calibrations/<session>.toml`, else `calibration.toml`, else None."""
    for candidate in (data_dir / "calibrations" / f"{session}.toml",
                      data_dir / "calibration.toml"):
        if candidate.is_file():
            return candidate.absolute()
    return None


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image from its header (no full decode)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.size
    except FileNotFoundError:
        raise ParallaxError(f"{path}: image not found") from None
    except (OSError, UnidentifiedImageError) as err:
        raise ParallaxError(f"{path}: cannot read image: {err}") from None


def _check_alignment(tables: list[LabelTable]) -> None:
    """Same keypoints in the same order, same row count, same basename on every row."""
    first = tables[0]
    for table in tables[1:]:
        if table.keypoint_names != first.keypoint_names:
            pairs = zip(first.keypoint_names, table.keypoint_names, strict=False)
            where = next((i for i, (a, b) in enumerate(pairs) if a != b),
                         min(len(first.keypoint_names), len(table.keypoint_names)))
            raise ParallaxError(
                f"{table.path}: keypoints differ from {first.path.name} at position {where + 1}: "
                f"{list(table.keypoint_names)} vs {list(first.keypoint_names)}; every view needs "
                "the same keypoints in the same order"
            )
        if len(table.index) != len(first.index):
            raise ParallaxError(
                f"{table.path}: {len(table.index)} rows but {first.path.name} has "
                f"{len(first.index)}; row n of every view must be the same frame"
            )
        base_a = np.array([PurePosixPath(p).name for p in first.index])
        base_b = np.array([PurePosixPath(p).name for p in table.index])
        bad = np.flatnonzero(base_a != base_b)
        if bad.size:
            row = int(bad[0])
            raise ParallaxError(
                f"{table.path}: row {row + 1} is '{table.index[row]}' but {first.path.name} row "
                f"{row + 1} is '{first.index[row]}' ({bad.size} rows differ); image basenames "
                "must match row by row across views"
            )


def _sessions(tables: list[LabelTable], views: Sequence[str]) -> np.ndarray:
    per_view = np.array([[session_of(p, v) for p in t.index] for t, v in zip(tables, views,
                                                                              strict=True)])
    bad = np.flatnonzero((per_view != per_view[0]).any(axis=0))
    if bad.size:
        row = int(bad[0])
        found = {v: per_view[i, row] for i, v in enumerate(views)}
        raise ParallaxError(
            f"{tables[0].path}: row {row + 1}: views disagree on the session {found}; images go "
            "in labeled-data/<session>_<view>/"
        )
    return per_view[0]


def _params_file_calibrations(data_dir: Path, name: str, sessions: np.ndarray,
                              frame_names: np.ndarray) -> np.ndarray:
    """LP calibrations.csv: match rows to frames by (session, basename); "" where not listed."""
    path = data_dir / name
    try:
        table = pd.read_csv(path, index_col=0)
    except FileNotFoundError:
        raise ParallaxError(f"{path}: data.camera_params_file not found") from None
    except (OSError, ValueError) as err:
        raise ParallaxError(f"{path}: cannot read data.camera_params_file: {err}") from None
    if "file" not in table.columns:
        raise ParallaxError(f"{path}: needs a 'file' column (found {list(table.columns)})")
    lookup = {}
    for line, (image, toml) in enumerate(zip(table.index, table["file"], strict=True), start=2):
        parts = PurePosixPath(str(image)).parts
        toml_path = (data_dir / str(toml)).absolute()
        if not toml_path.is_file():
            raise ParallaxError(f"{path}: line {line}: calibration '{toml}' not found")
        lookup[(parts[-2] if len(parts) >= 2 else "", parts[-1])] = str(toml_path)
    return np.array([lookup.get((s, f), "") for s, f in zip(sessions, frame_names, strict=True)],
                    dtype=object)


def _bboxes(data_dir: Path, bbox_files: Sequence[str], tables: list[LabelTable]) -> np.ndarray:
    """(views, frames, 4) x, y, h, w from LP bbox CSVs whose index equals the label CSV's."""
    boxes = []
    for name, table in zip(bbox_files, tables, strict=True):
        path = data_dir / name
        try:
            frame = pd.read_csv(path, index_col=0)
        except FileNotFoundError:
            raise ParallaxError(f"{path}: bbox file (data.bbox_file) not found") from None
        missing = [c for c in ("x", "y", "h", "w") if c not in frame.columns]
        if missing:
            raise ParallaxError(f"{path}: bbox CSV lacks column(s) {missing} (header ,x,y,h,w)")
        index = [str(i) for i in frame.index]
        if index != list(table.index):
            row = next((i for i, (a, b) in enumerate(zip(index, table.index, strict=False))
                        if a != b), min(len(index), len(table.index)))
            raise ParallaxError(
                f"{path}: row {row + 1} does not match {table.path.name} (bbox rows must list "
                f"the same images in the same order; {len(index)} vs {len(table.index)} rows)"
            )
        values = frame[["x", "y", "h", "w"]].to_numpy(dtype=float)
        if not np.isfinite(values).all() or (values[:, 2:] <= 0).any():
            row = int(np.flatnonzero(~np.isfinite(values).all(1) | (values[:, 2:] <= 0).any(1))[0])
            raise ParallaxError(f"{path}: row {row + 1}: bbox {values[row].tolist()} is invalid")
        boxes.append(values)
    return np.stack(boxes)


def load_labels(
    data_dir: str | Path,
    view_names: Sequence[str],
    csv_files: Sequence[str],
    *,
    bbox_files: Sequence[str] | None = None,
    camera_params_file: str | None = None,
    check_images: bool = True,
) -> MultiviewLabels:
    """Read and cross-check an LP multiview dataset (see the module docstring)."""
    data_dir = Path(data_dir)
    views = tuple(view_names)
    if len(csv_files) != len(views):
        raise ParallaxError(
            f"data.csv_file lists {len(csv_files)} files but data.view_names has {len(views)} "
            "views; give one CSV per view, in view order"
        )
    if len(set(views)) != len(views):
        raise ParallaxError(f"data.view_names has duplicates: {list(views)}")
    if bbox_files is not None and len(bbox_files) != len(views):
        raise ParallaxError(
            f"data.bbox_file lists {len(bbox_files)} files but there are {len(views)} views"
        )
    tables = [read_label_csv(data_dir / name) for name in csv_files]
    _check_alignment(tables)
    image_paths = np.array([list(t.index) for t in tables], dtype=object)
    frame_names = np.array([PurePosixPath(p).name for p in tables[0].index], dtype=object)
    sessions = _sessions(tables, views)
    if check_images:
        exists = np.vectorize(lambda p: (data_dir / p).is_file(), otypes=[bool])(image_paths)
        if not exists.all():
            view, row = np.argwhere(~exists)[0]
            raise ParallaxError(
                f"{data_dir / image_paths[view, row]}: image not found ({tables[view].path.name} "
                f"row {row + 1}; {int((~exists).sum())} labelled images missing in total)"
            )
    points = np.stack([t.points for t in tables])
    visible = None
    if any(t.visible is not None for t in tables):
        visible = np.stack([t.visible if t.visible is not None
                            else np.where(np.isnan(t.points[..., 0]), np.nan, 2.0)
                            for t in tables])
    bboxes = None
    if bbox_files:
        bboxes = _bboxes(data_dir, bbox_files, tables)
        scale = np.ones((len(views), len(frame_names), 2))
        if check_images:
            sizes = np.array([[image_size(data_dir / p) for p in row] for row in image_paths],
                             dtype=float)  # crop images may have been resized
            scale = np.stack([bboxes[..., 3], bboxes[..., 2]], axis=-1) / sizes
        points = bboxes[:, :, None, :2] + points * scale[:, :, None, :]
    calibration = np.array([str(find_calibration(data_dir, s) or "") for s in sessions],
                           dtype=object)
    if camera_params_file:
        listed = _params_file_calibrations(data_dir, camera_params_file, sessions, frame_names)
        calibration = np.where(listed != "", listed, calibration)
    counts = np.isfinite(points).all(-1).sum(axis=(1, 2))
    log.info("%s: %d frames, %d keypoints; labelled points per view: %s", data_dir,
             len(frame_names), len(tables[0].keypoint_names),
             dict(zip(views, counts.tolist(), strict=True)))
    return MultiviewLabels(
        data_dir=data_dir,
        view_names=views,
        keypoint_names=tables[0].keypoint_names,
        image_paths=image_paths,
        points_2d=points,
        visible=visible,
        sessions=sessions.astype(object),
        frame_names=frame_names,
        bboxes=bboxes,
        calibration_files=calibration,
    )
