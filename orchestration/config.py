"""Run configuration for the assets, derived from params.yaml (the one home of hyperparameters).

Each Config class has one field per key of one section of `deepcluster.config.Params`, defaulting
to that key's value in params.yaml. The classes are generated from the Params dataclasses rather
than written out, so a parameter added to the library appears in the Dagster launchpad with no
change here. The `compute` section describes the machine, not the experiment: it is
`ComputeResource`'s. Values that may be `auto` are strings in the launchpad ("auto" or a number).
"""

import dataclasses
from pathlib import Path
from typing import Any

import yaml
from dagster import Config
from pydantic import Field, create_model

from deepcluster.config import AUTO, Params, load_params, params_from_dict
from deepcluster.figures import PROMOTION_METRICS

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = load_params(ROOT / "params.yaml")

# the annotations deepcluster.config uses, as pydantic types (YAML lists, not tuples)
_TYPES = {
    "int": int,
    "float": float,
    "str": str,
    "bool": bool,
    # "auto" or a value, as text; checked by deepcluster.config
    "IntOrAuto": str,
    "FloatOrAuto": str,
    "BoolOrAuto": str,
    "tuple[float, float]": list[float],
    "tuple[float, ...]": list[float],
}


def _launchpad(value: Any, kind: str) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if kind.endswith("OrAuto"):
        return str(value).lower() if isinstance(value, bool) else str(value)
    return value


def _library(value: Any) -> Any:
    """A launchpad value back into the library's form ("32" -> 32, "true" -> True, "auto"
    stays); other text stays text."""
    if isinstance(value, str) and value != AUTO:
        parsed = yaml.safe_load(value)
        if isinstance(parsed, (bool, int, float)):
            return parsed
    return value


def section_config(section: str) -> type[Config]:
    """A Config class for one params.yaml section, each field defaulting to its value there."""
    values = getattr(DEFAULTS, section)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(values):
        default = _launchpad(getattr(values, f.name), str(f.type))
        fields[f.name] = (_TYPES[str(f.type)], Field(default, description=f"{section}.{f.name}"))
    name = f"{section.capitalize()}Config"
    return create_model(name, __base__=Config, __module__=__name__, **fields)


DataConfig = section_config("data")
ModelConfig = section_config("model")
ClusterConfig = section_config("cluster")
TrainConfig = section_config("train")
AugmentConfig = section_config("augment")
EvalConfig = section_config("eval")  # eval_report


class IngestConfig(Config):
    """The ingest assets: the resolution images are decoded to (auto: from their sizes)."""

    data: DataConfig = DataConfig()  # type: ignore[valid-type]


class TrainingConfig(Config):
    """The `checkpoint` asset: every experiment section, plus how to start."""

    data: DataConfig = DataConfig()  # type: ignore[valid-type]
    model: ModelConfig = ModelConfig()  # type: ignore[valid-type]
    cluster: ClusterConfig = ClusterConfig()  # type: ignore[valid-type]
    train: TrainConfig = TrainConfig()  # type: ignore[valid-type]
    augment: AugmentConfig = AugmentConfig()  # type: ignore[valid-type]
    resume: bool = Field(
        False,
        description="continue an interrupted run's staged checkpoint (op retries always do); "
        "otherwise a new materialisation trains from scratch. The published model is only "
        "replaced when a training finishes.",
    )


def experiment_params(sections: dict[str, Any], compute: dict[str, Any]) -> Params:
    """Validated Params from launchpad sections (missing ones: params.yaml) and the machine."""
    raw = DEFAULTS.to_dict()
    for name, values in sections.items():
        raw[name] = {key: _library(value) for key, value in values.items()}
    raw["compute"] = compute
    return params_from_dict(raw)


def training_params(config: TrainingConfig, compute: dict[str, Any]) -> Params:
    sections = ("data", "model", "cluster", "train", "augment")
    return experiment_params({name: getattr(config, name).model_dump() for name in sections}, compute)


def run_config_for(params: Params) -> dict[str, Any]:
    """The run config that makes the asset graph use `params` (a params.yaml other than the repo's)."""
    p = {name: _launchpad_section(params, name) for name in params.to_dict()}
    training = {name: p[name] for name in ("data", "model", "cluster", "train", "augment")}
    return {
        "ops": {
            "ingest": {"config": {"data": p["data"]}},
            "checkpoint": {"config": training},
            "eval_report": {"config": p["eval"]},
        },
        "resources": {"compute": {"config": p["compute"]}},
    }


def _launchpad_section(params: Params, name: str) -> dict[str, Any]:
    values = getattr(params, name)
    return {
        f.name: _launchpad(getattr(values, f.name), str(f.type)) for f in dataclasses.fields(values)
    }


class RegisterConfig(Config):
    """The `registered_model` asset: which figure decides the `champion` alias, and the name."""

    metric: str = Field(
        "auto",
        description="metrics.json figure, higher wins: auto (nmi with labels, else "
        f"nmi_stability) or one of {', '.join(PROMOTION_METRICS)}",
    )
    name: str = Field("deepcluster", description="registered model name in MLflow")
