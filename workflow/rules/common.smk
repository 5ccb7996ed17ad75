# Helpers for the rules: config validation, input functions, code digests. No rules here.

import copy
import functools
import json
import math
import shlex
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger
from snakemake.utils import validate


validate(config, schema="../schemas/config.schema.yaml")

DATA = config["data"]
DATA_DIR = Path(DATA["data_dir"])
VIEWS = list(DATA["view_names"])
EXAMPLE = config["example"]
# the workflow's own copy of the package decides code digests and cache keys
sys.path.insert(0, str(workflow.basedir))
from pipeline.core.digest import code_digest  # noqa: E402
from pipeline.core.hashing import images_digest  # noqa: E402
from pipeline.core.mappings import merge  # noqa: E402
from pipeline.core.errors import ParallaxError  # noqa: E402
from pipeline.core.views import check_min_views, check_view_names  # noqa: E402
from pipeline.data.paths import find_calibration  # noqa: E402
from pipeline.io.video import find_sessions  # noqa: E402
from pipeline.data.cache.keys import CACHE_KEYS  # noqa: E402

# the config sections training reads; model outputs go to results/models/<model>/
TRAIN_KEYS = ("model", "data", "training", "losses", "callbacks")
# the sections a `models:` variant may override
VARIANT_SECTIONS = ("model", "training", "losses", "callbacks")
CACHE_TRAINING_KEYS = {key.split(".")[1] for key in CACHE_KEYS if key.startswith("training.")}


def _non_finite(value, key: str = "") -> list[str]:
    """Dotted keys of NaN or infinite numbers (YAML `.nan`, `.inf`: JSON schema calls them
    numbers)."""
    if isinstance(value, dict):
        return [bad for k, v in value.items() for bad in _non_finite(v, f"{key}.{k}" if key
                                                                      else str(k))]
    if isinstance(value, list):
        return [bad for i, v in enumerate(value) for bad in _non_finite(v, f"{key}[{i}]")]
    if isinstance(value, float) and not math.isfinite(value):
        return [f"{key} = {value}"]
    return []


def _check_config():
    """Cross-field checks that JSON schema cannot express, with the key at fault named."""
    bad = _non_finite(config)
    if bad:
        raise WorkflowError(f"config: {', '.join(bad)}: not a finite number; give a number "
                            "(or null where the key allows it)")
    n_views = len(VIEWS)
    try:  # the stages' own checks (pipeline.core.views), at start
        check_view_names(VIEWS)
        check_min_views(config["triangulation"]["min_views"], VIEWS, "triangulation.min_views")
    except ParallaxError as err:
        raise WorkflowError(f"config: {err}") from None
    for key in ("csv_file", "bbox_file"):
        files = DATA.get(key)
        if files is not None and len(files) != n_views:
            raise WorkflowError(
                f"config: data.{key} has {len(files)} entries but data.view_names has {n_views}; "
                f"list one file per view, in view_names order"
            )
    if EXAMPLE["generate"] and EXAMPLE["views"] != n_views:
        raise WorkflowError(
            f"config: example.views is {EXAMPLE['views']} but data.view_names lists {n_views} views"
        )


_check_config()


def _model_configs() -> dict[str, dict]:
    """name -> the full config of each model variant (base config + the variant's overrides).

    Each merged config is validated again, so a bad value inside a variant is reported with the
    variant's name; variants may not change what the shared cache was built with.
    """
    variants = {name: override for name, override in (config.get("models") or {}).items()
                if override is not False}
    variants = variants or {config["model"]["model_name"]: {}}
    models = {}
    for name, override in variants.items():
        if override is True:
            override = {}
        clash = CACHE_TRAINING_KEYS & set((override or {}).get("training") or {})
        if clash:
            raise WorkflowError(
                f"config: models.{name}.training overrides {sorted(clash)}, which shape the shared "
                f"cache; set them in the base training section"
            )
        merged = merge({k: config[k] for k in config if k != "models"}, override or {})
        merged["model"]["model_name"] = name
        try:
            validate(merged, schema="../schemas/config.schema.yaml")
        except WorkflowError as err:
            raise WorkflowError(f"config: in models.{name}: {err}") from None
        models[name] = merged
    return models


