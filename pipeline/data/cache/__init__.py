"""The HDF5 cache of training samples: file format, builder, chunk reader, torch Dataset."""
