"""Lightning Pose multiview datasets: one DLC-style CSV per view, rows aligned across views.

Layout (README "Your own data"):
  CollectedData_<view>.csv                    one per view, in `data.view_names` order
  labeled-data/<session>_<view>/<frame>.png   row n of every CSV is the same instant
  calibrations.csv                            optional `data.camera_params_file`
  calibrations/<session>.toml, calibration.toml
  bboxes_<view>.csv                           optional `data.bbox_file`, header `,x,y,h,w`

Checks: one CSV per view, unique view names that cannot be confused in `<session>_<view>`
(`pipeline.core.views`); data.csv_file in view order (a CSV whose name ends with another view's
name, or whose image folders all belong to another view, is listed in the wrong place); the same
keypoints in the same order, the same row count and the same image basename on every row in all
views; one session per row.

Sessions: the image folder `<session>_<view>` with the trailing `_<view>` stripped (view names may
hold underscores: `s_1_cam_A` of view `cam_A` is session `s_1`); a folder that does not end with
`_<view>` is the session as a whole (then every view must use the same folder name on that row).

Images are read as stored: sizes come from the file header (PIL, which never applies an EXIF
orientation tag), pixels through `pipeline.data.images.read_image` (which ignores it too), so
labels are in the stored pixel grid, as DLC and LP label them.

Calibration per frame, first hit wins: (1) the `camera_params_file` (LP's calibrations.csv: first
column an image path without the view folder, e.g. `labeled-data/session0/img00000005.png`,
column `file` a TOML path relative to data_dir). LP matches its rows by basename and row order;
Parallax matches a row to a frame by (session, basename), the session being the path's folder
(a `_<view>` suffix is stripped if present), so row order does not matter and equal basenames in
different sessions cannot be confused. Frames it does not list fall through, listed rows that match
no frame are logged as a warning. (2) `calibrations/<session>.toml`. (3) `calibration.toml`.
Otherwise "" (no calibration for that frame).

Bboxes: the label CSVs are then in crop pixels; frame = bbox (x, y) + crop * (w / crop width,
h / crop height), the crop image size read from the image header when `check_images` is True
(crops may have been resized), else scale 1. Everything returned is in frame pixels. Boxes whose
h and w only fit their crop images when swapped are refused as swapped columns.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np

from pipeline.core.errors import ParallaxError
from pipeline.core.views import check_view_names, split_view
from pipeline.data.paths import (
    find_calibration,
    folder_of,
    folder_session,
    posix_path,
    relative_path,
    session_of,
)
from pipeline.data.sidecars import bbox_table, params_file_calibrations
from pipeline.io.labels_csv import LabelTable, read_label_csv

__all__ = [
    "MultiviewLabels",
    "find_calibration",
    "frame_keys",
    "image_size",
    "image_sizes",
    "load_labels",
    "relative_path",
    "session_of",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MultiviewLabels:
    """All views' labels, aligned by row (= frame = one instant).

    image_paths: (views, frames) the CSV row keys, relative to data_dir
    points_2d: (views, frames, keypoints, 2) frame pixels, NaN where missing
    visible: (views, frames, keypoints) LP visibility (0/1/2, NaN where missing) or None; a view
        whose CSV has no `visible` coord gets 2 where labelled when another view has one
    sessions, frame_names: (frames,) session name and image basename of each row
    bboxes: (views, frames, 4) x, y, h, w in frame pixels (LP order) or None
    calibration_files: (frames,) absolute path of the frame's calibration TOML, "" if none
    csv_files: (views,) each view's label CSV; csv_lines: (views, frames) the CSV line of each
        row (for messages), or None
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
    csv_files: tuple[Path, ...] = ()
    csv_lines: np.ndarray | None = None

    def where(self, view: int, frame: int) -> str:
        """`<csv> line <n>` of a view's row (for messages); the image path if unknown."""
        if self.csv_lines is None or not self.csv_files:
            return str(self.image_paths[view, frame])
        return f"{self.csv_files[view].name} line {int(self.csv_lines[view, frame])}"

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
        """The subset of frames given by indices or a boolean mask of length n_frames."""
        frames = np.asarray(frames)
        if frames.dtype == bool:
            if frames.shape != (self.n_frames,):
                raise ValueError(f"frame mask shape {frames.shape} != ({self.n_frames},)")
            frames = np.flatnonzero(frames)
        frames = frames.astype(int).reshape(-1)
        per_view = ("image_paths", "points_2d", "visible", "bboxes", "csv_lines")
        per_frame = ("sessions", "frame_names", "calibration_files")
        changes = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if value is not None and item.name in per_view:
                changes[item.name] = value[:, frames]
            elif item.name in per_frame:
                changes[item.name] = value[frames]
        return replace(self, **changes)


def frame_keys(labels: MultiviewLabels) -> list[str]:
    """A view-independent name per frame: `labeled-data/<session>/<image>` (LP style)."""
    return [
        f"labeled-data/{session}/{name}"
        for session, name in zip(labels.sessions, labels.frame_names, strict=True)
    ]


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image as stored, read from its header (no decode; PIL does not
    apply an EXIF orientation tag, and neither does `read_image`)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.size
    except FileNotFoundError:
        raise ParallaxError(f"{path}: image not found") from None
    except (OSError, UnidentifiedImageError) as err:
        raise ParallaxError(f"{path}: cannot read image: {err}") from None


