"""Run config generated from params.yaml: a Config class per section of `deepcluster.config.Params`
(the `compute` section is `ComputeResource`'s), each field defaulting to its value there, so a
parameter added to the library appears in the launchpad with no change here. Values that may be
`auto` are strings in the launchpad ("auto" or a number)."""

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
TRAINING = ("data", "model", "cluster", "train", "augment")  # the sections `checkpoint` takes

# the annotations of deepcluster.config, as pydantic types ("auto" or a value: text)
_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "IntOrAuto": str,
          "FloatOrAuto": str, "BoolOrAuto": str, "tuple[float, float]": list[float],
          "tuple[float, ...]": list[float]}  # fmt: skip


def _launchpad(value: Any, kind: str) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if kind.endswith("OrAuto"):
        return str(value).lower() if isinstance(value, bool) else str(value)
    return value


def _library(value: Any) -> Any:
    """A launchpad value back into the library's form ("32" -> 32, "true" -> True, "auto" stays)."""
    if isinstance(value, str) and value != AUTO:
        parsed = yaml.safe_load(value)
        if isinstance(parsed, (bool, int, float)):
            return parsed
    return value


def _section(params: Params, name: str) -> dict[str, Any]:
    values = getattr(params, name)
    return {f.name: _launchpad(getattr(values, f.name), str(f.type))
            for f in dataclasses.fields(values)}  # fmt: skip


def section_config(section: str) -> type[Config]:
    """A Config class for one params.yaml section, each field defaulting to its value there."""
    kinds = {f.name: str(f.type) for f in dataclasses.fields(getattr(DEFAULTS, section))}
    fields = {name: (_TYPES[kinds[name]], Field(value, description=f"{section}.{name}"))
              for name, value in _section(DEFAULTS, section).items()}  # fmt: skip
    return create_model(f"{section.capitalize()}Config", __base__=Config, __module__=__name__,
                        **fields)  # fmt: skip


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
    resume: bool = Field(False, description="continue the staged checkpoint of an interrupted run "
                         "(op retries always do); otherwise a new materialisation trains from "
                         "scratch. The published model is replaced only when a training ends.")


class RegisterConfig(Config):
    """The `registered_model` asset: which figure decides the `champion` alias, and the name."""

    metric: str = Field("auto", description="metrics.json figure, higher wins: auto (nmi with "
                        f"labels, else nmi_stability) or one of {', '.join(PROMOTION_METRICS)}")
    name: str = Field("deepcluster", description="registered model name in MLflow")


def experiment_params(sections: dict[str, Any], compute: dict[str, Any]) -> Params:
    """Validated Params from launchpad sections (missing ones: params.yaml) and the machine."""
    raw = DEFAULTS.to_dict()
    for name, values in sections.items():
        raw[name] = {key: _library(value) for key, value in values.items()}
    return params_from_dict({**raw, "compute": compute})


def training_params(config: TrainingConfig, compute: dict[str, Any]) -> Params:
    sections = {name: getattr(config, name).model_dump() for name in TRAINING}
    return experiment_params(sections, compute)


def run_config_for(params: Params) -> dict[str, Any]:
    """The run config that makes the graph use `params` (a params.yaml other than the repo's)."""
    p = {name: _section(params, name) for name in params.to_dict()}
    return {
        "ops": {"ingest": {"config": {"data": p["data"]}},
                "checkpoint": {"config": {name: p[name] for name in TRAINING}},
                "eval_report": {"config": p["eval"]}},
        "resources": {"compute": {"config": p["compute"]}},
    }  # fmt: skip
