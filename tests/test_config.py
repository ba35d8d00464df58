"""params.yaml loading: defaults, overrides, and messages that name the key, value and rule."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from deepcluster.config import ParamError, Params, load_params, params_from_dict, parse_overrides

ROOT = Path(__file__).resolve().parents[1]


def test_repo_params_file_is_valid_and_complete() -> None:
    params = load_params(ROOT / "params.yaml")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    # every hyperparameter has its home in params.yaml: no section or key left to code defaults
    assert set(raw) == set(Params().to_dict())
    for section, values in Params().to_dict().items():
        assert set(raw[section]) == set(values), section
    assert params.flat()["cluster.k"] == raw["cluster"]["k"]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"train": {"lr": -1}}, "train.lr = -1: must be a number in (0, 100]"),
        ({"train": {"lr": float("inf")}}, "train.lr = inf: must be a number in (0, 100]"),
        ({"train": {"lr": float("nan")}}, "train.lr = nan: must be a number in (0, 100]"),
        ({"model": {"embed_dim": 100000000}}, "model.embed_dim = 100000000: must be a whole number in 2..16384"),
        ({"model": {"method": "swav"}}, "model.method = 'swav': must be one of deepcluster"),
        ({"train": {"seed": -1}}, "train.seed = -1: must be a whole number in 0..4294967295"),
        ({"train": {"seed": 2**40}}, "train.seed = 1099511627776: must be a whole number in 0..4294967295"),
        ({"eval": {"grid_images": 0}}, "eval.grid_images = 0: must be a whole number in 1..1000"),
        ({"eval": {"grid_clusters": -3}}, "eval.grid_clusters = -3: must be a whole number in 1..1000"),
        ({"cluster": {"k": "many"}}, "cluster.k = 'many': must be a whole number in 2..1000000 or auto"),
        ({"cluster": {"heads": []}}, "cluster.heads = []: must be a list of numbers in (0, 1000], 1..16 of them"),
        ({"augment": {"blur": 2}}, "augment.blur = 2: must be a number in 0..1"),
        ({"train": {"lr": "fast"}}, "train.lr = 'fast': must be a number"),
        ({"compute": {"device": "tpu"}}, "compute.device = 'tpu': must be one of auto, cpu, cuda"),
        ({"train": {"device": "cpu"}}, "train.device: unknown key; allowed: epochs"),
        ({"model": {"arch": "vit"}}, "model.arch = 'vit': must be one of"),
        ({"cluster": {"k": 1}}, "cluster.k = 1: must be a whole number in 2..1000000 or auto"),
        ({"cluster": {"kk": 3}}, "cluster.kk: unknown key; allowed: k, pca_dim"),
        ({"clustre": {}}, "clustre: unknown section"),
        ({"augment": {"crop_scale": [0.9, 0.2]}}, "augment.crop_scale = [0.9, 0.2]"),
        ({"train": {"epochs": 2.5}}, "train.epochs = 2.5: must be a whole number"),
        ({"augment": {"hflip": "yes"}}, "augment.hflip = 'yes': must be true or false"),
        (
            {"cluster": {"pca_dim": 512}},
            "cluster.pca_dim = 512: must not exceed model.embed_dim",
        ),
    ],
)
def test_bad_values_are_named(raw: dict, message: str) -> None:
    with pytest.raises(ParamError, match=re.escape(message)):
        params_from_dict(raw)


def test_overrides_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  epochs: 3\n")
    params = load_params(path, {"train.lr": 0.2, "cluster.k": 7})
    assert (params.train.epochs, params.train.lr, params.cluster.k) == (3, 0.2, 7)
    with pytest.raises(ParamError, match="an override must be written section.key=value"):
        load_params(path, {"lr": 1})
    with pytest.raises(ParamError, match="parameter file not found"):
        load_params(tmp_path / "nope.yaml")
    path.write_text("train: [1, 2\n")
    with pytest.raises(ParamError, match="not valid YAML"):
        load_params(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"- 1\n- 2\n", "the top level must be a mapping of sections, got list"),
        (b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "not a text file"),
        (b"train:\n  lr: 0.1\n  lr: 0.2\n", "lr: written twice in the parameter file"),
        (b"train: {lr: 0.1}\ntrain: {lr: 0.2}\n", "train: written twice"),
    ],
)
def test_unusable_parameter_files_are_named(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_bytes(content)
    with pytest.raises(ParamError, match=message):
        load_params(path)


def test_overrides_are_parsed_strictly() -> None:
    assert parse_overrides(["train.lr=0.5", "cluster.heads=[1, 2]"]) == {
        "train.lr": 0.5,
        "cluster.heads": [1, 2],
    }
    with pytest.raises(ParamError, match=r"--set 'train.lr=\[1': '\[1' is not a valid value"):
        parse_overrides(["train.lr=[1"])
    with pytest.raises(ParamError, match="--set train.lr: given twice"):
        parse_overrides(["train.lr=1", "train.lr=2"])
    with pytest.raises(ParamError, match="write it as section.key=value"):
        parse_overrides(["lr=1"])


@pytest.mark.parametrize(
    ("written", "value"),
    [("1e-3", 0.001), ("1E-3", 0.001), (".5", 0.5), ("5.", 5.0), ("+2.5e+1", 25.0), ("1e1", 10.0)],
)
def test_numbers_in_any_yaml_spelling_are_numbers(tmp_path: Path, written: str, value) -> None:
    """YAML 1.1 (PyYAML) reads 1e-3 as a string; DVC's YAML 1.2 and people read a number."""
    path = tmp_path / "params.yaml"
    path.write_text(f"train:\n  lr: {written}\n")
    from_file = load_params(path)
    from_override = load_params(None, parse_overrides([f"train.lr={written}"]))
    from_list = load_params(None, parse_overrides([f"cluster.heads=[{written}, '1e0']"]))
    assert (from_file.train.lr, from_override.train.lr) == (value, value)
    assert from_list.cluster.heads == (value, 1.0)
    # stored, logged and hashed as plain floats
    for number in (from_file.train.lr, *from_list.cluster.heads):
        assert type(number) is float and repr(number) == repr(float(number))
    assert from_file.to_dict() == load_params(None, {"train.lr": value}).to_dict()


