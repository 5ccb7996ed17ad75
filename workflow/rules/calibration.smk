# Stage 1: catch broken, mis-ordered or inconsistent cameras before any GPU hour is spent.


rule validate_calibration:
    input:
        unpack(get_dataset_inputs),
    output:
        summary="results/calibration/summary.json",
        table="results/calibration/per_camera.csv",
        plot=report(
            "results/calibration/reprojection_errors.png",
            caption="../report/calibration.rst",
            category="Calibration",
        ),
    log:
        "logs/validate_calibration.log",
    benchmark:
        "benchmarks/validate_calibration.tsv"
    params:
        dataset=dataset_args(),
        max_px=config["calibration"]["max_median_reproj_px"],
        min_views=config["triangulation"]["min_views"],
        cfg=config_json("calibration", "triangulation.min_views"),
        code=stage_digest("validate_calibration"),
    threads: 1
    resources:
        cpus_per_task=cpus,
        mem_mb=4000,
        runtime=20,
    conda:
        "../../envs/pipeline.yaml"
    shell:
        "python -m pipeline.stages.validate_calibration {params.dataset} "
        "--max-median-reproj-px {params.max_px} --min-views {params.min_views} "
        "--summary {output.summary:q} --table {output.table:q} --plot {output.plot:q} > {log:q} 2>&1"
