"""Memory of a training epoch as the data grows: O(batch) beyond the image cache and the features;
and as k grows: the heads and centroids only (`--ks`).

    PYTHONPATH=ssl .venv/bin/python benchmarks/memory.py --sizes 2000 8000 32000
    PYTHONPATH=ssl .venv/bin/python benchmarks/memory.py --ks 100 1000 10000 --method deepercluster

For each size, the digits (replicated: same pixels, different bytes) are ingested at 28 px and one
epoch of the default training (DeepCluster-v2) runs in a fresh process, `deepcluster train`, whose
peak resident memory is read from the kernel (ru_maxrss). The image cache is memory-mapped, so the
pages an epoch touches count in that figure; the embeddings and v2's memory bank grow with the
data too. The last column is what is left once those are taken out: it must not grow with the
number of images.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from epoch_throughput import make_dataset

ROOT = Path(__file__).resolve().parents[1]
MEASURE = (
    "import resource, subprocess, sys\n"
    "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
    "sys.stderr.write(done.stderr[-2000:] if done.returncode else '')\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    "sys.exit(done.returncode)\n"
)


def peak_rss_mb(command: list[str], cwd: Path, env: dict) -> float:
    """Peak resident memory of `command`, in MiB, measured in a process of its own."""
    done = subprocess.run([sys.executable, "-c", MEASURE, *command], cwd=cwd, env=env,
                          capture_output=True, text=True, check=True)  # fmt: skip
    return int(done.stdout.split()[-1]) / 1024  # ru_maxrss is in KiB on Linux


def by_k(ks: list[int], method: str, images: int, env: dict, cli: list[str]) -> None:
    """One epoch at each k on the same images: peak RSS, and its ratio to the smallest k's."""
    print(f"{method}, {images} images (digits replicated), one epoch; k, peak RSS MiB, ratio")
    first = None
    with tempfile.TemporaryDirectory(prefix="memory-k-") as tmp:
        work = Path(tmp)
        make_dataset(work / "images", images)
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
        subprocess.run([*cli, "ingest", str(work / "images"), "-q", "-S", "data.resolution=28"],
                       cwd=work, env=env, check=True, capture_output=True)  # fmt: skip
        for k in ks:
            sets = [f"model.method={method}", f"cluster.k={k}", "train.epochs=1",
                    "data.resolution=28"]  # fmt: skip
            peak = peak_rss_mb([*cli, "train", "-q", "--fresh", *(f"-S{s}" for s in sets)],
                               work, env)  # fmt: skip
            first = first or peak
            print(f"k {k:>6}  peak RSS {peak:>7.0f} MiB  {peak / first:.2f}x k={ks[0]}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000, 32000])
    p.add_argument("--ks", type=int, nargs="+", help="measure these k instead of sizes")
    p.add_argument("--method", default="deepercluster", help="with --ks")
    p.add_argument("--images", type=int, default=20_000, help="with --ks (at least the largest k)")
    args = p.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "ssl"), "MLFLOW_TRACKING_URI": ""}
    cli = [sys.executable, "-m", "deepcluster.cli"]
    print(subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip())
    if args.ks:
        by_k(args.ks, args.method, args.images, env, cli)
        print(subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip())
        return
    print(f"{'images':>8}{'peak RSS MiB':>14}{'cache MiB':>11}{'features MiB':>14}{'the rest MiB':>14}")
    for n in args.sizes:
        with tempfile.TemporaryDirectory(prefix="memory-") as tmp:
            work = Path(tmp)
            make_dataset(work / "images", n)
            (work / "params.yaml").write_text(yaml.safe_dump({"train": {"epochs": 1}}))
            env["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
            subprocess.run([*cli, "ingest", str(work / "images"), "-q"], cwd=work, env=env,
                           check=True, capture_output=True)  # fmt: skip
            baseline = peak_rss_mb([*cli, "--help"], work, env)  # imports alone
            peak = peak_rss_mb([*cli, "train", "-q"], work, env)
            cache = (work / "artifacts/cache/images.npy").stat().st_size / 2**20
            features = n * 128 * 4 * 3 / 2**20  # embeddings + v2's two-view memory bank
            rest = peak - baseline - cache - features
            print(f"{n:>8}{peak:>14.0f}{cache:>11.1f}{features:>14.1f}{rest:>14.0f}", flush=True)
    print(f"(the rest: peak minus the imports ({baseline:.0f} MiB), the cache and the features)")
    print(subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip())


if __name__ == "__main__":
    main()
