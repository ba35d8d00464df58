"""Hyperparameters: one pydantic model (`Params`) whose defaults are params.yaml's.

The library, the CLI's `-S section.key=value` and Dagster's run config all validate through it. A
bad value is one line naming the key, the value as the user wrote it and what is allowed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types as at
import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from .errors import ParamError

__all__ = ["AUTO", "ParamError", "Params", "load_params", "params_from_dict", "parse_overrides"]

AUTO = "auto"
Auto = Literal["auto"]
MAX_SEED = 2**32 - 1
# a decimal number in any spelling: 1e-3, 1E-3, .5, 5., -2.5e+2 (YAML 1.1, which PyYAML reads,
# leaves exponents without a dot, such as 1e-3, as strings; YAML 1.2 and DVC read them as numbers)
NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _number(value: Any) -> Any:
    return float(value) if isinstance(value, str) and NUMBER.fullmatch(value.strip()) else value


def _pair(value: Any) -> Any:
    """A YAML list of two numbers as a tuple (strict mode takes tuples only)."""
    return tuple(_number(v) for v in value) if isinstance(value, list) else value


def whole(lo: int, hi: int | None = None) -> Any:
    return Annotated[int, Field(ge=lo, le=hi)]


def number(**bounds: float) -> Any:
    return Annotated[float, BeforeValidator(_number), Field(**bounds)]


Share = Annotated[tuple[float, float], BeforeValidator(_pair)]  # (lo, hi), 0 < lo <= hi <= 1
Probability = number(ge=0, le=1)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class DataParams(Section):
    resolution: whole(8, 1024) | Auto = Field(AUTO, description="square side in px")


class ModelParams(Section):
    method: Literal["deepcluster", "deepcluster-v2", "deepercluster"] = Field(
        "deepcluster-v2",
        description="deepcluster (Caron et al. 2018) | deepcluster-v2 (2020) | deepercluster (2019)",
    )
    arch: Literal["smallconv", "alexnet", "vgg16", "resnet18", "resnet50"] = "smallconv"
    sobel: bool | Auto = Field(AUTO, description="fixed Sobel input layer; auto: on colour")
    embed_dim: whole(2, 16_384) = Field(128, description="width of the clustered embedding")
    normalize: Literal["dataset", "imagenet"] = Field(
        "dataset", description="input standardisation: the data's mean/std or ImageNet's"
    )


class ClusterParams(Section):
    k: whole(2, 1_000_000) | Auto = Field(AUTO, description="clusters")
    pca_dim: whole(2, 16_384) | Auto = Field(
        AUTO, description="deepcluster, deepercluster: PCA-whitening dimension"
    )
    kmeans_iters: whole(1, 10_000) = 20
    kmeans_redo: whole(1, 1_000) = 1
    heads: Annotated[
        tuple[number(gt=0, le=1_000), ...],
        BeforeValidator(_pair),
        Field(min_length=1, max_length=16),
    ] = Field((0.05, 0.25, 1.0), description="v2: one prototype head per entry, of entry x k")
    super_clusters: whole(1, 1_000_000) | Auto = Field(
        AUTO, description="deepercluster: S super-clusters of k/S clusters each (1 otherwise)"
    )
    rotation: bool = Field(True, description="deepercluster: targets are (rotation, cluster)")
    reassign_every: whole(1, 100_000) | Auto = Field(
        AUTO, description="epochs per clustering (deepercluster; 1 otherwise)"
    )


class TrainParams(Section):
    epochs: whole(1, 100_000) | Auto = AUTO
    batch_size: whole(2, 65_536) | Auto = AUTO
    lr: number(gt=0, le=100) = 0.1
    schedule: Literal["constant", "cosine"] = Field(
        "cosine", description="constant (the paper) | cosine: per-step decay after the warm-up"
    )
    warmup_epochs: whole(0, 100_000) = 1
    momentum: number(ge=0, lt=1) = 0.9
    weight_decay: number(ge=0, lt=1) = 1e-5
    temperature: number(gt=0, le=10) = Field(0.1, description="v2: softmax temperature")
    seed: whole(0, MAX_SEED) = 0


class AugmentParams(Section):
    crop_scale: Share = Field((0.3, 1.0), description="global crops: area share")
    hflip: bool = Field(False, description="mirror images (photos: yes; digits and text: no)")
    local_crops: whole(0, 64) = Field(4, description="v2 multi-crop: small crops per image")
    local_size: number(gt=0, le=1) = Field(0.5, description="side of a local crop, share")
    local_scale: Share = (0.1, 0.4)
    jitter: number(ge=0, le=1) = Field(0.4, description="brightness, contrast (colour: hue too)")
    grayscale: Probability = 0.2
    blur: Probability = 0.3
    solarize: Probability = 0.1


class EvalParams(Section):
    knn_k: whole(1, 10_000) = 20
    test_fraction: number(gt=0, lt=1) = Field(0.3, description="held-out share for the probes")
    probe_epochs: whole(1, 100_000) = 200
    grid_clusters: whole(1, 1_000) = 12
    grid_images: whole(1, 1_000) = 16


class CurateParams(Section):
    budget: whole(1) = Field(200, description="images to choose")
    method: Literal["bins", "hierarchical"] = Field(
        "bins", description="bins (DeepCluster++) | hierarchical (Vo et al. 2024)"
    )
    bins: whole(1, 1_000) = Field(4, description="equal-frequency distance bins per cluster")
    eps: number(ge=0, lt=1) = Field(5e-4, description="near duplicates: cosine above 1 - eps")
    parents: whole(1) | None = Field(None, description="hierarchical: parent groups (sqrt k)")
    seed: whole(0, MAX_SEED) = 0


class ComputeParams(Section):
    """The machine, not the experiment: these never change which run a checkpoint belongs to."""

    device: Literal["auto", "cpu", "cuda"] = AUTO
    amp: bool = Field(True, description="bfloat16 autocast where the hardware runs it fast")
    threads: whole(1, 1024) | Auto = Field(AUTO, description="torch threads")
    workers: whole(0, 256) = Field(0, description="decoding processes at ingest")
    sync_bn: bool = Field(False, description="several GPUs: batch norm over the global batch")


# the sections that shape a training run (a checkpoint's fingerprint, Dagster's training config)
TRAINING = ("data", "model", "cluster", "train", "augment")
# `make demo`'s budget on the 1,797 digits, where auto gives 100 epochs (about 13 minutes on a
# 2-core AVX2-only CPU): 30 epochs beat the untrained network and raw pixels on every figure of the
# report, in fp32 at AVX2 and in bf16; 20 did not in bf16 (docs/learning.md, "The demo's budget")
DEMO = {"train.epochs": 30}


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    data: DataParams = DataParams()
    model: ModelParams = ModelParams()
    cluster: ClusterParams = ClusterParams()
    train: TrainParams = TrainParams()
    augment: AugmentParams = AugmentParams()
    eval: EvalParams = EvalParams()
    curate: CurateParams = CurateParams()
    compute: ComputeParams = ComputeParams()

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain YAML-able values (lists, not tuples)."""
        return self.model_dump(mode="json")

    def flat(self) -> dict[str, Any]:
        """`section.key -> value`, the form MLflow params and DVC `-S` overrides use."""
        return {f"{s}.{k}": v for s, d in self.to_dict().items() for k, v in d.items()}

    def auto_keys(self) -> list[str]:
        """`section.key` of every value still `auto` (resolved by `deepcluster.autoparams`);
        the machine's own (compute) are resolved where they are used."""
        return [k for k, v in self.flat().items() if v == AUTO and not k.startswith("compute.")]

    def replace(self, section: str, **values: Any) -> Params:
        """These params with some keys of one section changed, validated again."""
        raw = self.to_dict()
        raw[section] |= values
        return params_from_dict(raw)


