"""Orchestration overhead: the whole graph through Dagster vs the same steps through the CLI.

DAGSTER is `python -m orchestration materialize`: a real Dagster instance (sqlite, in a temporary
DAGSTER_HOME), the data observation job, then every asset and check of `deepcluster_job`, including
the registration in MLflow. CLI is `deepcluster run` followed by `deepcluster register`: the same
library steps, the same MLflow logging and registration, no Dagster. Both start from the same image
folder and params, each in a fresh artifacts folder and MLflow store, as separate processes (so both
pay their imports, as a user does). Runs are interleaved (cli, dagster, cli, ...) so both share the
machine's noise; medians are reported.

    .venv/bin/python benchmarks/orchestration_overhead.py --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RESULTS = ROOT / "benchmarks" / "results" / "orchestration_overhead.json"


def commands(data: Path, params: Path, art: Path) -> dict[str, list[list[str]]]:
    cli = str(BIN / "deepcluster")
    return {
        "cli": [
            [cli, "run", str(data), "--params", str(params), "--artifacts", str(art), "--quiet"],
            [cli, "register", "--artifacts", str(art)],
        ],
        "dagster": [
            [sys.executable, "-m", "orchestration", "materialize", "--params", str(params)]
            + ["--data", str(data), "--artifacts", str(art)]
        ],
    }


def timed(side: str, data: Path, params: Path, work: Path, i: int) -> float:
    """Wall seconds of one whole pipeline run of `side`, in fresh stores under `work`."""
    run_dir = work / f"{side}-{i}"
    run_dir.mkdir()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{run_dir / 'mlflow.db'}",
        "DAGSTER_HOME": str(run_dir / "dagster_home"),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "ssl"), str(ROOT)]),
    }
    start = time.perf_counter()
    for command in commands(data, params, run_dir / "artifacts")[side]:
        done = subprocess.run(
            command, check=False, cwd=run_dir, env=env, capture_output=True, text=True
        )
        if done.returncode != 0:
            output = done.stdout[-2000:] + done.stderr[-2000:]
            sys.exit(f"{side} failed: {' '.join(command)}\n{output}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="image folder (default: the digits sample)")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    times: dict[str, list[float]] = {"cli": [], "dagster": []}
    with tempfile.TemporaryDirectory(prefix="orchestration-overhead-") as tmp:
        work = Path(tmp)
        data = args.data
        if data is None:
            data = work / "digits"
            subprocess.run(
                [str(BIN / "deepcluster"), "sample-data", "digits", str(data)], check=True
            )
        for i in range(args.repeats):
            for side, seconds in times.items():
                seconds.append(timed(side, data.resolve(), args.params.resolve(), work, i))
                print(f"run {i + 1}/{args.repeats} {side}: {seconds[-1]:.1f} s", flush=True)
    median = {side: statistics.median(t) for side, t in times.items()}
    ratio = median["dagster"] / median["cli"]
    print(
        f"\nwhole pipeline, median of {args.repeats}: CLI {median['cli']:.1f} s, "
        f"Dagster {median['dagster']:.1f} s; Dagster / CLI = {ratio:.2f}x "
        f"(overhead {median['dagster'] - median['cli']:+.1f} s per run, {os.cpu_count()} CPUs)"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps({"seconds": times, "median_seconds": median, "ratio": ratio}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
