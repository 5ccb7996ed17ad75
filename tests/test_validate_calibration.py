"""Stage validate_calibration: good and broken calibrations, bad inputs, no partial outputs."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from pipeline.io.calibration_toml import read_calibration, write_calibration
from pipeline.stages import validate_calibration
from tests.conftest import dataset_cli_args

MOUSE_VIEWS = ["back", "mid", "side", "top"]


def run_stage(data_args: list[str], out: Path, *extra: str) -> tuple[int, dict[str, Path]]:
    paths = {
        "summary": out / "summary.json",
        "table": out / "per_camera.csv",
        "plot": out / "reprojection_errors.png",
    }
    argv = [*data_args, *extra]
    for key, path in paths.items():
        argv += [f"--{key}", str(path)]
    return validate_calibration.main(argv), paths


def assert_failed(code: int, paths: dict[str, Path], capsys, *needles: str) -> str:
    """Exit code 2, one error line naming every needle, and no output file left behind."""
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("parallax error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not any(path.exists() for path in paths.values())
    assert not list(next(iter(paths.values())).parent.glob(".*tmp*"))
    return lines[0]


def mouse_args(mouse_dir: Path, data_dir: Path | None = None) -> list[str]:
    return ["--data-dir", str(data_dir or mouse_dir), "--view-names", *MOUSE_VIEWS,
            "--csv-files", *[f"CollectedData_{v}.csv" for v in MOUSE_VIEWS]]


@pytest.fixture
def example_copy(example_dir, tmp_path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(example_dir, data)
    return data


def views_of(data: Path) -> list[str]:
    return [str(v) for v in np.load(data / "ground_truth.npz")["view_names"]]


def test_example_passes(example_dir, tmp_path):
    code, paths = run_stage(dataset_cli_args(example_dir), tmp_path / "out")
    assert code == 0
    summary = json.loads(paths["summary"].read_text())
    assert summary["passed"] and len(summary["calibrations"]) == 2  # one TOML per session
    table = pd.read_csv(paths["table"])
    assert len(table) == 2 * len(views_of(example_dir))
    assert (table.median_px < 1e-6).all() and (table.median_left_out_px < 1e-6).all()
    assert paths["plot"].read_bytes()[:4] == b"\x89PNG"


def test_real_mouse_good_calibration_passes(mouse_dir, tmp_path):
    code, paths = run_stage(mouse_args(mouse_dir), tmp_path / "out")
    assert code == 0
    summary = json.loads(paths["summary"].read_text())
    (entry,) = summary["calibrations"].values()
    assert entry["all_view_median_px"] == pytest.approx(6.09, abs=0.3)
    table = pd.read_csv(paths["table"]).set_index("camera")
    assert table.loc["mid", "median_px"] == pytest.approx(3.68, abs=0.3)


def test_real_mouse_broken_side_fails_naming_side(mouse_dir, tmp_path, capsys):
    data = tmp_path / "mouse"
    data.mkdir()
    for item in mouse_dir.iterdir():
        if item.name != "calibration.toml":
            (data / item.name).symlink_to(item)
    (data / "calibration.toml").symlink_to(mouse_dir / "calibration_broken_side.toml")
    code, paths = run_stage(mouse_args(mouse_dir, data), tmp_path / "out")
    assert_failed(code, paths, capsys, "calibration.toml", "'side'")


def test_perturbed_camera_is_blamed_by_reprojection(example_copy, tmp_path, capsys):
    """A camera rotated by 2 degrees passes the structure checks but not the reprojection."""
    from pipeline.geometry.cameras import CameraGroup

    views = views_of(example_copy)
    toml = sorted((example_copy / "calibrations").glob("*.toml"))[0]
    group = read_calibration(toml)
    cams = list(group.cameras)
    bad = cams[1]
    turn = cv2.Rodrigues(np.array([0.0, np.deg2rad(2.0), 0.0]))[0]  # about the camera's y
    cams[1] = type(bad)(name=bad.name, size=bad.size, matrix=bad.matrix, dist=bad.dist,
                        rvec=cv2.Rodrigues(turn @ bad.R)[0].ravel(), tvec=turn @ bad.tvec,
                        fisheye=bad.fisheye)
    write_calibration(CameraGroup(cameras=tuple(cams), metadata=group.metadata), toml)
    code, paths = run_stage(dataset_cli_args(example_copy), tmp_path / "out",
                            "--max-median-reproj-px", "2")
    message = assert_failed(code, paths, capsys, toml.name, f"'{views[1]}'")
    blamed = re.findall(r"'(\w+)' median", message)
    assert blamed == [views[1]]


def edit_toml(path: Path, old: str, new: str, count: int = 1) -> None:
    text = path.read_text()
    assert old in text, (old, text[:400])
    path.write_text(text.replace(old, new, count))


def first_toml(data: Path) -> Path:
    return sorted((data / "calibrations").glob("*.toml"))[0]


def test_malformed_toml(example_copy, tmp_path, capsys):
    toml = first_toml(example_copy)
    toml.write_text(toml.read_text().replace("]", "", 1))
    code, paths = run_stage(dataset_cli_args(example_copy), tmp_path / "out")
    assert_failed(code, paths, capsys, toml.name)


def test_missing_camera(example_copy, tmp_path, capsys):
    from pipeline.geometry.cameras import CameraGroup

    views = views_of(example_copy)
    toml = first_toml(example_copy)
    group = read_calibration(toml)
    write_calibration(CameraGroup(cameras=group.cameras[:-1], metadata=group.metadata), toml)
    code, paths = run_stage(dataset_cli_args(example_copy), tmp_path / "out")
    assert_failed(code, paths, capsys, toml.name, views[-1])


def test_camera_order_differs_from_view_names(example_copy, tmp_path, capsys):
    from pipeline.geometry.cameras import CameraGroup

    views = views_of(example_copy)
    toml = first_toml(example_copy)
    group = read_calibration(toml)
    write_calibration(CameraGroup(cameras=group.cameras[::-1], metadata=group.metadata), toml)
    code, paths = run_stage(dataset_cli_args(example_copy), tmp_path / "out")
    assert_failed(code, paths, capsys, toml.name, views[0], views[-1])


def test_intrinsics_third_row(example_copy, tmp_path, capsys):
    toml = first_toml(example_copy)
    edit_toml(toml, "[0.0, 0.0, 1.0]", "[12.0, 3.0, 1.0]")
    code, paths = run_stage(dataset_cli_args(example_copy), tmp_path / "out")
    assert_failed(code, paths, capsys, toml.name, views_of(example_copy)[0])


def test_image_size_mismatch(example_copy, tmp_path, capsys):
    toml = first_toml(example_copy)
    edit_toml(toml, "size = [160, 128]", "size = [1280, 1024]")
    code, paths = run_stage(dataset_cli_args(example_copy), tmp_path / "out")
    assert_failed(code, paths, capsys, toml.name, views_of(example_copy)[0], "160x128")


def test_two_header_rows(example_copy, tmp_path, capsys):
    views = views_of(example_copy)
    csv = example_copy / f"CollectedData_{views[0]}.csv"
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join(lines[1:]) + "\n")
    code, paths = run_stage(dataset_cli_args(example_copy), tmp_path / "out")
    assert_failed(code, paths, capsys, csv.name)


def test_view_with_fewer_rows(example_copy, tmp_path, capsys):
    views = views_of(example_copy)
    csv = example_copy / f"CollectedData_{views[2]}.csv"
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join(lines[:-1]) + "\n")
    code, paths = run_stage(dataset_cli_args(example_copy), tmp_path / "out")
    assert_failed(code, paths, capsys, csv.name)


def test_basenames_differ_across_views(example_copy, tmp_path, capsys):
    views = views_of(example_copy)
    csv = example_copy / f"CollectedData_{views[1]}.csv"
    lines = csv.read_text().splitlines()
    key = lines[4].split(",")[0]
    lines[4] = lines[4].replace(key, key.replace("img", "frame"), 1)
    csv.write_text("\n".join(lines) + "\n")
    code, paths = run_stage(dataset_cli_args(example_copy), tmp_path / "out")
    assert_failed(code, paths, capsys, csv.name)


def test_missing_image(example_copy, tmp_path, capsys):
    image = sorted((example_copy / "labeled-data").rglob("*.png"))[3]
    image.unlink()
    code, paths = run_stage(dataset_cli_args(example_copy), tmp_path / "out")
    assert_failed(code, paths, capsys, image.name)


def test_no_calibration_at_all(example_copy, tmp_path, capsys):
    shutil.rmtree(example_copy / "calibrations")
    code, paths = run_stage(dataset_cli_args(example_copy), tmp_path / "out")
    assert_failed(code, paths, capsys, "calibration")


# ---------------------------------------------------------------------------- structure, blame
@pytest.fixture(scope="module")
def four_views(tmp_path_factory) -> Path:
    """A noise-free 4-camera example (one session): enough cameras to blame one via the others."""
    from pipeline.synthetic.generate import generate_example

    out = tmp_path_factory.mktemp("four") / "data"
    generate_example(out, seed=5, n_sessions=1, frames_per_session=12, n_views=4,
                     image_size=(160, 128))
    return out


@pytest.fixture
def four_copy(four_views, tmp_path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(four_views, data)
    return data


def replace_camera(toml: Path, index: int, **changes) -> None:
    """Rewrite camera `index` of a calibration with some parameters changed."""
    from dataclasses import asdict

    from pipeline.geometry.cameras import Camera, CameraGroup

    group = read_calibration(toml)
    cams = list(group.cameras)
    cams[index] = Camera(**{**asdict(cams[index]), **changes})
    write_calibration(CameraGroup(cameras=tuple(cams), metadata=group.metadata), toml)


def test_identical_cameras_name_the_copy(four_copy, tmp_path, capsys):
    """cam2 holds cam1's parameters: the other two cameras tell that cam2 is the copy."""
    views = views_of(four_copy)
    toml = first_toml(four_copy)
    source = read_calibration(toml).cameras[1]
    replace_camera(toml, 2, matrix=source.matrix, dist=source.dist, rvec=source.rvec,
                   tvec=source.tvec)
    code, paths = run_stage(dataset_cli_args(four_copy), tmp_path / "out")
    message = assert_failed(code, paths, capsys, toml.name,
                            f"cameras '{views[1]}' ([cam_1]) and '{views[2]}' ([cam_2]) have "
                            "exactly the same parameters")
    assert f"so camera '{views[2]}' holds the wrong parameters" in message


