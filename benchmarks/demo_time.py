"""The demo's cost and whether it still learns: `deepcluster run` on a copy of data/ with params.yaml
at the demo's budget (`deepcluster.config.DEMO`, what `make demo` trains) unless -S says otherwise.

    PYTHONPATH=ssl .venv/bin/python benchmarks/demo_time.py --out benchmarks/results/demo_time.json
    PYTHONPATH=ssl .venv/bin/python benchmarks/demo_time.py --isa avx2 -S train.epochs=20

Each run trains from scratch in a temporary folder (own MLflow store), once with the CPU capped at
AVX2 (fp32, as on a CPU without AVX512-BF16/AMX) and once as the CPU is. Printed per run: wall and
CPU-seconds (the whole `run`, all threads), `uptime`, the CPU's flags, every figure of the report
beside its two baselines, and `beats_baselines`: the trained value is better than both on each.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu, uptime

from deepcluster import figures
from deepcluster.config import DEMO
from deepcluster.paths import Artifacts

ROOT = Path(__file__).resolve().parents[1]
# what PyTorch and oneDNN may use: "avx2" is a CPU without AVX512-BF16 or AMX (bf16 autocast off)
ISAS = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}, "native": {}}

def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_demo(isa: str, params: Path, overrides: list[str], work: Path) -> dict:
    """One `deepcluster run` of a fresh copy of data/; its seconds, printout and metrics.json."""
    data, artifacts = work / "data", work / "artifacts"
    shutil.copytree(ROOT / "data", data)
    env = {**os.environ, **ISAS[isa], "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    command = [str(ROOT / ".venv/bin/deepcluster"), "run", str(data), "-p", str(params),
               "-a", str(artifacts), "-q", *[a for o in overrides for a in ("-S", o)]]  # fmt: skip
    before, wall, cpu0 = uptime(), time.perf_counter(), children_cpu()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    wall, cpu_s = time.perf_counter() - wall, children_cpu() - cpu0
    if done.returncode != 0:
        sys.exit(f"{isa}: deepcluster run failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    metrics = json.loads(Artifacts(artifacts).metrics.read_text())
    steps = next((line for line in done.stdout.splitlines() if line.startswith("time:")), "")
    return {"isa": isa, "overrides": overrides, "wall_s": round(wall, 1), "cpu_s": round(cpu_s, 1),
            "uptime_before": before, "uptime_after": uptime(), "steps": steps,
            "figures": compared(metrics), "beats_baselines": beats(metrics),
            "training_collapse": metrics.get("training_collapse")}  # fmt: skip


def compared(metrics: dict) -> list[dict]:
    """Each report figure beside its baselines, with the trained value's lead over the better one
    (negative: a baseline is as good or better); `shortcut` is lower-is-better."""
    rows = []
    for row in figures.beside_baselines(metrics):
        bases = [row["random_init"], row["pixels"]]
        if None in bases:
            continue
        higher = figures.FIGURES[row["metric"]].higher_is_better
        lead = row["trained"] - max(bases) if higher else min(bases) - row["trained"]
        rows.append({**row, "lead": round(lead, 4)})
    return rows


def beats(metrics: dict) -> bool:
    rows = compared(metrics)
    return bool(rows) and all(row["lead"] > 0 for row in rows)


def show(result: dict) -> None:
    print(f"== {result['isa']}  {' '.join(result['overrides']) or '(params as given)'}")
    print(f"wall {result['wall_s']} s, CPU {result['cpu_s']} s   {result['steps']}")
    print(f"uptime before: {result['uptime_before']}\nuptime after:  {result['uptime_after']}")
    for r in result["figures"]:
        print(f"{r['metric']:15s} {r['trained']:.3f}   random init {r['random_init']:.3f}   "
              f"raw pixels {r['pixels']:.3f}   lead {r['lead']:+.3f}")  # fmt: skip
    if result["training_collapse"]:
        print(result["training_collapse"])
    print(f"beats_baselines {str(result['beats_baselines']).lower()}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--isa", nargs="+", choices=list(ISAS), default=list(ISAS))
    ap.add_argument("-p", "--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("-S", "--set", dest="overrides", action="append", default=[],
                    help="overrides instead of the demo's budget, e.g. train.epochs=20")  # fmt: skip
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args()
    overrides = args.overrides or [f"{key}={value}" for key, value in DEMO.items()]
    machine = cpu()
    print(f"CPU: {machine['model']}, {machine['cores']} cores, flags {' '.join(machine['flags'])}")
    results = []
    for isa in args.isa:
        with tempfile.TemporaryDirectory(prefix="demo-time-") as tmp:
            results.append(run_demo(isa, args.params.resolve(), overrides, Path(tmp)))
        show(results[-1])
    if args.out:
        from deepcluster.io import write_json

        write_json(args.out, {"cpu": machine, "runs": results})
        print(f"results in {args.out}")


if __name__ == "__main__":
    main()
