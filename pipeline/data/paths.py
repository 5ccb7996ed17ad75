"""Paths in an LP project: sessions from image folders, frame keys, calibration discovery.

A folder `<session>_<view>` is resolved by the known view names (`pipeline.core.views`), never
by splitting at an `_`: view names may hold underscores (`cam_A`, `Camera_left`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from pipeline.core.views import split_view


def posix_path(image_path: str) -> PurePosixPath:
    return PurePosixPath(str(image_path).replace("\\", "/"))


def folder_of(image_path: str) -> str:
    """The image's folder name (`labeled-data/s1_top/img5.png` -> `s1_top`), "" if none."""
    parts = posix_path(image_path).parts
    return parts[-2] if len(parts) >= 2 else ""


def session_of(image_path: str, view: str) -> str:
    """`labeled-data/sess1_cam0/img5.png`, `cam0` -> `sess1` (the row's own view is known, so
    `labeled-data/s_1_cam_A/x.png`, `cam_A` -> `s_1`); a folder without `_<view>` is returned
    whole."""
    folder = folder_of(image_path)
    parts = split_view(folder, [view])
    return parts[0] if parts else folder


def folder_session(folder: str, views: Sequence[str]) -> tuple[str, str | None]:
    """(session, view) of a folder name whose view is not known: the longest view name that
    ends it after an `_`; (folder, None) when none does."""
    parts = split_view(folder, views)
    return parts if parts else (folder, None)


def relative_path(path: str | Path, data_dir: Path) -> str:
    """`path` relative to the dataset folder when inside it, else unchanged (for portable
    tables and summaries)."""
    try:
        return str(Path(path).absolute().relative_to(Path(data_dir).absolute()))
    except ValueError:
        return str(path)


def find_calibration(data_dir: Path, session: str) -> Path | None:
    """`calibrations/<session>.toml`, else `calibration.toml`, else None (absolute paths)."""
    data_dir = Path(data_dir)
    for candidate in (data_dir / "calibrations" / f"{session}.toml",
                      data_dir / "calibration.toml"):
        if candidate.is_file():
            return candidate.absolute()
    return None