def test_two_cameras_at_one_position(four_copy, tmp_path, capsys):
    views = views_of(four_copy)
    toml = first_toml(four_copy)
    cams = read_calibration(toml).cameras
    replace_camera(toml, 3, tvec=-cams[3].R @ cams[0].center)  # cam3 moved onto cam0
    code, paths = run_stage(dataset_cli_args(four_copy), tmp_path / "out")
    assert_failed(code, paths, capsys, toml.name, f"cameras '{views[0]}' ([cam_0]) and "
                  f"'{views[3]}' ([cam_3]) sit at the same place")


def test_principal_point_outside_the_image_is_a_warning(four_views):
    from pipeline.data.calibration_check import structural_problems

    group = read_calibration(first_toml(four_views))
    matrix = group.cameras[1].matrix.copy()
    matrix[0, 2] = 161.0  # just outside the 160 px wide image
    cam = group.cameras[1]
    moved = type(cam)(name=cam.name, size=cam.size, matrix=matrix, dist=cam.dist,
                      rvec=cam.rvec, tvec=cam.tvec)
    from pipeline.geometry.cameras import CameraGroup

    errors, warnings = structural_problems(
        "calibration.toml", CameraGroup(cameras=(group.cameras[0], moved, *group.cameras[2:]),
                                        metadata={}))
    assert errors == []
    (warning,) = warnings
    assert warning.startswith(f"calibration.toml: camera '{cam.name}' ([cam_1]) principal "
                              "point (161, ")
    assert "outside its 160x128 image" in warning


