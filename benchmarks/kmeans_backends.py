"""faiss k-means against torch k-means (deepcluster/torch_kmeans.py) on this CPU.

    PYTHONPATH=ssl .venv/bin/python benchmarks/kmeans_backends.py [--n 20000 --d 128 --k 1000]

The data are unit-norm points around 2k random centres (as whitened, L2-normalised features are);
both backends get the same seed, 20 iterations, one run. One line each: wall time and objective.
`uptime` comes first and last (a busy machine shows in its load), then the CPU's flags that decide
the matmul kernels (avx2, avx512f, avx512_bf16, amx).
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np
import torch
from machine import cpu_flags, uptime

from deepcluster import cluster, torch_kmeans


def data(n: int, d: int, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(2 * k, d))
    x = centres[rng.integers(0, 2 * k, n)] + 0.5 * rng.normal(size=(n, d))
    return cluster.l2_normalize(x.astype(np.float32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--k", type=int, default=1_000)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    print(uptime())
    print(
        f"cpu {cpu_flags()} threads torch={torch.get_num_threads()} faiss={faiss.omp_get_max_threads()}"
    )
    x = data(args.n, args.d, args.k)
    shape = f"n={args.n} d={args.d} k={args.k} iters={args.iters}"
    for name, run in (
        ("faiss", lambda: cluster.kmeans(x, args.k, args.iters, seed=0)),
        ("torch", lambda: torch_kmeans.kmeans(x, args.k, args.iters, seed=0)),
    ):
        start = time.perf_counter()
        _, obj = run()
        print(f"{name:5s} {shape} time {time.perf_counter() - start:7.2f} s objective {obj:.2f}")
    print(uptime())


if __name__ == "__main__":
    main()
