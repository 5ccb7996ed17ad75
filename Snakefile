# Parallax: calibrated multi-view animal pose estimation.
# Stages (one rule file each): example -> calibration -> triangulation -> ...
# Run: snakemake --cores N   (see README.md)
# Training (in progress, not yet in `all`): snakemake --cores N results/models/<model_name>/best.pt

from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/example.smk"
include: "workflow/rules/calibration.smk"
include: "workflow/rules/triangulation.smk"
include: "workflow/rules/cache.smk"
include: "workflow/rules/train.smk"


rule all:
    default_target: True
    input:
        "results/calibration/summary.json",
        "results/triangulation/labels_3d.csv",
        "results/cache/train.h5",
        "results/cache/eval.h5",
        "results/cache/augment.png",
