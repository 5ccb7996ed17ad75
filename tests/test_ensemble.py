"""Ensembles (training.ensemble_seeds): one training job per member, every member's predictions
written, the ensemble's mean and variance in the raw files, and the workflow's wiring."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.errors import ParallaxError
from pipeline.inference.ensemble import combine, load_ensemble, model_name
from pipeline.io.predictions_csv import read_predictions_table
from pipeline.stages import predict_labeled
from tests.conftest import write_members
from tests.test_predict_labeled import stage_argv, trained  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[1]


def member_checkpoints(trained, tmp_path) -> list[Path]:  # noqa: F811
    """Two 'members' of one variant: the tiny MVT twice, the second with perturbed weights."""
    import torch

    generator = torch.Generator().manual_seed(1)
    return write_members(trained["mvt"], tmp_path / "models" / "mvt",
                         lambda _, v: v + 0.05 * torch.randn(v.shape, generator=generator))


def test_combine_mean_and_variance():
    points = np.array([[[1.0, 2.0]], [[3.0, 6.0]]])  # (M=2, 1, 2)
    conf = np.array([[0.5], [0.9]])
    mean, confidence, variance = combine(points, conf)
    np.testing.assert_allclose(mean, [[2.0, 4.0]])
    np.testing.assert_allclose(confidence, [0.7])
    np.testing.assert_allclose(variance, [[1.0, 4.0]])
    one = combine(points[:1], conf[:1])
    assert one[2] is None and np.array_equal(one[0], points[0])


def test_labeled_predictions_of_an_ensemble(example_dir, trained, tmp_path):  # noqa: F811
    checkpoints = member_checkpoints(trained, tmp_path)
    assert model_name(checkpoints[0]) == "mvt"
    out = tmp_path / "predictions"
    argv = stage_argv(example_dir, trained, checkpoints[0], out)
    at = argv.index("--checkpoint")
    argv[at + 1:at + 2] = [str(c) for c in checkpoints]
    assert predict_labeled.main([*argv, "--members-dir", str(out / "members")]) == 0
    views = [str(v) for v in np.load(example_dir / "ground_truth.npz")["view_names"]]
    for view in views:
        tables = [read_predictions_table(out / "members" / f"seed{s}" /
                                         f"predictions_{view}.csv") for s in (0, 1)]
        raw = read_predictions_table(out / f"predictions_{view}_raw.csv")
        stacked = np.stack([t.points for t in tables])
        np.testing.assert_allclose(raw.points, stacked.mean(0), atol=1e-9)
        np.testing.assert_allclose(raw.variance, stacked.var(0), atol=1e-9)
        np.testing.assert_allclose(raw.likelihood, np.mean([t.likelihood for t in tables], 0),
                                   atol=1e-9)
        assert (raw.variance > 0).mean() > 0.9  # the members disagree a little
        assert raw.index[0].startswith("labeled-data/")
    # one member: no variance, no member files
    single = tmp_path / "single"
    assert predict_labeled.main([*stage_argv(example_dir, trained, checkpoints[0], single),
                                 "--members-dir", str(single / "members")]) == 0
    assert read_predictions_table(single / f"predictions_{views[0]}_raw.csv").variance is None
    assert not any((single / "members").iterdir())


def test_members_must_agree(trained, tmp_path):  # noqa: F811
    import torch

    other = tmp_path / "other" / "best.pt"
    other.parent.mkdir()
    state = torch.load(trained["mvt"], weights_only=False)
    state["keypoint_names"] = [f"k{i}" for i in range(len(state["keypoint_names"]))]
    torch.save(state, other)
    with pytest.raises(ParallaxError, match="other views, keypoints or input size"):
        load_ensemble([trained["mvt"], other], "cpu")


def test_workflow_trains_one_job_per_seed(tmp_path):
    """A dry run: one train job per seed with the seed as rng_seed_model_pt, and every
    member's checkpoint given to the prediction stages."""
    (tmp_path / "ens.yaml").write_text(
        "models:\n  singleview: false\n  mvt_pm: false\n  mvt_pm_3d: false\n"
        "  mvt:\n    training: {ensemble_seeds: [3, 5]}\n")
    shutil.copy(REPO / "config.yaml", tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory",
         str(tmp_path), "-n", "-p", "--cores", "2", "--configfile", str(tmp_path / "config.yaml"),
         str(tmp_path / "ens.yaml")], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    for seed in (3, 5):
        assert f"results/models/mvt/members/seed{seed}/best.pt" in out
        assert f'"rng_seed_model_pt": {seed}' in out
    predict = [line for line in out.splitlines()
               if "pipeline.stages.predict_labeled" in line][0]
    assert "members/seed3/best.pt" in predict and "members/seed5/best.pt" in predict