def image_sizes(data_dir: Path, image_paths: np.ndarray) -> np.ndarray:
    """(..., 2) width, height of every image of `image_paths` (paths relative to data_dir),
    from the headers only: fast enough for thousands of images."""
    flat = [image_size(Path(data_dir) / posix_path(p)) for p in np.ravel(image_paths)]
    return np.array(flat, dtype=float).reshape(*np.shape(image_paths), 2)


def _check_view_order(tables: list[LabelTable], views: Sequence[str],
                      csv_files: Sequence[str]) -> None:
    """data.csv_file must follow data.view_names: a CSV named `..._<other view>.csv`, or whose
    image folders are all `<session>_<other view>`, is listed for the wrong view."""
    for i, (table, view, name) in enumerate(zip(tables, views, csv_files, strict=True)):
        named = split_view(Path(name).stem, views)
        if named and named[1] != view:
            raise ParallaxError(
                f"data.csv_file entry {i + 1} '{name}' is listed for view '{view}' (data."
                f"view_names {list(views)}) but its name says view '{named[1]}'; list the CSVs "
                "in data.view_names order"
            )
        owners = [folder_session(folder_of(p), views)[1] for p in table.index]
        found = [v for v in owners if v is not None]
        if found and view not in found:
            other = max(set(found), key=found.count)
            example = table.index[owners.index(other)]
            raise ParallaxError(
                f"{table.path}: listed for view '{view}' (data.csv_file entry {i + 1}) but its "
                f"images are in folders of view '{other}' (e.g. line {table.line_of(0)}: "
                f"'{example}'); list data.csv_file in data.view_names order"
            )


def _crop_scale(bboxes: np.ndarray, sizes: np.ndarray, tables: list[LabelTable],
                bbox_paths: Sequence[Path], image_paths: np.ndarray) -> np.ndarray:
    """(views, frames, 2) frame px per crop px (bbox w / width, h / height). Boxes whose h and w
    fit their crops only when swapped are refused (a swapped `,x,y,w,h` header, or columns
    mixed up), rather than blamed on the calibration later."""
    box_wh = np.stack([bboxes[..., 3], bboxes[..., 2]], axis=-1)
    scale = box_wh / sizes
    swapped = box_wh[..., ::-1] / sizes

    def uneven(s: np.ndarray) -> np.ndarray:
        return np.abs(np.log(s[..., 0] / s[..., 1])) > 0.01

    bad = uneven(scale) & ~uneven(swapped)
    if bad.any():
        view, frame = np.argwhere(bad)[0]
        (w, h), (width, height) = box_wh[view, frame], sizes[view, frame]
        raise ParallaxError(
            f"{bbox_paths[view]}: h and w look swapped: the box of '{image_paths[view, frame]}' "
            f"({tables[view].path.name} line {tables[view].line_of(frame)}) has w = {w:g}, "
            f"h = {h:g} but the image is {width:g}x{height:g} (w x h), which fits only with h "
            f"and w exchanged ({int(bad.sum())} boxes like this); columns are read by name, LP's "
            "header is ',x,y,h,w'"
        )
    return scale


def _check_alignment(tables: list[LabelTable]) -> None:
    """Same keypoints in the same order, same row count, same basename on every row."""
    first = tables[0]
    for table in tables[1:]:
        if table.keypoint_names != first.keypoint_names:
            ours, theirs = table.keypoint_names, first.keypoint_names
            at = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b),
                      min(len(ours), len(theirs)))
            here = f"'{ours[at]}'" if at < len(ours) else "nothing"
            there = f"'{theirs[at]}'" if at < len(theirs) else "nothing"
            raise ParallaxError(
                f"{table.path}: keypoint {at + 1} is {here} but {there} in {first.path.name} "
                f"({len(ours)} vs {len(theirs)} keypoints); every view needs the same keypoints "
                "in the same order"
            )
        if len(table.index) != len(first.index):
            more = "more" if len(table.index) > len(first.index) else "fewer"
            raise ParallaxError(
                f"{table.path}: {len(table.index)} rows, {more} than the {len(first.index)} rows "
                f"of {first.path.name}; row n of every view must be the same frame"
            )
        base_a = np.array([posix_path(p).name for p in first.index])
        base_b = np.array([posix_path(p).name for p in table.index])
        bad = np.flatnonzero(base_a != base_b)
        if bad.size:
            row = int(bad[0])
            raise ParallaxError(
                f"{table.path}: row {row + 1} (line {table.line_of(row)}) is '{table.index[row]}' "
                f"but row {row + 1} of {first.path.name} is '{first.index[row]}' ({bad.size} rows "
                "differ); image basenames must match row by row across views"
            )


