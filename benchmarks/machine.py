"""The machine a benchmark figure was measured on: load (`uptime`) and the CPU's flags that decide
the numeric path (AVX2 only, AVX-512, AVX512-BF16, AMX). Standard library only, so the GPU
check can use it on a machine with nothing but torch."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def cpu() -> dict:
    """The CPU's model name, its cores and which of FLAGS it has."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    lines = [line.split(":", 1) for line in info.splitlines() if ":" in line]
    fields = {key.strip(): value.strip() for key, value in reversed(lines)}  # the first CPU's
    have = set(fields.get("flags", "").split())
    return {"model": fields.get("model name", "?"), "cores": os.cpu_count(),
            "flags": [f for f in FLAGS if f in have]}  # fmt: skip


def cpu_flags() -> str:
    """One line: the cores and each flag as yes/no."""
    have = cpu()
    return f"cores={have['cores']} " + " ".join(
        f"{f}={'yes' if f in have['flags'] else 'no'}" for f in FLAGS
    )
