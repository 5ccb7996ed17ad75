# Stage 5c: a session's 3D trajectory smoothed over time through the cameras (one job per
# model x session, after predict_video).
rule smooth_video:
    input:
        predictions=lambda wildcards: expand(
            "results/models/{model}/videos/{session}_{view}_raw.csv",
            model=wildcards.model,
            session=wildcards.session,
            view=VIEWS,
        ),
        calibration=session_calibration,
        labels_3d="results/triangulation/labels_3d.csv",
    output:
        points="results/models/{model}/videos/{session}_smoothed_3d.csv",
        views=expand(
            "results/models/{{model}}/videos/{{session}}_{view}_smoothed.csv", view=VIEWS
        ),
        outliers="results/models/{model}/videos/{session}_smoothing_outliers.csv",
        figure=report(
            "results/models/{model}/videos/{session}_smoothing.png",
            caption="../report/smoothing.rst",
            category="Videos",
            subcategory="{model}",
        ),
    log:
        "logs/smooth_video/{model}/{session}.log",
    benchmark:
        "benchmarks/smooth_video/{model}/{session}.tsv"
    params:
        views=VIEWS,
        skeleton=skeleton_args(),
        threshold=config["smoothing"]["outlier_threshold_px"],
        min_confidence=config["smoothing"]["min_confidence"],
        process_noise=config["smoothing"]["process_noise_scale"],
        iterations=config["smoothing"]["iterations"],
        cfg=config_json("smoothing"),
        code=stage_digest("smooth_video"),
    threads: 1
    resources:
        cpus_per_task=cpus,
        mem_mb=4000,
        runtime=60,
    conda:
        "../../envs/pipeline.yaml"
    shell:
        "python -m pipeline.stages.smooth_video --predictions {input.predictions:q} "
        "--view-names {params.views:q} --calibration {input.calibration:q} "
        "--labels-3d {input.labels_3d:q} {params.skeleton} --session {wildcards.session:q} "
        "--outlier-threshold-px {params.threshold} --min-confidence {params.min_confidence} "
        "--process-noise-scale {params.process_noise} --iterations {params.iterations} "
        "--out-3d {output.points:q} --out-2d {output.views:q} "
        "--out-outliers {output.outliers:q} --out-figure {output.figure:q} > {log:q} 2>&1"
