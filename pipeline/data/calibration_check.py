"""Calibration validation: structural checks and per-camera reprojection errors of the
labels, with each camera in and left out of the triangulation, and the camera(s) to blame.

Errors (the calibration cannot work): K's third row not [0, 0, 1], focal lengths <= 0, K[1][0]
!= 0, bad sizes or non-finite numbers (all on load, `pipeline.io.calibration_toml`), camera names
other than `data.view_names` or in another order, two cameras with identical parameters (one is
a copy; the others tell which), two cameras at the same position (a zero baseline: what only
those two see cannot be triangulated; in practice a copied translation), an image whose size
differs from its camera's `size`, a labelled camera with fewer than 3 checkable labels, and
reprojection errors above the limit.

Warnings (a working calibration can look like this; the reprojection of the labels decides):
a principal point outside the image (a near-orthographic or off-centre camera),
and a camera with no labels at all in the frames using the calibration (it cannot be checked
from labels; triangulation, the cache and training go on without its labels). Warnings go to
the log and to summary.json's `warnings`.
"""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pandas as pd

from pipeline.core.errors import ParallaxError
from pipeline.data.paths import relative_path
from pipeline.data.project import MultiviewLabels, image_sizes
from pipeline.data.triangulate import load_calibrations, triangulate_labels
from pipeline.geometry.cameras import CameraGroup

log = logging.getLogger(__name__)


def structural_problems(name: str, group: CameraGroup) -> tuple[list[str], list[str]]:
    """(errors, warnings) `pipeline.io.calibration_toml.read_calibration` cannot see on one camera
    alone."""
    problems, warnings = [], []
    for index, cam in enumerate(group.cameras):
        width, height = cam.size
        cx, cy = cam.matrix[0, 2], cam.matrix[1, 2]
        if not (0 <= cx < width and 0 <= cy < height):
            warnings.append(
                f"{name}: camera '{cam.name}' ([cam_{index}]) principal point ({cx:g}, {cy:g}) "
                f"lies outside its {width}x{height} image (fine for a "
                "near-orthographic or off-centre camera; the reprojection of the labels decides)"
            )
    centers = np.stack([cam.center for cam in group.cameras])
    scale = max(float(np.ptp(centers, axis=0).max()), 1e-12)
    identical = set(identical_pairs(group))
    for (i, a), (j, b) in itertools.combinations(enumerate(group.cameras), 2):
        if (i, j) not in identical and np.linalg.norm(a.center - b.center) <= 1e-6 * scale:
            problems.append(
                f"{name}: cameras '{a.name}' ([cam_{i}]) and '{b.name}' ([cam_{j}]) sit at the "
                f"same place ({a.center.round(3).tolist()}): a zero baseline cannot "
                "triangulate (a copied translation?)"
            )
    return problems, warnings


def identical_pairs(group: CameraGroup) -> list[tuple[int, int]]:
    """Index pairs of cameras whose intrinsics, distortion and pose are all identical."""
    return [
        (i, j)
        for (i, a), (j, b) in itertools.combinations(enumerate(group.cameras), 2)
        if all(np.array_equal(getattr(a, k), getattr(b, k))
               for k in ("matrix", "dist", "rvec", "tvec"))
    ]


def identical_problem(
    labels: MultiviewLabels, name: str, group: CameraGroup, pair: tuple[int, int], min_views: int
) -> str:
    """Explain two identical cameras, using the other cameras to tell which one is the copy."""
    i, j = pair
    a, b = group.cameras[i].name, group.cameras[j].name
    message = (f"{name}: cameras '{a}' ([cam_{i}]) and '{b}' ([cam_{j}]) have exactly the same "
               "parameters; one of them was copied by mistake")
    others = np.ones(len(group.cameras), bool)
    others[[i, j]] = False
    if others.sum() < min_views:
        return message
    subset = labels.select(np.flatnonzero(labels.calibration_files == name))
    errors = triangulate_labels(subset, {name: group}, min_views=min_views,
                                view_weights=others).reproj_error
    med = {view: _stats(errors[view])[1] for view in pair}
    if not all(np.isfinite(list(med.values()))):
        return message
    copy, kept = (j, i) if med[j] > med[i] else (i, j)
    return (f"{message}: the other cameras place the labels {med[copy]:.1f} px (median) from "
            f"camera '{group.cameras[copy].name}' and {med[kept]:.1f} px from "
            f"'{group.cameras[kept].name}', so camera '{group.cameras[copy].name}' holds the "
            "wrong parameters")


