# Helpers for the rules: config validation, input functions, code digests. No rules here.

import hashlib
import json
import re
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate


validate(config, schema="../schemas/config.schema.yaml")

DATA = config["data"]
DATA_DIR = Path(DATA["data_dir"])
VIEWS = list(DATA["view_names"])
EXAMPLE = config["example"]
PIPELINE_DIR = Path(workflow.basedir) / "pipeline"
# the config values that shape the HDF5 cache (also its config hash, checked by readers)
CACHE_KEYS = (
    "data.image_resize_dims",
    "augmentation",
    "training.imgaug_3d",
    "training.train_prob",
    "training.val_prob",
    "training.rng_seed_data_pt",
    "training.test_sessions",
)
# the config sections training reads; model outputs go to results/models/<model.model_name>/
TRAIN_KEYS = ("model", "data", "training", "losses")
MODEL_NAME = config["model"]["model_name"]
MODEL_DIR = f"results/models/{MODEL_NAME}"
TRAIN_GPUS = 1 if config["training"]["device"] in ("cuda", "auto") else 0


def _check_config():
    """Cross-field checks that JSON schema cannot express, with the key at fault named."""
    n_views = len(VIEWS)
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


def _imports(module: str) -> set[str]:
    """`module` and every pipeline module it imports, transitively (by reading the source)."""
    seen, todo = set(), [module]
    pattern = re.compile(r"^\s*(?:from\s+pipeline\.(\w+)|from\s+\.(\w+)|import\s+pipeline\.(\w+))", re.M)
    while todo:
        name = todo.pop()
        path = PIPELINE_DIR / f"{name}.py"
        if name in seen or not path.is_file():
            continue
        seen.add(name)
        for match in pattern.finditer(path.read_text()):
            todo.append(next(group for group in match.groups() if group))
    return seen


def stage_digest(module: str) -> str:
    """Digest of a stage module and the pipeline modules it imports: editing them reruns the stage."""
    digest = hashlib.sha256()
    for name in sorted(_imports(module)):
        digest.update(name.encode())
        digest.update((PIPELINE_DIR / f"{name}.py").read_bytes())
    return digest.hexdigest()[:16]


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
        f"--data-dir '{DATA_DIR}'",
        "--view-names " + " ".join(f"'{view}'" for view in VIEWS),
        "--csv-files " + " ".join(f"'{name}'" for name in DATA["csv_file"]),
    ]
    if DATA.get("bbox_file"):
        args.append("--bbox-files " + " ".join(f"'{name}'" for name in DATA["bbox_file"]))
    if DATA.get("camera_params_file"):
        args.append(f"--camera-params-file '{DATA['camera_params_file']}'")
    return " ".join(args)


def output_folder(wildcards, output) -> str:
    """The folder of a rule's first output (the example's dataset, a model's directory)."""
    return str(Path(output[0]).parent)
