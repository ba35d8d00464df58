"""The hardware speed-ups that change how memory and the optimiser work, on this machine's CPU."""

from __future__ import annotations

import ctypes
import os

import pytest
import torch

from deepcluster.device import _glibc, heap_reuse
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
