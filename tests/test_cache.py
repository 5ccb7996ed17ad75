"""Stage cache_augmentations: warp exactness on pixels, 3D consistency, determinism, integrity."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from pipeline import cache_augmentations, triangulate_labels
from pipeline.augment3d import apply_affine, compose, invert, model_from_frame
from pipeline.cache import config_hash, verify
from pipeline.cache_dataset import CacheDataset
from pipeline.cameras import Camera, CameraGroup
from pipeline.errors import ParallaxError
from pipeline.example import KEYPOINT_COLOURS
from pipeline.photometric import PhotometricConfig
from tests.conftest import dataset_cli_args

CONFIG = {
    "data.image_resize_dims": {"height": 128, "width": 128},
    "augmentation": {"copies_per_frame": 2, "scale_range": [0.8, 1.2], "translate_frac": 0.25,
                     "rotate_deg": 20.0, "vertical_axis": [0.0, 0.0, 1.0]},
    "training.imgaug_3d": True, "training.train_prob": 0.6, "training.val_prob": 0.2,
    "training.rng_seed_data_pt": 0, "training.test_sessions": [],
}
OUTPUTS = ("splits", "train", "eval", "picture")


def build(data: Path, out: Path, config: dict = CONFIG) -> tuple[int, dict[str, Path]]:
    out.mkdir(parents=True, exist_ok=True)
    labels_3d = out / "labels_3d.csv"
    if not labels_3d.exists():
        code = triangulate_labels.main([*dataset_cli_args(data), "--points", str(labels_3d),
                                        "--outliers", str(out / "o.csv"),
                                        "--summary", str(out / "t.json")])
        assert code == 0
    paths = {"splits": out / "splits.csv", "train": out / "train.h5", "eval": out / "eval.h5",
             "picture": out / "augment.png"}
    argv = [*dataset_cli_args(data), "--labels-3d", str(labels_3d), "--config-json",
            json.dumps(config)]
    for key in OUTPUTS:
        argv += [f"--{key}", str(paths[key])]
    return cache_augmentations.main(argv), paths


@pytest.fixture(scope="module")
def built(example_dir, tmp_path_factory):
    code, paths = build(example_dir, tmp_path_factory.mktemp("cache"))
    assert code == 0
    return paths


def read(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as h5:
        return {name: h5[name][...] for name in h5}


def marker_centroid(image: np.ndarray, colour: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Colour-weighted centroid of a keypoint marker around `at` (x, y)."""
    cx, cy = np.round(at).astype(int)
    win = image[cy - 4:cy + 5, cx - 4:cx + 5].astype(float)
    weight = np.clip(1 - np.linalg.norm(win - colour, axis=-1) / 120, 0, None) ** 4
    ys, xs = np.mgrid[cy - 4:cy + 5, cx - 4:cx + 5]
    return np.array([(weight * xs).sum(), (weight * ys).sum()]) / weight.sum()


def test_image_moves_exactly_with_the_stored_warp(built, example_dir):
    """A marker drawn at p in the original image sits at A·p in the cached image (< 0.5 px)."""
    truth = np.load(example_dir / "ground_truth.npz")
    cache = read(built["train"])
    errors = []
    for row in np.flatnonzero(cache["copy"] > 0):
        frame = cache["frame_index"][row]
        A = compose(invert(cache["frame_from_model"][row]), cache["warp"][row])  # (V, 2, 3)
        for view in range(A.shape[0]):
            p = truth["points_2d"][view, frame]
            shown = truth["visible"][view, frame]  # markers are drawn where visible
            q = apply_affine(A[view], p)
            for k in np.flatnonzero(shown):
                others = np.delete(q, k, axis=0)
                if np.min(np.linalg.norm(others - q[k], axis=1)) < 8:
                    continue
                if not (6 <= q[k, 0] < 122 and 6 <= q[k, 1] < 122):
                    continue
                found = marker_centroid(cache["images"][row, view], KEYPOINT_COLOURS[k], q[k])
                errors.append(np.linalg.norm(found - q[k]))
    errors = np.array(errors)
    assert errors.size >= 30
    assert np.median(errors) < 0.2 and errors.max() < 0.5, (np.median(errors), errors.max())


