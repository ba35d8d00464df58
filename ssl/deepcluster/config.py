"""Typed, validated hyperparameters loaded from params.yaml (their one home).

Every section is a frozen dataclass; `load_params` rejects unknown keys and out-of-range values with a
message naming the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ParamError

__all__ = ["ParamError", "Params", "load_params", "params_from_dict"]

ARCHS = ("smallconv", "alexnet", "vgg16", "resnet18", "resnet50")
DEVICES = ("auto", "cpu", "cuda")
SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class DataParams:
    resolution: int = 32  # side of the square training image, pixels
    workers: int = 0  # decoding processes at ingest; 0 = in-process (best for small images)


@dataclass(frozen=True)
class ModelParams:
    arch: str = "smallconv"
    sobel: bool = False  # fixed Sobel filter on the grey image as the first layer (paper: True)
    embed_dim: int = 256  # width of the MLP whose output is clustered


@dataclass(frozen=True)
class ClusterParams:
    k: int = 100  # over-cluster: k well above the number of classes is the robust choice
    pca_dim: int = 64
    kmeans_iters: int = 20
    kmeans_redo: int = 1


@dataclass(frozen=True)
class TrainParams:
    epochs: int = 12
    batch_size: int = 128
    lr: float = 0.05
    schedule: str = (
        "cosine"  # constant (the paper) | cosine: decay per epoch to a steadier final model
    )
    momentum: float = 0.9
    weight_decay: float = 1e-5
    crop_scale: tuple[float, float] = (0.5, 1.0)  # random resized crop: area fraction range
    hflip: bool = True
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # mixed precision, used on CUDA only


@dataclass(frozen=True)
class EvalParams:
    knn_k: int = 20
    test_fraction: float = 0.3  # held-out share for the kNN and linear probes
    probe_epochs: int = 100
    grid_clusters: int = 12  # clusters shown as image grids
    grid_images: int = 16


@dataclass(frozen=True)
class Params:
    data: DataParams = field(default_factory=DataParams)
    model: ModelParams = field(default_factory=ModelParams)
    cluster: ClusterParams = field(default_factory=ClusterParams)
    train: TrainParams = field(default_factory=TrainParams)
    eval: EvalParams = field(default_factory=EvalParams)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {
            f.name: _plain(dataclasses.asdict(getattr(self, f.name)))
            for f in dataclasses.fields(self)
        }

    def flat(self) -> dict[str, Any]:
        """`section.key -> value`, the form MLflow params and DVC `-S` overrides use."""
        return {f"{s}.{k}": v for s, d in self.to_dict().items() for k, v in d.items()}


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _coerce(where: str, value: Any, kind: Any) -> Any:
    """Check `value` against the annotated type; ints are accepted where floats are expected."""
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise ParamError(f"{where} = {value!r}: must be true or false")
    if kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ParamError(f"{where} = {value!r}: must be a whole number")
    if kind == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value  # kept as written, so messages quote the user's own value
        raise ParamError(f"{where} = {value!r}: must be a number")
    if kind == "str":
        if isinstance(value, str):
            return value
        raise ParamError(f"{where} = {value!r}: must be a string")
    if kind == "tuple[float, float]":
        if isinstance(value, (list, tuple)) and len(value) == 2:
            return tuple(_coerce(where, v, "float") for v in value)
        raise ParamError(f"{where} = {value!r}: must be a list of two numbers")
    raise TypeError(f"unsupported parameter type {kind}")


def _section(cls: type, name: str, raw: Any) -> Any:
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise ParamError(f"{name}: must be a mapping of keys to values, got {raw!r}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ParamError(f"{name}.{unknown[0]}: unknown key; allowed: {', '.join(known)}")
    values = {k: _coerce(f"{name}.{k}", v, known[k].type) for k, v in raw.items()}
    return cls(**values)


def _require(ok: bool, where: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ParamError(f"{where} = {value!r}: {allowed}")


def validate(p: Params) -> Params:
    """Range checks that types alone cannot express."""
    _require(
        8 <= p.data.resolution <= 1024, "data.resolution", p.data.resolution, "must be 8..1024"
    )
    _require(p.data.workers >= 0, "data.workers", p.data.workers, "must be >= 0")
    _require(
        p.model.arch in ARCHS, "model.arch", p.model.arch, f"must be one of {', '.join(ARCHS)}"
    )
    _require(p.model.embed_dim >= 2, "model.embed_dim", p.model.embed_dim, "must be >= 2")
    _require(p.cluster.k >= 2, "cluster.k", p.cluster.k, "must be >= 2")
    _require(p.cluster.pca_dim >= 2, "cluster.pca_dim", p.cluster.pca_dim, "must be >= 2")
    _require(
        p.cluster.pca_dim <= p.model.embed_dim,
        "cluster.pca_dim",
        p.cluster.pca_dim,
        f"must not exceed model.embed_dim ({p.model.embed_dim})",
    )
    _require(
        p.cluster.kmeans_iters >= 1, "cluster.kmeans_iters", p.cluster.kmeans_iters, "must be >= 1"
    )
    _require(
        p.cluster.kmeans_redo >= 1, "cluster.kmeans_redo", p.cluster.kmeans_redo, "must be >= 1"
    )
    t = p.train
    _require(t.epochs >= 1, "train.epochs", t.epochs, "must be >= 1")
    _require(t.batch_size >= 2, "train.batch_size", t.batch_size, "must be >= 2")
    _require(t.lr > 0, "train.lr", t.lr, "must be > 0")
    _require(
        t.schedule in SCHEDULES,
        "train.schedule",
        t.schedule,
        f"must be one of {', '.join(SCHEDULES)}",
    )
    _require(0 <= t.momentum < 1, "train.momentum", t.momentum, "must be in [0, 1)")
    _require(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "must be >= 0")
    lo, hi = t.crop_scale
    _require(
        0 < lo <= hi <= 1,
        "train.crop_scale",
        list(t.crop_scale),
        "must be [lo, hi], 0 < lo <= hi <= 1",
    )
    _require(t.device in DEVICES, "train.device", t.device, f"must be one of {', '.join(DEVICES)}")
    e = p.eval
    _require(e.knn_k >= 1, "eval.knn_k", e.knn_k, "must be >= 1")
    _require(0 < e.test_fraction < 1, "eval.test_fraction", e.test_fraction, "must be in (0, 1)")
    _require(e.probe_epochs >= 1, "eval.probe_epochs", e.probe_epochs, "must be >= 1")
    return p


def params_from_dict(raw: Any) -> Params:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamError(f"params: the top level must be a mapping of sections, got {raw!r}")
    sections = {f.name: f for f in dataclasses.fields(Params)}
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ParamError(f"{unknown[0]}: unknown section; allowed: {', '.join(sections)}")
    built = {
        name: _section(f.default_factory, name, raw.get(name))  # type: ignore[misc]
        for name, f in sections.items()
    }
    return validate(Params(**built))


def load_params(
    path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None
) -> Params:
    """Read params.yaml; `overrides` maps `section.key` to a value (the CLI's `--set`)."""
    path = Path(path)
    if not path.is_file():
        raise ParamError(f"{path}: parameter file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ParamError(f"{path}: not valid YAML ({err})") from err
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if not key:
            raise ParamError(f"{dotted}: an override must be written section.key=value")
        if not isinstance(raw.get(section, {}), dict):
            raise ParamError(f"{section}: must be a mapping")
        raw.setdefault(section, {})
        raw[section] = {**(raw[section] or {}), key: value}
    return params_from_dict(raw)
