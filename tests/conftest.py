"""Shared test fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
MOUSE = SHARED_DATA / "mouse-4cam"


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