def test_labels_are_warped_clicks_up_to_the_fit_residual(built, example_dir):
    truth = np.load(example_dir / "ground_truth.npz")
    cache = read(built["train"])
    rows = np.flatnonzero(cache["copy"] > 0)
    assert cache["fit_residual_px"][rows].max() > 0  # the residual is real and recorded
    for row in rows:
        frame = cache["frame_index"][row]
        A = compose(invert(cache["frame_from_model"][row]), cache["warp"][row])
        expected = apply_affine(A, truth["points_2d"][:, frame])
        labels = cache["keypoints_2d"][row]
        ok = np.isfinite(labels).all(-1)
        gap = np.linalg.norm(labels - expected, axis=-1)
        assert (gap[ok] <= np.repeat(cache["fit_residual_px"][row], ok.sum(1)) + 1e-6).all()


def test_stored_3d_reprojects_onto_stored_labels(built):
    cache = read(built["train"])
    names = [n.decode() if isinstance(n, bytes) else n for n in cache["cam_files"]]
    assert len(names) == 2
    checked = 0
    for row in range(len(cache["copy"])):
        c = cache["calibration_index"][row]
        cams = []
        for v in range(cache["cam_intrinsics"].shape[1]):
            ext = cache["cam_extrinsics"][c, v]
            import cv2

            cams.append(Camera(name=f"v{v}", size=(160, 128), matrix=cache["cam_intrinsics"][c, v],
                               dist=cache["cam_distortions"][c, v, :5],
                               rvec=cv2.Rodrigues(ext[:, :3])[0].ravel(), tvec=ext[:, 3]))
        frame_px = CameraGroup(cameras=tuple(cams)).project(cache["keypoints_3d"][row])
        model = apply_affine(invert(cache["frame_from_model"][row]), frame_px)
        labels = cache["keypoints_2d"][row]
        ok = np.isfinite(labels).all(-1) & np.isfinite(model).all(-1)
        assert np.abs(model[ok] - labels[ok]).max() < 1e-3
        checked += ok.sum()
    assert checked > 500


def test_resize_affine_maps_pixel_centres():
    m = model_from_frame(np.array([[10.0, 20.0, 100.0, 200.0]]), (50, 100))[0]
    corners = apply_affine(m, np.array([[9.5, 19.5], [209.5, 119.5]]))  # frame pixel edges
    np.testing.assert_allclose(corners, [[-0.5, -0.5], [99.5, 49.5]])


def test_deterministic_and_config_sensitive(example_dir, built, tmp_path):
    code, again = build(example_dir, tmp_path / "again")
    assert code == 0
    for key in OUTPUTS:
        assert built[key].read_bytes() == again[key].read_bytes(), key
    with pytest.raises(ParallaxError, match="another configuration"):
        CacheDataset(again["train"], expected_config_hash=config_hash({**CONFIG, "x": 1}))
    CacheDataset(again["train"], expected_config_hash=config_hash(CONFIG))


def test_truncated_and_corrupt_caches(built, tmp_path):
    data = built["train"].read_bytes()
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ParallaxError, match="truncated.h5"):
        CacheDataset(truncated)
    corrupt = tmp_path / "corrupt.h5"
    flipped = bytearray(data)
    middle = len(flipped) // 2
    flipped[middle:middle + 64] = bytes(b ^ 0xFF for b in flipped[middle:middle + 64])
    corrupt.write_bytes(bytes(flipped))
    with pytest.raises(ParallaxError, match="corrupt.h5"):
        verify(corrupt)


