# Parallax: calibrated multi-view animal pose estimation.
# Stages (one rule file each): example -> calibration -> triangulation -> cache -> train
#   -> predict (labelled frames, videos) -> evaluate -> comparison, smooth_video -> report
# Run: snakemake --cores N   then   snakemake --report results/report.html   (see README.md)

from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"


wildcard_constraints:
    model="|".join(re.escape(name) for name in MODEL_NAMES),
    # only the sessions found (never `<session>_smoothed` from another file name)
    session="|".join(re.escape(name) for name in VIDEO_SESSIONS) or "(?!)",
    member="(members/seed[0-9]+/)?",


include: "workflow/rules/example.smk"
include: "workflow/rules/calibration.smk"
include: "workflow/rules/triangulation.smk"
include: "workflow/rules/cache.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/predict.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/smooth.smk"


rule all:
    default_target: True
    input:
        "results/calibration/summary.json",
        "results/triangulation/labels_3d.csv",
        "results/cache/augment.png",
        expand("results/models/{model}/evaluation/metrics.json", model=MODEL_NAMES),
        "results/comparison/comparison.csv",
        expand(
            "results/models/{model}/videos/{session}_3d.csv",
            model=MODEL_NAMES,
            session=VIDEO_SESSIONS,
        ),
        expand(
            "results/models/{model}/videos/{session}_smoothed_3d.csv",
            model=MODEL_NAMES,
            session=VIDEO_SESSIONS,
        ),
