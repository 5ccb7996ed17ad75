"""File formats, one module per format: anipose calibration TOML, DLC/LP label and prediction CSVs,
anipose pose-3d CSVs, videos."""
