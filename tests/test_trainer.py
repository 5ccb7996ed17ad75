"""Training loop: a tiny CPU run learns (its validation error falls to a few model pixels), the
model sees images masked at the scheduled ratio, kill + resume equals an unbroken run, a changed
configuration or cache starts from scratch, bad configs are refused."""

from __future__ import annotations

import json
import shutil

import cv2
import h5py
import pandas as pd
import pytest
import torch

from pipeline.core.errors import ParallaxError
from pipeline.models.masking import mask_ratio, patches_to_mask
from pipeline.stages import cache_augmentations, train, triangulate_labels
from pipeline.training.config import TrainConfig
from pipeline.training.trainer import Trainer
from tests.conftest import dataset_cli_args

CONFIG = {
    "data.image_resize_dims": {"height": 64, "width": 64},
    "augmentation": {"copies_per_frame": 1, "scale_range": [0.8, 1.2], "translate_frac": 0.25,
                     "rotate_deg": 0.0, "vertical_axis": [0.0, 0.0, 1.0]},
    "training.imgaug_3d": True, "training.train_prob": 0.6, "training.val_prob": 0.2,
    "training.rng_seed_data_pt": 0, "training.test_sessions": [],
}

TINY = {
    "model": {"model_type": "heatmap_multiview_transformer", "backbone": "vit_tiny_test"},
    "data": {"image_resize_dims": {"height": 64, "width": 64}, "downsample_factor": 2},
    "training": {"max_epochs": 2, "train_batch_size": 4, "val_batch_size": 8,
                 "learning_rate": 1e-3, "check_val_every_n_epoch": 1, "ckpt_every_n_steps": 3,
                 "rng_seed_model_pt": 0, "imgaug": "dlc",
                 "patch_mask": {"init_step": 1, "final_step": 4, "init_ratio": 0.0,
                                "final_ratio": 0.5}},
    "losses": {"supervised_pairwise_projections": {"log_weight": 5.0},
               "supervised_reprojection_heatmap_mse": {"log_weight": 0.5}},
}


@pytest.fixture(scope="module")
def small_cache(example_dir, tmp_path_factory):
    """The example cached at 64x64 through the stage CLIs."""
    out = tmp_path_factory.mktemp("small")
    data = dataset_cli_args(example_dir)
    assert triangulate_labels.main([*data, "--points", str(out / "l.csv"), "--outliers",
                                    str(out / "o.csv"), "--summary", str(out / "s.json")]) == 0
    paths = {key: out / name for key, name in (("splits", "splits.csv"), ("train", "train.h5"),
                                               ("eval", "eval.h5"), ("picture", "a.png"))}
    argv = [*data, "--labels-3d", str(out / "l.csv"), "--config-json", json.dumps(CONFIG)]
    for key, path in paths.items():
        argv += [f"--{key}", str(path)]
    assert cache_augmentations.main(argv) == 0
    return paths


def trainer(paths, out, config=TINY):
    torch.set_num_threads(1)
    return Trainer(TrainConfig.from_config(config), paths["train"], paths["eval"], out)


def test_tiny_run_writes_checkpoints_and_metrics(small_cache, tmp_path):
    run = trainer(small_cache, tmp_path)
    run.fit()
    assert {"best.pt", "last.pt", "metrics.csv"} <= {p.name for p in tmp_path.iterdir()}
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert len(metrics) == run.total_steps == 2 * run.steps_per_epoch
    for column in ("heatmap_mse", "pairwise_projection", "reprojection_heatmap_mse", "lr",
                   "mask_ratio", "step_time", "val_loss", "val_pixel_error_model"):
        assert column in metrics.columns, column
    # the mask ratio follows the step schedule: 0 before step 1, linear to 0.5 at step 4
    expected = [min(max(s - 1, 0) / 3, 1.0) * 0.5 for s in range(run.total_steps)]
    assert metrics["mask_ratio"].tolist() == pytest.approx(expected)
    assert metrics["loss"].notna().all()


