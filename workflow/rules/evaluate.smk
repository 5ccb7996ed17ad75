# Stage 5b: metrics, tables and figures per model, and the comparison across models.

EVAL_FIGURES = {
    "errors_per_keypoint": "Per-keypoint pixel error",
    "errors_per_view": "Per-view pixel error",
    "pck": "PCK curves",
    "training_curves": "Loss and mask-ratio curves",
    "overlays": "Predictions vs labels, worst test frames first",
    "skeleton_3d": "3D predictions vs ground truth",
    "view_dropout": "View dropout",
}
# Snakemake's report does not render CSV: the tables also go into tables.html.
EVAL_TABLES = ("per_keypoint", "per_view", "occlusion", "view_dropout_summary")


rule evaluate:
    input:
        unpack(get_dataset_inputs),
        predictions=rules.predict_labeled.output,
        labels_3d="results/triangulation/labels_3d.csv",
        splits="results/cache/splits.csv",
        metrics=model_metrics,
    output:
        metrics="results/models/{model}/evaluation/metrics.json",
        tables=expand("results/models/{{model}}/evaluation/{table}.csv", table=EVAL_TABLES),
        html=report(
            "results/models/{model}/evaluation/tables.html",
            caption="../report/tables.rst",
            category="Evaluation",
            subcategory="{model}",
        ),
        figures=[
            report(
                f"results/models/{{model}}/evaluation/{name}.png",
                caption=f"../report/{name}.rst",
                category="Training" if name == "training_curves" else "Evaluation",
                subcategory="{model}",
            )
            for name in EVAL_FIGURES
        ],
    log:
        "logs/evaluate/{model}.log",
    benchmark:
        "benchmarks/evaluate/{model}.tsv"
    params:
        dataset=dataset_args(),
        predictions=lambda wildcards: f"results/models/{wildcards.model}/predictions",
        out=output_folder,
        pck=" ".join(str(t) for t in config["evaluation"]["pck_thresholds_px"]),
        bbox_fraction=config["evaluation"]["pck_bbox_fraction"],
        skeleton=skeleton_args(),
        code=stage_digest("evaluate"),
    threads: 1
    resources:
        cpus_per_task=cpus,
        mem_mb=4000,
        runtime=30,
    conda:
        "../../envs/pipeline.yaml"
    shell:
        "python -m pipeline.stages.evaluate {params.dataset} --predictions-dir {params.predictions:q} "
        "--labels-3d {input.labels_3d:q} --splits {input.splits:q} --metrics-csv {input.metrics:q} "
        "--out-dir {params.out:q} --model-name {wildcards.model:q} --pck-thresholds {params.pck} "
        "--pck-bbox-fraction {params.bbox_fraction} {params.skeleton} > {log:q} 2>&1"


rule compare_models:
    input:
        metrics=expand("results/models/{model}/evaluation/metrics.json", model=MODEL_NAMES),
    output:
        table="results/comparison/comparison.csv",
        plot=report(
            "results/comparison/comparison.png",
            caption="../report/comparison.rst",
            category="Model comparison",
        ),
        html=report(
            "results/comparison/comparison.html",
            caption="../report/comparison.rst",
            category="Model comparison",
        ),
    log:
        "logs/compare_models.log",
    benchmark:
        "benchmarks/compare_models.tsv"
    params:
        metrics=lambda wildcards, input: quoted(
            f"{name}={path}" for name, path in zip(MODEL_NAMES, input.metrics)
        ),
        code=stage_digest("compare_models"),
    threads: 1
    resources:
        cpus_per_task=cpus,
        mem_mb=2000,
        runtime=10,
    conda:
        "../../envs/pipeline.yaml"
    shell:
        "python -m pipeline.stages.compare_models --metrics {params.metrics} "
        "--out-csv {output.table:q} --out-png {output.plot:q} --out-html {output.html:q} "
        "> {log:q} 2>&1"
