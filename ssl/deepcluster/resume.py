"""The training state that survives a restart: what an epoch changes, saved after every epoch
and loaded again, so a killed run resumes where it stopped with the result of an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt
from . import distributed as dist
from .config import Params
from .epochs import EpochStats
from .errors import UserError


@dataclass
class LoopState:
    """Everything an epoch changes, so a resumed run continues exactly where it stopped."""

    epoch: int = 0
    history: list[EpochStats] = field(default_factory=list)
    assignments: np.ndarray | None = None  # the last clustering's labels (first head)
    memory: torch.Tensor | None = None  # v2: (GLOBAL_CROPS, n, d) unit embeddings of the last pass
    lr_scale: float = 1.0  # lowered by the cluster-health guard after a collapse


def save(path: Path, model, optimizer, generator, state: LoopState, params: Params, ranks) -> None:
    """Rank 0 writes it; every rank's random state goes in, so each resumes its own stream."""
    rng_states = dist.all_gather_objects(torch.get_rng_state(), ranks)
    if not ranks.main:
        return
    ckpt.save(
        {
            "model": model.state_dict(),
            "heads": model.head_sizes,
            "optimizer": optimizer.state_dict(),
            "epoch": state.epoch,
            "generator": generator.get_state(),
            "torch_rng": rng_states,
            "assignments": torch.from_numpy(state.assignments),
            "memory": state.memory,
            "lr_scale": state.lr_scale,
            "history": [asdict(h) for h in state.history],
            "params": params.to_dict(),
            "fingerprint": ckpt.params_fingerprint(params),
        },
        path,
    )


def check_resumable(path: Path, params: Params, world: int) -> dict:
    """The checkpoint at `path`, refused unless a run of `params` in `world` processes can
    continue it. The pipeline calls this before it opens an MLflow run for the training."""
    state = ckpt.load(path)
    if state["fingerprint"] != ckpt.params_fingerprint(params):
        raise UserError(
            f"{path} was trained with other parameters: resume it with those, or discard it "
            "with --fresh (Dagster: resume: false)"
        )
    if int(state["epoch"]) > int(params.train.epochs):
        raise UserError(
            f"{path} already holds {state['epoch']} epochs, more than train.epochs = "
            f"{params.train.epochs}: train longer, or from scratch with --fresh"
        )
    processes = len(state["torch_rng"])
    if processes != world:
        raise UserError(
            f"{path} was trained by {processes} processes: resume it with --nproc {processes}"
        )
    return state


def load(path: Path, params: Params, model, optimizer, generator, ranks) -> LoopState:
    """Model, optimizer and random streams as the checkpoint left them; the loop's state."""
    state = check_resumable(path, params, ranks.world)
    model.reset_heads(state["heads"])
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"][ranks.rank])
    return LoopState(
        epoch=int(state["epoch"]),
        history=[EpochStats(**h) for h in state["history"]],
        assignments=state["assignments"].numpy(),
        memory=state["memory"],
        lr_scale=float(state["lr_scale"]),
    )
