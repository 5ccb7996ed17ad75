"""Train/val/test split: proportions, held-out sessions, determinism, the splits.csv reader."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.errors import ParallaxError
from pipeline.data.splits import make_splits, read_splits

SESSIONS = ["a"] * 30 + ["b"] * 40 + ["c"] * 30
KEYS = [f"labeled-data/{s}/img{i:03d}.png" for i, s in enumerate(SESSIONS)]


def split(**kwargs):
    options = {"train_prob": 0.8, "val_prob": 0.1, "seed": 0, **kwargs}
    return make_splits(KEYS, SESSIONS, **options)


def test_proportions_columns_and_order():
    table = split()
    assert list(table.columns) == ["image", "session", "set"]
    assert table["image"].tolist() == KEYS and table["session"].tolist() == SESSIONS
    assert table["set"].value_counts().to_dict() == {"train": 80, "val": 10, "test": 10}


def test_deterministic_and_seeded():
    assert split().equals(split())
    assert not split()["set"].equals(split(seed=1)["set"])


def test_held_out_sessions_are_all_test():
    table = split(test_sessions=["b"])
    sets = table["set"].to_numpy()
    assert (sets[table["session"] == "b"] == "test").all()
    others = sets[table["session"] != "b"]
    assert (others == "train").sum() == 48 and (others == "val").sum() == 6


def test_unknown_session_is_named():
    with pytest.raises(ParallaxError, match="'nope'"):
        split(test_sessions=["a", "nope"])


def test_degenerate_settings():
    assert (split(train_prob=1.0, val_prob=0.0)["set"] == "train").all()
    tiny = make_splits(KEYS[:3], SESSIONS[:3], train_prob=0.6, val_prob=0.05, seed=0)
    assert sorted(tiny["set"]) == ["train", "train", "val"]  # val_prob > 0 keeps one val frame
    with pytest.raises(ParallaxError, match="train_prob"):
        split(train_prob=0.7, val_prob=0.4)
    with pytest.raises(ParallaxError, match="every session"):
        split(test_sessions=["a", "b", "c"])


def test_reader_checks_the_frames(tmp_path):
    path = tmp_path / "splits.csv"
    split().to_csv(path, index=False)
    sets = read_splits(path, KEYS)
    assert isinstance(sets, np.ndarray) and sets.tolist() == split()["set"].tolist()
    with pytest.raises(ParallaxError, match="rerun cache_augmentations"):
        read_splits(path, KEYS[::-1])
    bad = split()
    bad.loc[3, "set"] = "holdout"
    bad.to_csv(path, index=False)
    with pytest.raises(ParallaxError, match="holdout"):
        read_splits(path, KEYS)
