"""Paths in an LP project: sessions from image folders, frame keys, calibration discovery."""

from __future__ import annotations

from pathlib import Path, PurePosixPath


def posix_path(image_path: str) -> PurePosixPath:
    return PurePosixPath(str(image_path).replace("\\", "/"))


def session_of(image_path: str, view: str) -> str:
    """`labeled-data/sess1_cam0/img5.png`, `cam0` -> `sess1`; a folder without `_<view>` is
    returned whole."""
    parts = posix_path(image_path).parts
    folder = parts[-2] if len(parts) >= 2 else ""
    suffix = f"_{view}"
    return folder[: -len(suffix)] if folder.endswith(suffix) and folder != suffix else folder


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
