"""Parallax: multi-view animal pose estimation pipeline."""

__version__ = "0.1.0"
