"""The labelled dataset and what training reads: LP project loading, splits, 3D augmentation,
photometric augmentation, images, the HDF5 cache."""