def test_one_bad_camera_is_blamed_via_the_others(four_copy, tmp_path, capsys):
    """The synthetic twin of the real recording's broken `side` camera: one camera rotated by
    4 degrees inflates every camera's median above the limit; removing the worst left-out
    camera until the rest agree blames that camera alone."""
    from pipeline.data.calibration_check import camera_errors
    from pipeline.data.project import load_labels
    from pipeline.data.triangulate import load_calibrations

    views = views_of(four_copy)
    toml = first_toml(four_copy)
    bad = read_calibration(toml).cameras[2]
    turn = cv2.Rodrigues(np.array([0.0, np.deg2rad(4.0), 0.0]))[0]
    replace_camera(toml, 2, rvec=cv2.Rodrigues(turn @ bad.R)[0].ravel(), tvec=turn @ bad.tvec)
    labels = load_labels(four_copy, views, [f"CollectedData_{v}.csv" for v in views])
    (name, group), = load_calibrations(labels).items()
    table = camera_errors(labels, name, group, 2)[0]
    assert (table.median_px > 2.5).all()  # every camera looks bad on its own numbers
    code, paths = run_stage(dataset_cli_args(four_copy), tmp_path / "out",
                            "--max-median-reproj-px", "2.5")
    message = assert_failed(code, paths, capsys, toml.name, "the other cameras agree without "
                            "them")
    assert re.findall(r"'(\w+)' median", message) == [views[2]]


def test_image_size_checked_on_every_image(example_copy, tmp_path, capsys):
    """Not only the first image of each view: the 7th image of a view is named."""
    views = views_of(example_copy)
    image = example_copy / "labeled-data" / f"session0_{views[1]}" / "img00000006.png"
    cv2.imwrite(str(image), np.zeros((120, 160, 3), np.uint8))
    code, paths = run_stage(dataset_cli_args(example_copy), tmp_path / "out")
    assert_failed(code, paths, capsys, "session0.toml", f"camera '{views[1]}'", str(image),
                  "160x120", f"CollectedData_{views[1]}.csv line 10", "1 of 10 images")
