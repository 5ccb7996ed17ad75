"""LP multiview dataset I/O: CSV variants, alignment checks, sessions, calibration, bboxes."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from pipeline.core.errors import ParallaxError
from pipeline.data.paths import find_calibration, session_of
from pipeline.data.project import image_size, load_labels
from pipeline.io.labels_csv import read_label_csv, write_label_csv

VIEWS = ("top", "side", "front")
KPS = ("nose", "ear", "tail")
HEADER = "scorer,lab,lab\nbodyparts,nose,nose\ncoords,x,y\n"


def make_dataset(root: Path, frames: int = 3, sessions=("s1", "s2"), size=(40, 30),
                 visible: bool = False) -> Path:
    """A tiny LP-layout dataset: one CSV per view, blank PNGs, frame f of session s on one row."""
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
        extra = None
        if visible:
            vis = np.full(points.shape[:2], 2.0)
            vis[0, 1] = 0.0
            vis[1, 2] = 1.0
            extra = {"visible": vis}
        write_label_csv(root / f"CollectedData_{view}.csv", index, KPS, points, extra=extra)
    return root


def csv_names(views=VIEWS) -> list[str]:
    return [f"CollectedData_{v}.csv" for v in views]


def load(root: Path, **kwargs):
    return load_labels(root, VIEWS, csv_names(), **kwargs)


def edit_csv(path: Path, old: str, new: str, count: int = -1) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, count))


def raises(match: str):
    return pytest.raises(ParallaxError, match=match)


# ---------------------------------------------------------------------------------- happy paths


def test_happy_path_two_sessions_three_views(tmp_path, caplog):
    root = make_dataset(tmp_path)
    with caplog.at_level(logging.INFO, logger="pipeline.data.project"):
        labels = load(root)
    assert (labels.n_views, labels.n_frames, labels.n_keypoints) == (3, 6, 3)
    assert labels.points_2d.shape == (3, 6, 3, 2) and labels.points_2d.dtype == np.float64
    assert labels.view_names == VIEWS and labels.keypoint_names == KPS
    assert list(labels.sessions) == ["s1"] * 3 + ["s2"] * 3
    assert list(labels.frame_names) == [f"img{f:08d}.png" for f in range(3)] * 2
    assert labels.image_paths.shape == (3, 6)
    assert labels.image_paths[2, 4] == "labeled-data/s2_front/img00000001.png"
    assert np.isnan(labels.points_2d[:, 0, 1]).all()
    assert labels.visible is None and labels.bboxes is None
    assert (labels.calibration_files == "").all()
    table = read_label_csv(root / "CollectedData_side.csv")
    np.testing.assert_array_equal(labels.points_2d[1], table.points)
    assert "labelled points per view: top 17, side 17, front 17" in caplog.text

    sub = labels.select(labels.sessions == "s2")
    assert sub.n_frames == 3 and list(sub.frame_names) == list(labels.frame_names[3:])
    np.testing.assert_array_equal(sub.points_2d, labels.points_2d[:, 3:])
    assert list(labels.select([5, 0]).image_paths[0]) == [labels.image_paths[0, 5],
                                                          labels.image_paths[0, 0]]


def test_visible_coords_through_load(tmp_path):
    labels = load(make_dataset(tmp_path, visible=True))
    assert labels.visible.shape == (3, 6, 3)
    assert labels.visible[0, 0, 1] == 0.0 and labels.visible[2, 1, 2] == 1.0
    assert labels.visible[1, 5, 0] == 2.0


def test_visible_and_split_index(tmp_path):
    path = tmp_path / "v.csv"
    path.write_text(
        "scorer,,,lab,lab,lab\nbodyparts,,,nose,nose,nose\ncoords,,,x,y,visible\n"
        "labeled-data,s_cam,img1.png,1.0,2.0,1\nlabeled-data,s_cam,img2.png,,,0\n"
    )
    table = read_label_csv(path)
    assert table.index == ("labeled-data/s_cam/img1.png", "labeled-data/s_cam/img2.png")
    np.testing.assert_array_equal(table.visible[:, 0], [1.0, 0.0])
    assert np.isnan(table.points[1]).all() and table.likelihood is None
    assert table.lines == (4, 5)


def test_split_index_dataset_loads(tmp_path):
    root = make_dataset(tmp_path)
    for view in VIEWS:
        path = root / f"CollectedData_{view}.csv"
        lines = path.read_text().splitlines()
        head = [line.replace(",", ",,,", 1) for line in lines[:3]]
        body = [line.replace("/", ",", 2) for line in lines[3:]]
        path.write_text("\n".join(head + body) + "\n")
    reference = load(make_dataset(tmp_path / "plain"))
    np.testing.assert_array_equal(load(root).points_2d, reference.points_2d)


def test_likelihood_is_read_but_not_a_label(tmp_path):
    path = tmp_path / "pred.csv"
    path.write_text("scorer,m,m,m\nbodyparts,nose,nose,nose\ncoords,x,y,likelihood\n"
                    "a.png,1,2,0.5\n")
    table = read_label_csv(path)
    assert table.points.shape == (1, 1, 2) and table.visible is None
    assert table.likelihood[0, 0] == 0.5


def test_round_trip_with_likelihood_and_set(tmp_path):
    points = np.array([[[1.5, 2.25], [np.nan, np.nan]], [[1 / 3, 1e-9], [7.0, 8.0]]])
    rng = np.random.default_rng(1)
    points[0, 0] = rng.normal(0, 1e3, 2)  # full-precision float64
    like = np.array([[0.9, np.nan], [0.5, 0.1 + 0.2]])
    path = tmp_path / "p.csv"
    write_label_csv(path, ["a/b/x.png", "a/b/y.png"], ["nose", "tail"], points,
                    extra={"likelihood": like}, extra_columns={"set": ["train", "test"]},
                    scorer="mvt")
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write leaves no temporary file
    table = read_label_csv(path)
    np.testing.assert_array_equal(table.points, points)
    np.testing.assert_array_equal(table.likelihood, like)
    assert table.index == ("a/b/x.png", "a/b/y.png") and table.keypoint_names == ("nose", "tail")
    assert table.extra_columns == {"set": ("train", "test")}
    # pandas reads it with the documented call; the set column keeps its name on level 0
    frame = pd.read_csv(path, header=[0, 1, 2], index_col=0)
    assert frame.shape == (2, 7)
    assert frame.columns[-1][0] == "set" and list(frame.iloc[:, -1]) == ["train", "test"]
    assert frame.loc["a/b/y.png", ("mvt", "tail", "likelihood")] == 0.1 + 0.2


def test_round_trip_visible(tmp_path):
    points = np.array([[[1.0, 2.0]], [[np.nan, np.nan]]])
    vis = np.array([[2.0], [0.0]])
    write_label_csv(tmp_path / "l.csv", ["x.png", "y.png"], ["nose"], points,
                    extra={"visible": vis})
    table = read_label_csv(tmp_path / "l.csv")
    np.testing.assert_array_equal(table.visible, vis)
    np.testing.assert_array_equal(table.points, points)


def test_pandas_written_set_column_variants_are_read(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("scorer,lab,lab,set\nbodyparts,nose,nose,set\ncoords,x,y,set\n"
                    "a.png,1,2,train\n")
    assert read_label_csv(path).extra_columns == {"set": ("train",)}
    path.write_text("scorer,lab,lab,set\nbodyparts,nose,nose,Unnamed: 3_level_1\n"
                    "coords,x,y,Unnamed: 3_level_2\na.png,1,2,test\n")
    assert read_label_csv(path).extra_columns == {"set": ("test",)}


def test_session_of():
    assert session_of("labeled-data/sess1_cam0/img00000005.png", "cam0") == "sess1"
    assert session_of("labeled-data/my_sess_top/img1.png", "top") == "my_sess"
    assert session_of("labeled-data/recording/img1.png", "top") == "recording"
    assert session_of("labeled-data\\s_top\\img1.png", "top") == "s"


def test_sessions_without_view_suffix_must_agree(tmp_path):
    root = make_dataset(tmp_path, sessions=("s1",))
    for view in VIEWS:  # every view uses the same folder name -> that folder is the session
        edit_csv(root / f"CollectedData_{view}.csv", f"s1_{view}/", "shared/")
    (root / "labeled-data" / "s1_top").rename(root / "labeled-data" / "shared")
    labels = load(root)
    assert set(labels.sessions) == {"shared"}
    edit_csv(root / "CollectedData_side.csv", "shared/img00000001", "other/img00000001")
    with raises(r"row 2: the views disagree on the session.*CollectedData_side.csv"):
        load(root, check_images=False)


def test_calibration_priority(tmp_path):
    root = make_dataset(tmp_path, sessions=("s1", "s2", "s3"))
    assert (load(root).calibration_files == "").all()  # 4: nothing found
    (root / "calibration.toml").write_text("")
    (root / "calibrations").mkdir()
    (root / "calibrations" / "s2.toml").write_text("")
    (root / "override.toml").write_text("")
    (root / "calibrations.csv").write_text(
        ",file\n"
        "labeled-data/s2/img00000002.png,override.toml\n"     # 1: listed (view folder stripped)
        "labeled-data/s3_top/img00000000.png,override.toml\n"  # with a view folder: tolerated
        "labeled-data/s9/img00000000.png,override.toml\n"      # matches no frame: warned
    )
    labels = load(root, camera_params_file="calibrations.csv")
    names = [Path(p).name for p in labels.calibration_files]
    assert names == (["calibration.toml"] * 3 + ["s2.toml", "s2.toml", "override.toml"]
                     + ["override.toml", "calibration.toml", "calibration.toml"])
    assert all(Path(p).is_absolute() for p in labels.calibration_files)
    assert find_calibration(root, "s2") == (root / "calibrations" / "s2.toml").absolute()
    assert find_calibration(root, "s1") == (root / "calibration.toml").absolute()
    (root / "calibration.toml").unlink()
    assert find_calibration(root, "s1") is None


def test_calibrations_csv_missing_toml(tmp_path):
    root = make_dataset(tmp_path)
    (root / "calibrations.csv").write_text(",file\nlabeled-data/s2/img00000002.png,gone.toml\n")
    with raises(r"calibrations.csv: line 2: calibration file 'gone.toml' not found"):
        load(root, camera_params_file="calibrations.csv")
    with raises(r"nope.csv: calibrations file .* not found"):
        load(root, camera_params_file="nope.csv")


def write_bboxes(root: Path, row: str = "100,50,60,80") -> list[str]:
    names = []
    for view in VIEWS:
        index = read_label_csv(root / f"CollectedData_{view}.csv").index
        (root / f"bboxes_{view}.csv").write_text(",x,y,h,w\n" + "".join(f"{p},{row}\n"
                                                                          for p in index))
        names.append(f"bboxes_{view}.csv")
    return names


def test_bboxes_map_crop_to_frame_pixels(tmp_path):
    root = make_dataset(tmp_path, sessions=("s1",), size=(40, 30))
    plain = load(root)
    names = write_bboxes(root)  # x, y, h, w: 40x30 crops of an 80x60 box, resized by 1/2
    boxed = load(root, bbox_files=names)
    np.testing.assert_allclose(boxed.points_2d, plain.points_2d * 2 + np.array([100, 50]))
    np.testing.assert_array_equal(boxed.bboxes[1, 2], [100, 50, 60, 80])
    unscaled = load(root, bbox_files=names, check_images=False)  # no image sizes: scale 1
    np.testing.assert_allclose(unscaled.points_2d, plain.points_2d + np.array([100, 50]))


def test_swapped_bbox_columns_are_named(tmp_path):
    """h and w exchanged (values written in x, y, w, h order under LP's `,x,y,h,w` header): the
    80x60 boxes of 40x30 crops only fit swapped; said so, not blamed on the calibration later."""
    root = make_dataset(tmp_path, sessions=("s1",), size=(40, 30))
    names = write_bboxes(root, row="100,50,80,60")
    with raises(r"bboxes_top.csv: h and w look swapped: the box of "
                r"'labeled-data/s1_top/img00000000.png' \(CollectedData_top.csv line 4\) has "
                r"w = 60, h = 80 but the image is 40x30 .* \(9 boxes like this\)"):
        load(root, bbox_files=names)
    for name in names:  # the same values under a header that names them right: fine
        text = (root / name).read_text()
        (root / name).write_text(text.replace(",x,y,h,w", ",x,y,w,h", 1))
    np.testing.assert_array_equal(load(root, bbox_files=names).bboxes[0, 0], [100, 50, 60, 80])


def test_csv_files_follow_the_view_names(tmp_path):
    root = make_dataset(tmp_path, sessions=("s1",))
    with raises(r"data.csv_file entry 1 'CollectedData_side.csv' is listed for view 'top' "
                r".* says view 'side'"):
        load_labels(root, VIEWS, csv_names(("side", "top", "front")))
    for view in VIEWS:  # names that say nothing: the image folders tell
        (root / f"CollectedData_{view}.csv").rename(root / f"labels_{VIEWS.index(view)}.csv")
    with raises(r"labels_1.csv: listed for view 'top' \(data.csv_file entry 1\) but its images "
                r"are in folders of view 'side' \(e.g. line 4: 'labeled-data/s1_side/"):
        load_labels(root, VIEWS, ["labels_1.csv", "labels_0.csv", "labels_2.csv"])


def test_bad_bbox_files(tmp_path):
    root = make_dataset(tmp_path, sessions=("s1",))
    names = write_bboxes(root)
    (root / "bboxes_top.csv").write_text(",x,y,h\nfoo,1,2,3\n")
    with raises(r"bboxes_top.csv: bbox CSV lacks column\(s\) \['w'\]"):
        load(root, bbox_files=names)
    write_bboxes(root)
    edit_csv(root / "bboxes_side.csv", "img00000001", "img00000009")
    with raises(r"bboxes_side.csv: row 2 is 'labeled-data/s1_side/img00000009.png' \(line 3\) "
                r"but CollectedData_side.csv row 2 is 'labeled-data/s1_side/img00000001.png'"):
        load(root, bbox_files=names)
    write_bboxes(root)
    edit_csv(root / "bboxes_front.csv", "100,50,60,80", "100,50,abc,80", 1)
    with raises(r"bboxes_front.csv: line 2: h = 'abc' is not a valid bbox value"):
        load(root, bbox_files=names)
    with raises(r"data.bbox_file lists 2 files but data.view_names has 3"):
        load(root, bbox_files=names[:2])


def test_image_size(tmp_path):
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((30, 40), np.uint8))
    assert image_size(tmp_path / "a.png") == (40, 30)
    with raises(r"b.png: image not found"):
        image_size(tmp_path / "b.png")
    (tmp_path / "c.png").write_text("not an image")
    with raises(r"c.png: cannot read image"):
        image_size(tmp_path / "c.png")


# ---------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "text, needle",
    [
        ("bodyparts,nose,nose\ncoords,x,y\nimg.png,1,2\n",
         "expected 3 header rows whose first cells are 'scorer', 'bodyparts', 'coords'"),
        ("scorer,a,a\nindividuals,m1,m1\nbodyparts,nose,nose\ncoords,x,y\nimg.png,1,2\n",
         "multi-animal DLC CSV .* not supported yet"),
        ("", "expected 3 header rows .* found an empty file"),
        (HEADER + "img.png,1,abc\n", r"line 4, column 3 \(nose y\): 'abc' is not a finite number"),
        (HEADER + "img.png,1,2\n\nimg2.png,inf,2\n", "line 6, column 2 .*'inf' is not a finite"),
        (HEADER + "img.png,1,\n", "line 4: keypoint 'nose' has only one of x, y"),
        (HEADER + "img.png,1,2\nimg.png,3,4\n", "'img.png' appears twice .*lines 4 and 5"),
        (HEADER + "img.png,1,2,3\n", "line 4 has 4 cells, the header has 3"),
        (HEADER + ",1,2\n", "line 4 has an empty image path"),
        ("scorer,a,a\nbodyparts,nose,nose\ncoords,x,x\nimg.png,1,2\n",
         "keypoint 'nose' has two 'x' columns"),
        ("scorer,a\nbodyparts,nose\ncoords,x\nimg.png,1\n",
         "keypoint 'nose' needs both x and y columns, has only x"),
        ("scorer,a,a,a\nbodyparts,nose,nose,nose\ncoords,x,y,z\nimg.png,1,2,3\n",
         "column 4 .*unknown coord 'z' for keypoint 'nose'"),
        ("scorer,a,a,a,a,a\nbodyparts,n,n,n,t,t\ncoords,x,y,visible,x,y\nimg.png,1,2,2,3,4\n",
         "'n' has a 'visible' column but 't' does not"),
        ("scorer,a,a,a\nbodyparts,n,n,n\ncoords,x,y,visible\nimg.png,1,2,5\n",
         "line 4: keypoint 'n' visible = 5, expected 0, 1 or 2"),
        ("scorer,a,a,\nbodyparts,n,n,\ncoords,x,y,\nimg.png,1,2,oops\n",
         "line 4, column 4 has a value but the column has no name"),
        ("scorer,set\nbodyparts,\ncoords,\nimg.png,train\n", "no keypoint x/y columns"),
    ],
)
def test_bad_csvs(tmp_path, text, needle):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with raises(f"bad.csv: .*{needle}"):
        read_label_csv(path)


def test_missing_csv(tmp_path):
    root = make_dataset(tmp_path)
    with raises(r"CollectedData_back.csv: label CSV not found"):
        load_labels(root, ["top", "back"], ["CollectedData_top.csv", "CollectedData_back.csv"])


def test_view_and_file_counts(tmp_path):
    root = make_dataset(tmp_path)
    with raises(r"data.csv_file lists 2 files but data.view_names has 3 views"):
        load_labels(root, VIEWS, csv_names()[:2])
    with raises(r"data.view_names has duplicates \['top'\]"):
        load_labels(root, ["top", "top", "side"], csv_names())
    with raises(r"data.view_names is empty"):
        load_labels(root, [], [])
    with raises(r"nowhere: dataset folder .* not found"):
        load_labels(root / "nowhere", VIEWS, csv_names())


def test_different_keypoints(tmp_path):
    root = make_dataset(tmp_path)
    edit_csv(root / "CollectedData_side.csv", "tail", "tial")
    with raises(r"CollectedData_side.csv: keypoint 3 is 'tial' but 'tail' in "
                r"CollectedData_top.csv"):
        load(root)


def test_fewer_keypoints(tmp_path):
    root = make_dataset(tmp_path)
    table = read_label_csv(root / "CollectedData_front.csv")
    write_label_csv(root / "CollectedData_front.csv", table.index, KPS[:2], table.points[:, :2])
    with raises(r"CollectedData_front.csv: keypoint 3 is nothing but 'tail' .*\(2 vs 3 keypoints"):
        load(root)


def test_fewer_rows(tmp_path):
    root = make_dataset(tmp_path)
    path = root / "CollectedData_side.csv"
    path.write_text("\n".join(path.read_text().splitlines()[:-1]) + "\n")
    with raises(r"CollectedData_side.csv: 5 rows, fewer than the 6 rows of CollectedData_top.csv"):
        load(root)


def test_basename_mismatch(tmp_path):
    root = make_dataset(tmp_path)
    edit_csv(root / "CollectedData_front.csv", "s2_front/img00000000.png", "s2_front/img7.png")
    with raises(r"CollectedData_front.csv: row 4 \(line 7\) is 'labeled-data/s2_front/img7.png' "
                r"but row 4 of CollectedData_top.csv is 'labeled-data/s2_top/img00000000.png'"):
        load(root)


def test_missing_image_is_named(tmp_path):
    root = make_dataset(tmp_path)
    (root / "labeled-data/s2_front/img00000001.png").unlink()
    (root / "labeled-data/s2_front/img00000002.png").unlink()
    with raises(r"s2_front/img00000001.png: image not found \(CollectedData_front.csv line 8; "
                r"2 of 18 labelled images missing in total\)"):
        load(root)
    assert load(root, check_images=False).n_frames == 6


# ---------------------------------------------------------------------------------- real data


def test_real_mouse(mouse_dir, caplog):
    views = ["back", "mid", "side", "top"]
    with caplog.at_level(logging.INFO, logger="pipeline.data.project"):
        labels = load_labels(mouse_dir, views, csv_names(views))
    assert labels.points_2d.shape == (4, 80, 15, 2)
    assert set(labels.sessions) == {"session0"}
    assert labels.keypoint_names[:3] == ("Nose", "Ear_R", "Ear_L")
    expected = str((mouse_dir / "calibration.toml").absolute())
    assert set(labels.calibration_files) == {expected}
    counts = np.isfinite(labels.points_2d).all(-1).sum(axis=(1, 2))
    assert counts.tolist() == [941, 1200, 1025, 1200]
    assert "back 941, mid 1200, side 1025, top 1200" in caplog.text
