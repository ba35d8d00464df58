"""Time to quality: the CPU-seconds our defaults need to reach the conventional design's final kNN
and linear-probe accuracy, both sides trained in the same run on the same machine.

    PYTHONPATH=ssl .venv/bin/python benchmarks/time_to_quality.py                 # MNIST-5k
    PYTHONPATH=ssl .venv/bin/python benchmarks/time_to_quality.py --set digits --probe-every 2
    PYTHONPATH=ssl .venv/bin/python benchmarks/time_to_quality.py --variants v2 v2-one-crop --epochs 6

CONVENTIONAL is the reference DeepCluster design (`epoch_throughput.Conventional`: PNG files
decoded by PIL in a DataLoader, per-sample transforms, fp32, torch's SGD) with v1's auto settings
for v1's auto number of epochs; its final network is probed once. OURS is `params.yaml` as a user
runs it (the auto values, DeepCluster-v2), then v1 at our auto settings (the conventional
side's own design, our implementation), each probed every `--probe-every` epochs: `train` stops
there and resumes from its checkpoint, bit for bit the uninterrupted run. The probes are the
evaluation step's (kNN top-1 and the linear probe on the backbone, the same held-out 30%), and
their time is not counted. CPU-seconds are process time, DataLoader workers included.
Per method, `time_to_quality_speedup[method]`: the conventional side's CPU-seconds over ours to
reach both of its figures (0.00 when ours did not reach them); the last line,
`time_to_quality_speedup X.XX`, is our defaults' (params.yaml's method).
With --variants, ablation variants (benchmarks/ablations.py) are probed every epoch against the
conventional figures of the last full run: where each one's time to quality goes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
from pathlib import Path

import ablations
import epoch_throughput as et
import machine
import psutil
import quality

from deepcluster import evaluate
from deepcluster.device import set_threads
from deepcluster.train import train

PROBES = ("knn_top1", "linear_top1")
RESULTS = quality.ROOT / "benchmarks/results/time_to_quality.json"
VARIANT_RESULTS = quality.ROOT / "benchmarks/results/time_to_quality-variants.json"
METHODS = ("deepcluster", "deepcluster-v2", "deepercluster")


def cpu_seconds() -> float:
    """User + system time of this process and its live children (the DataLoader workers)."""
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


def probe(model, ds: quality.Dataset, params) -> dict[str, float]:
    """kNN and linear probe on the backbone, the evaluation step's split and budgets."""
    views = evaluate.network_views(model, ds.images, params, show=False)
    keep = evaluate.with_class(ds.labels)
    labels, feats, e = ds.labels[keep], views.probes[keep], params.eval
    train_idx, test_idx = evaluate.split(len(labels), labels, e.test_fraction, params.train.seed)
    return evaluate.feature_scores(feats, labels, train_idx, test_idx, e.knn_k, e.probe_epochs)


def conventional(ds: quality.Dataset, seed: int, work: Path) -> dict:
    """The reference design trained for v1's auto epochs: its CPU-seconds and final figures."""
    params = quality.resolved(quality.default_params({"model.method": "deepcluster", "train.seed": seed}), ds)
    folder = quality.CACHE / ds.name / "images"
    paths = [folder / path for path in ds.manifest["path"]]
    tuning = et.tune_workers(params, paths, ds.images, work)
    workers = min(tuning, key=tuning.get)
    side = et.Conventional(params, paths, workers, ds.images)
    began = cpu_seconds()
    for epoch in range(params.train.epochs):
        side.epoch(work / "conventional.pt")
        print(f"conventional epoch {epoch + 1}/{params.train.epochs}", flush=True)
    spent = cpu_seconds() - began
    scores = probe(side.model, ds, params)
    return {"epochs": params.train.epochs, "workers": workers, "cpu_seconds": spent, **scores}


def ours(ds: quality.Dataset, work: Path, targets: dict, every: int, name: str, params, last: int) -> dict:
    """`params` trained as `name`, probed every `every` epochs until both targets are reached or
    epoch `last` (at most the schedule's end) is probed."""
    total, spent, probes, reached = params.train.epochs, 0.0, [], {}
    last = min(last, total)
    for stop in [*range(every, last, every), last]:
        began = cpu_seconds()
        result = train(params, ds.images, work / name, ds.labels, stop_after=stop, progress=False)
        spent += cpu_seconds() - began
        scores = probe(result.model, ds, params)
        probes.append({"epoch": stop, "cpu_seconds": spent, **scores})
        print(f"{name} epoch {stop}/{total}: {spent:.0f} CPU-s, " + ", ".join(
            f"{k} {scores[k]:.3f}" for k in PROBES), flush=True)  # fmt: skip
        for key in PROBES:
            if key not in reached and scores[key] >= targets[key]:
                reached[key] = {"epoch": stop, "cpu_seconds": spent}
        if len(reached) == len(PROBES):
            break
    return {"method": params.model.method, "epochs": total, "probes": probes, "reached": reached}


def method_run(ds: quality.Dataset, seed: int, work: Path, targets: dict, every: int, method: str) -> dict:
    """`method` at our auto settings."""
    params = quality.resolved(quality.default_params({"train.seed": seed, "model.method": method}), ds)
    return ours(ds, work, targets, every, method, params, params.train.epochs)


