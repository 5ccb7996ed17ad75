"""Camera geometry without file I/O: the pinhole/fisheye camera model, distortion, N-view DLT, and
the same math in torch."""
