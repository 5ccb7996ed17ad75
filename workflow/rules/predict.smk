# Stage 5a: predictions of each model on the labelled frames and on the session videos.


rule predict_labeled:
    input:
        unpack(get_dataset_inputs),
        checkpoint=model_checkpoints,
        splits="results/cache/splits.csv",
        labels_3d="results/triangulation/labels_3d.csv",
    output:
        predictions=expand(
            "results/models/{{model}}/predictions/predictions_{view}.csv", view=VIEWS
        ),
        pixel_error=expand(
            "results/models/{{model}}/predictions/predictions_{view}_pixel_error.csv",
            view=VIEWS,
        ),
        raw=expand(
            "results/models/{{model}}/predictions/predictions_{view}_raw{suffix}.csv",
            view=VIEWS,
            suffix=("", "_pixel_error"),
        ),
        points_3d="results/models/{model}/predictions/predictions_3d.csv",
        error_3d="results/models/{model}/predictions/error_3d.csv",
        view_dropout="results/models/{model}/predictions/view_dropout.csv",
        members=directory("results/models/{model}/predictions/members"),
    log:
        "logs/predict_labeled/{model}.log",
    benchmark:
        "benchmarks/predict_labeled/{model}.tsv"
    params:
        dataset=dataset_args(),
        out=output_folder,
        batch=config["prediction"]["batch_size"],
        min_confidence=config["prediction"]["consensus"]["min_confidence"],
        outlier_px=config["prediction"]["consensus"]["outlier_px"],
        min_views=config["triangulation"]["min_views"],
        dropout="" if config["prediction"]["view_dropout"] else "--no-view-dropout",
        device=lambda wildcards: model_device(wildcards.model),
        code=stage_digest("predict_labeled"),
    threads: 2
    resources:
        cpus_per_task=cpus,
        mem_mb=8000,
        runtime=120,
        gpu=predict_gpus,
    conda:
        "../../envs/pipeline.yaml"
    shell:
        "python -m pipeline.stages.predict_labeled {params.dataset} --checkpoint {input.checkpoint:q} "
        "--members-dir {output.members:q} "
        "--splits {input.splits:q} --labels-3d {input.labels_3d:q} --out-dir {params.out:q} "
        "--batch-size {params.batch} --min-confidence {params.min_confidence} "
        "--outlier-px {params.outlier_px} --min-views {params.min_views} {params.dropout} "
        "--device {params.device} --threads {threads} > {log:q} 2>&1"


rule predict_video:
    input:
        checkpoint=model_checkpoints,
        videos=session_videos,
        calibration=session_calibration,
    output:
        predictions=expand(
            "results/models/{{model}}/videos/{{session}}_{view}.csv", view=VIEWS
        ),
        points_3d="results/models/{model}/videos/{session}_3d.csv",
        raw=expand("results/models/{{model}}/videos/{{session}}_{view}_raw.csv", view=VIEWS),
        members=directory("results/models/{model}/videos/members/{session}"),
        traces=report(
            "results/models/{model}/videos/{session}_trajectories.png",
            caption="../report/video_traces.rst",
            category="Videos",
            subcategory="{model}",
        ),
    log:
        "logs/predict_video/{model}/{session}.log",
    benchmark:
        "benchmarks/predict_video/{model}/{session}.tsv"
    params:
        views=VIEWS,
        calibration=lambda wildcards, input: (
            f"--calibration {quoted(input.calibration)}" if input.calibration else ""
        ),
        out=output_folder,
        batch=config["prediction"]["batch_size"],
        min_confidence=config["prediction"]["consensus"]["min_confidence"],
        outlier_px=config["prediction"]["consensus"]["outlier_px"],
        min_views=config["triangulation"]["min_views"],
        labeled="--labeled-video" if config["prediction"]["labeled_videos"] else "",
        skeleton=skeleton_args(),
        device=lambda wildcards: model_device(wildcards.model),
        code=stage_digest("predict_video"),
    threads: 2
    resources:
        cpus_per_task=cpus,
        mem_mb=8000,
        runtime=240,
        gpu=predict_gpus,
    conda:
        "../../envs/pipeline.yaml"
    shell:
        "python -m pipeline.stages.predict_video --checkpoint {input.checkpoint:q} "
        "--members-dir {output.members:q} "
        "--videos {input.videos:q} --view-names {params.views:q} {params.calibration} "
        "--session {wildcards.session:q} --out-dir {params.out:q} --batch-size {params.batch} "
        "--min-confidence {params.min_confidence} --outlier-px {params.outlier_px} "
        "--min-views {params.min_views} {params.labeled} {params.skeleton} "
        "--device {params.device} --threads {threads} > {log:q} 2>&1"
