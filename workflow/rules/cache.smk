# Stage 3: split the frames, 3D-augment the training frames, cache everything to HDF5.


rule cache_augmentations:
    input:
        unpack(get_dataset_inputs),
        labels_3d="results/triangulation/labels_3d.csv",
        validation="results/calibration/summary.json",
    output:
        splits="results/cache/splits.csv",
        train="results/cache/train.h5",
        eval="results/cache/eval.h5",
        picture=report(
            "results/cache/augment.png",
            caption="../report/augment.rst",
            category="Augmentation",
        ),
    log:
        "logs/cache_augmentations.log",
    benchmark:
        "benchmarks/cache_augmentations.tsv"
    params:
        dataset=dataset_args(),
        cfg=config_json(*CACHE_KEYS),
        # the bytes of the labelled images: an image replaced or edited, even keeping its
        # mtime, reruns the cache
        images=images_param,
        code=stage_digest("cache_augmentations"),
    threads: 1
    resources:
        cpus_per_task=cpus,
        mem_mb=4000,
        runtime=60,
    conda:
        "../../envs/pipeline.yaml"
    shell:
        "python -m pipeline.stages.cache_augmentations {params.dataset} "
        "--labels-3d {input.labels_3d:q} --config-json {params.cfg:q} "
        "--splits {output.splits:q} --train {output.train:q} --eval {output.eval:q} "
        "--picture {output.picture:q} > {log:q} 2>&1"