# ---------------------------------------------------------------------------------------------
# One line per bad value


def rule(section: str, key: str) -> str:
    """What `section.key` allows, in words, from its annotation."""
    field = Params.model_fields[section].annotation.model_fields[key]
    return "must be " + _describe(field.annotation, field.metadata)


def _describe(kind: Any, metadata: list = ()) -> str:
    if get_origin(kind) in (Union, type(int | str)):
        parts = [a for a in get_args(kind) if a is not type(None)]
        words = " or ".join(_describe(a) for a in parts)
        return words + (" or null" if len(parts) < len(get_args(kind)) else "")
    if get_origin(kind) is Annotated:
        base, *extra = get_args(kind)
        return _describe(base, [*extra, *metadata])
    if get_origin(kind) is Literal:
        choices = [str(c) for c in get_args(kind)]
        return choices[0] if len(choices) == 1 else "one of " + ", ".join(choices)
    if kind is bool:
        return "true or false"
    if get_origin(kind) is tuple:
        items = get_args(kind)
        if ... not in items:
            return f"a list of {len(items)} numbers"
        each = _describe(items[0]).replace("a number", "numbers", 1)
        lengths = [m for m in metadata if isinstance(m, (at.MinLen, at.MaxLen))]
        counts = "..".join(str(getattr(m, "min_length", getattr(m, "max_length", ""))) for m in lengths)
        return f"a list of {each}" + (f", {counts} of them" if counts else "")
    noun = "a whole number" if kind is int else "a number"
    return noun + _bounds([m for item in metadata for m in getattr(item, "metadata", [item])])