MODELS = _model_configs()
MODEL_NAMES = list(MODELS)


def members(name: str) -> list[str]:
    """The `{member}` wildcard values of a variant: "" (one model, results/models/<name>/), or
    for training.ensemble_seeds one "members/seed<s>/" per seed (one training job each)."""
    seeds = MODELS[name]["training"].get("ensemble_seeds")
    return [f"members/seed{seed}/" for seed in seeds] if seeds else [""]


def model_checkpoints(wildcards) -> list[str]:
    """best.pt of every member of variant `wildcards.model`."""
    return [f"results/models/{wildcards.model}/{m}best.pt" for m in members(wildcards.model)]


def model_metrics(wildcards) -> str:
    """metrics.csv of the variant's (first) member: its training curves in the report."""
    return f"results/models/{wildcards.model}/{members(wildcards.model)[0]}metrics.csv"


def model_config_json(wildcards) -> str:
    """The model/data/training/losses/callbacks sections of one variant (of one ensemble
    member: its seed as training.rng_seed_model_pt), as canonical JSON."""
    merged = copy.deepcopy({key: MODELS[wildcards.model][key] for key in TRAIN_KEYS})
    seed = wildcards.member.removeprefix("members/seed").removesuffix("/")
    if seed:
        merged["training"]["rng_seed_model_pt"] = int(seed)
    return json.dumps(merged, sort_keys=True)


def model_device(name: str) -> str:
    return MODELS[name]["training"]["device"]


def model_gpus(wildcards) -> int:
    """GPUs a training job asks for: training.num_gpus unless the device is the CPU."""
    training = MODELS[wildcards.model]["training"]
    return 0 if training["device"] == "cpu" else training["num_gpus"]


def predict_gpus(wildcards) -> int:
    return 0 if model_device(wildcards.model) == "cpu" else 1


def train_command(wildcards, threads) -> str:
    """`python -m pipeline.stages.train`, or torchrun with one process per GPU when num_gpus > 1."""
    gpus = model_gpus(wildcards)
    if gpus > 1:
        return f"torchrun --standalone --nproc_per_node {gpus} -m pipeline.stages.train"
    return "python -m pipeline.stages.train"


def _video_sessions() -> list[str]:
    """Sessions with one video per view in data_dir/video_dir (`<session>_<view>.mp4`, matched
    by the known view names: `pipeline.io.video.find_sessions`) and a calibration
    (calibrations/<session>.toml or calibration.toml); a session without one is left out, and
    said so at start."""
    if not config["prediction"]["videos"]:
        return []
    if EXAMPLE["generate"]:
        return [f"session{i}" for i in range(EXAMPLE["sessions"])] if EXAMPLE["video_frames"] else []
    folder = DATA_DIR / DATA["video_dir"]
    if not folder.is_dir():
        return []
    try:
        sessions = sorted(find_sessions(folder, VIEWS, (".mp4",)))
    except ParallaxError as err:
        raise WorkflowError(f"prediction.videos: {err}") from None
    missing = [s for s in sessions if find_calibration(DATA_DIR, s) is None]
    if missing:
        logger.warning(f"prediction.videos: no calibrations/<session>.toml nor calibration.toml "
                       f"for {missing}: their videos are not predicted")
    return [s for s in sessions if s not in missing]


VIDEO_SESSIONS = _video_sessions()


def video_path(session: str, view: str) -> str:
    return data_file(f"{DATA['video_dir']}/{session}_{view}.mp4")


def session_videos(wildcards) -> list[str]:
    return [video_path(wildcards.session, view) for view in VIEWS]


def session_calibration(wildcards) -> list[str]:
    """The calibration TOML of a video session (`pipeline.data.paths.find_calibration`:
    calibrations/<session>.toml, else the shared calibration.toml)."""
    if EXAMPLE["generate"]:
        return [data_file(f"calibrations/{wildcards.session}.toml")]
    return [str(find_calibration(DATA_DIR, wildcards.session))]