def image_size_problems(name: str, group: CameraGroup, labels: MultiviewLabels) -> list[str]:
    """Camera `size` against every image of its view in the frames using this calibration
    (header reads only; bbox crops are checked against their boxes on load instead)."""
    if labels.bboxes is not None:
        return []
    frames = np.flatnonzero(labels.calibration_files == name)
    problems = []
    for view, cam in enumerate(group.cameras):
        sizes = image_sizes(labels.data_dir, labels.image_paths[view, frames])
        bad = np.flatnonzero((sizes != np.array(cam.size, float)).any(axis=-1))
        if bad.size:
            frame = frames[bad[0]]
            width, height = sizes[bad[0]].astype(int)
            problems.append(
                f"{name}: camera '{cam.name}' has size {list(cam.size)} (width, height) but "
                f"image {labels.data_dir / labels.image_paths[view, frame]} is {width}x{height} "
                f"({labels.where(view, frame)}; {bad.size} of {frames.size} images of view "
                f"'{labels.view_names[view]}' differ)"
            )
    return problems


# a camera needs this many triangulated labels to have its reprojection error checked
MIN_CHECK_POINTS = 3


def unchecked_cameras(labels: MultiviewLabels, name: str, rows: pd.DataFrame,
                      min_views: int) -> tuple[list[str], list[str]]:
    """(errors, warnings) for cameras with too few labels to check. A camera with no label at
    all in the calibration's frames is a warning (DeepFly3D has such a camera); one with 1-2
    checkable labels is an error (label more), as is a calibration no camera can be checked in."""
    frames = labels.calibration_files == name
    clicked = np.isfinite(labels.points_2d[:, frames]).all(-1).sum(axis=(1, 2))
    few = rows[rows.n_points < MIN_CHECK_POINTS]
    checked = len(rows) - len(few)
    unlabelled = [row.camera for row in few.itertuples()
                  if clicked[labels.view_names.index(row.camera)] == 0]
    if checked and unlabelled:
        few = few[~few.camera.isin(unlabelled)]
    else:
        unlabelled = []
    errors = []
    if len(few):
        cams = ", ".join(f"'{row.camera}' ({row.n_points})" for row in few.itertuples())
        errors.append(
            f"{name}: camera(s) {cams} have fewer than {MIN_CHECK_POINTS} labelled keypoints "
            f"that are also labelled in another view (min_views {min_views}), so the "
            f"calibration cannot be checked; label more frames in these views"
        )
    warnings = [
        f"{name}: camera '{cam}' has no labels in the {int(frames.sum())} frames using this "
        "calibration, so its calibration cannot be checked from labels; its training targets "
        "are projections of the points triangulated from the other views"
        for cam in unlabelled
    ]
    return errors, warnings


def _log_warnings(warnings: list[str]) -> list[str]:
    for warning in warnings:
        log.warning("%s", warning)
    return warnings


def _relative_message(message: str, relative: dict[str, str]) -> str:
    """A message that starts with a calibration's absolute path, with its portable name."""
    for name, short in relative.items():
        if message.startswith(f"{name}:"):
            return short + message[len(name):]
    return message


def _stats(errors: np.ndarray) -> tuple[int, float, float]:
    """(count, median, p90) of the finite values."""
    finite = errors[np.isfinite(errors)]
    if finite.size == 0:
        return 0, float("nan"), float("nan")
    return int(finite.size), float(np.median(finite)), float(np.percentile(finite, 90))


