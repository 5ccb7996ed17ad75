"""Inference: load a checkpoint, predict 2D heatmaps and keypoints, triangulate and reproject
predictions."""