def _g(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _bounds(items: list) -> str:
    lo = next((("[", m.ge) for m in items if isinstance(m, at.Ge)), None)
    lo = lo or next((("(", m.gt) for m in items if isinstance(m, at.Gt)), None)
    hi = next(((m.le, "]") for m in items if isinstance(m, at.Le)), None)
    hi = hi or next(((m.lt, ")") for m in items if isinstance(m, at.Lt)), None)
    if lo and hi:
        if lo[0] == "[" and hi[1] == "]":
            return f" in {_g(lo[1])}..{_g(hi[0])}"
        return f" in {lo[0]}{_g(lo[1])}, {_g(hi[0])}{hi[1]}"
    if lo:
        return f" >= {_g(lo[1])}" if lo[0] == "[" else f" > {_g(lo[1])}"
    return ""


def _one_line(err: ValidationError, raw: dict) -> ParamError:
    """The first problem of a validation error as the library's one-line message."""
    e = err.errors()[0]
    where = [str(part) for part in e["loc"][:2]]
    if e["type"] == "extra_forbidden":
        owner = Params if len(where) == 1 else Params.model_fields[where[0]].annotation
        what = "section" if len(where) == 1 else "key"
        return ParamError(f"{'.'.join(where)}: unknown {what}; allowed: {', '.join(owner.model_fields)}")
    section = raw.get(where[0])
    if len(where) == 1:
        return ParamError(f"{where[0]}: must be a mapping of keys to values, got {section!r}")
    written = section[where[1]]
    return ParamError(f"{where[0]}.{where[1]} = {written!r}: {rule(*where)}")


def _check_together(p: Params) -> Params:
    """The rules that involve more than one value."""
    for key in ("crop_scale", "local_scale"):
        lo, hi = getattr(p.augment, key)
        if not 0 < lo <= hi <= 1:
            raise ParamError(f"augment.{key} = {[lo, hi]}: must be [lo, hi], 0 < lo <= hi <= 1")
    if p.cluster.pca_dim != AUTO and p.cluster.pca_dim > p.model.embed_dim:
        raise ParamError(f"cluster.pca_dim = {p.cluster.pca_dim}: must not exceed "
                         f"model.embed_dim ({p.model.embed_dim})")  # fmt: skip
    _check_deepercluster(p)
    if p.compute.sync_bn and p.compute.device == "cpu":
        raise ParamError("compute.sync_bn = True: needs CUDA (set it with compute.device auto or cuda)")
    return p


def _check_deepercluster(p: Params) -> None:
    """S must split k; the other methods train one level on clusters made every epoch."""
    c = p.cluster
    if c.super_clusters != AUTO and c.k != AUTO and c.k % c.super_clusters:
        raise ParamError(f"cluster.super_clusters = {c.super_clusters}: must divide cluster.k "
                         f"({c.k}): each super-cluster holds k/S clusters")  # fmt: skip
    if p.model.method == "deepercluster":
        return
    for key in ("super_clusters", "reassign_every"):
        value = getattr(c, key)
        if value not in (AUTO, 1):
            raise ParamError(f"cluster.{key} = {value}: must be 1 or auto with model.method "
                             f"{p.model.method} (other values need deepercluster)")  # fmt: skip


def params_from_dict(raw: Any) -> Params:
    """Validated Params from a params.yaml-shaped mapping (missing sections and keys: defaults)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamError(f"params: the top level must be a mapping of sections, got {raw!r}")
    try:
        return _check_together(Params.model_validate(raw))
    except ValidationError as err:
        raise _one_line(err, raw) from None


# ---------------------------------------------------------------------------------------------
# params.yaml and -S overrides


class _StrictLoader(yaml.SafeLoader):
    """YAML that refuses a key written twice (plain YAML keeps the last one silently)."""


def _no_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    keys = [loader.construct_object(key, deep=deep) for key, _ in node.value]
    repeated = sorted({str(k) for k in keys if keys.count(k) > 1})
    if repeated:
        raise ParamError(f"{repeated[0]}: written twice in the parameter file")
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ParamError(f"{path}: not a text file (expected YAML)") from None
    except OSError as err:
        raise ParamError(f"{path}: cannot read it ({err.strerror or err})") from None
    try:
        return yaml.load(text, Loader=_StrictLoader) or {}
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at_line = f" at line {where.line + 1}" if where is not None else ""
        raise ParamError(f"{path}: not valid YAML{at_line} ({getattr(err, 'problem', err)})") from None


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`section.key=value` strings (the CLI's -S) -> {dotted key: YAML value}."""
    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or "." not in key:
            raise ParamError(f"--set {item!r}: write it as section.key=value")
        if key in parsed:
            raise ParamError(f"--set {key}: given twice")
        try:
            parsed[key] = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ParamError(f"--set {item!r}: {text!r} is not a valid value") from None
    return parsed


def load_params(
    path: str | Path | None = "params.yaml", overrides: dict[str, Any] | None = None
) -> Params:
    """Read params.yaml (None: the built-in defaults, which equal the repo's params.yaml);
    `overrides` maps `section.key` to a value (the CLI's `--set`)."""
    raw: Any = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ParamError(f"{path}: parameter file not found")
        raw = _read_yaml(path)
        if not isinstance(raw, dict):
            raise ParamError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if not key:
            raise ParamError(f"{dotted}: an override must be written section.key=value")
        if not isinstance(raw.get(section, {}), dict):
            raise ParamError(f"{section}: must be a mapping")
        raw[section] = {**(raw.get(section) or {}), key: value}
    return params_from_dict(raw)
