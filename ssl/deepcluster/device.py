"""Device choice and the CUDA-only speed-ups (AMP, channels_last), with CPU twins of each path."""

from __future__ import annotations

import contextlib

import torch

from .errors import ParamError


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; asking for `cuda` on a machine without it is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ParamError("train.device = 'cuda': no CUDA device is available (use 'auto' or 'cpu')")
    return torch.device(name)


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on CUDA (no loss scaling needed); a no-op on the CPU."""
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def memory_format(device: torch.device) -> torch.memory_format:
    """channels_last speeds up convolutions on tensor cores; contiguous NCHW is best on the CPU."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format
