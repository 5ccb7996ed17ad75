"""anipose `calibration.toml` reading and writing, with the structural checks on load.

Reading: stdlib tomllib, `[cam_N]` tables in NUMERIC order, every problem a ParallaxError naming
the file and camera. Writing: a tiny TOML writer whose floats use repr(), so a dump/load round
trip is bit-exact, written atomically.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.atomic import atomic_path
from pipeline.core.errors import ParallaxError
from pipeline.geometry.cameras import Camera, CameraGroup, _check_camera

_CAM_KEY = re.compile(r"cam_(\d+)")


def _context(where: str, name: str) -> str:
    """'file.toml [cam_2]' + 'side' -> "file.toml: camera 'side' ([cam_2])"."""
    match = re.fullmatch(r"(.*) (\[[^\]]*\])", where)
    if match:
        return f"{match[1]}: camera '{name}' ({match[2]})"
    return f"{where}: camera '{name}'" if where else f"camera '{name}'"


def _numbers(value: Any, shape: tuple[int, ...], ctx: str, key: str) -> np.ndarray:
    """A nested list of finite numbers of exactly `shape`, as float64."""

    def ok(v: Any, dims: tuple[int, ...]) -> bool:
        if not dims:
            return isinstance(v, int | float) and not isinstance(v, bool)
        return isinstance(v, list) and len(v) == dims[0] and all(ok(e, dims[1:]) for e in v)

    if not ok(value, shape):
        text = repr(value)
        text = text if len(text) <= 120 else text[:117] + "..."
        want = " x ".join(map(str, shape))
        raise ParallaxError(f"{ctx}: '{key}' must be {want} numbers, got {text}")
    arr = np.array(value, dtype=float)
    if not np.isfinite(arr).all():
        raise ParallaxError(f"{ctx}: '{key}' has non-finite values {arr.tolist()}")
    return arr


def camera_to_dict(cam: Camera) -> dict[str, Any]:
    """The anipose TOML table of a camera."""
    d: dict[str, Any] = {
        "name": cam.name,
        "size": list(cam.size),
        "matrix": cam.matrix.tolist(),
        "distortions": cam.dist.tolist(),
        "rotation": cam.rvec.tolist(),
        "translation": cam.tvec.tolist(),
    }
    if cam.fisheye:
        d["fisheye"] = True
    return d


def camera_from_dict(d: dict[str, Any], *, where: str) -> Camera:
    """A camera from its anipose TOML table; `where` ("file.toml [cam_2]") is for errors."""
    if not isinstance(d, dict):
        raise ParallaxError(f"{where}: expected a table, got {type(d).__name__}")
    name = d.get("name")
    ctx = _context(where, name if isinstance(name, str) else "?")
    if not isinstance(name, str) or not name:
        raise ParallaxError(f"{ctx}: 'name' must be a non-empty string, got {name!r}")
    missing = [
        k for k in ("size", "matrix", "distortions", "rotation", "translation") if k not in d
    ]
    if missing:
        raise ParallaxError(f"{ctx}: missing key(s) {', '.join(map(repr, missing))}")
    fisheye = d.get("fisheye", False)
    if not isinstance(fisheye, bool):
        raise ParallaxError(f"{ctx}: 'fisheye' must be true or false, got {fisheye!r}")
    size = d["size"]
    dist = d["distortions"]
    if not isinstance(dist, list):
        raise ParallaxError(f"{ctx}: 'distortions' must be a list of numbers, got {dist!r}")
    cam = dict(
        name=name,
        size=tuple(size) if isinstance(size, list) else size,
        fisheye=fisheye,
        matrix=_numbers(d["matrix"], (3, 3), ctx, "matrix"),
        dist=_numbers(dist, (len(dist),), ctx, "distortions"),
        rvec=_numbers(d["rotation"], (3,), ctx, "rotation"),
        tvec=_numbers(d["translation"], (3,), ctx, "translation"),
    )
    probe = object.__new__(Camera)
    for key, value in cam.items():
        object.__setattr__(probe, key, value)
    _check_camera(probe, ctx)
    return Camera(**cam)


def read_calibration(path: str | Path, view_names: Sequence[str] | None = None) -> CameraGroup:
    """Read an anipose calibration.toml; cameras in numeric cam_N order, checked.

    With `view_names`, the camera names must equal them in the same order.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParallaxError(f"{path}: calibration file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ParallaxError(f"{path}: cannot read calibration file: {err}") from None
    except tomllib.TOMLDecodeError as err:
        raise ParallaxError(f"{path}: not valid TOML: {err}") from None
    keys = sorted((int(m[1]), k) for k in data if (m := _CAM_KEY.fullmatch(k)))
    if not keys:
        raise ParallaxError(f"{path}: no [cam_N] tables found (keys: {sorted(data)})")
    cameras = tuple(camera_from_dict(data[k], where=f"{path} [{k}]") for _, k in keys)
    sections = {cam.name: [] for cam in cameras}
    for (_, key), cam in zip(keys, cameras, strict=True):
        sections[cam.name].append(f"[{key}]")
    for name, secs in sections.items():
        if len(secs) > 1:
            raise ParallaxError(f"{path}: camera name '{name}' is used by {' and '.join(secs)}")
    metadata = data.get("metadata", {})
    if not isinstance(metadata, dict):
        raise ParallaxError(f"{path}: [metadata] must be a table, got {metadata!r}")
    group = CameraGroup(cameras=cameras, metadata=metadata)
    if view_names is not None:
        _check_views(group, path, list(view_names), dict(sections))
    return group


def _check_views(
    group: CameraGroup, path: Path, views: list[str], sections: dict[str, list[str]]
) -> None:
    names = list(group.names)
    if names == views:
        return
    missing = [v for v in views if v not in names]
    extra = [f"'{n}' ({sections[n][0]})" for n in names if n not in views]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"no camera for view(s) {missing}")
        if extra:
            parts.append(f"camera(s) {', '.join(extra)} not in the view names")
        raise ParallaxError(
            f"{path}: {'; '.join(parts)} (cameras {names}, views {views}); camera names "
            "must equal the view names"
        )
    raise ParallaxError(
        f"{path}: cameras are in order {names} but the views are {views}; write the "
        "[cam_N] tables in view order (cameras are matched by name, never by position)"
    )


