"""Stage cache_augmentations: warp exactness on pixels, 3D consistency, determinism, integrity,
the torch Dataset and the CLI's failure behaviour."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import cv2
import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.core.errors import ParallaxError
from pipeline.core.hashing import config_hash
from pipeline.data.augment3d import apply_affine, compose, invert
from pipeline.data.cache.format import open_checked, verify
from pipeline.data.cache.torch_dataset import CacheDataset
from pipeline.data.images import IMAGENET_MEAN, IMAGENET_STD, warp_image
from pipeline.data.photometric import PhotometricConfig, from_imgaug, photometric
from pipeline.geometry.cameras import Camera, CameraGroup
from pipeline.io.calibration_toml import read_calibration
from pipeline.stages import cache_augmentations, triangulate_labels
from pipeline.synthetic.render import KEYPOINT_COLOURS
from tests.conftest import dataset_cli_args

SIZE = 64  # model image side; the example's frames are 160x128
CONFIG = {
    "data.image_resize_dims": {"height": SIZE, "width": SIZE},
    "augmentation": {"copies_per_frame": 2, "scale_range": [0.8, 1.2], "translate_frac": 0.25,
                     "rotate_deg": 20.0, "vertical_axis": [0.0, 0.0, 1.0]},
    "training.imgaug_3d": True, "training.train_prob": 0.6, "training.val_prob": 0.2,
    "training.rng_seed_data_pt": 0, "training.test_sessions": [],
}
OUTPUTS = ("splits", "train", "eval", "picture")


def triangulate(data_args: list[str], out: Path) -> Path:
    labels_3d = out / "labels_3d.csv"
    if not labels_3d.exists():
        code = triangulate_labels.main([*data_args, "--points", str(labels_3d), "--outliers",
                                        str(out / "o.csv"), "--summary", str(out / "t.json")])
        assert code == 0
    return labels_3d


def build(data_args: list[str], out: Path, config: dict = CONFIG,
          labels_3d: Path | None = None) -> tuple[int, dict[str, Path]]:
    out.mkdir(parents=True, exist_ok=True)
    labels_3d = labels_3d or triangulate(data_args, out)
    paths = {"splits": out / "splits.csv", "train": out / "train.h5", "eval": out / "eval.h5",
             "picture": out / "augment.png"}
    argv = [*data_args, "--labels-3d", str(labels_3d), "--config-json",
            config if isinstance(config, str) else json.dumps(config)]
    for key in OUTPUTS:
        argv += [f"--{key}", str(paths[key])]
    return cache_augmentations.main(argv), paths


@pytest.fixture(scope="module")
def built(example_dir, tmp_path_factory):
    code, paths = build(dataset_cli_args(example_dir), tmp_path_factory.mktemp("cache"))
    assert code == 0
    return paths


def read(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as h5:
        return {name: h5[name][...] for name in h5}


def marker_centre(image: np.ndarray, colour: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Sub-pixel centre of a keypoint marker (Gaussian dot of `colour` on a black disc), measured
    on the pixels: intensity along the colour, counted only where the pixel has that hue,
    centroid over a 5x5 window re-centred (sub-pixel) until it settles."""
    pixels = image.astype(np.float32)
    unit = (colour / np.linalg.norm(colour)).astype(np.float32)
    along = pixels @ unit
    cosine = along / np.maximum(np.linalg.norm(pixels, axis=-1), 1e-3)
    weight = along * np.clip((cosine - 0.9) / 0.1, 0, 1) ** 2
    offsets = np.arange(5) - 2.0
    centre = np.asarray(start, float).copy()
    for _ in range(6):
        win = cv2.getRectSubPix(weight, (5, 5), (float(centre[0]), float(centre[1])))
        centre += np.array([win.sum(0) @ offsets, win.sum(1) @ offsets]) / win.sum()
    return centre


def frame_to_cached(cache: dict, row: int) -> np.ndarray:
    """(V, 2, 3) original frame pixels -> cached model pixels: resize ∘ warp."""
    return compose(invert(cache["frame_from_model"][row]), cache["warp"][row])