def quoted(values) -> str:
    """Shell words for `values`, each quoted (nothing in a name or path is ever executed)."""
    return " ".join(shlex.quote(str(value)) for value in values)


def skeleton_args() -> str:
    """`--skeleton a b c d ...`: data.skeleton's keypoint pairs, flattened (names may hold '-')."""
    pairs = DATA.get("skeleton") or []
    names = quoted(name for pair in pairs for name in pair)
    return f"--skeleton {names}" if pairs else ""


def stage_digest(rule: str) -> str:
    """Digest of the stage module `pipeline.stages.<rule>` and every pipeline module it imports,
    transitively (`pipeline.core.digest`): editing any of them reruns the rule."""
    return code_digest(f"pipeline.stages.{rule}", Path(workflow.basedir))


def config_json(*keys: str) -> str:
    """The config sections or dotted keys a stage uses, as canonical JSON.

    Used as a `params:` entry, so changing any of them reruns the stage (and nothing else).
    """
    picked = {}
    for key in keys:
        value = config
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        picked[key] = value
    return json.dumps(picked, sort_keys=True)


def data_file(name: str) -> str:
    """A path inside data.data_dir."""
    return str(DATA_DIR / name)


@functools.cache
def labelled_images_digest() -> str:
    """`pipeline.core.hashing.images_digest` of every image the label CSVs list (read once per
    run, only for jobs that use it): a params entry of the cache (and train) rule, so replacing
    or editing a labelled image, even keeping its mtime, reruns cache_augmentations. "" for the
    generated example (its images are outputs of generate_example); "unreadable" when a label
    CSV cannot be read (validate_calibration then reports it)."""
    if EXAMPLE["generate"]:
        return ""
    from pipeline.io.labels_csv import read_label_csv

    try:
        paths = [p for name in DATA["csv_file"] for p in read_label_csv(DATA_DIR / name).index]
    except (ParallaxError, OSError):
        return "unreadable"
    return images_digest(DATA_DIR, paths)


def images_param(wildcards) -> str:
    return labelled_images_digest()


def images_hash_arg(wildcards) -> str:
    """`--images-hash <digest>` for the train stage ("" for the generated example)."""
    digest = labelled_images_digest()
    return f"--images-hash {quoted([digest])}" if digest else ""


def get_dataset_inputs(wildcards=None) -> dict:
    """The label CSVs, bbox CSVs and calibrations a stage reads (for the DAG and rerun triggers).

    For the generated example the CSVs are outputs of `generate_example`. For user data the
    calibration TOMLs that exist are listed so that editing one reruns the stages using it.
    """
    inputs = {"csv": [data_file(name) for name in DATA["csv_file"]]}
    if DATA.get("bbox_file"):
        inputs["bbox"] = [data_file(name) for name in DATA["bbox_file"]]
    if EXAMPLE["generate"]:
        inputs["example"] = data_file("ground_truth.npz")
        return inputs
    calibrations = sorted(str(path) for path in (DATA_DIR / "calibrations").glob("*.toml"))
    if (DATA_DIR / "calibration.toml").is_file():
        calibrations.append(data_file("calibration.toml"))
    if DATA.get("camera_params_file"):
        calibrations.append(data_file(DATA["camera_params_file"]))
    inputs["calibration"] = calibrations
    return inputs


def dataset_args() -> str:
    """The shared command-line arguments that describe the dataset to a stage."""
    args = [
        f"--data-dir {quoted([DATA_DIR])}",
        f"--view-names {quoted(VIEWS)}",
        f"--csv-files {quoted(DATA['csv_file'])}",
    ]
    if DATA.get("bbox_file"):
        args.append(f"--bbox-files {quoted(DATA['bbox_file'])}")
    if DATA.get("camera_params_file"):
        args.append(f"--camera-params-file {quoted([DATA['camera_params_file']])}")
    return " ".join(args)


def output_folder(wildcards, output) -> str:
    """The folder of a rule's first output (the example's dataset, a model's directory)."""
    return str(Path(output[0]).parent)


def cpus(wildcards, threads) -> int:
    """cpus_per_task (SLURM) = the rule's threads, after Snakemake scaled them to --cores."""
    return threads
