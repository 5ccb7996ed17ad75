"""LP multiview dataset I/O: CSV variants, alignment checks, sessions, calibration, bboxes."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.dataset import load_labels, read_label_csv, session_of, write_label_csv
from pipeline.errors import ParallaxError

VIEWS = ("top", "side", "front")
KPS = ("nose", "tail")


def make_dataset(root: Path, frames: int = 3, sessions=("s1", "s2"), size=(40, 30)) -> Path:
    """A tiny LP-layout dataset: random labels, blank images."""
    rng = np.random.default_rng(0)
    for view in VIEWS:
        index = []
        for session in sessions:
            for f in range(frames):
                rel = f"labeled-data/{session}_{view}/img{f:08d}.png"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(root / rel), np.zeros((size[1], size[0], 3), np.uint8))
                index.append(rel)
        points = rng.uniform(0, 30, (len(index), len(KPS), 2))
        points[0, 1] = np.nan
        write_label_csv(root / f"CollectedData_{view}.csv", index, KPS, points)
    return root


def load(root: Path, **kwargs):
    return load_labels(root, VIEWS, [f"CollectedData_{v}.csv" for v in VIEWS], **kwargs)


def test_happy_path(tmp_path):
    labels = load(make_dataset(tmp_path))
    assert labels.points_2d.shape == (3, 6, 2, 2)
    assert list(labels.sessions) == ["s1"] * 3 + ["s2"] * 3
    assert labels.keypoint_names == KPS
    assert np.isnan(labels.points_2d[:, 0, 1]).all()
    assert (labels.calibration_files == "").all() and labels.bboxes is None
    sub = labels.select(labels.sessions == "s2")
    assert sub.n_frames == 3 and list(sub.frame_names) == list(labels.frame_names[3:])


def test_round_trip_with_likelihood_and_set(tmp_path):
    points = np.array([[[1.5, 2.25], [np.nan, np.nan]], [[1 / 3, 1e-9], [7.0, 8.0]]])
    like = np.array([[0.9, np.nan], [0.5, 1.0]])
    path = tmp_path / "p.csv"
    write_label_csv(path, ["a/b/x.png", "a/b/y.png"], KPS, points, extra={"likelihood": like},
                    extra_columns={"set": ["train", "test"]})
    table = read_label_csv(path)
    np.testing.assert_array_equal(table.points, points)
    np.testing.assert_array_equal(table.likelihood, like)
    assert table.index == ("a/b/x.png", "a/b/y.png")


def test_visible_coordinate_and_split_index(tmp_path):
    path = tmp_path / "v.csv"
    path.write_text(
        "scorer,,,lab,lab,lab\nbodyparts,,,nose,nose,nose\ncoords,,,x,y,visible\n"
        "labeled-data,s_cam,img1.png,1.0,2.0,1\nlabeled-data,s_cam,img2.png,,,0\n"
    )
    table = read_label_csv(path)
    assert table.index == ("labeled-data/s_cam/img1.png", "labeled-data/s_cam/img2.png")
    np.testing.assert_array_equal(table.visible[:, 0], [1.0, 0.0])
    assert np.isnan(table.points[1]).all()


@pytest.mark.parametrize(
    "text, needle",
    [
        ("bodyparts,nose,nose\ncoords,x,y\nimg.png,1,2\n", "3 header rows"),
        ("scorer,a,a\nindividuals,m1,m1\nbodyparts,nose,nose\ncoords,x,y\nimg.png,1,2\n",
         "multi-animal"),
        ("scorer,a,a\nbodyparts,nose,nose\ncoords,x,y\nimg.png,1,abc\n", "line 4"),
        ("scorer,a,a\nbodyparts,nose,nose\ncoords,x,y\nimg.png,1,\n", "only one of x, y"),
        ("scorer,a,a\nbodyparts,nose,nose\ncoords,x,y\nimg.png,1,2\nimg.png,3,4\n", "twice"),
    ],
)
def test_bad_csvs(tmp_path, text, needle):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ParallaxError, match="bad.csv") as err:
        read_label_csv(path)
    assert needle in str(err.value)


def test_different_keypoints(tmp_path):
    root = make_dataset(tmp_path)
    csv = root / "CollectedData_side.csv"
    csv.write_text(csv.read_text().replace("tail", "tial"))
    with pytest.raises(ParallaxError, match="CollectedData_side.csv.*keypoints differ"):
        load(root)


def test_missing_image_is_named(tmp_path):
    root = make_dataset(tmp_path)
    (root / "labeled-data/s2_front/img00000001.png").unlink()
    with pytest.raises(ParallaxError, match="s2_front/img00000001.png.*1 labelled images missing"):
        load(root)
    assert load(root, check_images=False).n_frames == 6


def test_sessions_and_calibration_priority(tmp_path):
    root = make_dataset(tmp_path)
    assert session_of("labeled-data/my_sess_top/img1.png", "top") == "my_sess"
    (root / "calibration.toml").write_text("")
    (root / "calibrations").mkdir()
    (root / "calibrations" / "s2.toml").write_text("")
    (root / "override.toml").write_text("")
    listed = ",file\nlabeled-data/s2/img00000002.png,override.toml\n"
    (root / "calibrations.csv").write_text(listed)
    labels = load(root, camera_params_file="calibrations.csv")
    names = [Path(p).name for p in labels.calibration_files]
    assert names == ["calibration.toml"] * 3 + ["s2.toml", "s2.toml", "override.toml"]
    (root / "calibrations.csv").write_text(",file\nlabeled-data/s2/img00000002.png,gone.toml\n")
    with pytest.raises(ParallaxError, match="gone.toml"):
        load(root, camera_params_file="calibrations.csv")


def test_bboxes_map_crop_to_frame_pixels(tmp_path):
    root = make_dataset(tmp_path, sessions=("s1",), size=(40, 30))
    plain = load(root)
    for view in VIEWS:
        index = read_label_csv(root / f"CollectedData_{view}.csv").index
        rows = "".join(f"{p},100,50,60,80\n" for p in index)  # x, y, h, w: crops resized 2x
        (root / f"bboxes_{view}.csv").write_text(",x,y,h,w\n" + rows)
    boxed = load(root, bbox_files=[f"bboxes_{v}.csv" for v in VIEWS])
    expected = plain.points_2d * 2 + np.array([100, 50])
    np.testing.assert_allclose(boxed.points_2d, expected)
    (root / "bboxes_top.csv").write_text(",x,y,h\nfoo,1,2,3\n")
    with pytest.raises(ParallaxError, match=r"bboxes_top.csv.*\['w'\]"):
        load(root, bbox_files=[f"bboxes_{v}.csv" for v in VIEWS])


def test_view_and_csv_counts(tmp_path):
    root = make_dataset(tmp_path)
    with pytest.raises(ParallaxError, match="data.csv_file lists 2"):
        load_labels(root, VIEWS, ["CollectedData_top.csv", "CollectedData_side.csv"])


def test_real_mouse(mouse_dir):
    views = ["back", "mid", "side", "top"]
    labels = load_labels(mouse_dir, views, [f"CollectedData_{v}.csv" for v in views])
    assert labels.points_2d.shape == (4, 80, 15, 2)
    assert set(labels.sessions) == {"session0"}
    assert {Path(p).name for p in labels.calibration_files} == {"calibration.toml"}
    counts = np.isfinite(labels.points_2d).all(-1).sum(axis=(1, 2))
    assert counts.tolist() == [941, 1200, 1025, 1200]