def _sessions(tables: list[LabelTable], views: Sequence[str]) -> np.ndarray:
    per_view = np.array([[session_of(p, v) for p in t.index]
                         for t, v in zip(tables, views, strict=True)], dtype=object)
    bad = np.flatnonzero((per_view != per_view[0]).any(axis=0))
    if bad.size:
        row = int(bad[0])
        found = ", ".join(f"{t.path.name}: '{t.index[row]}' -> '{per_view[i, row]}'"
                          for i, t in enumerate(tables))
        raise ParallaxError(
            f"{tables[0].path.parent}: row {row + 1}: the views disagree on the session ({found});"
            " images go in labeled-data/<session>_<view>/"
        )
    return per_view[0]


def _check_images_exist(data_dir: Path, tables: list[LabelTable], image_paths: np.ndarray) -> None:
    exists = np.array([[(data_dir / posix_path(p)).is_file() for p in row] for row in image_paths],
                      dtype=bool).reshape(image_paths.shape)
    if not exists.all():
        view, row = np.argwhere(~exists)[0]
        raise ParallaxError(
            f"{data_dir / image_paths[view, row]}: image not found ({tables[view].path.name} "
            f"line {tables[view].line_of(row)}; {int((~exists).sum())} of {exists.size} labelled "
            "images missing in total)"
        )


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
    views = tuple(str(v) for v in view_names)
    if not data_dir.is_dir():
        raise ParallaxError(f"{data_dir}: dataset folder (data.data_dir) not found")
    if not views:
        raise ParallaxError("data.view_names is empty; list one view per label CSV")
    if len(csv_files) != len(views):
        raise ParallaxError(
            f"data.csv_file lists {len(csv_files)} files but data.view_names has {len(views)} "
            f"views ({list(views)}); give one CSV per view, in view order"
        )
    if len(set(views)) != len(views):
        dupes = sorted({v for v in views if views.count(v) > 1})
        raise ParallaxError(f"data.view_names has duplicates {dupes}: {list(views)}")
    check_view_names(views)
    if bbox_files is not None and len(bbox_files) != len(views):
        raise ParallaxError(
            f"data.bbox_file lists {len(bbox_files)} files but data.view_names has {len(views)} "
            "views; give one bbox CSV per view, in view order"
        )
    tables = [read_label_csv(data_dir / name) for name in csv_files]
    _check_view_order(tables, views, csv_files)
    _check_alignment(tables)
    image_paths = np.array([list(t.index) for t in tables], dtype=object).reshape(len(views), -1)
    frame_names = np.array([posix_path(p).name for p in tables[0].index], dtype=object)
    sessions = _sessions(tables, views)
    if check_images:
        _check_images_exist(data_dir, tables, image_paths)
    points = np.stack([t.points for t in tables])
    visible = None
    if any(t.visible is not None for t in tables):
        visible = np.stack([t.visible if t.visible is not None
                            else np.where(np.isnan(t.points[..., 0]), np.nan, 2.0)
                            for t in tables])
    bboxes = None
    if bbox_files:
        bboxes = bbox_table(data_dir, bbox_files, tables)
        scale = np.ones((len(views), len(frame_names), 2))
        if check_images:  # crop images may have been resized: scale = bbox size / image size
            scale = _crop_scale(bboxes, image_sizes(data_dir, image_paths), tables,
                                [data_dir / name for name in bbox_files], image_paths)
        points = bboxes[:, :, None, :2] + points * scale[:, :, None, :]
    by_session = {s: str(find_calibration(data_dir, s) or "") for s in dict.fromkeys(sessions)}
    calibration = np.array([by_session[s] for s in sessions], dtype=object)
    if camera_params_file:
        listed = params_file_calibrations(data_dir, camera_params_file, views, sessions,
                                           frame_names)
        calibration = np.where(listed != "", listed, calibration).astype(object)
    counts = np.isfinite(points).all(-1).sum(axis=(1, 2))
    log.info("%s: %d frames, %d sessions, %d keypoints; labelled points per view: %s", data_dir,
             len(frame_names), len(set(sessions)), len(tables[0].keypoint_names),
             ", ".join(f"{v} {c}" for v, c in zip(views, counts.tolist(), strict=True)))
    empty = ~np.isfinite(points).all(-1).any(axis=(0, 2))
    if empty.any():
        log.info("%s: %d frames have no label in any view (kept in the split, but they add "
                 "no loss and nothing to triangulate), e.g. line %d of %s", data_dir,
                 int(empty.sum()), int(np.flatnonzero(empty)[0]) + 4, csv_files[0])
    if not (calibration != "").all():
        log.info("%s: %d of %d frames have no calibration file", data_dir,
                 int((calibration == "").sum()), len(calibration))
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
        csv_files=tuple(t.path for t in tables),
        csv_lines=np.array([[t.line_of(r) for r in range(len(t.index))] for t in tables],
                           dtype=int).reshape(len(views), -1),
    )


def load_dataset(args: argparse.Namespace, *, check_images: bool = True) -> MultiviewLabels:
    """Load the labelled dataset described by :func:`add_dataset_args`'s arguments."""
    return load_labels(
        args.data_dir,
        args.view_names,
        args.csv_files,
        bbox_files=args.bbox_files,
        camera_params_file=args.camera_params_file,
        check_images=check_images,
    )
