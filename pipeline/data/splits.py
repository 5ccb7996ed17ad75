"""Train / validation / test split of the labelled frames (written once, used by every stage).

Frames of `training.test_sessions` (whole sessions held out) are all test; naming a session the
dataset does not have is an error. The other n frames are permuted by a NumPy generator seeded
with `training.rng_seed_data_pt`: the first max(1, round(train_prob·n)) are train, the next
round(val_prob·n) validation (at least 1 when val_prob > 0 and frames remain), the rest test
(LP's `train_prob` / `val_prob`). Deterministic: the same frames, sessions and settings always
give the same table.

`splits.csv`: one row per labelled frame in label-CSV order, columns `image` (the frame key
`labeled-data/<session>/<file>`, as in labels_3d.csv), `session`, `set` (train | val | test).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from pipeline.core.errors import ParallaxError
from pipeline.data.tables import read_frame_table

SETS = ("train", "val", "test")


def make_splits(
    keys: Sequence[str],
    sessions: Sequence[str],
    *,
    train_prob: float,
    val_prob: float,
    seed: int,
    test_sessions: Sequence[str] = (),
) -> pd.DataFrame:
    """A table (image, session, set) in frame order."""
    if len(keys) != len(sessions):
        raise ValueError(f"{len(keys)} frame keys but {len(sessions)} sessions")
    if not (0 < train_prob <= 1 and 0 <= val_prob and train_prob + val_prob <= 1):
        raise ParallaxError(
            f"training.train_prob ({train_prob}) and training.val_prob ({val_prob}) must be "
            "in [0, 1], train_prob > 0 and their sum <= 1"
        )
    sessions = np.asarray(sessions, dtype=object)
    unknown = sorted(set(test_sessions) - set(sessions))
    if unknown:
        raise ParallaxError(
            f"training.test_sessions names unknown session(s) {unknown}; the sessions are "
            f"{sorted(set(sessions))}"
        )
    labels = np.full(len(keys), "test", dtype=object)
    pool = np.flatnonzero(~np.isin(sessions, list(test_sessions)))
    if pool.size == 0:
        raise ParallaxError("training.test_sessions holds out every session: nothing to train on")
    order = pool[np.random.default_rng(seed).permutation(pool.size)]
    n_train = max(1, int(round(train_prob * pool.size)))
    n_val = min(int(round(val_prob * pool.size)), pool.size - n_train)
    if val_prob > 0 and n_val == 0 and pool.size > n_train:
        n_val = 1
    labels[order[:n_train]] = "train"
    labels[order[n_train:n_train + n_val]] = "val"
    return pd.DataFrame({"image": list(keys), "session": list(sessions), "set": labels})


def read_splits(path, keys: Sequence[str]) -> np.ndarray:
    """The `set` column of a splits CSV, checked against the dataset's frame keys."""
    table = read_frame_table(path, keys, "cache_augmentations")
    if "set" not in table.columns:
        raise ParallaxError(f"{path}: no 'set' column; rerun cache_augmentations")
    bad = set(table["set"].astype(str)) - set(SETS)
    if bad:
        raise ParallaxError(f"{path}: unknown set name(s) {sorted(bad)}")
    return table["set"].to_numpy(dtype=object)