def write_calibration(group: CameraGroup, path: str | Path) -> None:
    """Write anipose TOML ([cam_0] ... in order, then [metadata]) atomically, bit-exact."""
    chunks = [_toml_table(f"cam_{i}", camera_to_dict(cam)) for i, cam in enumerate(group.cameras)]
    chunks.append(_toml_table("metadata", group.metadata))
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(chunks), encoding="utf-8")


# ---------------------------------------------------------------- tiny TOML writer
def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_str(key)


def _toml_str(s: str) -> str:
    out = s.replace("\\", "\\\\").replace('"', '\\"')
    out = re.sub(r"[\x00-\x1f\x7f]", lambda m: f"\\u{ord(m[0]):04x}", out)
    return f'"{out}"'


def _toml_value(v: Any) -> str:
    if isinstance(v, bool | np.bool_):
        return "true" if v else "false"
    if isinstance(v, int | np.integer):
        return str(int(v))
    if isinstance(v, float | np.floating):
        v = float(v)
        if math.isnan(v):
            return "nan"
        return repr(v) if math.isfinite(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, list | tuple | np.ndarray):
        return "[" + ", ".join(_toml_value(e) for e in v) + "]"
    if isinstance(v, dict):
        return (
            "{" + ", ".join(f"{_toml_key(str(k))} = {_toml_value(e)}" for k, e in v.items()) + "}"
        )
    if hasattr(v, "isoformat"):
        return v.isoformat()
    raise ParallaxError(f"cannot write {type(v).__name__} value {v!r} to TOML")


def _toml_table(name: str, table: dict[str, Any]) -> str:
    lines = [f"[{name}]"] + [f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"
