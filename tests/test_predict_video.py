"""Stage predict_video and pipeline.io.video: one row per video frame, 2D and 3D outputs, all or
nothing on desynchronised / corrupt / missing videos, frames streamed in batches."""

from __future__ import annotations

import json
import shutil
import weakref
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.core.errors import ParallaxError
from pipeline.inference.predictor import load_model, predict, prepare_views
from pipeline.io import video as video_io
from pipeline.io.calibration_toml import read_calibration
from pipeline.io.predictions_csv import read_predictions_table
from pipeline.stages import cache_augmentations, predict_video, triangulate_labels
from pipeline.synthetic.generate import generate_example
from pipeline.training.config import TrainConfig
from pipeline.training.trainer import Trainer
from tests.conftest import dataset_cli_args, write_members

VIDEO_FRAMES = 12
CACHE_CONFIG = {
    "data.image_resize_dims": {"height": 64, "width": 64},
    "augmentation": {"copies_per_frame": 0, "scale_range": [1.0, 1.0], "translate_frac": 0.0,
                     "rotate_deg": 0.0, "vertical_axis": [0.0, 0.0, 1.0]},
    "training.imgaug_3d": False, "training.train_prob": 0.6, "training.val_prob": 0.2,
    "training.rng_seed_data_pt": 0, "training.test_sessions": [],
}
TINY = {
    "model": {"model_type": "heatmap_multiview_transformer", "backbone": "vit_tiny_test"},
    "data": {"image_resize_dims": {"height": 64, "width": 64}, "downsample_factor": 2},
    "training": {"max_epochs": 1, "max_steps": 2, "train_batch_size": 4, "val_batch_size": 8,
                 "learning_rate": 1e-3, "check_val_every_n_epoch": 1, "ckpt_every_n_steps": 2,
                 "rng_seed_model_pt": 0, "imgaug": "dlc", "device": "cpu"},
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-view example with 12-frame videos and a tiny MVT trained for 2 steps on it."""
    root = tmp_path_factory.mktemp("predict_video")
    data = root / "data"
    generate_example(data, seed=5, n_sessions=2, frames_per_session=8, n_views=3,
                     image_size=(160, 128), video_frames=VIDEO_FRAMES)
    cache = root / "cache"
    args = dataset_cli_args(data)
    assert triangulate_labels.main([*args, "--points", str(cache / "l.csv"), "--outliers",
                                    str(cache / "o.csv"), "--summary", str(cache / "s.json")]) == 0
    argv = [*args, "--labels-3d", str(cache / "l.csv"), "--config-json", json.dumps(CACHE_CONFIG)]
    for key, name in (("splits", "splits.csv"), ("train", "train.h5"), ("eval", "eval.h5"),
                      ("picture", "a.png")):
        argv += [f"--{key}", str(cache / name)]
    assert cache_augmentations.main(argv) == 0
    torch.set_num_threads(1)
    model_dir = root / "models" / "tiny"
    Trainer(TrainConfig.from_config(TINY), cache / "train.h5", cache / "eval.h5", model_dir).fit()
    views = [str(v) for v in np.load(data / "ground_truth.npz")["view_names"]]
    return {"data": data, "checkpoint": model_dir / "best.pt", "views": views}


def session_videos(trained, session="session0", folder=None):
    folder = folder or trained["data"] / "videos"
    return [folder / f"{session}_{view}.mp4" for view in trained["views"]]


def cli(trained, out, videos=None, *extra, session="session0"):
    videos = videos or session_videos(trained, session)
    return ["--checkpoint", str(trained["checkpoint"]), "--videos", *map(str, videos),
            "--view-names", *trained["views"], "--session", session,
            "--calibration", str(trained["data"] / "calibrations" / f"{session}.toml"),
            "--out-dir", str(out), "--batch-size", "5", "--device", "cpu", *extra]


def read_frames(path: Path) -> np.ndarray:
    capture = cv2.VideoCapture(str(path))
    frames = []
    while (item := capture.read())[0]:
        frames.append(item[1])
    capture.release()
    return np.stack(frames)


def copy_videos(trained, tmp_path) -> list[Path]:
    folder = tmp_path / "videos"
    folder.mkdir()
    return [Path(shutil.copy(p, folder)) for p in session_videos(trained)]


def test_end_to_end_one_row_per_frame(trained, tmp_path):
    out = tmp_path / "videos"
    assert predict_video.main(cli(trained, out)) == 0
    views = trained["views"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"session0_{v}{kind}.csv" for v in views for kind in ("", "_raw")]
        + ["session0_3d.csv", "session0_trajectories.png"])
    loaded = load_model(trained["checkpoint"], "cpu")
    videos = session_videos(trained)
    frames = [read_frames(p) for p in videos]  # V x (N, H, W, 3)
    assert [len(f) for f in frames] == [VIDEO_FRAMES] * len(views)
    assert video_io.probe(videos[0]).frame_count == VIDEO_FRAMES
    tables = []
    for view in views:  # the raw network output
        table = pd.read_csv(out / f"session0_{view}_raw.csv", header=[0, 1, 2], index_col=0)
        assert table.index.tolist() == list(range(VIDEO_FRAMES))
        assert table.columns.get_level_values(0)[0] == "tiny"  # scorer = the model's name
        assert list(table.columns.get_level_values(1)[::3]) == loaded.keypoint_names
        assert list(table.columns.get_level_values(2)[:3]) == ["x", "y", "likelihood"]
        tables.append(table.to_numpy(float).reshape(VIDEO_FRAMES, -1, 3))
    written = np.stack(tables)  # (V, N, K, 3)
    # row n is video frame n: predict a few frames directly, one at a time, and compare
    for n in (0, 6, VIDEO_FRAMES - 1):  # first batch, second batch, the short last batch
        images, frame_from_model = prepare_views([f[n] for f in frames], None,
                                                 loaded.image_size)
        xy, conf = predict(loaded, images[None], frame_from_model[None])
        np.testing.assert_allclose(written[:, n, :, :2], xy[0], atol=1e-3)
        np.testing.assert_allclose(written[:, n, :, 2], conf[0], atol=1e-5)
    # the final predictions: where a view was replaced, the reprojection of the 3D point
    final = np.stack([pd.read_csv(out / f"session0_{v}.csv", header=[0, 1, 2], index_col=0)
                      .to_numpy(float).reshape(VIDEO_FRAMES, -1, 3) for v in views])
    np.testing.assert_array_equal(final[..., 2], written[..., 2])  # likelihood: the network's
    pose = pd.read_csv(out / "session0_3d.csv")
    names = loaded.keypoint_names
    points_3d = pose[[f"{k}_{a}" for k in names for a in "xyz"]].to_numpy(float)
    group = read_calibration(trained["data"] / "calibrations" / "session0.toml", views)
    reprojected = group.project(points_3d.reshape(VIDEO_FRAMES, len(names), 3))
    replaced = np.abs(final[..., :2] - written[..., :2]).max(-1) > 1e-6
    assert replaced.any()
    np.testing.assert_allclose(final[..., :2][replaced], reprojected[replaced], atol=1e-3)
    assert len(pose) == VIDEO_FRAMES and pose["fnum"].tolist() == list(range(VIDEO_FRAMES))
    for kp in loaded.keypoint_names:
        for suffix in ("x", "y", "z", "error", "ncams", "score"):
            assert f"{kp}_{suffix}" in pose.columns
    assert {"M_00", "M_22", "center_0", "center_2"} <= set(pose.columns)
    assert "frame" not in pose.columns and "set" not in pose.columns
    # a 3D point exactly where at least min_views (2) views agree on it
    ncams = pose[[f"{kp}_ncams" for kp in loaded.keypoint_names]].to_numpy()
    finite = np.isfinite(points_3d.reshape(VIDEO_FRAMES, len(names), 3)).all(-1)
    np.testing.assert_array_equal(finite, ncams >= 2)
    assert finite.mean() > 0.25


def test_labeled_video_and_skeleton(trained, tmp_path, capsys):
    out = tmp_path / "videos"
    loaded = load_model(trained["checkpoint"], "cpu")
    kp = loaded.keypoint_names
    assert predict_video.main(cli(trained, out, None, "--labeled-video", "--min-confidence",
                                  "0", "--skeleton",
                                  kp[0], kp[1], kp[1], kp[2])) == 0
    for view, source in zip(trained["views"], session_videos(trained), strict=True):
        labeled = read_frames(out / f"session0_{view}_labeled.mp4")
        original = read_frames(source)
        assert labeled.shape == original.shape
        # pixels around every predicted keypoint changed (drawn); far corners did not
        table = pd.read_csv(out / f"session0_{view}.csv", header=[0, 1, 2], index_col=0)
        xy = table.to_numpy(float).reshape(VIDEO_FRAMES, -1, 3)[..., :2]
        diff = np.abs(labeled.astype(int) - original.astype(int)).sum(-1)
        ix = np.clip(np.rint(xy[..., 0]).astype(int), 0, labeled.shape[2] - 1)
        iy = np.clip(np.rint(xy[..., 1]).astype(int), 0, labeled.shape[1] - 1)
        at_points = diff[np.arange(VIDEO_FRAMES)[:, None], iy, ix]
        assert np.median(at_points) > 60
    assert predict_video.main(cli(trained, tmp_path / "bad", None, "--labeled-video",
                                  "--skeleton", kp[0], "nothing")) == 2
    assert "unknown keypoint(s) ['nothing']" in capsys.readouterr().err


def test_desynchronised_videos_refused(trained, tmp_path, capsys):
    videos = copy_videos(trained, tmp_path)
    short = read_frames(videos[1])[:9]
    writer = cv2.VideoWriter(str(videos[1]), cv2.VideoWriter_fourcc(*"mp4v"), 30.0,
                             (short.shape[2], short.shape[1]))
    for frame in short:
        writer.write(frame)
    writer.release()
    out = tmp_path / "out"
    assert predict_video.main(cli(trained, out, videos, "--labeled-video")) == 2
    err = capsys.readouterr().err
    assert "not synchronised" in err
    for path, count in zip(videos, (12, 9, 12), strict=True):
        assert f"{path}: {count} frames" in err
    assert sum(line.startswith("parallax error:") for line in err.splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("damage", ["garbage", "truncated_mp4", "truncated_avi"])
def test_corrupt_video_refused(trained, tmp_path, capsys, damage):
    videos = copy_videos(trained, tmp_path)
    bad = videos[2]
    if damage == "garbage":
        bad.write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, np.uint8).tobytes())
        expected = "OpenCV cannot open this video"
    elif damage == "truncated_mp4":
        bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
        expected = "OpenCV cannot open this video"
    else:  # an AVI whose frames stop half way: the container still says 12 frames
        frames = [read_frames(p) for p in videos]
        videos = [p.with_suffix(".avi") for p in videos]
        for path, clip in zip(videos, frames, strict=True):
            writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30.0,
                                     (clip.shape[2], clip.shape[1]))
            for frame in clip:
                writer.write(frame)
            writer.release()
        bad = videos[2]
        bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
        expected = "decoding failed at frame"
    out = tmp_path / "out"
    assert predict_video.main(cli(trained, out, videos, "--labeled-video")) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and expected in err, err
    assert not out.exists() or not any(out.iterdir())


def test_iter_batches_reports_where_decoding_stops(trained):
    videos = session_videos(trained)
    infos = [video_io.probe(p) for p in videos]
    assert infos[0] == video_io.VideoInfo(VIDEO_FRAMES, 30.0, 160, 128)
    lying = [infos[0], video_io.VideoInfo(20, 30.0, 160, 128), infos[2]]
    with pytest.raises(ParallaxError, match=rf"{videos[1]}: decoding failed at frame 12 of "
                                            r"the 20"):
        list(video_io.iter_batches(videos, 5, lying))
    starts = [(start, [len(b) for b in batch]) for start, batch in
              video_io.iter_batches(videos, 5, infos)]
    assert starts == [(0, [5] * 3), (5, [5] * 3), (10, [2] * 3)]


def test_missing_view_and_unmatched_files(trained, tmp_path, caplog, capsys):
    folder = tmp_path / "videos"
    folder.mkdir()
    for path in [*session_videos(trained, "session0"), *session_videos(trained, "session1")]:
        shutil.copy(path, folder)
    (folder / "notes_overview.mp4").write_bytes(b"")
    sessions = video_io.find_sessions(folder, trained["views"])
    assert list(sessions) == ["session0", "session1"]
    assert [p.name for p in sessions["session1"]] == [f"session1_{v}.mp4"
                                                      for v in trained["views"]]
    assert "notes_overview.mp4" in caplog.text
    (folder / f"session1_{trained['views'][1]}.mp4").unlink()
    with pytest.raises(ParallaxError, match=rf"session 'session1' has no video for view\(s\) "
                                            rf"\['{trained['views'][1]}'\]"):
        video_io.find_sessions(folder, trained["views"])
    # the stage: a view's video missing, or the videos in the wrong order
    videos = session_videos(trained)
    out = tmp_path / "out"
    assert predict_video.main(cli(trained, out, videos[:2])) == 2
    assert "2 video(s) for 3 views" in capsys.readouterr().err
    assert predict_video.main(cli(trained, out, [videos[1], videos[0], videos[2]])) == 2
    assert f"{videos[1]}: expected the video of session 'session0' view" in \
        capsys.readouterr().err
    absent = [*videos[:2], tmp_path / "elsewhere" / videos[2].name]
    assert predict_video.main(cli(trained, out, absent)) == 2
    assert f"{absent[2]}: video file not found" in capsys.readouterr().err
    assert not out.exists()


def test_calibration_must_match_views_and_sizes(trained, tmp_path, capsys):
    toml = (trained["data"] / "calibrations" / "session0.toml").read_text()
    renamed = tmp_path / "renamed.toml"
    renamed.write_text(toml.replace(f'"{trained["views"][2]}"', '"elsewhere"'))
    out = tmp_path / "out"
    argv = cli(trained, out)
    argv[argv.index("--calibration") + 1] = str(renamed)
    assert predict_video.main(argv) == 2
    assert "no camera for view(s)" in capsys.readouterr().err
    resized = tmp_path / "resized.toml"
    resized.write_text(toml.replace("size = [160, 128]", "size = [320, 256]"))
    argv[argv.index("--calibration") + 1] = str(resized)
    assert predict_video.main(argv) == 2
    assert "calibrated for 320x256 images" in capsys.readouterr().err
    assert not out.exists()


def test_frames_are_streamed_in_batches(trained, monkeypatch):
    """At most one batch of frames per view is alive at any time, whatever the video length."""
    alive: dict[int, weakref.ref] = {}  # arrays are not hashable: weak references by id
    peak = []
    original = video_io._new_batch

    def tracked(infos, batch_size):
        held = [ref() for ref in alive.values()]
        peak.append(sum(len(a) for a in held if a is not None))  # frames held at this point
        del held
        batch = original(infos, batch_size)
        for array in batch:
            key = id(array)
            alive[key] = weakref.ref(array, lambda _, key=key: alive.pop(key, None))
        return batch

    monkeypatch.setattr(video_io, "_new_batch", tracked)
    loaded = load_model(trained["checkpoint"], "cpu")
    result = predict_video.predict_session(loaded, session_videos(trained), batch_size=4)
    assert result.n_frames == VIDEO_FRAMES
    assert result.points.shape == (3, VIDEO_FRAMES, len(loaded.keypoint_names), 2)
    assert len(peak) == VIDEO_FRAMES // 4 + 1  # 3 full batches, then the one that finds the end
    assert max(peak) == 0, peak  # the previous batch was released before the next was decoded


def test_real_videos_are_found_and_synchronised(mouse_dir):
    views = ["back", "mid", "side", "top"]
    sessions = video_io.find_sessions(mouse_dir / "videos", views)
    assert list(sessions) == ["session0"]
    infos = video_io.check_synchronised(sessions["session0"])
    assert {(i.frame_count, i.width, i.height) for i in infos} == {(120, 1280, 1024)}
    assert video_io.count_frames(sessions["session0"][0]) == 120


def test_ensemble_members_mean_and_variance(trained, tmp_path):
    """Two members: each member's CSVs in --members-dir, the raw file is their mean with their
    variance (x_var, y_var), the video decoded once for both."""
    members = write_members(trained["checkpoint"], tmp_path / "models" / "tiny",
                            lambda _, v: v * 1.05)
    out, member_dir = tmp_path / "videos", tmp_path / "videos" / "members" / "session0"
    argv = cli(trained, out, None, "--members-dir", str(member_dir))
    at = argv.index("--checkpoint")
    argv[at + 1:at + 2] = [str(m) for m in members]
    assert predict_video.main(argv) == 0
    for view in trained["views"]:
        tables = [read_predictions_table(member_dir / f"seed{s}" / f"session0_{view}.csv")
                  for s in (0, 1)]
        raw = read_predictions_table(out / f"session0_{view}_raw.csv")
        stacked = np.stack([t.points for t in tables])
        np.testing.assert_allclose(raw.points, stacked.mean(0), atol=1e-9)
        np.testing.assert_allclose(raw.variance, stacked.var(0), atol=1e-9)
        assert len(raw.index) == VIDEO_FRAMES
        assert raw.keypoint_names == tables[0].keypoint_names
    assert tables[0].points.shape[0] == VIDEO_FRAMES and (raw.variance > 0).any()
