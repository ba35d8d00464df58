"""Typed, validated hyperparameters loaded from params.yaml (their one home).

Every section is a frozen dataclass; `load_params` rejects unknown keys and out-of-range values with a
message naming the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import yaml

from .errors import ParamError

__all__ = ["ParamError", "Params", "load_params", "params_from_dict"]

ARCHS = ("smallconv", "alexnet", "vgg16", "resnet18", "resnet50")
METHODS = ("deepcluster", "deepcluster-v2")
DEVICES = ("auto", "cpu", "cuda")
SCHEDULES = ("constant", "cosine")
NORMALIZATIONS = ("dataset", "imagenet")
AUTO = "auto"
# Upper bounds that keep a typo from allocating terabytes: far above any sensible setting.
MAX_EMBED_DIM = 16_384
MAX_K = 1_000_000
MAX_SEED = 2**32 - 1

# `auto` values are resolved from the data at run time (`deepcluster.autoparams`)
IntOrAuto = int | str
BoolOrAuto = bool | str
RESOLVED_KEYS = (
    "data.resolution", "model.sobel", "cluster.k", "cluster.pca_dim", "train.batch_size",
    "train.epochs",
)  # fmt: skip


@dataclass(frozen=True)
class DataParams:
    resolution: IntOrAuto = AUTO  # square side in px; auto: from the images' sizes


@dataclass(frozen=True)
class ModelParams:
    method: str = "deepcluster-v2"  # deepcluster (Caron et al. 2018) | deepcluster-v2 (2020)
    arch: str = "smallconv"
    sobel: BoolOrAuto = AUTO  # fixed Sobel filter on the grey image as the first layer; auto: colour
    embed_dim: int = 128  # width of the clustered embedding (v2: the prototype space)
    normalize: str = "dataset"  # input standardisation: the data's own mean/std, or ImageNet's


@dataclass(frozen=True)
class ClusterParams:
    k: IntOrAuto = AUTO  # clusters; auto: from the number of images
    pca_dim: IntOrAuto = AUTO  # v1: PCA-whitening dimension before k-means
    kmeans_iters: int = 20
    kmeans_redo: int = 1
    heads: tuple[float, ...] = (0.05, 0.25, 1.0)  # v2: one prototype head per entry, of entry x k


@dataclass(frozen=True)
class TrainParams:
    epochs: IntOrAuto = AUTO  # auto: from the number of images
    batch_size: IntOrAuto = AUTO  # auto: from the number of images
    lr: float = 0.1
    schedule: str = "cosine"  # constant (the paper) | cosine: per-step decay after the warm-up
    warmup_epochs: int = 1
    momentum: float = 0.9
    weight_decay: float = 1e-5
    temperature: float = 0.1  # v2: softmax temperature over prototype similarities
    seed: int = 0


@dataclass(frozen=True)
class ComputeParams:
    """The machine, not the experiment: these never change which run a checkpoint belongs to."""

    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # bfloat16 autocast where the hardware runs it fast (CUDA, AVX512-BF16, AMX)
    threads: IntOrAuto = AUTO  # torch threads; auto: the usable cores / processes sharing them
    workers: int = 0  # decoding processes at ingest; 0 = in-process (best for small images)
    sync_bn: bool = False  # several GPUs (torchrun): batch norm over the global batch


@dataclass(frozen=True)
class AugmentParams:
    crop_scale: tuple[float, float] = (0.3, 1.0)  # global crops: random resized crop, area share
    hflip: bool = False  # mirror images (natural images: yes; digits and text: no)
    local_crops: int = 4  # v2 multi-crop: small crops per image besides the two global ones
    local_size: float = 0.5  # side of a local crop as a share of data.resolution
    local_scale: tuple[float, float] = (0.1, 0.4)
    jitter: float = 0.4  # brightness and contrast (and saturation, hue on colour data)
    grayscale: float = 0.2  # probability, colour data only
    blur: float = 0.3  # probability of a Gaussian blur
    solarize: float = 0.1  # probability of solarisation


@dataclass(frozen=True)
class EvalParams:
    knn_k: int = 20
    test_fraction: float = 0.3  # held-out share for the kNN and linear probes
    probe_epochs: int = 200
    grid_clusters: int = 12  # clusters shown as image grids
    grid_images: int = 16


@dataclass(frozen=True)
class Params:
    data: DataParams = field(default_factory=DataParams)
    model: ModelParams = field(default_factory=ModelParams)
    cluster: ClusterParams = field(default_factory=ClusterParams)
    train: TrainParams = field(default_factory=TrainParams)
    augment: AugmentParams = field(default_factory=AugmentParams)
    eval: EvalParams = field(default_factory=EvalParams)
    compute: ComputeParams = field(default_factory=ComputeParams)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {
            f.name: _plain(dataclasses.asdict(getattr(self, f.name)))
            for f in dataclasses.fields(self)
        }

    def flat(self) -> dict[str, Any]:
        """`section.key -> value`, the form MLflow params and DVC `-S` overrides use."""
        return {f"{s}.{k}": v for s, d in self.to_dict().items() for k, v in d.items()}

    def auto_keys(self) -> list[str]:
        """`section.key` of every value still `auto` (resolved by `deepcluster.autoparams`)."""
        return [key for key in RESOLVED_KEYS if self.flat()[key] == AUTO]


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


# a decimal number in any spelling: 1e-3, 1E-3, .5, 5., -2.5e+2 (YAML 1.1, which PyYAML reads,
# leaves exponents without a dot, such as 1e-3, as strings; YAML 1.2 and DVC read them as numbers)
NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class Written(float):
    """A number the user wrote as a string (1e-3): a float to the checks, quoted as written in
    their messages. `params_from_dict` turns it into a plain float before anything stores it."""

    def __new__(cls, text: str) -> Self:
        number = super().__new__(cls, text)
        number.text = text
        return number

    def __repr__(self) -> str:
        return self.text


def _plain_number(value: Any) -> Any:
    if isinstance(value, tuple):
        return tuple(_plain_number(v) for v in value)
    return float(value) if isinstance(value, Written) else value


def _plain_numbers(p: Params) -> Params:
    """`p` without `Written` numbers: what is saved, hashed and logged is a plain float."""
    sections = {
        f.name: dataclasses.replace(
            getattr(p, f.name),
            **{k: _plain_number(v) for k, v in vars(getattr(p, f.name)).items()},
        )
        for f in dataclasses.fields(p)
    }
    return Params(**sections)


def _coerce(where: str, value: Any, kind: Any) -> Any:
    """Check `value` against the annotated type; ints, and strings that spell a number, are
    accepted where floats are expected (bools, and anything but ints where ints are, are not)."""
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise ParamError(f"{where} = {value!r}: must be true or false")
    if kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ParamError(f"{where} = {value!r}: must be a whole number")
    if kind == "float":
        if isinstance(value, str) and NUMBER.fullmatch(value.strip()):
            return Written(value.strip())  # YAML 1.1 reads 1e-3 as a string
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value  # kept as written, so messages quote the user's own value
        raise ParamError(f"{where} = {value!r}: must be a number")
    if kind == "str":
        if isinstance(value, str):
            return value
        raise ParamError(f"{where} = {value!r}: must be a string")
    if kind == "IntOrAuto":
        if value == AUTO:
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ParamError(f"{where} = {value!r}: must be a whole number or auto")
    if kind == "BoolOrAuto":
        return value if value == AUTO else _coerce(where, value, "bool")
    if kind == "tuple[float, ...]":
        if isinstance(value, (list, tuple)) and value:
            return tuple(_coerce(where, v, "float") for v in value)
        raise ParamError(f"{where} = {value!r}: must be a non-empty list of numbers")
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


def _in(where: str, value: Any, choices: tuple[str, ...]) -> None:
    _require(value in choices, where, value, f"must be one of {', '.join(choices)}")


def _range(where: str, value: Any, lo: float, hi: float | None = None, auto: bool = False) -> None:
    """lo <= value (<= hi); `auto` allows the string auto."""
    if auto and value == AUTO:
        return
    ok = value >= lo and (hi is None or value <= hi)
    rule = f"must be {lo}..{hi}" if hi is not None else f"must be >= {lo}"
    _require(ok, where, value, rule + (" or auto" if auto else ""))


def _share_range(where: str, pair: tuple[float, float]) -> None:
    lo, hi = pair
    _require(0 < lo <= hi <= 1, where, list(pair), "must be [lo, hi], 0 < lo <= hi <= 1")


def validate(p: Params) -> Params:
    """Range checks that types alone cannot express."""
    _range("data.resolution", p.data.resolution, 8, 1024, auto=True)
    m = p.model
    _in("model.method", m.method, METHODS)
    _in("model.arch", m.arch, ARCHS)
    _in("model.normalize", m.normalize, NORMALIZATIONS)
    _range("model.embed_dim", m.embed_dim, 2, MAX_EMBED_DIM)
    c = p.cluster
    _range("cluster.k", c.k, 2, MAX_K, auto=True)
    _range("cluster.pca_dim", c.pca_dim, 2, MAX_EMBED_DIM, auto=True)
    if c.pca_dim != AUTO:
        _require(
            c.pca_dim <= m.embed_dim,
            "cluster.pca_dim",
            c.pca_dim,
            f"must not exceed model.embed_dim ({m.embed_dim})",
        )
    _range("cluster.kmeans_iters", c.kmeans_iters, 1, 10_000)
    _range("cluster.kmeans_redo", c.kmeans_redo, 1, 1_000)
    for scale in c.heads:
        _require(0 < scale <= 1_000, "cluster.heads", list(c.heads), "each must be in (0, 1000]")
    _require(len(c.heads) <= 16, "cluster.heads", list(c.heads), "at most 16 heads")
    t = p.train
    _range("train.epochs", t.epochs, 1, 100_000, auto=True)
    _range("train.batch_size", t.batch_size, 2, 65_536, auto=True)
    _require(0 < t.lr <= 100, "train.lr", t.lr, "must be > 0 and at most 100")
    _in("train.schedule", t.schedule, SCHEDULES)
    _range("train.warmup_epochs", t.warmup_epochs, 0, 100_000)
    _require(0 <= t.momentum < 1, "train.momentum", t.momentum, "must be in [0, 1)")
    _require(0 <= t.weight_decay < 1, "train.weight_decay", t.weight_decay, "must be in [0, 1)")
    _require(0 < t.temperature <= 10, "train.temperature", t.temperature, "must be in (0, 10]")
    _range("train.seed", t.seed, 0, MAX_SEED)
    a = p.augment
    _share_range("augment.crop_scale", a.crop_scale)
    _share_range("augment.local_scale", a.local_scale)
    _range("augment.local_crops", a.local_crops, 0, 64)
    _require(0 < a.local_size <= 1, "augment.local_size", a.local_size, "must be in (0, 1]")
    _require(0 <= a.jitter <= 1, "augment.jitter", a.jitter, "must be in [0, 1]")
    for name in ("grayscale", "blur", "solarize"):
        value = getattr(a, name)
        _require(0 <= value <= 1, f"augment.{name}", value, "must be a probability in [0, 1]")
    _in("compute.device", p.compute.device, DEVICES)
    _range("compute.threads", p.compute.threads, 1, 1024, auto=True)
    _range("compute.workers", p.compute.workers, 0, 256)
    _require(
        not p.compute.sync_bn or p.compute.device != "cpu",
        "compute.sync_bn", p.compute.sync_bn, "needs CUDA (set it with compute.device auto or cuda)",
    )
    e = p.eval
    _range("eval.knn_k", e.knn_k, 1, 10_000)
    _require(0 < e.test_fraction < 1, "eval.test_fraction", e.test_fraction, "must be in (0, 1)")
    _range("eval.probe_epochs", e.probe_epochs, 1, 100_000)
    _range("eval.grid_clusters", e.grid_clusters, 1, 1_000)
    _range("eval.grid_images", e.grid_images, 1, 1_000)
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
    return _plain_numbers(validate(Params(**built)))


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
        at = f" at line {where.line + 1}" if where is not None else ""
        raise ParamError(f"{path}: not valid YAML{at} ({getattr(err, 'problem', err)})") from None


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
        raw.setdefault(section, {})
        raw[section] = {**(raw[section] or {}), key: value}
    return params_from_dict(raw)
