"""Device choice and the hardware speed-ups (bf16 autocast, channels_last), on CUDA and the CPU."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
from collections.abc import Iterator

import torch

from .errors import ParamError


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; asking for `cuda` on a machine without it is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ParamError("compute.device = 'cuda': no CUDA device is available (use auto or cpu)")
    return torch.device(name)


# oneDNN instruction-set caps (ONEDNN_MAX_CPU_ISA) under which it has no native bf16 kernels
_ONEDNN_ISAS_WITHOUT_BF16 = {
    "SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
}  # fmt: skip


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matrix products run several times faster than fp32 here.

    Without them the CPU emulates bf16 and autocast only slows training down. A oneDNN cap below
    AVX512-BF16 (`ONEDNN_MAX_CPU_ISA=AVX2`, as the suite sets to run as on an AVX2-only CPU)
    counts as no support: the kernels that would use it are switched off.
    """
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in _ONEDNN_ISAS_WITHOUT_BF16:
        return False
    cpu = torch.cpu
    return any(
        getattr(cpu, probe, lambda: False)()
        for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )


def bf16_enabled(device: torch.device, amp: bool) -> bool:
    """Whether `train.amp` turns into bfloat16 autocast on this device."""
    if not amp:
        return False
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16())


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bfloat16 autocast (no loss scaling needed) where it is fast; a no-op elsewhere."""
    if bf16_enabled(device, enabled):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def memory_format(device: torch.device) -> torch.memory_format:
    """channels_last: faster convolutions on tensor cores and in oneDNN's CPU kernels (measured
    1.2-1.7x on the small net at 16-32 px, see docs/benchmarks.md)."""
    return torch.channels_last


def auto_threads() -> int:
    """OMP_NUM_THREADS when set, else the cores this process may use, shared among the processes
    of one run (torchrun sets LOCAL_WORLD_SIZE). More threads than free cores makes torch's
    threads wait on each other: on a loaded two-core machine one thread was 2-17x faster than
    two (docs/benchmarks.md)."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    sharing = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, (cores or 1) // max(1, sharing))


def set_threads(threads: int | str) -> int:
    """Apply `compute.threads` (auto or a number) to torch's intra-op pool; returns the count."""
    count = auto_threads() if threads == "auto" else int(threads)
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count


# glibc's mallopt parameters and their defaults (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM, _DEFAULT_MMAP_MAX = 128 * 1024, 65536


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


@contextlib.contextmanager
def heap_reuse(enabled: bool = True) -> Iterator[None]:
    """Inside, freed tensors stay in the process's heap for the next step to reuse (glibc only).

    By default glibc gives every block over 32 MiB (a batch of AlexNet activations, a bf16 copy
    of its 9216x4096 weight) back to the kernel when it is freed, so each training step pays page
    faults to get the same memory again: about 12% of an AlexNet epoch on the CPU, more in the
    features pass (docs/benchmarks.md). The price is a higher peak (freed blocks are kept, not
    returned); on leaving, the defaults come back and the kept memory is released. A process
    whose allocator the user has tuned (MALLOC_* or GLIBC_TUNABLES) is left as it is.
    """
    tuned = any(k.startswith("MALLOC_") for k in os.environ) or "GLIBC_TUNABLES" in os.environ
    libc = _glibc() if enabled and not tuned else None
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM)
        libc.malloc_trim(0)