def test_other_types_stay_strict_and_messages_quote_the_value_as_written() -> None:
    cases = [
        ("train.lr=1e3", r"train.lr = '1e3': must be a number in \(0, 100\]"),
        ("augment.crop_scale=[9e-1, 2e-1]", r"augment.crop_scale = \[0.9, 0.2\]: must be \[lo, hi\]"),
        ("cluster.k=1e3", "cluster.k = '1e3': must be a whole number in 2..1000000 or auto"),
        ("train.epochs=1e1", "train.epochs = '1e1': must be a whole number in 1..100000 or auto"),
        ("train.seed='3'", "train.seed = '3': must be a whole number"),
        ("augment.hflip=1", "augment.hflip = 1: must be true or false"),
        ("train.lr=inf", "train.lr = 'inf': must be a number"),
        ("cluster.k=1000001", "cluster.k = 1000001: must be a whole number in 2..1000000 or auto"),
    ]
    for override, message in cases:
        with pytest.raises(ParamError, match=message):
            load_params(None, parse_overrides([override]))


def test_library_defaults_equal_params_yaml() -> None:
    """One set of defaults: the dataclasses' and the repo's params.yaml agree exactly."""
    assert load_params(None).to_dict() == load_params(ROOT / "params.yaml").to_dict()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"model": {"method": "deepercluster"}, "cluster": {"k": 30, "super_clusters": 4}},
         "cluster.super_clusters = 4: must divide cluster.k (30): each super-cluster holds k/S clusters"),
        ({"cluster": {"super_clusters": 2}},
         "cluster.super_clusters = 2: must be 1 or auto with model.method deepcluster-v2"),
        ({"model": {"method": "deepcluster"}, "cluster": {"reassign_every": 3}},
         "cluster.reassign_every = 3: must be 1 or auto with model.method deepcluster "),
        ({"cluster": {"super_clusters": 0}},
         "cluster.super_clusters = 0: must be a whole number in 1..1000000 or auto"),
        ({"cluster": {"reassign_every": "often"}},
         "cluster.reassign_every = 'often': must be a whole number in 1..100000 or auto"),
        ({"cluster": {"rotation": "yes"}}, "cluster.rotation = 'yes': must be true or false"),
        ({"model": {"method": "deeper"}},
         "model.method = 'deeper': must be one of deepcluster, deepcluster-v2, deepercluster"),
    ],
)
def test_deepercluster_values_are_checked_together(raw, message) -> None:
    with pytest.raises(ParamError) as caught:
        params_from_dict(raw)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_deepercluster_values_that_fit() -> None:
    params = params_from_dict(
        {"model": {"method": "deepercluster"}, "cluster": {"k": 30, "super_clusters": 3}}
    )
    assert (params.cluster.super_clusters, params.cluster.rotation) == (3, True)
    assert params_from_dict({"cluster": {"super_clusters": 1, "reassign_every": 1}})


def test_auto_values_are_listed_until_resolved() -> None:
    params = load_params(None)
    assert set(params.auto_keys()) == {
        "data.resolution",
        "model.sobel",
        "cluster.k",
        "cluster.pca_dim",
        "cluster.super_clusters",
        "cluster.reassign_every",
        "train.batch_size",
        "train.epochs",
    }
    assert params.compute.device == "auto"  # a machine setting, not one of the resolved values
