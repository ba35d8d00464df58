"""Device choice, torch's thread count and the hardware speed-ups (bf16 autocast, channels_last)."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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


# A fractional limit rounds up when nearly whole (1.8 CPUs -> 2 threads), not when half: under a
# 1.5-CPU quota one thread ran 3.9-4.3 s an epoch, two 4.6-4.7 s.
_QUOTA_SLACK = 0.25
# Other processes cost a thread once they take over half a core: beside a process busy 30% of the
# time two threads ran 4.4 s an epoch against one's 5.4, at 70% 5.8 against 4.1, and at 50% each
# won once (docs/benchmarks.md, "A shared machine")
_LOAD_SLACK = 0.5
_LOAD_SAMPLES, _LOAD_GAP_S = 10, 0.005  # about 50 ms per check: a mean, not one instant
_CGROUP = Path("/sys/fs/cgroup")
_MEMBERSHIP = Path("/proc/self/cgroup")


@dataclass(frozen=True)
class CpuShare:
    """What this process may use of the CPU now: the inputs of `threads_for`."""

    cores: int  # CPUs in this process's affinity mask
    quota: float | None = None  # the cgroup's CPU limit, in CPUs (None: no limit)
    others: float = 0.0  # runnable threads of other processes on those cores (a mean)
    processes: int = 1  # processes of one run sharing the cores (torchrun's LOCAL_WORLD_SIZE)

    def reason(self) -> str:
        parts = [f"{self.others:.1f} other runnable processes"]
        if self.quota is not None and self.quota < self.cores:
            parts.append(f"cgroup quota {self.quota:g} CPUs")
        if self.processes > 1:
            parts.append(f"{self.processes} processes of this run")
        return ", ".join(parts)


def threads_for(share: CpuShare) -> int:
    """As many threads as get a core each, a core less than half taken by others counting as
    free. torch's threads meet at a barrier after every operation, so one thread waiting for a
    core stalls them all: beside one busy process, two threads on two cores ran 3.4-3.9x slower
    than alone (benchmarks/shared_machine.py)."""
    capacity = share.cores if share.quota is None else min(share.cores, share.quota)
    fair = int(capacity / max(1, share.processes) + _QUOTA_SLACK)
    free = int(capacity - share.others + _LOAD_SLACK)
    return max(1, min(fair, free))


def cgroup_quota(root: Path = _CGROUP, membership: Path = _MEMBERSHIP) -> float | None:
    """The CPU limit of this process's cgroup in CPUs: v2 `cpu.max`, v1 `cpu.cfs_quota_us`."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        _, controllers, group = line.split(":", 2)
        group = group.lstrip("/")
        if controllers == "":
            folders, names = [root / group, root], ("cpu.max",)
        elif "cpu" in controllers.split(","):
            v1 = [root / name for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu")]
            folders = [f / group for f in v1] + v1
            names = ("cpu.cfs_quota_us", "cpu.cfs_period_us")
        else:
            continue
        limits += [q for q in (_read_quota(f, names) for f in folders) if q is not None]
    return min(limits, default=None)


def _read_quota(folder: Path, names: tuple[str, ...]) -> float | None:
    try:
        fields = " ".join((folder / name).read_text() for name in names).split()
        quota, period = fields[0], float(fields[1])
    except (OSError, IndexError, ValueError):
        return None
    if quota in ("max", "-1") or period <= 0:
        return None
    return float(quota) / period


def other_runnable() -> float:
    """Runnable threads of other processes, a mean over a few instants: the kernel's count of
    runnable threads (/proc/loadavg) less this process's own. Elsewhere: the 1-minute load
    average less torch's threads."""
    try:
        samples = []
        for _ in range(_LOAD_SAMPLES):
            running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
            samples.append(max(0, running - _own_running()))
            time.sleep(_LOAD_GAP_S)
        return sum(samples) / len(samples)
    except (OSError, IndexError, ValueError):
        return max(0.0, os.getloadavg()[0] - torch.get_num_threads())


def _own_running() -> int:
    count = 0
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            stat = (task / "stat").read_text()
            count += stat[stat.rindex(")") + 2] == "R"  # the state follows the command name
    return count


def cpu_share() -> CpuShare:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    everywhere = os.cpu_count() or 1
    # the load counts every CPU's threads; on a subset, only its part competes with us
    others = other_runnable() * min(1.0, (cores or 1) / everywhere)
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return CpuShare(cores or 1, cgroup_quota(), others, max(1, processes))


def choose_threads(threads: int | str) -> tuple[int, str]:
    """`compute.threads` as a count, and why: a number wins, then OMP_NUM_THREADS, then `auto`
    (the cores and quota this process may use, less the other processes running on them)."""
    if threads != "auto":
        return int(threads), "compute.threads"
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"])), "OMP_NUM_THREADS"
    share = cpu_share()
    return threads_for(share), share.reason()


def auto_threads() -> int:
    return choose_threads("auto")[0]


def set_threads(threads: int | str) -> int:
    """Apply `compute.threads` (auto or a number) to torch's intra-op pool; returns the count."""
    return _apply(choose_threads(threads)[0])


def retune_threads(threads: int | str) -> str | None:
    """`set_threads` again, as the load changes (once an epoch); the line to log when the count
    changed ("threads 2 -> 1: 1.0 other runnable processes"), else None."""
    before = torch.get_num_threads()
    count, reason = choose_threads(threads)
    if _apply(count) == before:
        return None
    return f"threads {before} -> {count}: {reason}"


def _apply(count: int) -> int:
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    faiss = sys.modules.get("faiss")  # its own OpenMP runtime: k-means would keep the old count
    if faiss is not None and hasattr(faiss, "omp_set_num_threads"):
        faiss.omp_set_num_threads(count)
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