def test_view_with_few_labels_still_augments(example_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(example_dir, data)
    csv = data / "CollectedData_cam1.csv"
    lines = csv.read_text().splitlines()
    for row in range(3, len(lines)):  # keep only the first keypoint in this view
        cells = lines[row].split(",")
        lines[row] = ",".join(cells[:3] + [""] * (len(cells) - 3))
    csv.write_text("\n".join(lines) + "\n")
    code, paths = build(data, tmp_path / "out")
    assert code == 0
    cache = read(paths["train"])
    rows = np.flatnonzero(cache["copy"] > 0)
    assert rows.size == 2 * np.sum(cache["copy"] == 0)
    assert np.isfinite(cache["warp"][rows]).all()
    assert np.isfinite(cache["keypoints_2d"][rows][:, 1, 1:]).sum() == 0


def test_imgaug_3d_off_means_no_copies(example_dir, tmp_path):
    code, paths = build(example_dir, tmp_path, {**CONFIG, "training.imgaug_3d": False})
    assert code == 0
    assert (read(paths["train"])["copy"] == 0).all()


def test_bad_input_leaves_nothing(example_dir, tmp_path, capsys):
    code, paths = build(example_dir, tmp_path, {**CONFIG, "training.test_sessions": ["nope"]})
    assert code == 2
    assert "training.test_sessions" in capsys.readouterr().err
    assert not any(path.exists() for path in paths.values())


def test_dataset_items_and_workers(built):
    dataset = CacheDataset(built["train"], photometric=PhotometricConfig(), seed=1)
    item = dataset[0]
    views = len(dataset.view_names)
    assert item["images"].shape == (views, 3, 128, 128)
    assert item["keypoints_2d"].shape == (views, 12, 2)
    assert item["frame_from_model"].shape == (views, 2, 3)
    assert item["has_calibration"] and item["distortions"].shape == (views, 8)
    assert torch.equal(dataset[3]["images"], dataset[3]["images"])  # reproducible per epoch
    dataset.set_epoch(1)
    assert not torch.equal(dataset[3]["images"], CacheDataset(built["train"])[3]["images"])
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2)
    batch = next(iter(loader))
    assert batch["images"].shape == (4, views, 3, 128, 128)
    evaluation = CacheDataset(built["eval"])
    assert set(evaluation.meta["set"].astype(str)) <= {"val", "test"}


def test_splits_table(built, example_dir):
    from pipeline.dataset import frame_keys, load_labels
    from pipeline.splits import read_splits

    views = ["cam0", "cam1", "cam2"]
    labels = load_labels(example_dir, views, [f"CollectedData_{v}.csv" for v in views])
    sets = read_splits(built["splits"], frame_keys(labels))
    assert sorted(set(sets)) == ["test", "train", "val"]
    assert (sets == "train").sum() == 12  # train_prob 0.6 of 20 frames
    with pytest.raises(ParallaxError, match="rerun cache_augmentations"):
        read_splits(built["splits"], frame_keys(labels)[::-1])


def test_real_mouse_cache(mouse_dir, tmp_path):
    """The real 4-camera recording (1280x1024) caches; labels stay on the reprojected 3D."""
    views = ["back", "mid", "side", "top"]
    args = ["--data-dir", str(mouse_dir), "--view-names", *views,
            "--csv-files", *[f"CollectedData_{v}.csv" for v in views]]
    assert triangulate_labels.main([*args, "--points", str(tmp_path / "l.csv"), "--outliers",
                                    str(tmp_path / "o.csv"), "--summary",
                                    str(tmp_path / "s.json")]) == 0
    config = {**CONFIG, "augmentation": {**CONFIG["augmentation"], "copies_per_frame": 1},
              "training.train_prob": 0.5, "training.val_prob": 0.1}
    paths = {key: tmp_path / f"{key}.out" for key in OUTPUTS}
    argv = [*args, "--labels-3d", str(tmp_path / "l.csv"), "--config-json", json.dumps(config)]
    for key in OUTPUTS:
        argv += [f"--{key}", str(paths[key])]
    assert cache_augmentations.main(argv) == 0
    cache = read(paths["train"])
    assert cache["images"].shape[1:] == (4, 128, 128, 3)
    assert (cache["copy"] == 1).sum() == 40 and (cache["copy"] == 0).sum() == 40
    assert cache["source_paths"][0, 2].decode().startswith("labeled-data/session0_side/")
    rows = cache["copy"] == 1
    assert np.median(cache["fit_residual_px"][rows]) < 1.0  # model px at 128 px
