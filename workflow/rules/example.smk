# The bundled synthetic dataset: generated, never committed as images.

if EXAMPLE["generate"]:

    rule generate_example:
        output:
            csv=[data_file(name) for name in DATA["csv_file"]],
            truth=data_file("ground_truth.npz"),
            calibrations=[
                data_file(f"calibrations/session{i}.toml") for i in range(EXAMPLE["sessions"])
            ],
            videos=[video_path(s, view) for s in VIDEO_SESSIONS for view in VIEWS],
        log:
            "logs/generate_example.log",
        benchmark:
            "benchmarks/generate_example.tsv"
        params:
            out=output_folder,
            cfg=config_json("example"),
            code=stage_digest("generate_example"),
            seed=EXAMPLE["seed"],
            sessions=EXAMPLE["sessions"],
            frames=EXAMPLE["frames_per_session"],
            views=EXAMPLE["views"],
            width=EXAMPLE["width"],
            height=EXAMPLE["height"],
            noise=EXAMPLE["label_noise_px"],
            video_frames=EXAMPLE["video_frames"],
            occlusion=EXAMPLE["occlusion"],
        threads: 1
        resources:
            mem_mb=2000,
            runtime=20,
        conda:
            "../../envs/pipeline.yaml"
        shell:
            "python -m pipeline.stages.generate_example --out {params.out:q} --seed {params.seed} "
            "--sessions {params.sessions} --frames {params.frames} --views {params.views:q} "
            "--width {params.width} --height {params.height} --noise {params.noise} "
            "--video-frames {params.video_frames} --occlusion {params.occlusion} > {log:q} 2>&1"
