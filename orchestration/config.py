"""Run configuration for the assets, derived from params.yaml (the one home of hyperparameters).

Each Config class has one field per key of one section of `deepcluster.config.Params`, defaulting
to that key's value in params.yaml. The classes are generated from the Params dataclasses rather
than written out, so a parameter added to the library appears in the Dagster launchpad with no
change here. `train.device` and `data.workers` describe the machine, not the experiment, so they
live in `ComputeResource` instead.
"""

import dataclasses
from pathlib import Path
from typing import Any

from dagster import Config
from pydantic import Field, create_model

from deepcluster.config import Params, load_params, params_from_dict

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = load_params(ROOT / "params.yaml")
MACHINE_KEYS = {"data": {"workers"}, "train": {"device"}}  # ComputeResource's

# the annotations deepcluster.config uses, as pydantic types (YAML lists, not tuples)
_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "tuple[float, float]": list[float]}


def section_config(section: str) -> type[Config]:
    """A Config class for one params.yaml section, each field defaulting to its value there."""
    values = getattr(DEFAULTS, section)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(values):
        if f.name in MACHINE_KEYS.get(section, ()):
            continue
        default = getattr(values, f.name)
        default = list(default) if isinstance(default, tuple) else default
        fields[f.name] = (_TYPES[str(f.type)], Field(default, description=f"{section}.{f.name}"))
    name = f"{section.capitalize()}Config"
    return create_model(name, __base__=Config, __module__=__name__, **fields)


IngestConfig = section_config("data")  # image_cache: the training resolution
ModelConfig = section_config("model")
ClusterConfig = section_config("cluster")
TrainConfig = section_config("train")
EvalConfig = section_config("eval")  # eval_report


class TrainingConfig(Config):
    """The `checkpoint` asset: the model, cluster and train sections, plus how to start."""

    model: ModelConfig = ModelConfig()  # type: ignore[valid-type]
    cluster: ClusterConfig = ClusterConfig()  # type: ignore[valid-type]
    train: TrainConfig = TrainConfig()  # type: ignore[valid-type]
    resume: bool = Field(
        False,
        description="continue from an existing checkpoint.pt (e.g. after raising train.epochs "
        "with schedule: constant; a cosine checkpoint resumes only a run of the same length); "
        "otherwise a new materialisation trains from scratch. Op retries always resume.",
    )
    fail_after_epoch: int | None = Field(
        None,
        description="TESTING ONLY: the first attempt of train_epochs raises after this epoch, "
        "to show that the retry resumes from the epoch checkpoint",
    )


def training_params(config: TrainingConfig, resolution: int, device: str, workers: int) -> Params:
    """Validated Params for a training run; `resolution` is the image cache's, so they agree."""
    return params_from_dict(
        {
            "data": {"resolution": resolution, "workers": workers},
            "model": config.model.model_dump(),
            "cluster": config.cluster.model_dump(),
            "train": {**config.train.model_dump(), "device": device},
            "eval": DEFAULTS.to_dict()["eval"],
        }
    )


def run_config_for(params: Params) -> dict[str, Any]:
    """The run config that makes the asset graph use `params` (a params.yaml other than the repo's)."""
    p = params.to_dict()
    experiment = {
        section: {k: v for k, v in p[section].items() if k not in MACHINE_KEYS.get(section, ())}
        for section in p
    }
    return {
        "ops": {
            "image_cache": {"config": experiment["data"]},
            "checkpoint": {
                "config": {key: experiment[key] for key in ("model", "cluster", "train")}
            },
            "eval_report": {"config": experiment["eval"]},
        },
        "resources": {
            "compute": {"config": {"device": p["train"]["device"], "workers": p["data"]["workers"]}}
        },
    }


class RegisterConfig(Config):
    """The `registered_model` asset: which figure decides the `champion` alias, and the name."""

    metric: str = Field(
        "auto",
        description="metrics.json key, higher wins; auto: nmi with labels, else nmi_stability",
    )
    name: str = Field("deepcluster", description="registered model name in MLflow")
