# Stage 4: train the heatmap model (multi-view transformer or single-view baseline).


rule train:
    input:
        train="results/cache/train.h5",
        eval="results/cache/eval.h5",
    output:
        best=f"{MODEL_DIR}/best.pt",
        last=f"{MODEL_DIR}/last.pt",
        metrics=f"{MODEL_DIR}/metrics.csv",
        config=f"{MODEL_DIR}/config.yaml",
    log:
        f"logs/train/{MODEL_NAME}.log",
    benchmark:
        f"benchmarks/train/{MODEL_NAME}.tsv"
    params:
        cfg=config_json(*TRAIN_KEYS),
        cache_cfg=config_json(*CACHE_KEYS),
        out=output_folder,
        code=stage_digest("train"),
    threads: 2
    resources:
        mem_mb=16000,
        runtime=720,
        gpu=TRAIN_GPUS,
    conda:
        "../../envs/pipeline.yaml"
    shell:
        "python -m pipeline.train --train-h5 {input.train} --eval-h5 {input.eval} "
        "--config-json '{params.cfg}' --cache-config-json '{params.cache_cfg}' "
        "--out-dir {params.out} --threads {threads} > {log} 2>&1"
