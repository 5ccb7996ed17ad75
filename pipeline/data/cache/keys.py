"""The config values that shape the HDF5 cache (standard library only).

The workflow passes exactly these values to `cache_augmentations` (`--config-json`), the cache
records their hash and every reader checks it; a model variant may not override them
(`workflow/rules/common.smk`).
"""

CACHE_KEYS = (
    "data.image_resize_dims",
    "augmentation",
    "training.imgaug_3d",
    "training.train_prob",
    "training.val_prob",
    "training.rng_seed_data_pt",
    "training.test_sessions",
)