def test_kill_and_resume_equals_unbroken_run(small_cache, tmp_path):
    unbroken = trainer(small_cache, tmp_path / "a")
    unbroken.fit()
    killed_after_step_3(small_cache, tmp_path / "b")
    resumed = trainer(small_cache, tmp_path / "b")
    resumed.resume()
    assert resumed.step == 3
    resumed.fit()
    for key, value in unbroken.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    a = pd.read_csv(tmp_path / "a" / "metrics.csv")
    b = pd.read_csv(tmp_path / "b" / "metrics.csv")
    assert a["loss"].tolist() == b["loss"].tolist()


def test_bad_configs(small_cache, tmp_path):
    bad_backbone = json.loads(json.dumps(TINY))
    bad_backbone["model"]["backbone"] = "resnet50"
    with pytest.raises(ParallaxError, match="model.backbone"):
        trainer(small_cache, tmp_path, bad_backbone)
    bad_size = json.loads(json.dumps(TINY))
    bad_size["data"]["image_resize_dims"] = {"height": 60, "width": 64}
    with pytest.raises(ParallaxError, match="image_resize_dims"):
        trainer(small_cache, tmp_path, bad_size)
    bad_precision = json.loads(json.dumps(TINY))
    bad_precision["training"]["precision"] = "fp16"
    with pytest.raises(ParallaxError, match="fp16"):  # refused before any step
        trainer(small_cache, tmp_path, bad_precision)


def test_train_stage_cli(small_cache, tmp_path):
    config = json.loads(json.dumps(TINY))
    config["training"].update(max_epochs=1, max_steps=2)
    out = tmp_path / "models" / "tiny"
    argv = ["--train-h5", str(small_cache["train"]), "--eval-h5", str(small_cache["eval"]),
            "--config-json", json.dumps(config), "--out-dir", str(out)]
    assert train.main(argv) == 0
    assert {"best.pt", "last.pt", "metrics.csv", "config.yaml"} <= {p.name for p in out.iterdir()}
    state = torch.load(out / "last.pt", weights_only=False)
    assert state["step"] == 2 and state["model_type"] == "heatmap_multiview_transformer"
    # a cache built with another configuration is refused, naming the file
    other = json.dumps({**CONFIG, "training.rng_seed_data_pt": 99})
    assert train.main([*argv, "--cache-config-json", other]) == 2


# ------------------------------------------------------------------------------- learning
def mean_pose_error(train_set, val_set) -> float:
    """Mean validation pixel error of a model that ignores the images and puts every keypoint
    at its mean training position in each view (what a model learns without looking)."""
    def stack(dataset):
        items = [dataset[i] for i in range(len(dataset))]
        return (torch.stack([item["keypoints_2d"] for item in items]),
                torch.stack([item["keypoints_valid"] for item in items]))

    points, valid = stack(train_set)
    mean = torch.where(valid[..., None], points, 0).sum(0) / valid.sum(0)[..., None]
    points, valid = stack(val_set)
    return float(torch.linalg.vector_norm(points - mean, dim=-1)[valid].mean())


def test_a_tiny_run_learns(small_cache, tmp_path):
    """600 seeded steps of the multi-view transformer (heatmap loss only, 64 px, one CPU
    thread: about 10 s) take the validation error from ~7 model px (an untrained model puts
    every keypoint near the centre) to ~1.7 px, far below the ~4.8 px of a model that ignores
    the images and predicts each keypoint's mean position."""
    config = json.loads(json.dumps(TINY))
    config["training"].update(max_epochs=100, learning_rate=2e-3, imgaug="none",
                              check_val_every_n_epoch=10, ckpt_every_n_steps=10**6,
                              patch_mask={"final_ratio": 0.0})
    config["losses"] = {}
    run = trainer(small_cache, tmp_path, config)
    untrained = run.validate()["val_pixel_error_model"]
    run.fit()
    assert run.total_steps == 600
    val = pd.read_csv(tmp_path / "metrics.csv")["val_pixel_error_model"].dropna()
    assert len(val) == 10
    first, last = float(val.iloc[0]), float(val.iloc[-1])
    blind = mean_pose_error(run.train_set, run.val_set)
    print(f"val pixel error (model px): untrained {untrained:.2f}, step 60 {first:.2f}, "
          f"step 600 {last:.2f}; mean-pose baseline {blind:.2f}")
    assert untrained > 5.0  # the test data is not trivially solved at step 0
    assert last < 2.5, val.tolist()
    assert last < 0.35 * untrained and last < 0.5 * first, val.tolist()
    assert last < 0.6 * blind, (last, blind)


