"""Training loop: a tiny CPU run learns, the mask ratio follows its schedule, kill + resume
equals an unbroken run, bad configs are refused."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from pipeline.core.errors import ParallaxError
from pipeline.stages import cache_augmentations, triangulate_labels
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
    broken = trainer(small_cache, tmp_path / "b")
    original = broken.optimizer.step

    def dying_step(*args, **kwargs):
        if broken.step == 4:  # killed after the step-3 checkpoint
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    broken.optimizer.step = dying_step
    with pytest.raises(KeyboardInterrupt):
        broken.fit()
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
    from pipeline.stages import train

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