def marker_errors(cache: dict, truth: dict, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Distances (model px) between where each drawn marker is found in the cached images and
    where the stored maps put it (A·p), and the copy of each measurement."""
    errors, copies = [], []
    for row in range(len(cache["copy"])):
        frame = cache["frame_index"][row]
        A = frame_to_cached(cache, row)
        for view in range(A.shape[0]):
            q = apply_affine(A[view], truth["points_2d"][view, frame])
            for k in np.flatnonzero(truth["visible"][view, frame]):  # the drawn markers
                gaps = np.linalg.norm(np.delete(q, k, axis=0) - q[k], axis=1)
                if np.nanmin(gaps) < 6 or not (4 <= q[k].min() and q[k].max() < size - 5):
                    continue  # another marker nearby, or too close to the border
                found = marker_centre(cache["images"][row, view], KEYPOINT_COLOURS[k], q[k])
                errors.append(np.linalg.norm(found - q[k]))
                copies.append(cache["copy"][row])
    return np.array(errors), np.array(copies)


def test_image_moves_exactly_with_the_stored_warp(built, example_dir):
    """A marker drawn at p in the original image is found at A·p in the cached image
    (< 0.5 px, measured on the pixels; no half-pixel or resize offsets)."""
    errors, copies = marker_errors(read(built["train"]), np.load(example_dir / "ground_truth.npz"),
                                   SIZE)
    assert (copies > 0).sum() >= 40 and (copies == 0).sum() >= 15
    assert errors.max() < 0.5 and np.median(errors) < 0.1, (np.median(errors), errors.max())


def test_bbox_crops_map_exactly(example_dir, tmp_path):
    """With data.bbox_file the images on disk are crops: content still lands at A·p."""
    data = tmp_path / "data"
    shutil.copytree(example_dir, data)
    views = ["cam0", "cam1", "cam2"]
    for v, view in enumerate(views):
        csv = data / f"CollectedData_{view}.csv"
        lines = csv.read_text().splitlines()
        boxes = [",x,y,h,w"]
        for row in range(3, len(lines)):
            cells = lines[row].split(",")
            x, y = 14 + 3 * v + row % 4, 10 + (row % 3)  # a box per view and frame
            image = cv2.imread(str(data / cells[0]))
            cv2.imwrite(str(data / cells[0]), image[y:y + 100, x:x + 120])
            for c in range(1, len(cells)):
                if cells[c]:
                    cells[c] = repr(float(cells[c]) - (x if c % 2 else y))
            lines[row] = ",".join(cells)
            boxes.append(f"{cells[0]},{x},{y},100,120")
        csv.write_text("\n".join(lines) + "\n")
        (data / f"bboxes_{view}.csv").write_text("\n".join(boxes) + "\n")
    args = [*dataset_cli_args(data), "--bbox-files", *[f"bboxes_{v}.csv" for v in views]]
    code, paths = build(args, tmp_path / "out")
    assert code == 0
    errors, copies = marker_errors(read(paths["train"]), np.load(data / "ground_truth.npz"),
                                   SIZE)
    assert (copies > 0).sum() >= 30
    assert errors.max() < 0.5 and np.median(errors) < 0.1, (np.median(errors), errors.max())


def test_warp_image_places_a_blob_exactly():
    """One warpAffine (with the anti-alias pre-blur) moves content exactly, at any sub-pixel
    position, rotation and shrink factor."""
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:200, 0:240].astype(float)
    for _ in range(6):
        p = rng.uniform(80, 140, 2)
        blob = 40 + 200 * np.exp(-((xs - p[0]) ** 2 + (ys - p[1]) ** 2) / (2 * 3.0**2))
        image = np.repeat(blob[..., None], 3, axis=2).round().astype(np.uint8)
        angle, scale = rng.uniform(-40, 40), rng.uniform(0.25, 0.6)
        A = cv2.getRotationMatrix2D((120.0, 100.0), angle, scale)
        A[:, 2] += rng.uniform(-5, 5, 2) - [120 - 32, 100 - 24]
        out = warp_image(image, A, (48, 64)).astype(float)[..., 0] - 40
        q = apply_affine(A, p[None])[0]
        oy, ox = np.mgrid[0:48, 0:64]
        weight = np.clip(out, 0, None) * (np.hypot(ox - q[0], oy - q[1]) < 6)
        found = np.array([(weight * ox).sum(), (weight * oy).sum()]) / weight.sum()
        assert np.linalg.norm(found - q) < 0.05


def similarity_residual(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """(V,) max |S·before − after| of the least-squares 2D similarity S per view (frame px),
    fitted here with numpy's lstsq, independently of the cache's own fit."""
    out = np.zeros(len(before))
    for v, (src, dst) in enumerate(zip(before, after, strict=True)):
        ok = np.isfinite(src).all(-1) & np.isfinite(dst).all(-1)
        x, y = src[ok].T
        rows = np.concatenate([np.stack([x, -y, np.ones_like(x), 0 * x], -1),
                               np.stack([y, x, 0 * x, np.ones_like(x)], -1)])
        coef = np.linalg.lstsq(rows, np.concatenate([dst[ok, 0], dst[ok, 1]]), rcond=None)[0]
        fitted = rows @ coef
        out[v] = np.hypot(*(fitted - np.concatenate([dst[ok, 0], dst[ok, 1]])).reshape(2, -1)
                          ).max()
    return out


def test_labels_are_the_warped_clicks_up_to_the_fit_residual(built, example_dir):
    """Clicked labels of an augmented copy differ from the warped clicks by at most the residual
    of a similarity fit between the projections of the pose before and after the move, fitted
    here independently (numpy lstsq; the example's labels are noise-free)."""
    truth = np.load(example_dir / "ground_truth.npz")
    cache = read(built["train"])
    points_3d = pd.read_csv(built["train"].parent / "labels_3d.csv")
    names = [str(k) for k in truth["keypoint_names"]]
    pose = points_3d[[f"{k}_{a}" for k in names for a in "xyz"]].to_numpy(float)
    pose = pose.reshape(len(points_3d), len(names), 3)
    sessions = {s: read_calibration(example_dir / "calibrations" / f"{s}.toml")
                for s in ("session0", "session1")}
    checked = 0
    for row in range(len(cache["copy"])):
        frame = cache["frame_index"][row]
        expected = apply_affine(frame_to_cached(cache, row), truth["points_2d"][:, frame])
        labels = cache["keypoints_2d"][row]
        clicked = cache["label_source"][row] == 1
        assert clicked.sum() > 5
        gap = np.linalg.norm(labels - expected, axis=-1)
        if cache["copy"][row] == 0:
            assert (gap[clicked] < 1e-6).all()
            continue
        group = sessions[str(points_3d["session"][frame])]
        before, after = group.project(pose[frame]), group.project(cache["keypoints_3d"][row])
        gain = np.linalg.norm(invert(cache["frame_from_model"][row])[:, :, :2], ord=2,
                              axis=(1, 2))  # (V,) largest model px per frame px
        bound = similarity_residual(before, after) * gain  # model px
        assert (gap[clicked] <= np.broadcast_to(bound[:, None], gap.shape)[clicked] + 1e-6).all()
        # the stored fit residual (max over the fitted keypoints) is no smaller than any clicked
        # label's gap and no larger than the independent bound
        stored = cache["fit_residual_px"][row]
        with_3d = clicked & np.isfinite(cache["keypoints_3d"][row]).all(-1)[None]
        seen = np.where(with_3d, gap, 0.0).max(-1)
        assert (seen <= stored + 1e-4).all() and (stored <= bound + 1e-4).all()
        checked += 1
        # a label without 3D (clicked in one view only) is its click mapped exactly
        no_3d = clicked & ~np.isfinite(cache["keypoints_3d"][row]).all(-1)[None]
        assert (gap[no_3d] < 1e-6).all()
    assert checked > 10
    # clicks are exactly the labelled points; every other target is a projected one
    labelled = np.isfinite(truth["points_2d"]).all(-1) & truth["visible"]
    for row in range(len(cache["copy"])):
        source = cache["label_source"][row]
        assert not ((source == 1) & ~labelled[:, cache["frame_index"][row]]).any()
        assert not ((source == 2) & labelled[:, cache["frame_index"][row]]).any()


def check_hidden_targets(train_h5: Path, example_dir: Path) -> tuple[int, int]:
    """Assert that targets of keypoints not clicked in a view are the projections of their 3D
    point inside the image (label_source 2) and absent outside (0); (projected, outside)."""
    cache = read(train_h5)
    truth = np.load(example_dir / "ground_truth.npz")
    points_3d = pd.read_csv(train_h5.parent / "labels_3d.csv")
    names = [str(k) for k in truth["keypoint_names"]]
    pose = points_3d[[f"{k}_{a}" for k in names for a in "xyz"]].to_numpy(float)
    pose = pose.reshape(len(points_3d), len(names), 3)
    projected = outside = 0
    for row in range(len(cache["copy"])):
        frame = cache["frame_index"][row]
        group = read_calibration(example_dir / "calibrations"
                                 / f"{points_3d['session'][frame]}.toml")
        world = pose[frame] if cache["copy"][row] == 0 else cache["keypoints_3d"][row]
        with np.errstate(invalid="ignore"):
            front = np.stack([(cam.R @ world.T + cam.extrinsic[:, 3:])[2] > 0
                              for cam in group.cameras])
        expected = apply_affine(invert(cache["frame_from_model"][row]), group.project(world))
        source, labels = cache["label_source"][row], cache["keypoints_2d"][row]
        clicked = np.isfinite(truth["points_2d"][:, frame]).all(-1) & truth["visible"][:, frame]
        has_3d = np.isfinite(world).all(-1)[None]
        hidden = ~clicked & has_3d & front
        inside = ((expected >= -0.5) & (expected < SIZE - 0.5)).all(-1)
        np.testing.assert_allclose(labels[hidden & inside], expected[hidden & inside],
                                   atol=1e-6)
        assert (source[hidden & inside] == 2).all()
        assert (source[hidden & ~inside] == 0).all()
        assert np.isnan(labels[hidden & ~inside]).all()
        assert (source[~clicked & ~has_3d] == 0).all()
        projected += int((hidden & inside).sum())
        outside += int((hidden & ~inside).sum())
    return projected, outside


def test_hidden_keypoints_get_the_projection_of_their_3d_point(built, example_dir, tmp_path):
    """Not clicked in a view but triangulated from the others: the target is the projection of
    the triangulated point (original frames) or of the moved point (augmented copies), only
    inside the image; label_source says which targets are projected."""
    projected, _ = check_hidden_targets(built["train"], example_dir)
    assert projected > 20
    # shifts of up to 1.5x the pose's extent move many hidden keypoints out of the image
    far = {**CONFIG, "augmentation": {**CONFIG["augmentation"], "translate_frac": 1.5}}
    code, paths = build(dataset_cli_args(example_dir), tmp_path / "far", far)
    assert code == 0
    projected, outside = check_hidden_targets(paths["train"], example_dir)
    assert projected > 20 and outside > 5
    # the Dataset separates clicked from projected targets
    cache = read(built["train"])
    item = CacheDataset(built["train"])[0]
    np.testing.assert_array_equal(item["keypoints_valid"].numpy(), cache["label_source"][0] == 1)
    np.testing.assert_array_equal(item["hidden_valid"].numpy(), cache["label_source"][0] == 2)


def stored_cameras(cache: dict, calibration: int) -> CameraGroup:
    cams = []
    for view in range(cache["cam_intrinsics"].shape[1]):
        ext = cache["cam_extrinsics"][calibration, view]
        fisheye = bool(cache["cam_fisheye"][calibration, view])
        dist = cache["cam_distortions"][calibration, view]
        cams.append(Camera(name=f"v{view}", size=(160, 128),
                           matrix=cache["cam_intrinsics"][calibration, view],
                           dist=dist[:4] if fisheye else dist,
                           rvec=cv2.Rodrigues(ext[:, :3])[0].ravel(), tvec=ext[:, 3],
                           fisheye=fisheye))
    return CameraGroup(cameras=tuple(cams))


def test_stored_3d_reprojects_onto_the_stored_labels(built):
    """project(keypoints_3d) through the stored cameras = frame_from_model · keypoints_2d."""
    cache = read(built["train"])
    assert len(cache["cam_files"]) == 2  # one calibration per session
    checked = 0
    for row in np.flatnonzero(cache["copy"] > 0):
        group = stored_cameras(cache, cache["calibration_index"][row])
        frame_px = group.project(cache["keypoints_3d"][row])
        labels = apply_affine(cache["frame_from_model"][row], cache["keypoints_2d"][row])
        ok = np.isfinite(labels).all(-1) & np.isfinite(cache["keypoints_3d"][row]).all(-1)
        assert np.abs(frame_px[ok] - labels[ok]).max() < 1e-3
        checked += ok.sum()
    assert checked > 300
    # the same through the Dataset's tensors (float32)
    dataset = CacheDataset(built["train"])
    for row in np.flatnonzero(cache["copy"] > 0)[:6]:
        item = {k: v.numpy() for k, v in dataset[int(row)].items()}
        group = stored_cameras(cache, cache["calibration_index"][row])
        ok = item["keypoints_valid"] & item["keypoints_3d_valid"][None]
        frame_px = group.project(item["keypoints_3d"].astype(float))
        labels = apply_affine(item["frame_from_model"].astype(float),
                              item["keypoints_2d"].astype(float))
        assert np.abs(frame_px[ok] - labels[ok]).max() < 0.02
        np.testing.assert_allclose(item["extrinsics"], cache["cam_extrinsics"][
            cache["calibration_index"][row]], atol=1e-5)


def differences(a: Path, b: Path) -> list[str]:
    """What differs between two caches (to diagnose a determinism failure)."""
    first, second = read(a), read(b)
    out = [name for name in first if not np.array_equal(first[name], second.get(name),
                                                         equal_nan=first[name].dtype.kind == "f")]
    with h5py.File(a) as h5a, h5py.File(b) as h5b:
        out += [f"attr {k}" for k in h5a.attrs if str(h5a.attrs[k]) != str(h5b.attrs.get(k))]
    return out + [f"sizes {a.stat().st_size} {b.stat().st_size}"]


def test_deterministic_residuals_logged(example_dir, built, tmp_path, capsys):
    code, again = build(dataset_cli_args(example_dir), tmp_path / "again")
    assert code == 0
    for key in OUTPUTS:
        assert built[key].read_bytes() == again[key].read_bytes(), (key, differences(
            built[key], again[key]) if key in ("train", "eval") else "")
    cache = read(again["train"])
    residual = cache["fit_residual_px"][cache["copy"] > 0]
    log = capsys.readouterr().err
    line = next(line for line in log.splitlines() if "similarity-fit residual" in line)
    assert f"median {np.median(residual):.4f}, p95 {np.percentile(residual, 95):.4f}" in line
    with h5py.File(again["train"]) as h5:
        assert h5.attrs["residual_median_px"] == pytest.approx(np.median(residual))
        assert h5.attrs["kind"] == "train" and list(h5.attrs["image_size"]) == [SIZE, SIZE]
    picture = cv2.imread(str(again["picture"]))
    assert picture.shape[1] == 3 * 192 and picture.shape[0] > 6 * 192  # 2 frames x 3 rows


def test_config_change_is_refused(built):
    CacheDataset(built["train"], expected_config_hash=config_hash(CONFIG))
    verify(built["eval"], expected_config_hash=config_hash(CONFIG))
    changed = {**CONFIG, "augmentation": {**CONFIG["augmentation"], "scale_range": [0.9, 1.1]}}
    for path in (built["train"], built["eval"]):
        with pytest.raises(ParallaxError, match=f"{path.name}.*another configuration"):
            CacheDataset(path, expected_config_hash=config_hash(changed))


def test_truncated_and_corrupt_caches(built, tmp_path):
    data = built["train"].read_bytes()
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ParallaxError, match="truncated.h5"):
        CacheDataset(truncated)
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not an HDF5 file" * 100)
    with pytest.raises(ParallaxError, match="garbage.h5"):
        open_checked(garbage)
    with pytest.raises(ParallaxError, match="missing.h5.*not found"):
        CacheDataset(tmp_path / "missing.h5")

    def flip(name: str, dataset: str, sample: int) -> Path:
        with h5py.File(built["train"]) as h5:
            coords = (sample,) + (0,) * (h5[dataset].ndim - 1)
            info = h5[dataset].id.get_chunk_info_by_coord(coords)
        damaged = bytearray(data)
        middle = info.byte_offset + info.size // 2
        damaged[middle:middle + 16] = bytes(b ^ 0x5A for b in damaged[middle:middle + 16])
        path = tmp_path / name
        path.write_bytes(bytes(damaged))
        return path

    bad_image = flip("bad_image.h5", "images", 3)
    dataset = CacheDataset(bad_image)  # the metadata is intact
    assert dataset[2]["images"].shape[0] == 3
    with pytest.raises(ParallaxError, match="bad_image.h5.*sample 3"):
        dataset[3]
    with pytest.raises(ParallaxError, match="bad_image.h5.*images"):
        verify(bad_image)
    with pytest.raises(ParallaxError, match="bad_labels.h5.*keypoints_2d"):
        CacheDataset(flip("bad_labels.h5", "keypoints_2d", 0))


def edit_csv(path: Path, keep_columns) -> None:
    """Blank every label cell of rows whose index passes `keep_columns(row)` is not None, except
    the keypoints it returns."""
    lines = path.read_text().splitlines()
    for row in range(3, len(lines)):
        keep = keep_columns(row - 3)
        if keep is None:
            continue
        cells = lines[row].split(",")
        for column in range(1, len(cells)):
            if (column - 1) // 2 not in keep:
                cells[column] = ""
        lines[row] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")


def test_sparse_views_still_augment_and_bare_frames_do_not(example_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(example_dir, data)
    truth = np.load(example_dir / "ground_truth.npz")
    k = int(np.argmax(truth["visible"][1].sum(axis=0)))  # cam1's most often clicked keypoint
    # cam1 keeps only keypoint k: a view with < 3 clicks must still get warps from the 3D points
    edit_csv(data / "CollectedData_cam1.csv", lambda row: {k})
    # frame 0 keeps one keypoint in every view: < 2 triangulated keypoints, stored un-augmented
    for view in ("cam0", "cam2"):
        edit_csv(data / f"CollectedData_{view}.csv", lambda row: {k} if row == 0 else None)
    config = {**CONFIG, "training.train_prob": 1.0, "training.val_prob": 0.0}
    code, paths = build(dataset_cli_args(data), tmp_path / "out", config)
    assert code == 0
    assert "fewer than 2 triangulated keypoints': 1" in capsys.readouterr().err
    cache = read(paths["train"])
    assert (cache["copy"][cache["frame_index"] == 0] == 0).all()
    rows = np.flatnonzero(cache["copy"] > 0)
    assert rows.size == 2 * 19
    assert np.isfinite(cache["warp"][rows]).all()
    cam1 = cache["keypoints_2d"][rows, 1]
    clicked = cache["label_source"][rows, 1] == 1
    assert (np.isfinite(cam1[:, k]).all(-1) & clicked[:, k]).sum() >= 25
    assert np.delete(clicked, k, axis=1).sum() == 0  # the others: projected targets at most
    assert (np.delete(cache["label_source"][rows, 1], k, axis=1) == 2).sum() > 25
    with h5py.File(paths["train"]) as h5:
        assert json.loads(h5.attrs["not_augmented"]) == {"few_3d": 1}
    assert read(paths["eval"])["copy"].size == 0  # an empty eval cache is still valid
    assert len(CacheDataset(paths["eval"])) == 0


def test_imgaug_3d_off_means_no_copies(built, example_dir, tmp_path):
    labels_3d = built["train"].parent / "labels_3d.csv"
    code, paths = build(dataset_cli_args(example_dir), tmp_path,
                        {**CONFIG, "training.imgaug_3d": False}, labels_3d)
    assert code == 0
    cache = read(paths["train"])
    assert (cache["copy"] == 0).all() and len(cache["copy"]) == 12
    assert (cache["warp"] == np.eye(2, 3)).all()


def test_uncompressed_images_read_the_same(built, example_dir, tmp_path):
    labels_3d = built["train"].parent / "labels_3d.csv"
    config = {**CONFIG, "augmentation": {**CONFIG["augmentation"], "image_compression": "none"}}
    code, paths = build(dataset_cli_args(example_dir), tmp_path, config, labels_3d)
    assert code == 0
    with h5py.File(paths["train"]) as h5:
        assert h5["images"].compression is None and h5["images"].fletcher32
    np.testing.assert_array_equal(read(paths["train"])["images"], read(built["train"])["images"])
    assert paths["train"].stat().st_size > built["train"].stat().st_size


@pytest.mark.parametrize(("config", "message"), [
    ({**CONFIG, "training.test_sessions": ["nope"]}, "training.test_sessions.*'nope'"),
    ("{not json", "--config-json is not valid JSON"),
    ({k: v for k, v in CONFIG.items() if k != "augmentation"}, "lacks key.*augmentation"),
    ({**CONFIG, "augmentation": {**CONFIG["augmentation"], "scale_range": [1.2, 0.8]}},
     "scale_range"),
    ("corrupt-image", "cannot read image"),
])
def test_bad_input_exits_2_with_one_message_and_no_outputs(built, example_dir, tmp_path, capsys,
                                                           config, message):
    data = example_dir
    if config == "corrupt-image":  # fails half-way through the build
        data = tmp_path / "data"
        shutil.copytree(example_dir, data)
        keys = (data / "CollectedData_cam2.csv").read_text().splitlines()[-1].split(",")[0]
        (data / keys).write_bytes(b"\x89PNG broken")
        config = CONFIG
    out = tmp_path / "out"
    code, paths = build(dataset_cli_args(data), out, config, built["train"].parent /
                        "labels_3d.csv")
    assert code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("parallax error:")]
    assert len(errors) == 1 and "Traceback" not in err
    assert re.search(message, errors[0]), errors[0]
    assert not any(path.exists() for path in paths.values())
    assert list(out.iterdir()) == []  # no temporary files either


def test_dataset_items_follow_the_contract(built):
    train = CacheDataset(built["train"])
    views = len(train.view_names)
    item = train[5]
    expected = {
        "images": ((views, 3, SIZE, SIZE), torch.float32),
        "keypoints_2d": ((views, 12, 2), torch.float32), "keypoints_valid": ((views, 12),
                                                                          torch.bool),
        "visible": ((views, 12), torch.int8), "keypoints_3d": ((12, 3), torch.float32),
        "keypoints_3d_valid": ((12,), torch.bool),
        "frame_from_model": ((views, 2, 3), torch.float32),
        "intrinsics": ((views, 3, 3), torch.float32), "extrinsics": ((views, 3, 4),
                                                                   torch.float32),
        "distortions": ((views, 8), torch.float32), "fisheye": ((views,), torch.bool),
        "has_calibration": ((), torch.bool), "index": ((), torch.int64),
        "hidden_valid": ((views, 12), torch.bool),
    }
    assert set(item) == set(expected)
    for name, (shape, dtype) in expected.items():
        assert tuple(item[name].shape) == shape and item[name].dtype == dtype, name
    assert item["has_calibration"] and int(item["index"]) == 5
    assert (item["keypoints_2d"][~item["keypoints_valid"] & ~item["hidden_valid"]] == 0).all()
    assert ((item["visible"] > 0) == item["keypoints_valid"]).all()
    raw = read(built["train"])["images"][5, :, :, :, ::-1].transpose(0, 3, 1, 2) / 255.0
    normalised = (raw - IMAGENET_MEAN[:, None, None]) / IMAGENET_STD[:, None, None]
    np.testing.assert_allclose(item["images"].numpy(), normalised, atol=1e-5)
    uint8 = CacheDataset(built["train"], normalize=False)[5]["images"]
    assert uint8.dtype == torch.uint8
    evaluation = CacheDataset(built["eval"], sets=("val",))
    assert len(evaluation) == 4 and set(evaluation.meta["set"][evaluation.rows]) == {"val"}


def test_dataloader_with_workers_matches_single_process(built):
    dataset = CacheDataset(built["train"], photometric=PhotometricConfig(), seed=1)
    dataset[0]  # a handle opened in the parent before the workers fork
    batches = {}
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(dataset, batch_size=8, num_workers=workers)
        batches[workers] = list(loader)
    assert sum(len(b["index"]) for b in batches[2]) == len(dataset)
    for one, two in zip(batches[0], batches[2], strict=True):
        for key in one:
            assert torch.equal(one[key], two[key]), key


def test_photometric_is_per_view_reproducible_and_configurable(built):
    images = read(built["train"])["images"][0]
    config = PhotometricConfig(blur_prob=0.5, noise_prob=0.5, dropout_prob=0.5)
    first = photometric(images, np.random.default_rng(3), config)
    assert np.array_equal(first, photometric(images, np.random.default_rng(3), config))
    assert first.dtype == np.uint8 and first.shape == images.shape
    changes = [np.abs(first[v].astype(int) - images[v]).mean() for v in range(len(images))]
    assert len(set(np.round(changes, 3))) == len(images)  # each view drawn on its own
    dataset = CacheDataset(built["train"], photometric=config, seed=0)
    epoch0 = dataset[4]["images"]
    dataset.set_epoch(1)
    assert not torch.equal(epoch0, dataset[4]["images"])
    dataset.set_epoch(0)
    assert torch.equal(epoch0, dataset[4]["images"])
    assert from_imgaug("none") is None and from_imgaug("default") is None
    assert from_imgaug("dlc") == PhotometricConfig()
    with pytest.raises(ParallaxError, match="training.imgaug"):
        from_imgaug("dlc-mv")


def test_real_mouse_cache(mouse_dir, tmp_path):
    """The real 4-camera recording (1280x1024): a few frames cache, labels follow the 3D."""
    data = tmp_path / "mouse"
    data.mkdir()
    views = ["back", "mid", "side", "top"]
    for name in ("labeled-data", "calibration.toml"):
        (data / name).symlink_to(mouse_dir / name)
    for view in views:  # the first 10 frames
        lines = (mouse_dir / f"CollectedData_{view}.csv").read_text().splitlines()
        (data / f"CollectedData_{view}.csv").write_text("\n".join(lines[:13]) + "\n")
    args = ["--data-dir", str(data), "--view-names", *views,
            "--csv-files", *[f"CollectedData_{v}.csv" for v in views]]
    config = {**CONFIG, "augmentation": {**CONFIG["augmentation"], "copies_per_frame": 1,
                                         "rotate_deg": 0.0},
              "data.image_resize_dims": {"height": 128, "width": 128}}
    code, paths = build(args, tmp_path / "out", config)
    assert code == 0
    cache = read(paths["train"])
    assert cache["images"].shape[1:] == (4, 128, 128, 3)
    assert (cache["copy"] == 1).sum() == 6 and (cache["copy"] == 0).sum() == 6
    assert cache["source_paths"][0, 2].decode().startswith("labeled-data/session0_side/")
    rows = cache["copy"] == 1
    assert np.median(cache["fit_residual_px"][rows]) < 1.0  # model px at 128 px
    assert (cache["images"][rows].mean(axis=(2, 3, 4)) > 20).all()  # real content, not fill
