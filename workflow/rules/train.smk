# Stage 4: train each model variant (multi-view transformer or single-view baseline).


rule train:
    input:
        train="results/cache/train.h5",
        eval="results/cache/eval.h5",
    output:
        best="results/models/{model}/best.pt",
        last="results/models/{model}/last.pt",
        metrics="results/models/{model}/metrics.csv",
        config="results/models/{model}/config.yaml",
    log:
        "logs/train/{model}.log",
    benchmark:
        "benchmarks/train/{model}.tsv"
    params:
        cfg=model_config_json,
        cache_cfg=config_json(*CACHE_KEYS),
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
        "--out-dir {params.out:q} --threads {threads} --resume > {log:q} 2>&1"
