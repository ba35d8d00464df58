"""Training on a shared machine: epoch time beside one busy process over epoch time alone.

    PYTHONPATH=ssl .venv/bin/python benchmarks/shared_machine.py --out benchmarks/results/shared_machine.json

Each arm trains the digits (params.yaml's defaults, a few epochs) in its own process, alone and
then beside a `while True: pass` process; the median epoch's `seconds` is compared. `auto` is
`compute.threads: auto` as shipped (load-aware, re-checked each epoch); `old` is the former rule
(all the cores); `one` is one thread; `auto_passive` adds OpenMP's passive wait (tried: slower
alone, not kept). `--duty 0.3` makes the other process busy 30% of each 100 ms instead of always.
Fair sharing of the cores costs 2x; collapse is more. The last lines are `shared_ratio_auto X.XX`
and `shared_ratio_old X.XX`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from machine import cpu_flags, uptime

ROOT = Path(__file__).resolve().parents[1]
OMP_KEYS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
# env and compute.threads of each arm, each from a clean OpenMP environment
ARMS = {
    "auto": ({}, "auto"),
    "old": ({}, str(os.cpu_count() or 1)),
    "one": ({}, "1"),  # one thread whatever the load: what auto picks beside a busy process
    "auto_passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, "auto"),  # tried, not kept: slower alone
}


def worker(art_root: Path, out_dir: Path, threads: str, epochs: int) -> None:
    """One training in this process; prints the epochs' seconds as JSON (the last line)."""
    from deepcluster import pipeline, progress
    from deepcluster.config import load_params
    from deepcluster.paths import Artifacts
    from deepcluster.train import train

    count = int(threads) if threads.isdigit() else threads
    params = load_params(None, {"train.epochs": epochs, "compute.device": "cpu",
                                "compute.threads": count})  # fmt: skip
    manifest, images = pipeline.ingested(Artifacts(art_root))
    resolved, _ = pipeline.resolve_params(params, manifest, images)
    lines: list[str] = []
    with progress.lines_to(lines.append):
        result = train(resolved, images, out_dir, progress=True)
    print(json.dumps({"seconds": [h.seconds for h in result.history], "log": lines}))


def hog_command(duty: float) -> list[str]:
    """A process busy `duty` of the time: spins, then sleeps, in 100 ms periods (1.0: always)."""
    if duty >= 1.0:
        return [sys.executable, "-c", "while True: pass"]
    loop = (f"import time\nwhile True:\n    end = time.perf_counter() + {duty * 0.1}\n"
            f"    while time.perf_counter() < end: pass\n    time.sleep({(1 - duty) * 0.1})")  # fmt: skip
    return [sys.executable, "-c", loop]


def run_arm(arm: str, art_root: Path, epochs: int, busy: float, scratch: Path) -> dict:
    extra, threads = ARMS[arm]
    env = {k: v for k, v in os.environ.items() if k not in OMP_KEYS} | extra
    env["PYTHONPATH"] = str(ROOT / "ssl")
    out_dir = Path(tempfile.mkdtemp(dir=scratch))
    hog = subprocess.Popen(hog_command(busy)) if busy else None
    try:
        cmd = [sys.executable, __file__, "--worker", str(art_root), str(out_dir), threads,
               str(epochs)]  # fmt: skip
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    if done.returncode != 0:
        raise SystemExit(f"{arm} failed:\n{done.stderr[-3000:]}")
    record = json.loads(done.stdout.strip().splitlines()[-1])
    record["median"] = statistics.median(record["seconds"])
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--arms", default="auto,old", help=f"comma-separated, of {', '.join(ARMS)}")
    ap.add_argument("--duty", type=float, default=1.0,
                    help="share of the time the busy process runs (default 1.0: always)")  # fmt: skip
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    arms = args.arms.split(",")
    if unknown := [a for a in arms if a not in ARMS]:
        raise SystemExit(f"--arms: unknown {', '.join(unknown)} (known: {', '.join(ARMS)})")
    print(f"before: {uptime()}\ncpu {cpu_flags()}", flush=True)
    from deepcluster import pipeline
    from deepcluster.config import load_params
    from deepcluster.io import write_json
    from deepcluster.paths import Artifacts
    from deepcluster.sample import export_digits

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        export_digits(scratch / "digits")
        art = Artifacts(scratch / "art")
        pipeline.ingest(scratch / "digits", load_params(None), art, show=False)
        for arm in arms:
            alone = run_arm(arm, art.root, args.epochs, 0.0, scratch)
            beside = run_arm(arm, art.root, args.epochs, args.duty, scratch)
            ratio = beside["median"] / alone["median"]
            results[arm] = {"alone": alone, "beside_busy": beside, "ratio": ratio}
            print(f"{arm:18s} alone {alone['median']:6.2f} s  beside busy "
                  f"{beside['median']:6.2f} s  ratio {ratio:.2f}  {beside['log']}", flush=True)  # fmt: skip
            if args.out is not None:  # after each arm: a long run keeps what it measured
                write_json(args.out, {"cpu": cpu_flags(), "uptime": uptime(), "epochs": args.epochs,
                                      "arms": results})  # fmt: skip
    after = uptime()
    print(f"after: {after}")
    print(f"{'arm':18s} {'alone s':>8s} {'busy s':>8s} {'ratio':>6s}")
    for arm, r in results.items():
        print(f"{arm:18s} {r['alone']['median']:8.2f} {r['beside_busy']['median']:8.2f} "
              f"{r['ratio']:6.2f}")  # fmt: skip
    for arm, r in results.items():
        print(f"shared_ratio_{arm} {r['ratio']:.2f}")


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--worker":
        worker(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
    else:
        main()
