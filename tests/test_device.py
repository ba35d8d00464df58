"""The hardware speed-ups that change how memory and the optimiser work, on this machine's CPU."""

from __future__ import annotations

import ctypes
import os

import pytest
import torch

from deepcluster.device import (
    CpuShare,
    _glibc,
    cgroup_quota,
    choose_threads,
    heap_reuse,
    other_runnable,
    retune_threads,
    threads_for,
)
from deepcluster.train import sgd


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                     "uordblks", "fordblks", "keepcost")
    ]  # fmt: skip


def _mapped_bytes() -> int:
    """Bytes glibc holds in blocks mapped straight from the kernel (returned on free)."""
    libc = _glibc()
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2().hblkhd


@pytest.mark.skipif(_glibc() is None, reason="glibc's allocator only")
def test_large_tensors_come_from_the_heap_inside_heap_reuse_only(monkeypatch) -> None:
    for name in [k for k in os.environ if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"]:
        monkeypatch.delenv(name)  # an allocator tuned by the user is left alone (next test)
    size = 64 << 20  # above glibc's largest mmap threshold (32 MiB)
    before = _mapped_bytes()
    outside = torch.empty(size, dtype=torch.uint8)
    assert _mapped_bytes() - before >= size  # the default: a fresh mapping, faulted in on use
    del outside
    with heap_reuse():
        before = _mapped_bytes()
        inside = torch.empty(size, dtype=torch.uint8)
        assert _mapped_bytes() - before < size
        del inside
    before = _mapped_bytes()
    after = torch.empty(size, dtype=torch.uint8)
    assert _mapped_bytes() - before >= size  # the defaults are back
    del after


@pytest.mark.skipif(_glibc() is None, reason="glibc's allocator only")
def test_an_allocator_the_user_tuned_is_left_alone(monkeypatch) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    with heap_reuse():
        before = _mapped_bytes()
        inside = torch.empty(64 << 20, dtype=torch.uint8)
        assert _mapped_bytes() - before >= 64 << 20
        del inside


def test_fused_sgd_takes_the_same_steps_as_torchs_reference_loop() -> None:
    def run(fused: bool) -> torch.Tensor:
        torch.manual_seed(0)
        weights = [torch.nn.Parameter(torch.randn(300, 200)), torch.nn.Parameter(torch.randn(50))]
        if fused:
            opt = sgd(weights, torch.device("cpu"), lr=0.05, momentum=0.9, weight_decay=1e-4)
            assert opt.defaults["fused"]
        else:
            opt = torch.optim.SGD(weights, lr=0.05, momentum=0.9, weight_decay=1e-4)
        grads = torch.Generator().manual_seed(1)
        for _ in range(20):
            for w in weights:
                w.grad = torch.randn(w.shape, generator=grads)
            opt.step()
        return torch.cat([w.detach().flatten() for w in weights])

    torch.manual_seed(0)
    start = torch.cat([torch.randn(300, 200).flatten(), torch.randn(50)])
    reference, fused = run(False), run(True)
    assert (reference - start).abs().mean() > 0.1  # the steps moved the weights
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-6)


def test_a_onednn_cap_below_avx512_bf16_turns_bf16_autocast_off() -> None:
    """`ONEDNN_MAX_CPU_ISA=AVX2` is how the suite runs as on a CPU without bf16 (make
    test-numerics): autocast must then stay off, as it does on such a CPU."""
    import subprocess
    import sys

    probe = "from deepcluster.device import bf16_enabled; import torch; "
    probe += "print(bf16_enabled(torch.device('cpu'), True))"
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=False
    )
    assert out.stdout.strip() == "False", out.stderr


# ---------------------------------------------------------------------------------------------
# compute.threads: auto on a shared machine


@pytest.mark.parametrize(
    ("share", "threads"),
    [
        (CpuShare(cores=2), 2),  # an idle machine: every core
        (CpuShare(cores=2, others=1.0), 1),  # one busy process: the core left
        (CpuShare(cores=2, others=0.1), 2),  # a short-lived command now and then is no reason
        (CpuShare(cores=2, others=0.3), 2),  # a process busy a third of the time: two still faster
        (CpuShare(cores=2, others=0.6), 1),  # half a core taken: a thread would wait for it
        (CpuShare(cores=2, others=9.0), 1),  # never none
        (CpuShare(cores=2, quota=1.5), 1),
        (CpuShare(cores=2, quota=1.9), 2),
        (CpuShare(cores=64, quota=4.0), 4),
        (CpuShare(cores=8, processes=4), 2),  # torchrun: the cores shared among the ranks
        (CpuShare(cores=8, others=6.0, processes=4), 2),  # the three other ranks' threads
        (CpuShare(cores=8, others=7.0, processes=4), 1),  # ... and one busy process
    ],
)
def test_auto_threads_are_the_cores_nobody_else_is_running_on(share, threads) -> None:
    assert threads_for(share) == threads


@pytest.mark.parametrize(
    ("files", "cpus"),
    [
        ({"cpu.max": "150000 100000\n"}, 1.5),  # cgroup v2
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 0.5),  # v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
    ],
)
def test_the_cgroup_cpu_quota_is_read_from_v2_and_v1_files(tmp_path, files, cpus) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    membership = tmp_path / "self-cgroup"
    membership.write_text("2:cpu,cpuacct:/\n0::/\n")
    assert cgroup_quota(tmp_path, membership) == cpus


def test_a_busy_process_counts_as_another_runnable_one() -> None:
    import subprocess
    import sys
    import time

    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # started and spinning
        assert other_runnable() >= 0.8
    finally:
        busy.kill()
        busy.wait()


@pytest.fixture
def torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_a_number_wins_over_omp_num_threads_which_wins_over_auto(monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert choose_threads(5)[0] == 5
    assert choose_threads("auto") == (3, "OMP_NUM_THREADS")


def test_the_recheck_changes_torchs_count_and_says_so_once(torch_threads) -> None:
    import faiss

    torch.set_num_threads(2)
    assert retune_threads(1) == "threads 2 -> 1: compute.threads"
    assert torch.get_num_threads() == 1
    assert faiss.omp_get_max_threads() == 1  # k-means runs in faiss's own OpenMP pool
    assert retune_threads(1) is None  # unchanged: nothing to log


def test_training_rechecks_the_threads_each_epoch(ingested, tmp_path, torch_threads) -> None:
    from deepcluster import pipeline, progress
    from deepcluster.train import train
    from tests.conftest import fast_params

    manifest, images = pipeline.ingested(ingested)
    raw = fast_params(train={"epochs": 1}, compute={"threads": 1})
    params, _ = pipeline.resolve_params(raw, manifest, images)
    torch.set_num_threads(2)
    lines: list[str] = []
    with progress.lines_to(lines.append):
        train(params, images, tmp_path / "run", progress=True)
    assert torch.get_num_threads() == 1
    assert lines[0] == "threads 2 -> 1: compute.threads"
