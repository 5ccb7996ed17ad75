# Stage 2: ground-truth 3D of the labelled frames, reprojection errors, label outliers.


rule triangulate_labels:
    input:
        unpack(get_dataset_inputs),
        validation="results/calibration/summary.json",
    output:
        points="results/triangulation/labels_3d.csv",
        outliers=report(
            "results/triangulation/outliers.csv",
            caption="../report/outliers.rst",
            category="Triangulation",
        ),
        summary="results/triangulation/summary.json",
    log:
        "logs/triangulate_labels.log",
    benchmark:
        "benchmarks/triangulate_labels.tsv"
    params:
        dataset=dataset_args(),
        min_views=config["triangulation"]["min_views"],
        outlier_px=config["triangulation"]["outlier_threshold_px"],
        cfg=config_json("triangulation"),
        code=stage_digest("triangulate_labels"),
    threads: 1
    resources:
        cpus_per_task=cpus,
        mem_mb=4000,
        runtime=20,
    conda:
        "../../envs/pipeline.yaml"
    shell:
        "python -m pipeline.stages.triangulate_labels {params.dataset} "
        "--min-views {params.min_views} --outlier-threshold-px {params.outlier_px} "
        "--points {output.points:q} --outliers {output.outliers:q} --summary {output.summary:q} "
        "> {log:q} 2>&1"
