"""Start-up cost: wall seconds of the CLI's light commands, each in a fresh process, beside the
import of torch alone (the floor a step that trains or embeds cannot go under).

    .venv/bin/python benchmarks/startup.py [--data data --repeats 3 --before /tmp/before/ssl]

`--before` times the same commands on another copy of the library too (for instance
`git archive HEAD ssl | tar -x -C /tmp/before`). Runs are interleaved so every command shares the
machine's noise; medians are reported. `uptime` comes first and last (a busy machine shows in it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_flags, uptime

from deepcluster.io import write_json

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RESULTS = ROOT / "benchmarks" / "results" / "startup.json"
FLOOR = "import torch"


def commands(data: Path, work: Path, i: int) -> dict[str, list[str]]:
    """The commands timed; ingest writes into a fresh artifacts folder each time."""
    cli, python = str(BIN / "deepcluster"), sys.executable
    return {
        "deepcluster --help": [cli, "--help"],
        "deepcluster ingest": [cli, "ingest", str(data), "--artifacts", str(work / f"art-{i}"), "-q"],
        "import deepcluster.pipeline": [python, "-c", "import deepcluster.pipeline"],
        "import deepcluster.cli": [python, "-c", "import deepcluster.cli"],
        FLOOR: [python, "-c", "import torch"],
    }


def timed(command: list[str], library: Path) -> float:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(library), str(ROOT)])}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data", help="image folder (digits)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--before", type=Path, help="another copy of ssl/ to time beside this one")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not args.data.is_dir():
        sys.exit(f"--data {args.data}: not a folder (`deepcluster sample-data digits data`)")
    if args.before and not (args.before / "deepcluster").is_dir():
        sys.exit(f"--before {args.before}: holds no deepcluster package")
    load = [uptime()]
    print(load[0])
    print(f"cpu {cpu_flags()} ({os.cpu_count()} CPUs)")
    libraries = {"": ROOT / "ssl"} | ({"before: ": args.before.resolve()} if args.before else {})
    seconds: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="startup-") as tmp:
        for i in range(args.repeats):
            for label, library in libraries.items():
                work = Path(tmp) / (label.strip(": ") or "now")
                for name, command in commands(args.data.resolve(), work, i).items():
                    if not (label and name == FLOOR):  # torch is the same on both sides
                        seconds.setdefault(label + name, []).append(timed(command, library))
    median = {name: statistics.median(times) for name, times in seconds.items()}
    floor = median[FLOOR]
    for name, value in median.items():
        runs = ", ".join(f"{s:.2f}" for s in seconds[name])
        print(f"{name:38s} median {value:5.2f} s  ({runs})  {value / floor:4.2f}x `{FLOOR}`")
    load.append(uptime())
    print(load[-1])
    ratio = {name: value / floor for name, value in median.items()}
    write_json(args.out, {"seconds": seconds, "median_seconds": median, "ratio_to_torch": ratio,
                          "repeats": args.repeats, "cpu": cpu_flags(), "uptime": load})  # fmt: skip
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
