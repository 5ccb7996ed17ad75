"""Shared test fixtures and the Hypothesis profiles.

Hypothesis (tests/test_properties.py) runs the `ci` profile unless the environment variable
HYPOTHESIS_PROFILE names another: `ci` is derandomized (the same examples on every run and
machine, derived from each test's source; no example database), so a CI failure reproduces with
a plain rerun; `explore` (alias `dev`) draws new random examples on each run, ten times as many,
and keeps failures in the local example database:

    HYPOTHESIS_PROFILE=explore .venv/bin/python -m pytest tests/test_properties.py
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
MOUSE = SHARED_DATA / "mouse-4cam"

#: every profile: no per-example deadline (a loaded 2-core machine), tmp_path in @given tests
_COMMON = {"deadline": None, "suppress_health_check": [HealthCheck.function_scoped_fixture]}
settings.register_profile("ci", max_examples=60, derandomize=True, database=None,
                          print_blob=True, **_COMMON)
settings.register_profile("explore", max_examples=600, derandomize=False, **_COMMON)
settings.register_profile("dev", settings.get_profile("explore"))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def mouse_dir() -> Path:
    """The real 4-camera mouse recording; tests using it skip when ../shared is absent."""
    if not (MOUSE / "calibration.toml").is_file():
        pytest.skip("../shared/data/mouse-4cam not available")
    return MOUSE


@pytest.fixture(scope="session")
def example_dir(tmp_path_factory) -> Path:
    """A small noise-free synthetic dataset (read-only: copy it before mutating)."""
    from pipeline.synthetic.generate import generate_example

    out = tmp_path_factory.mktemp("example") / "data"
    generate_example(out, seed=3, n_sessions=2, frames_per_session=10, n_views=3,
                     image_size=(160, 128), label_noise_px=0.0)
    return out


def dataset_cli_args(data_dir: Path) -> list[str]:
    """The dataset arguments of a stage CLI for a generated example in `data_dir`."""
    import numpy as np

    views = [str(v) for v in np.load(data_dir / "ground_truth.npz")["view_names"]]
    return [
        "--data-dir", str(data_dir),
        "--view-names", *views,
        "--csv-files", *[f"CollectedData_{view}.csv" for view in views],
    ]


def write_members(checkpoint: Path, model_dir: Path, perturb) -> list[Path]:
    """Two ensemble 'members' of one trained checkpoint, as the train rule lays them out
    (`<model_dir>/members/seed<s>/best.pt`): seed 0 the checkpoint itself, seed 1 its weights
    passed through `perturb(name, tensor)` (floating-point tensors only)."""
    import torch

    paths = []
    for seed in (0, 1):
        folder = model_dir / "members" / f"seed{seed}"
        folder.mkdir(parents=True)
        state = torch.load(checkpoint, weights_only=False)
        if seed:
            state["model"] = {k: perturb(k, v) if v.is_floating_point() else v
                              for k, v in state["model"].items()}
        torch.save(state, folder / "best.pt")
        paths.append(folder / "best.pt")
    return paths
