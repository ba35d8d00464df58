"""Checkpoint and model files: what a training saves, and how the network is rebuilt from them.

Every file loads with `torch.load(weights_only=True)`: tensors and plain values only, never
pickled code. Saves are atomic and byte-stable (equal states give equal bytes), so DVC sees an
unchanged model.pt after an identical re-run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .config import TRAINING, Params, params_from_dict
from .device import memory_format
from .errors import stop_held
from .io import atomic_path, write_json
from .models import DeepClusterNet, build_model
from .paths import TrainFiles


def params_fingerprint(params: Params) -> str:
    """Hash of everything that shapes a training run.

    With a constant learning rate the length is left out, so a finished run can be extended; a
    cosine schedule depends on the length, so there it is part of the fingerprint. How a model is
    evaluated and which machine trains it are not part of the run.
    """
    d = {section: values for section, values in params.to_dict().items() if section in TRAINING}
    if params.train.schedule == "constant":
        d["train"] = {k: v for k, v in d["train"].items() if k != "epochs"}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def save(state: dict, path: Path) -> Path:
    """torch.save, atomically. Through a file object: given a path, torch names the archive inside
    after the (random) temporary file, so equal states would give different bytes. A stop waits
    for the file: torch's writer, interrupted, raises its own error and hides the stop."""
    with stop_held(), atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)
    return path


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def export_model(model: DeepClusterNet, params: Params, path: Path) -> Path:
    """Final weights, the head sizes and the parameters that rebuild the network, plus the
    parameters again as JSON beside it (`TrainFiles.params`), readable without loading weights."""
    state = {"model": model.state_dict(), "params": params.to_dict(), "heads": model.head_sizes}
    write_json(TrainFiles(Path(path).parent).params, params.to_dict())
    return save(state, path)


def saved_params(model_path: Path) -> Params:
    """The resolved parameters a model was trained with, from the params.json beside it."""
    sidecar = TrainFiles(Path(model_path).parent).params
    if sidecar.exists():
        return params_from_dict(json.loads(sidecar.read_text()))
    return params_from_dict(load(model_path)["params"])


def load_model(path: Path, device: str | torch.device = "cpu") -> DeepClusterNet:
    state = load(path)
    params = params_from_dict(state["params"])
    model = build_model(params.model, state["heads"])
    model.load_state_dict(state["model"])
    device = torch.device(device)
    return model.to(device, memory_format=memory_format(device)).eval()