def variants(args, targets: dict) -> int:
    """`--variants`: each ablation variant (benchmarks/ablations.py) at the auto settings, probed
    every epoch up to `--epochs`; kept in --out by name, merged with the runs already there."""
    for name in args.variants:
        description, overrides, hook = ablations.VARIANTS[name]
        params, ds = ablations.params_for(overrides, args.set, None, args.seed)  # ds: the cached set
        with tempfile.TemporaryDirectory(prefix="ttq-") as tmp, hook() if hook else contextlib.nullcontext():
            side = ours(ds, Path(tmp), targets, 1, name, params, args.epochs or params.train.epochs)
        record = json.loads(args.out.read_text()) if args.out.exists() else {}  # another run's rows
        record[f"{name}:{args.seed}"] = {"description": description, **side, "targets": targets,
                                         "cpu": machine.cpu(), "uptime": machine.uptime()}  # fmt: skip
        args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(variant_table(json.loads(args.out.read_text()), args.seed))
    return 0


def variant_table(record: dict, seed: int) -> str:
    """kNN (linear) per epoch for each variant of `seed`, and its CPU-seconds per epoch."""
    rows = {k: v for k, v in record.items() if k.endswith(f":{seed}")}
    epochs = max((len(v["probes"]) for v in rows.values()), default=0)
    lines = ["| variant | " + " | ".join(f"epoch {e + 1}" for e in range(epochs)) + " | CPU-s / epoch |",
             "|" + " --- |" * (epochs + 2)]  # fmt: skip
    for v in rows.values():
        cells = [f"{p['knn_top1']:.3f} ({p['linear_top1']:.3f})" for p in v["probes"]]
        per_epoch = v["probes"][-1]["cpu_seconds"] / v["probes"][-1]["epoch"]
        lines.append(f"| {v['description']} | " + " | ".join(cells + [""] * (epochs - len(cells)))
                     + f" | {per_epoch:.0f} |")  # fmt: skip
    return "\n".join(lines)


def speedups(theirs: dict, mine: dict) -> dict[str, float]:
    """The conventional side's CPU-seconds over ours to reach each of its figures (0: not reached)."""
    hits = mine["reached"]
    return {k: theirs["cpu_seconds"] / hits[k]["cpu_seconds"] if k in hits else 0.0 for k in PROBES}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", default="mnist5k", choices=["digits", "mnist5k"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--probe-every", type=int, default=5)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=None,
                        help="our methods to time, each at its auto settings (default: params.yaml's, "
                             "then v1, the conventional side's own design)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: auto)")
    parser.add_argument("--variants", nargs="+", choices=list(ablations.VARIANTS), default=None, metavar="NAME",
                        help="ablation variants (benchmarks/ablations.py) instead of our methods, probed every epoch; the "
                             f"conventional side's figures from {RESULTS.name} (its last run)")  # fmt: skip
    parser.add_argument("--epochs", type=int, default=None, help="--variants: the last epoch probed")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"default: {RESULTS.name}, {VARIANT_RESULTS.name} with --variants")  # fmt: skip
    args = parser.parse_args()
    threads = set_threads(args.threads or "auto")
    print(f"{args.set}, seed {args.seed}, {threads} torch threads; {machine.cpu_flags()}", flush=True)
    print(f"before: {machine.uptime()}", flush=True)
    if args.variants:
        args.out = args.out or VARIANT_RESULTS
        last = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        if last.get("set") != args.set:
            parser.error(f"--variants compares with the conventional figures of a full run on {args.set} "
                         f"in {RESULTS}: run without --variants first")  # fmt: skip
        theirs = last["conventional"]
        return variants(args, {k: theirs[k] for k in PROBES})
    args.out = args.out or RESULTS
    ds = quality.load_dataset(args.set, quality.default_params())
    default = quality.default_params().model.method
    methods = args.methods or list(dict.fromkeys([default, "deepcluster"]))
    with tempfile.TemporaryDirectory(prefix="ttq-") as tmp:
        theirs = conventional(ds, args.seed, Path(tmp))
        print("conventional: " + ", ".join(f"{k} {theirs[k]:.3f}" for k in PROBES)
              + f" after {theirs['epochs']} epochs, {theirs['cpu_seconds']:.0f} CPU-s", flush=True)  # fmt: skip
        targets = {k: theirs[k] for k in PROBES}
        mine = [method_run(ds, args.seed, Path(tmp), targets, args.probe_every, m) for m in methods]
    record = {"set": args.set, "seed": args.seed, "threads": threads, "default_method": default,
              "conventional": theirs, "ours": [], "cpu": machine.cpu(), "uptime": machine.uptime()}  # fmt: skip
    for side in mine:
        ratios = speedups(theirs, side)
        for key in PROBES:
            hit = side["reached"].get(key)
            where = f"epoch {hit['epoch']}, {hit['cpu_seconds']:.0f} CPU-s" if hit else "not reached"
            print(f"{side['method']}: {key} {theirs[key]:.3f} reached at {where}: {ratios[key]:.2f}x")
        # both figures reached: the later of the two
        record["ours"].append({**side, "speedups": ratios, "time_to_quality_speedup": min(ratios.values())})
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"after: {machine.uptime()}")
    for side in record["ours"]:
        print(f"time_to_quality_speedup[{side['method']}] {side['time_to_quality_speedup']:.2f}")
    # the headline: our defaults' figure when they were timed, else the first method's
    head = next((side for side in record["ours"] if side["method"] == default), record["ours"][0])
    print(f"time_to_quality_speedup {head['time_to_quality_speedup']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
