"""Inference core: coordinate chain frame -> model -> frame, view blanking, checkpoint loading,
confidence-weighted triangulation, prediction CSV round trips."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from pipeline.core.errors import ParallaxError
from pipeline.geometry.cameras import Camera, CameraGroup
from pipeline.inference.consensus import ConsensusSettings, consensus
from pipeline.inference.predictor import (
    LoadedModel,
    load_model,
    predict,
    prepare_views,
)
from pipeline.io.predictions_csv import (
    read_pixel_error,
    read_pose_3d,
    read_predictions_2d,
    write_pixel_error,
    write_pose_3d,
    write_predictions_2d,
)
from tests.test_predict_labeled import trained  # noqa: F401  (session fixture, built once)

SIZE = (64, 96)  # model input (H, W)


class PeakModel(nn.Module):
    """Heatmaps (B, V, K, H/s, W/s) with all mass on given cells; records its input."""

    def __init__(self, cells: np.ndarray, stride: int = 4) -> None:
        super().__init__()
        self.cells, self.stride, self.inputs = cells, stride, []  # cells (V, K, 2) row, col

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        self.inputs.append(images.clone())
        b, v = images.shape[:2]
        h, w = images.shape[-2] // self.stride, images.shape[-1] // self.stride
        k = self.cells.shape[1]
        maps = torch.zeros(b, v, k, h, w)
        for view in range(v):
            for kp in range(k):
                row, col = self.cells[view, kp]
                maps[:, view, kp, row, col] = 1.0
        return {"heatmaps": maps}


class BrightnessModel(nn.Module):
    """A 'dot detector': one heatmap = the stride-pooled image brightness above the background,
    normalised to sum 1 (its local soft-argmax is the dot's brightness centroid)."""

    stride = 2

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        b, v = images.shape[:2]
        pooled = nn.functional.avg_pool2d(images.flatten(0, 1).mean(1, keepdim=True), 2)
        pooled = pooled - pooled.amin(dim=(-2, -1), keepdim=True)
        maps = pooled / pooled.sum(dim=(-2, -1), keepdim=True)
        return {"heatmaps": maps.view(b, v, 1, *maps.shape[-2:])}


def loaded_with(model: nn.Module, views: int, keypoints: int) -> LoadedModel:
    return LoadedModel(model=model, device=torch.device("cpu"),
                       view_names=[f"v{i}" for i in range(views)],
                       keypoint_names=[f"k{i}" for i in range(keypoints)], image_size=SIZE,
                       model_type="test", name="test")


def frames_of(shapes: list[tuple[int, int]], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in shapes]


@pytest.mark.parametrize("with_boxes", [False, True])
def test_predicted_peak_maps_to_frame_pixels(with_boxes):
    shapes = [(480, 640), (300, 200), (1024, 1280)]
    boxes = np.array([[10, 20, 200, 300], [0, 0, 300, 200], [500, 100, 512, 768]], float)
    images, frame_from_model = prepare_views(frames_of(shapes), boxes if with_boxes else None,
                                             SIZE)
    assert images.shape == (3, *SIZE, 3) and images.dtype == np.uint8
    cells = np.array([[[3, 5], [0, 0]], [[15, 23], [7, 11]], [[8, 1], [2, 20]]])  # row, col
    model = PeakModel(cells)
    xy, conf = predict(loaded_with(model, 3, 2), images[None], frame_from_model)
    # independently: cell centre in model px, then the pixel-edge resize of the box by hand
    s = model.stride
    model_xy = cells[..., ::-1] * s + (s - 1) / 2
    box = boxes if with_boxes else np.array([[0, 0, h, w] for h, w in shapes], float)
    x0, y0, bh, bw = (box[:, i, None] for i in range(4))
    expected = np.stack([(model_xy[..., 0] + 0.5) * bw / SIZE[1] - 0.5 + x0,
                         (model_xy[..., 1] + 0.5) * bh / SIZE[0] - 0.5 + y0], -1)
    np.testing.assert_allclose(xy[0], expected, atol=1e-9)
    np.testing.assert_allclose(conf, 1.0)


def test_dot_in_frame_is_found_at_its_frame_position():
    shapes = [(480, 640), (1024, 1280)]
    dots = np.array([[412.0, 133.0], [250.0, 700.0]])  # x, y frame px
    frames = [np.zeros((h, w, 3), np.uint8) for h, w in shapes]
    for frame, (x, y) in zip(frames, dots, strict=True):
        cv2.circle(frame, (int(x), int(y)), 12, (255, 255, 255), -1)
    images, frame_from_model = prepare_views(frames, None, SIZE)
    xy, _ = predict(loaded_with(BrightnessModel(), 2, 1), images[None], frame_from_model)
    scale = np.array([w / SIZE[1] for _, w in shapes])  # frame px per model px
    error = np.linalg.norm(xy[0, :, 0] - dots, axis=-1)
    assert (error < 0.25 * scale).all(), (xy[0, :, 0], dots)


def test_blank_views_set_the_normalised_input_to_zero():
    images = np.random.default_rng(1).integers(0, 255, (2, 3, *SIZE, 3), dtype=np.uint8)
    model = PeakModel(np.zeros((3, 1, 2), int))
    loaded = loaded_with(model, 3, 1)
    predict(loaded, images, np.tile(np.eye(2, 3), (3, 1, 1)), blank_views=[1])
    seen = model.inputs[-1]
    assert (seen[:, 1] == 0).all() and (seen[:, [0, 2]] != 0).any(dim=(2, 3, 4)).all()
    mask = np.array([[True, False, False], [False, False, True]])
    predict(loaded, images, np.tile(np.eye(2, 3), (3, 1, 1)), blank_mask=mask, batch_size=1)
    seen = torch.cat(model.inputs[-2:])
    zero = (seen == 0).flatten(2).all(-1).numpy()
    np.testing.assert_array_equal(zero, mask)
    # the normalisation is the training one: ImageNet mean/std of RGB in 0..1
    bgr = images[1, 0, 5, 7].astype(float)
    expected = (bgr[::-1] / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    np.testing.assert_allclose(seen[1, 0, :, 5, 7].numpy(), expected, rtol=1e-5)


def test_trained_checkpoint_loads_and_predicts(trained):  # noqa: F811
    loaded = load_model(trained["mvt"], "cpu")
    assert not loaded.model.training and loaded.name == "mvt"
    assert loaded.model_type == "heatmap_multiview_transformer" and loaded.image_size == (64, 64)
    v = len(loaded.view_names)
    images = np.random.default_rng(0).integers(0, 255, (2, v, 64, 64, 3), dtype=np.uint8)
    to_frame = np.tile(np.eye(2, 3), (v, 1, 1))
    xy, conf = predict(loaded, images, to_frame)
    assert xy.shape == (2, v, len(loaded.keypoint_names), 2) and np.isfinite(xy).all()
    assert ((conf > 0) & (conf <= 1)).all()
    # MVT: blanking view 0 changes the other views' predictions (cross-view attention) ...
    blanked, _ = predict(loaded, images, to_frame, blank_views=[0])
    assert not np.allclose(blanked[:, 1:], xy[:, 1:])
    # ... the single-view baseline: the other views are untouched
    single = load_model(trained["single"], "cpu")
    assert single.model_type == "heatmap"
    xy1, _ = predict(single, images, to_frame)
    blanked1, _ = predict(single, images, to_frame, blank_views=[0])
    np.testing.assert_allclose(blanked1[:, 1:], xy1[:, 1:], atol=1e-4)
    assert not np.allclose(blanked1[:, 0], xy1[:, 0])


def test_load_model_errors(trained, tmp_path):  # noqa: F811
    with pytest.raises(ParallaxError, match="not found"):
        load_model(tmp_path / "missing.pt")
    loaded = load_model(trained["mvt"], "cpu")
    with pytest.raises(ParallaxError, match="view names"):
        load_model(trained["mvt"], "cpu", view_names=loaded.view_names[::-1])
    with pytest.raises(ParallaxError, match="keypoint names"):
        load_model(trained["mvt"], "cpu", keypoint_names=loaded.keypoint_names[:-1])
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(trained["mvt"].read_bytes()[:1000])
    with pytest.raises(ParallaxError, match="corrupt.pt"):
        load_model(corrupt)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ParallaxError, match="missing"):
        load_model(foreign)


def make_group(n_views: int = 4) -> CameraGroup:
    cams = []
    for i in range(n_views):
        angle = 2 * np.pi * i / n_views
        rvec = np.array([0.0, -angle, 0.0])
        centre = np.array([np.sin(angle), 0.2, -np.cos(angle)]) * 500
        from pipeline.geometry.cameras import rodrigues

        tvec = -rodrigues(rvec) @ centre
        cams.append(Camera(name=f"c{i}", size=(640, 480),
                           matrix=[[800, 0, 320], [0, 800, 240], [0, 0, 1]],
                           dist=[0.01, -0.02, 0, 0, 0], rvec=rvec, tvec=tvec))
    return CameraGroup(cameras=tuple(cams))


def test_consensus_recovers_points_and_rejects_a_wrong_view():
    group = make_group()
    rng = np.random.default_rng(0)
    truth = rng.uniform(-40, 40, (5, 3, 3))  # (N, K, 3)
    points = group.project(truth)  # (V, N, K, 2)
    conf = rng.uniform(0.6, 1.0, points.shape[:-1])
    agreed = consensus(points, conf, group, 1.0, ConsensusSettings(0.5, 6.0))
    np.testing.assert_allclose(agreed.points_3d, truth, atol=1e-6)
    assert (agreed.n_views == 4).all() and np.nanmax(agreed.reproj_error) < 1e-6
    assert not agreed.replaced.any()
    np.testing.assert_allclose(agreed.score, conf.mean(axis=0))
    # view 2 is 60 px off at full confidence: a plain weighted DLT moves, the consensus
    # rejects the view, keeps the 3D exact and replaces view 2 by the true projection
    wrong = points.copy()
    wrong[2] += 60.0
    plain = group.triangulate(wrong, weights=np.ones_like(conf)).points_3d
    assert np.abs(plain - truth).max() > 1.0
    agreed = consensus(wrong, np.ones_like(conf), group, 1.0, ConsensusSettings(0.5, 6.0))
    np.testing.assert_allclose(agreed.points_3d, truth, atol=1e-6)
    assert (agreed.n_views == 3).all() and np.isnan(agreed.reproj_error[2]).all()
    assert agreed.replaced[2].all() and not agreed.replaced[[0, 1, 3]].any()
    np.testing.assert_allclose(agreed.final, points, atol=1e-6)
    np.testing.assert_allclose(agreed.final[[0, 1, 3]], wrong[[0, 1, 3]])
    # the threshold is in model pixels: with 20 frame px per model px, 60 px is 3 model px,
    # an inlier, kept as predicted
    loose = consensus(wrong, np.ones_like(conf), group, 20.0, ConsensusSettings(0.5, 6.0))
    assert not loose.replaced.any() and (loose.n_views == 4).all()


def test_consensus_fills_unsure_and_missing_views_and_keeps_lonely_ones():
    group = make_group()
    truth = np.random.default_rng(1).uniform(-40, 40, (4, 2, 3))
    points = group.project(truth)
    conf = np.full(points.shape[:-1], 0.9)
    points[1, 0] += 3.0  # a small error at low confidence: replaced anyway
    conf[1, 0] = 0.2
    points[3, 1] = np.nan  # no prediction at all: filled by the reprojection
    conf[3, 1] = np.nan
    agreed = consensus(points, conf, group, 1.0, ConsensusSettings(0.5, 6.0))
    assert agreed.replaced[1, 0].all() and agreed.replaced[3, 1].all()
    np.testing.assert_allclose(agreed.final, group.project(truth), atol=1e-6)
    assert (agreed.n_views[0] == 3).all() and (agreed.n_views[1] == 3).all()
    # a keypoint seen by one view only: no 3D, the view keeps its prediction
    alone = points.copy()
    alone[1:, 2:] = np.nan
    conf2 = np.where(np.isfinite(alone).all(-1), 0.9, np.nan)
    lonely = consensus(alone, conf2, group, 1.0)
    assert np.isnan(lonely.points_3d[2:]).all() and (lonely.n_views[2:] == 0).all()
    np.testing.assert_array_equal(lonely.final[0, 2:], alone[0, 2:])
    assert not lonely.replaced[:, 2:].any()


def test_consensus_needs_min_views_that_agree():
    """Two views agree, two others are wrong in different directions: with min_views 3 there
    is no consensus, and no view is replaced by a point the wrong views pulled."""
    group = make_group()
    truth = np.random.default_rng(3).uniform(-40, 40, (3, 2, 3))
    points = group.project(truth)
    points[2] += 50.0
    points[3] -= 50.0
    conf = np.ones(points.shape[:-1])
    strict = consensus(points, conf, group, 1.0, ConsensusSettings(0.5, 6.0, min_views=3))
    assert np.isnan(strict.points_3d).all() and not strict.replaced.any()
    np.testing.assert_array_equal(strict.final, points)
    loose = consensus(points, conf, group, 1.0, ConsensusSettings(0.5, 6.0, min_views=2))
    np.testing.assert_allclose(loose.points_3d, truth, atol=1e-6)
    with pytest.raises(ParallaxError, match="prediction.consensus"):
        ConsensusSettings(min_confidence=1.5)


def test_prediction_csvs_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    index = [f"labeled-data/s0_top/img{i:04d}.png" for i in range(4)]
    kps = ["nose", "tail_base", "paw"]
    points = rng.uniform(0, 1000, (4, 3, 2))
    points[1, 2] = np.nan
    conf = rng.uniform(0, 1, (4, 3))
    sets = ["train", "val", "test", "train"]
    write_predictions_2d(tmp_path / "p.csv", index, kps, points, conf, "mvt", sets)
    got = read_predictions_2d(tmp_path / "p.csv")
    assert got[0] == index and got[1] == kps and list(got[4]) == sets
    np.testing.assert_array_equal(got[2], points)
    np.testing.assert_array_equal(got[3], conf)
    lp = pd.read_csv(tmp_path / "p.csv", header=[0, 1, 2], index_col=0)
    assert lp.columns[:3].tolist() == [("mvt", "nose", "x"), ("mvt", "nose", "y"),
                                       ("mvt", "nose", "likelihood")]
    write_predictions_2d(tmp_path / "v.csv", range(4), kps, points, conf, "mvt")
    assert read_predictions_2d(tmp_path / "v.csv")[4] is None

    errors = rng.uniform(0, 5, (4, 3))
    errors[0, 1] = np.nan
    write_pixel_error(tmp_path / "e.csv", index, kps, errors, sets)
    e_index, e_kps, e_errors, e_sets = read_pixel_error(tmp_path / "e.csv")
    assert e_index == index and e_kps == kps and list(e_sets) == sets
    np.testing.assert_array_equal(e_errors, errors)

    p3 = rng.normal(size=(4, 3, 3))
    p3[2, 0] = np.nan
    err3, ncams, score = rng.uniform(0, 3, (4, 3)), rng.integers(0, 4, (4, 3)), conf
    write_pose_3d(tmp_path / "3d.csv", kps, p3, err3, ncams, score,
                  {"frame": index, "set": sets})
    names, r3, rerr, rn, rscore, rest = read_pose_3d(tmp_path / "3d.csv")
    assert names == kps
    np.testing.assert_array_equal(r3, p3)
    np.testing.assert_array_equal(rerr, err3)
    np.testing.assert_array_equal(rn, ncams)
    np.testing.assert_array_equal(rscore, score)
    assert list(rest.columns) == [*(f"M_{r}{c}" for r in range(3) for c in range(3)),
                                  "center_0", "center_1", "center_2", "fnum", "frame", "set"]
    assert list(rest["frame"]) == index and list(rest["fnum"]) == [0, 1, 2, 3]
    np.testing.assert_array_equal(rest[[f"M_{r}{c}" for r in range(3) for c in range(3)]]
                                  .to_numpy()[0], np.eye(3).ravel())
