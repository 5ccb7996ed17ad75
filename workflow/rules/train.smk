# Stage 4: train each model variant (multi-view transformer or single-view baseline); an
# ensemble (training.ensemble_seeds) trains one job per member, results/models/<model>/members/.


rule train:
    input:
        train="results/cache/train.h5",
        eval="results/cache/eval.h5",
    output:
        best="results/models/{model}/{member}best.pt",
        last="results/models/{model}/{member}last.pt",
        metrics="results/models/{model}/{member}metrics.csv",
        config="results/models/{model}/{member}config.yaml",
    log:
        "logs/train/{model}/{member}train.log",
    benchmark:
        "benchmarks/train/{model}/{member}train.tsv"
    params:
        cfg=model_config_json,
        cache_cfg=config_json(*CACHE_KEYS),
        images=images_hash_arg,  # the trainer refuses a cache built from other images
        out=output_folder,
        command=train_command,
        code=stage_digest("train"),
    threads: 2
    resources:
        cpus_per_task=cpus,
        mem_mb=16000,
        runtime=720,
        gpu=model_gpus,
    conda:
        "../../envs/pipeline.yaml"
    shell:
        "{params.command} --train-h5 {input.train:q} --eval-h5 {input.eval:q} "
        "--config-json {params.cfg:q} --cache-config-json {params.cache_cfg:q} "
        "{params.images} "
        "--out-dir {params.out:q} --threads {threads} --resume > {log:q} 2>&1"
