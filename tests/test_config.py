"""params.yaml loading: defaults, overrides, and messages that name the key, value and rule."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deepcluster.config import ParamError, Params, load_params, params_from_dict

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
        ({"train": {"lr": -1}}, "train.lr = -1: must be > 0"),
        ({"train": {"lr": "fast"}}, "train.lr = 'fast': must be a number"),
        ({"train": {"device": "tpu"}}, "train.device = 'tpu': must be one of auto, cpu, cuda"),
        ({"model": {"arch": "vit"}}, "model.arch = 'vit': must be one of"),
        ({"cluster": {"k": 1}}, "cluster.k = 1: must be >= 2"),
        ({"cluster": {"kk": 3}}, "cluster.kk: unknown key; allowed: k, pca_dim"),
        ({"clustre": {}}, "clustre: unknown section"),
        ({"train": {"crop_scale": [0.9, 0.2]}}, "train.crop_scale = [0.9, 0.2]"),
        ({"train": {"epochs": 2.5}}, "train.epochs = 2.5: must be a whole number"),
        ({"train": {"hflip": "yes"}}, "train.hflip = 'yes': must be true or false"),
        ({"cluster": {"pca_dim": 512}}, "cluster.pca_dim = 512: must not exceed model.embed_dim"),
    ],
)
def test_bad_values_are_named(raw: dict, message: str) -> None:
    with pytest.raises(ParamError, match=message.replace("[", r"\[").replace("]", r"\]")):
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
