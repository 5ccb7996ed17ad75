"""View names inside file and folder names: `<session>_<view>`, and the checks of a set of view
names (standard library only: the workflow runs them at start, every stage again).

Lightning Pose puts the view after the session, joined by `_`, in image folders
(`labeled-data/<session>_<view>/img.png`) and videos (`videos/<session>_<view>.mp4`). View names
may hold underscores themselves (`camera_0`, `cam_A`, `Camera_left`), so a name is never split
at an `_`: it is matched against the known view names, and the longest view whose `_<view>` ends
the name wins (`s1_cam_A` with views `cam_A`, `cam_B` -> session `s1`, view `cam_A`).

That is unambiguous unless one view name ends with `_` + another view name (views `a` and
`b_a`: `x_b_a` is session `x` of view `b_a` or session `x_b` of view `a`). Such sets of view
names are rejected (:func:`view_name_clashes`), at workflow start and by every stage.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.core.errors import ParallaxError


def split_view(name: str, views: Sequence[str]) -> tuple[str, str] | None:
    """(session, view) of `<session>_<view>` (longest matching view), None when no view name
    ends `name` after an `_` with a non-empty session before it."""
    matches = [v for v in views if name.endswith(f"_{v}") and len(name) > len(v) + 1]
    if not matches:
        return None
    view = max(matches, key=len)
    return name[: -len(view) - 1], view


def view_name_clashes(views: Sequence[str]) -> list[str]:
    """One sentence per pair of view names that make `<session>_<view>` ambiguous."""
    clashes = []
    for long in views:
        for short in views:
            if long != short and long.endswith(f"_{short}"):
                head = long[: -len(short) - 1]
                clashes.append(
                    f"'{long}' ends with '_{short}', so a folder or video named "
                    f"'x_{long}' could be session 'x' of view '{long}' or session "
                    f"'x_{head}' of view '{short}'"
                )
    return clashes


def check_view_names(views: Sequence[str], key: str = "data.view_names") -> None:
    """ParallaxError naming the clashing view names, if any (see the module docstring)."""
    clashes = view_name_clashes(views)
    if clashes:
        raise ParallaxError(f"{key} {list(views)}: ambiguous view names: {'; '.join(clashes)}; "
                            "rename one of them")


def check_min_views(min_views: int, views: Sequence[str],
                    key: str = "triangulation.min_views (--min-views)") -> None:
    """ParallaxError naming `key` unless 2 <= min_views <= the number of views."""
    if not 2 <= min_views <= len(views):
        raise ParallaxError(
            f"{key} is {min_views} but data.view_names lists {len(views)} views "
            f"{list(views)}; it must be between 2 and {len(views)}"
        )