def camera_errors(
    labels: MultiviewLabels, name: str, group: CameraGroup, min_views: int
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Per-camera reprojection statistics, with each camera in and left out.

    Returns the table, errors_in (views, points) and errors_out (views, points) in pixels.
    """
    subset = labels.select(np.flatnonzero(labels.calibration_files == name))
    groups = {name: group}
    errors_in = triangulate_labels(subset, groups, min_views=min_views).reproj_error
    n_views = len(group.cameras)
    errors_out = np.stack(
        [
            triangulate_labels(
                subset, groups, min_views=min_views, view_weights=np.arange(n_views) != view
            ).reproj_error[view]
            for view in range(n_views)
        ]
    )
    rows = []
    for view, cam in enumerate(group.cameras):
        n_in, med_in, p90_in = _stats(errors_in[view])
        n_out, med_out, p90_out = _stats(errors_out[view])
        rows.append(
            dict(
                calibration=name, camera=cam.name, n_points=n_in, median_px=med_in,
                p90_px=p90_in, n_points_left_out=n_out, median_left_out_px=med_out,
                p90_left_out_px=p90_out,
            )
        )
    shape = (n_views, -1)
    return pd.DataFrame(rows), errors_in.reshape(shape), errors_out.reshape(shape)


def culprits(
    labels: MultiviewLabels, name: str, group: CameraGroup, min_views: int, max_px: float
) -> list[str]:
    """Cameras to blame when some median exceeds `max_px`: drop the worst left-out camera
    until the rest agree. One bad camera inflates everyone's error; this finds which."""
    subset = labels.select(np.flatnonzero(labels.calibration_files == name))
    keep = np.ones(len(group.cameras), bool)
    blamed: list[str] = []
    for _ in range(len(keep) - min_views):  # one camera dropped per pass: always ends
        result = triangulate_labels(subset, {name: group}, min_views=min_views, view_weights=keep)
        medians = np.array([_stats(result.reproj_error[v])[1] for v in range(len(keep))])
        if np.all(np.nan_to_num(medians[keep]) <= max_px):
            return blamed
        loo = np.full(len(keep), -np.inf)
        for view in np.flatnonzero(keep):
            weights = keep & (np.arange(len(keep)) != view)
            loo[view] = np.nan_to_num(
                _stats(
                    triangulate_labels(
                        subset, {name: group}, min_views=min_views, view_weights=weights
                    ).reproj_error[view]
                )[1],
                nan=-np.inf,
            )
        worst = int(np.argmax(loo))
        keep[worst] = False
        blamed.append(group.cameras[worst].name)
    return blamed or [group.cameras[int(np.nanargmax(medians))].name]


def validate(
    labels: MultiviewLabels, max_px: float, min_views: int
) -> tuple[dict, pd.DataFrame, dict[str, tuple[CameraGroup, np.ndarray, np.ndarray]]]:
    """Run every check; raise ParallaxError listing the fatal problems, else return results."""
    groups = load_calibrations(labels)
    problems: list[str] = []
    warnings: list[str] = []
    for name, group in groups.items():
        errors, warned = structural_problems(name, group)
        problems += errors + image_size_problems(name, group, labels)
        warnings += warned
        problems += [identical_problem(labels, name, group, pair, min_views)
                     for pair in identical_pairs(group)]
    _log_warnings(warnings)
    if problems:
        raise ParallaxError("; ".join(problems))
    tables, arrays = [], {}
    for name, group in groups.items():
        table, errors_in, errors_out = camera_errors(labels, name, group, min_views)
        tables.append(table)
        arrays[name] = (group, errors_in, errors_out)
    table = pd.concat(tables, ignore_index=True)
    log.info("per-camera reprojection error:\n%s", table.to_string(index=False))
    for name, rows in table.groupby("calibration", sort=False):
        errors, warned = unchecked_cameras(labels, name, rows, min_views)
        problems += errors
        warnings += _log_warnings(warned)
    if problems:
        raise ParallaxError("; ".join(problems))
    for name, group in groups.items():
        rows = table[table.calibration == name]
        if (rows.median_px > max_px).any():
            blamed = culprits(labels, name, group, min_views, max_px)
            worst = rows.set_index("camera").loc[blamed]
            details = ", ".join(
                f"'{cam}' median {row.median_px:.2f} px (left out {row.median_left_out_px:.2f} px)"
                for cam, row in worst.iterrows()
            )
            problems.append(
                f"{name}: camera(s) {details} exceed calibration.max_median_reproj_px = "
                f"{max_px:g}; the other cameras agree without them"
            )
    if problems:
        raise ParallaxError("; ".join(problems))
    relative = {name: relative_path(name, labels.data_dir) for name in groups}
    table["calibration"] = table["calibration"].map(relative)
    summary = {
        "passed": True,
        "warnings": [_relative_message(w, relative) for w in warnings],
        "max_median_reproj_px": max_px,
        "frames": int(labels.n_frames),
        "frames_without_calibration": int(np.sum(labels.calibration_files == "")),
        "calibrations": {
            relative[name]: {
                "cameras": list(group.names),
                "frames": int(np.sum(labels.calibration_files == name)),
                "all_view_median_px": float(np.nanmedian(arrays[name][1])),
                "median_px": dict(zip(group.names,
                                      table[table.calibration == relative[name]].median_px,
                                      strict=True)),
            }
            for name, group in groups.items()
        },
    }
    return summary, table, arrays
