"""Curated versus random subsets of equal size, on a deliberately skewed labelled set.

The set: the digits sample with one class ten times as frequent as every other (all images of the
major class, 18 of each other class, chosen with a fixed seed). The features: the project's own
DeepCluster features, trained on that folder with the library's steps (params.yaml with
cluster.k = 30) and clustered by the pipeline's step; when the training cannot run (`--features
pixels`, or the library failing), PCA of the raw pixels clustered by the same step. The first
line of the output says which.

Per budget, each sampler draws 10 subsets (seeds 0..9): curated by distance bins (DeepCluster++),
curated by balanced hierarchical sampling (Vo et al.), and uniformly at random. Figures: classes
present, entropy of the subset's classes (bits; log2(10) = 3.32 is perfectly even), imbalance
(largest / smallest class count among the classes present), and a logistic regression trained on
the subset's labels, tested on every image outside the subset: accuracy and balanced accuracy
(mean recall per class: a class the subset missed scores 0). Means over the seeds, (min) for
classes present.

    PYTHONPATH=ssl .venv/bin/python benchmarks/curation.py [--features pixels]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import numpy as np
from machine import uptime
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.preprocessing import StandardScaler

from deepcluster import pipeline
from deepcluster.config import CurateParams, load_params
from deepcluster.curate import Pool, class_coverage, curate, load_pool
from deepcluster.data import load_cache
from deepcluster.evaluate import pixel_features
from deepcluster.io import write_json
from deepcluster.paths import Artifacts
from deepcluster.sample import export_digits

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "curation.json"
MAJOR, MINOR_COUNT, K = "0", 18, 30
BUDGETS = (20, 40, 80)
SEEDS = range(10)


def skewed_folder(out: Path, seed: int = 0) -> Path:
    """The digits export with every image of MAJOR and MINOR_COUNT of each other class."""
    digits = out / "digits"
    export_digits(digits)
    rng = np.random.default_rng(seed)
    for label in sorted(p for p in digits.iterdir() if p.is_dir()):
        files = sorted(label.iterdir())
        keep = files if label.name == MAJOR else rng.choice(files, MINOR_COUNT, replace=False)
        (out / "skewed" / label.name).mkdir(parents=True)
        for path in keep:
            shutil.copy2(path, out / "skewed" / label.name / path.name)
    return out / "skewed"


def build_features(folder: Path, art: Artifacts, which: str) -> str:
    """features.npy and the clustering in `art`; returns what the features are."""
    params = load_params(ROOT / "params.yaml", {"cluster.k": K, "compute.device": "cpu"})
    pipeline.ingest(folder, params, art, progress=False)
    if which == "trained":
        try:
            pipeline.train_step(params, art, progress=False)
            pipeline.features_step(params, art, progress=False)
            pipeline.cluster_step(params, art)
            return f"DeepCluster features trained on this set ({params.train.epochs} epochs, k={K})"
        except Exception:  # noqa: BLE001 -- the library may be mid-rewrite: say so, fall back
            traceback.print_exc()
            print("training failed (traceback above): falling back to pixel features")
    pixels = pixel_features(load_cache(art.cache))
    art.features.parent.mkdir(parents=True, exist_ok=True)
    np.save(art.features, PCA(32, random_state=0).fit_transform(pixels).astype(np.float32))
    pipeline.cluster_step(params, art)
    return f"PCA(32) of raw pixels, clustered by the pipeline's step (k={K})"


def classifier_scores(features: np.ndarray, labels: np.ndarray, rows: np.ndarray) -> tuple:
    """Logistic regression on the subset's labels, scored on every other image."""
    rest = np.setdiff1d(np.arange(len(labels)), rows)
    if len(np.unique(labels[rows])) == 1:
        predicted = np.full(len(rest), labels[rows][0])
    else:
        scaler = StandardScaler().fit(features[rows])
        model = LogisticRegression(max_iter=2000)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(scaler.transform(features[rows]), labels[rows])
        predicted = model.predict(scaler.transform(features[rest]))
    truth = labels[rest]
    return float((predicted == truth).mean()), float(balanced_accuracy_score(truth, predicted))


def subsets(pool: Pool, budget: int) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(0)
    n = len(pool.clusters)
    return {
        "curated: bins": [_rows(pool, budget, "bins", s) for s in SEEDS],
        "curated: hierarchical": [_rows(pool, budget, "hierarchical", s) for s in SEEDS],
        "random": [rng.choice(n, budget, replace=False) for _ in SEEDS],
    }


def _rows(pool: Pool, budget: int, method: str, seed: int) -> np.ndarray:
    return curate(pool, CurateParams(budget=budget, method=method, seed=seed)).subset["row"].to_numpy()


def figures(pool: Pool, rows_per_seed: list[np.ndarray]) -> dict[str, float]:
    per_seed = []
    for rows in rows_per_seed:
        cover = class_coverage(pool.labels[rows], pool.labels)
        acc, bal = classifier_scores(pool.embeddings, pool.labels, rows)
        per_seed.append({**cover, "accuracy": acc, "balanced_accuracy": bal})
    mean = {k: float(np.mean([s[k] for s in per_seed])) for k in per_seed[0] if k != "classes"}
    mean["classes_present_min"] = int(min(s["classes_present"] for s in per_seed))
    return mean


def table(results: list[dict]) -> str:
    head = "| budget | subset | classes present (min) | entropy, bits | imbalance | accuracy "
    lines = [head + "| balanced accuracy |", "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['budget']} | {r['subset']} | {r['classes_present']:.1f} "
            f"({r['classes_present_min']}) | {r['entropy_bits']:.2f} | {r['imbalance']:.1f} | "
            f"{r['accuracy']:.3f} | {r['balanced_accuracy']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", choices=("trained", "pixels"), default="trained")
    args = parser.parse_args()
    print(f"start: {uptime()}")
    with tempfile.TemporaryDirectory(prefix="curation-benchmark-") as tmp:
        folder = skewed_folder(Path(tmp))
        art = Artifacts(Path(tmp) / "artifacts")
        source = build_features(folder, art, args.features)
        pool = load_pool(art)
        counts = {str(c): int(n) for c, n in zip(*np.unique(pool.labels, return_counts=True))}
        print(f"features: {source}")
        print(f"set: {len(pool.labels)} digits, class counts {counts}")
        results = [
            {"budget": budget, "subset": name, **figures(pool, rows)}
            for budget in BUDGETS
            for name, rows in subsets(pool, budget).items()
        ]
    print(table(results))
    write_json(RESULTS, {"features": source, "class_counts": counts, "rows": results})
    print(f"end: {uptime()}")


if __name__ == "__main__":
    sys.exit(main())
