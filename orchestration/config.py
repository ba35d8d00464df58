"""Run config derived from `deepcluster.config.Params`: a Config class per section, defaulting to
params.yaml (`compute` is `ComputeResource`'s); values that may be `auto` are text in the launchpad."""

from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from dagster import Config
from pydantic import Field, create_model

from deepcluster.config import AUTO, TRAINING, Params, load_params, params_from_dict
from deepcluster.figures import PROMOTION_METRICS

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = load_params(ROOT / "params.yaml")


def _launchpad_type(kind: Any) -> Any:
    """Dagster's type for a field of `Params`: text where `auto` is allowed ("auto" or a value),
    lists for tuples, choices as text, else the base type."""
    if get_origin(kind) is Annotated:
        return _launchpad_type(get_args(kind)[0])
    if get_origin(kind) in (Union, type(int | str)):
        parts = get_args(kind)
        if any(get_origin(a) is Literal for a in parts):
            return str
        return _launchpad_type(next(a for a in parts if a is not type(None))) | None
    if get_origin(kind) is tuple:
        return list[float]
    return str if get_origin(kind) is Literal else kind


def _launchpad(value: Any, kind: type) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if kind is str and not isinstance(value, str):  # auto-or-value fields hold text
        return str(value).lower() if isinstance(value, bool) else str(value)
    return value


def _library(value: Any) -> Any:
    """A launchpad value back into the library's form ("32" -> 32, "true" -> True, "auto" stays)."""
    if isinstance(value, str) and value != AUTO:
        parsed = yaml.safe_load(value)
        if isinstance(parsed, (bool, int, float)):
            return parsed
    return value


def _kinds(section: str) -> dict[str, Any]:
    fields = Params.model_fields[section].annotation.model_fields
    return {name: _launchpad_type(f.annotation) for name, f in fields.items()}


def _section(params: Params, name: str) -> dict[str, Any]:
    kinds = _kinds(name)
    return {key: _launchpad(value, kinds[key]) for key, value in dict(getattr(params, name)).items()}


def section_config(section: str) -> type[Config]:
    """A Config class for one params.yaml section, each field defaulting to its value there."""
    fields = Params.model_fields[section].annotation.model_fields
    kinds = _kinds(section)
    config = {name: (kinds[name], Field(value, description=f"{section}.{name}: "
                                        f"{fields[name].description or ''}".rstrip(": ")))
              for name, value in _section(DEFAULTS, section).items()}  # fmt: skip
    return create_model(f"{section.capitalize()}Config", __base__=Config, __module__=__name__,
                        **config)  # fmt: skip


SECTIONS = {name: section_config(name) for name in (*TRAINING, "eval", "curate")}
DataConfig, ModelConfig, ClusterConfig, TrainConfig, AugmentConfig = (SECTIONS[s] for s in TRAINING)
EvalConfig, CurateConfig = SECTIONS["eval"], SECTIONS["curate"]  # eval_report, curated_subset


class IngestConfig(Config):
    """The ingest assets: the resolution images are decoded to (auto: from their sizes)."""

    data: DataConfig = DataConfig()  # type: ignore[valid-type]


# the `checkpoint` asset: every section training reads (`deepcluster.config.TRAINING`), and how to
# start; the published model is replaced only when a training ends
TrainingConfig = create_model(
    "TrainingConfig", __base__=Config, __module__=__name__,
    resume=(bool, Field(False, description="continue the staged checkpoint of an interrupted run "
                        "(op retries always do); else a new materialisation trains from scratch")),
    **{name: (SECTIONS[name], SECTIONS[name]()) for name in TRAINING},
)  # fmt: skip


class RegisterConfig(Config):
    """The `registered_model` asset: which figure decides the `champion` alias, and the name."""

    metric: str = Field("auto", description="metrics.json figure, higher wins: auto (nmi with "
                        f"labels, else nmi_stability) or one of {', '.join(PROMOTION_METRICS)}")
    name: str = Field("deepcluster", description="registered model name in MLflow")


def experiment_params(sections: dict[str, Any], compute: dict[str, Any] | None = None) -> Params:
    """Validated Params from launchpad sections (missing ones: params.yaml) and the machine."""
    raw = DEFAULTS.to_dict()
    for name, values in sections.items():
        raw[name] = {key: _library(value) for key, value in values.items()}
    return params_from_dict({**raw, "compute": compute or raw["compute"]})


def params_from_config(config: TrainingConfig, compute: dict[str, Any]) -> Params:
    sections = {name: getattr(config, name).model_dump() for name in TRAINING}
    return experiment_params(sections, compute)


def run_config_for(params: Params) -> dict[str, Any]:
    """The run config that makes the graph use `params` (a params.yaml other than the repo's)."""
    p = {name: _section(params, name) for name in params.to_dict()}
    return {
        "ops": {"ingest": {"config": {"data": p["data"]}},
                "checkpoint": {"config": {name: p[name] for name in TRAINING}},
                "eval_report": {"config": p["eval"]},
                "curated_subset": {"config": p["curate"]}},
        "resources": {"compute": {"config": p["compute"]}},
    }  # fmt: skip