# ------------------------------------------------------------------------------- masking
def test_the_model_sees_images_masked_at_the_scheduled_ratio(small_cache, tmp_path):
    """The pixels entering the backbone's patch embedding during training: per sample and
    view, the number of all-zero patches (masked; a normalised uint8 image has no exact 0) is
    floor(mask_ratio(step) * patches), every training step: none before init_epoch, then the
    ramp; validation images are never masked; samples and views get their own masks."""
    config = json.loads(json.dumps(TINY))
    schedule = {"init_epoch": 1, "final_epoch": 2, "init_ratio": 0.25, "final_ratio": 0.5}
    config["training"].update(max_epochs=3, patch_mask=schedule)
    run = trainer(small_cache, tmp_path, config)
    net, p = run.net, run.net.patch_size
    seen = []  # (step, training, masked patches (B, V, gh*gw))

    def record(module, args):
        pixels = args[0].detach()  # (B*V, 3, H, W), after apply_patch_mask
        n, c, h, w = pixels.shape
        blocks = pixels.reshape(n, c, h // p, p, w // p, p)
        blank = (blocks == 0).all(dim=5).all(dim=3).all(dim=1)  # (B*V, gh, gw)
        seen.append((run.step, net.training, blank.reshape(-1, net.num_views, blank[0].numel())))

    net.backbone.patch_embed.register_forward_pre_hook(record)
    run.fit()
    spe = run.steps_per_epoch
    assert spe == 6 and run.total_steps == 18
    training = [(step, blank) for step, is_training, blank in seen if is_training]
    assert [step for step, _ in training] == list(range(18))  # one forward per step
    grid = (64 // p, 64 // p)
    counts = {}
    for step, blank in training:
        expected = patches_to_mask(mask_ratio(step, spe, run.cfg.patch_mask), *grid)
        assert (blank.sum(-1) == expected).all(), (step, expected, blank.sum(-1))
        counts[step] = expected
        if expected:  # independent masks per sample and view
            patterns = {tuple(m.tolist()) for m in blank.flatten(0, 1)}
            assert len(patterns) > 1, step
    # the schedule itself, by hand: 16 patches per view, 0 before step 6 (init_epoch 1), 0.25
    # at step 6, linear to 0.5 at step 12 (final_epoch 2), then constant
    assert [counts[s] for s in range(18)] == [0] * 6 + [4, 4, 5, 6, 6, 7] + [8] * 6
    evaluation = [blank for _, is_training, blank in seen if not is_training]
    assert evaluation and not any(blank.any() for blank in evaluation)
    # the logged ratio is what the model saw (up to the floor to whole patches)
    logged = pd.read_csv(tmp_path / "metrics.csv")["mask_ratio"].to_numpy()
    seen_ratio = [counts[s] / (grid[0] * grid[1]) for s in range(18)]
    assert logged == pytest.approx(seen_ratio, abs=1 / (grid[0] * grid[1]))


# ------------------------------------------------------------------------------- resume
def killed_after_step_3(paths, out, config=TINY) -> None:
    """A run killed during step 5, after its step-3 checkpoint (ckpt_every_n_steps 3)."""
    run = trainer(paths, out, config)
    original = run._train_step

    def dying_step(*args, **kwargs):
        if run.step == 4:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    run._train_step = dying_step
    with pytest.raises(KeyboardInterrupt):
        run.fit()
    assert torch.load(out / "last.pt", weights_only=False)["step"] == 3


def rerun_with_resume(paths, out, config, capsys) -> str:
    """The train stage as the rule runs it (always --resume); returns its log."""
    capsys.readouterr()
    argv = ["--train-h5", str(paths["train"]), "--eval-h5", str(paths["eval"]),
            "--config-json", json.dumps(config), "--out-dir", str(out), "--resume"]
    assert train.main(argv) == 0
    return capsys.readouterr().err


def assert_fresh_run(paths, out, config, log, tmp_path) -> None:
    """`out` holds a run from step 0 (the log says so): metrics equal to those of a run in
    an empty folder, one row per step."""
    assert "starting from scratch, not resuming" in log, log
    assert "another training configuration or cache" in log, log
    assert "fresh start: removed" in log and "resumed from" not in log, log
    fresh = trainer(paths, tmp_path / "fresh", config)
    fresh.fit()
    a = pd.read_csv(out / "metrics.csv")
    b = pd.read_csv(tmp_path / "fresh" / "metrics.csv")
    assert a["step"].tolist() == list(range(1, fresh.total_steps + 1))
    for column in ("loss", "lr", "val_loss"):
        assert a[column].tolist() == pytest.approx(b[column].tolist(), nan_ok=True), column


def test_resume_only_with_the_same_training_config(small_cache, tmp_path, capsys):
    """The rule always passes --resume: an unchanged config (or a changed runtime value such as
    val_batch_size) continues at step 3; a changed learning rate starts from step 0."""
    same = tmp_path / "same"
    killed_after_step_3(small_cache, same)
    runtime = json.loads(json.dumps(TINY))
    runtime["training"]["val_batch_size"] = 3  # not in the resume hash
    log = rerun_with_resume(small_cache, same, runtime, capsys)
    assert "resumed from" in log and "at step 3" in log, log
    assert "starting from scratch" not in log, log

    changed = tmp_path / "changed"
    killed_after_step_3(small_cache, changed)
    faster = json.loads(json.dumps(TINY))
    faster["training"]["learning_rate"] = 3e-3
    log = rerun_with_resume(small_cache, changed, faster, capsys)
    assert_fresh_run(small_cache, changed, faster, log, tmp_path)
    lr = pd.read_csv(changed / "metrics.csv")["lr"]
    assert lr.iloc[0] > 2e-3  # the new learning rate from the first row on


def rebuild_cache(data_dir, labels_3d, out, config) -> dict:
    """cache_augmentations into `out` (overwriting what is there)."""
    paths = {key: out / name for key, name in (("splits", "splits.csv"), ("train", "train.h5"),
                                               ("eval", "eval.h5"), ("picture", "a.png"))}
    argv = [*dataset_cli_args(data_dir), "--labels-3d", str(labels_3d), "--config-json",
            json.dumps(config)]
    for key, path in paths.items():
        argv += [f"--{key}", str(path)]
    assert cache_augmentations.main(argv) == 0
    return paths


def cache_hashes(path) -> tuple[str, str]:
    with h5py.File(path, "r") as h5:
        return str(h5.attrs["config_hash"]), str(h5.attrs["input_hash"])


@pytest.mark.parametrize("change", ["none", "config", "input"])
def test_resume_only_with_the_same_cache(small_cache, example_dir, tmp_path, capsys, change):
    """A run interrupted at step 3, then its cache rebuilt in place: from a copy of the same
    inputs (same hashes: resumes), with another augmentation config (another config_hash) or
    with one image changed by one grey level (another input_hash): these start from step 0."""
    labels_3d = small_cache["train"].parent / "l.csv"
    data = tmp_path / "data"
    shutil.copytree(example_dir, data)
    cache = rebuild_cache(data, labels_3d, tmp_path / "cache", CONFIG)
    before = cache_hashes(cache["train"])
    assert before == cache_hashes(small_cache["train"])  # paths do not enter the hashes
    out = tmp_path / "model"
    killed_after_step_3(cache, out)

    config = CONFIG
    if change == "config":
        config = {**CONFIG, "augmentation": {**CONFIG["augmentation"], "translate_frac": 0.2}}
    elif change == "input":
        image = sorted((data / "labeled-data").rglob("*.png"))[0]
        pixels = cv2.imread(str(image))
        pixels[0, 0, 0] ^= 1
        assert cv2.imwrite(str(image), pixels)
    rebuild_cache(data, labels_3d, tmp_path / "cache", config)
    after = cache_hashes(cache["train"])
    log = rerun_with_resume(cache, out, TINY, capsys)
    if change == "none":
        assert after == before
        assert "resumed from" in log and "at step 3" in log, log
        return
    # exactly the hash the scenario is about changed
    assert [a != b for a, b in zip(after, before, strict=True)] == [change == "config",
                                                                   change == "input"]
    assert_fresh_run(cache, out, TINY, log, tmp_path)
