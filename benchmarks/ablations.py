"""Ablations behind the defaults: one change at a time against the default (auto) settings.

    PYTHONPATH=ssl .venv/bin/python benchmarks/ablations.py --set mnist5k --epochs 15
    PYTHONPATH=ssl .venv/bin/python benchmarks/ablations.py --set digits --only v1 v1-head-decays
    PYTHONPATH=ssl .venv/bin/python benchmarks/ablations.py --set colour-nuisance --seeds 0 1 2 \
        --only v1-colour-before v1-sobel v1-jitter-0.8 v1-sobel-jitter-0.8 v1-grey-0.5 v1-crops-0.14

Each variant is a set of params.yaml overrides, or a change of code path that is no parameter
(the old head schedule, batch-mode batch norm or the trunk's output at feature extraction; v2
with one of its differences from v1 taken away, which `time_to_quality.py --variants` probes
epoch by epoch). All variants of a set share the epoch budget given on the command line, the seed
and the evaluation (`benchmarks/quality.py`). Finished variants are kept in
benchmarks/results/ablations-<set>.json and skipped on the next call, so a long sweep can be
stopped and continued; --redo runs them again.
docs/learning.md discusses the table.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import quality
import torch

from deepcluster import autoparams, methods, models
from deepcluster import cluster as cluster_mod
from deepcluster import train as train_mod
from deepcluster.methods import deepcluster_v2 as v2_mod
from deepcluster.sampler import uniform_over_clusters

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def patched(owner, name: str, value) -> Iterator[None]:
    """`owner.name` replaced by `value` for the duration (a code path that is no parameter)."""
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def head_follows_trunk():
    """v1's head with the trunk's decayed learning rate (the behaviour before the fix)."""
    return patched(train_mod.EpochTrainer, "head_lr", lambda self, trunk_lr, state: trunk_lr)


# DeepCluster-v2 with one of its differences from v1 taken away (time_to_quality.py --variants)
def v2_clean_features():
    """Each epoch clusters a clean eval-mode pass over every image (v1's), not the memory bank."""
    original = v2_mod.DeepClusterV2.cluster

    def cluster(self, ctx, state, seed):
        state.memory = None  # the method refills it from ctx.features(), as in its first epoch
        return original(self, ctx, state, seed)

    return patched(v2_mod.DeepClusterV2, "cluster", cluster)


def v2_whitened():
    """v1's clustering per head (PCA-whitened to the auto dimension for its k, Euclidean k-means);
    the prototypes are the unit means of each cluster's embeddings."""
    original = v2_mod.cluster_features

    def cluster_features(feats, k, pca_dim, iters, redo, seed, use_gpu, spherical):
        dim, _ = autoparams.pca_dim(k, feats.shape[1])
        c = original(feats, k, dim, iters, redo, seed, use_gpu, spherical=False)
        sums = np.zeros((k, feats.shape[1]), np.float32)
        np.add.at(sums, c.assignments, feats)
        return dataclasses.replace(c, centroids=cluster_mod.l2_normalize(sums))

    return patched(v2_mod, "cluster_features", cluster_features)


@contextlib.contextmanager
def v2_trained_prototypes() -> Iterator[None]:
    """The prototypes start at the centroids and are trained by SGD at the base rate (SwAV's)."""
    set_prototypes = models.DeepClusterNet.set_prototypes

    def trainable(self, centroids):
        set_prototypes(self, centroids)
        for head in self.heads:
            head.weight.requires_grad_(True)

    with (
        patched(models.DeepClusterNet, "set_prototypes", trainable),
        patched(v2_mod.DeepClusterV2, "head_optimizer", methods.Method.head_optimizer),
    ):
        yield


def v2_balanced():
    """Images drawn uniformly over the finest head's clusters (v1's sampler), not each once."""

    def plan(self, clusterings, n, generator):
        order, _ = uniform_over_clusters(clusterings[-1].assignments, n, generator)
        labels = [torch.from_numpy(cl.assignments) for cl in clusterings]
        return methods.Plan(order, lambda start, batch: [lab[torch.from_numpy(batch)] for lab in labels])

    return patched(v2_mod.DeepClusterV2, "plan", plan)


def v2_one_crop():
    """One global crop per image (with `augment.local_crops: 0`: one view, as v1)."""
    return patched(v2_mod, "GLOBAL_CROPS", 1)


@contextlib.contextmanager
def features_with(kind: str) -> Iterator[None]:
    """Feature extraction for clustering from another layer or batch-norm mode."""
    original = train_mod.compute_features

    @torch.no_grad()
    def patched(model, source, batch_size, amp=True, progress=True):
        norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        if kind == "batch-bn":  # batch statistics, running statistics left untouched
            model.train()
            saved = [m.momentum for m in norms]
            for m in norms:
                m.momentum = 0.0
        else:
            model.eval()
        rows = []
        for start in range(0, len(source), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(source))).numpy()
            x = source.floats(idx)
            with train_mod.autocast(source.device, amp):
                out = model.trunk_features(x) if kind == "trunk" else model.embed(x)
            rows.append(out.float().cpu())
        if kind == "batch-bn":
            for m, momentum in zip(norms, saved, strict=True):
                m.momentum = momentum
        model.eval()
        return torch.cat(rows).numpy()

    train_mod.compute_features = patched
    try:
        yield
    finally:
        train_mod.compute_features = original


V1 = {"model.method": "deepcluster"}
PAPER_AUG = {"augment.jitter": 0.0, "augment.blur": 0.0, "augment.solarize": 0.0}
OLD_HEADS = {"cluster.heads": [1.0, 2.0, 4.0]}
# name -> (description, overrides, code-path change or None)
VARIANTS: dict[str, tuple[str, dict, Callable | None]] = {
    "v2": ("DeepCluster-v2, the defaults", {}, None),
    "v2-heads-fine": ("heads of k, 2k, 4k (finer, not coarser)", OLD_HEADS, None),
    "v2-one-head": ("a single head of k", {"cluster.heads": [1.0]}, None),
    "v2-no-multicrop": ("no local crops", {"augment.local_crops": 0}, None),
    "v2-paper-aug": ("crops only (no jitter, blur, solarise)", PAPER_AUG, None),
    "v2-light-crops": ("global crops of 0.6-1.0 of the area", {"augment.crop_scale": [0.6, 1.0]}, None),
    "v2-imagenet-norm": ("ImageNet mean/std on grey images", {"model.normalize": "imagenet"}, None),
    "v2-k-half": ("half the auto k", {"cluster.k": "half"}, None),
    "v2-k-double": ("twice the auto k", {"cluster.k": "double"}, None),
    "v2-batch-half": ("half the auto batch", {"train.batch_size": "half"}, None),
    "v2-batch-double": ("twice the auto batch", {"train.batch_size": "double"}, None),
    "v2-embed-64": ("64-d embedding", {"model.embed_dim": 64}, None),
    "v2-embed-256": ("256-d embedding", {"model.embed_dim": 256}, None),
    "v2-constant-lr": ("constant learning rate", {"train.schedule": "constant"}, None),
    "v2-temp-0.2": ("temperature 0.2", {"train.temperature": 0.2}, None),
    "v2-epochs-half": ("half the epochs", {"train.epochs": "half"}, None),
    "v2-fp32": ("fp32 instead of bf16 autocast", {"compute.amp": False}, None),
    "v2-temp-0.05": ("temperature 0.05", {"train.temperature": 0.05}, None),
    "v2-temp-0.3": ("temperature 0.3", {"train.temperature": 0.3}, None),
    "v2-lr-0.03": ("learning rate 0.03", {"train.lr": 0.03}, None),
    "v2-lr-0.3": ("learning rate 0.3", {"train.lr": 0.3}, None),
    "v2-clean-features": ("clusters a clean features pass, not the memory bank", {}, v2_clean_features),
    "v2-whitened": ("v1's whitened k-means, prototypes the clusters' means", {}, v2_whitened),
    "v2-trained-prototypes": ("prototypes trained by SGD from the centroids", {}, v2_trained_prototypes),
    "v2-balanced": ("images drawn uniformly over the clusters (v1's sampler)", {}, v2_balanced),
    "v2-one-crop": ("one crop per image, no local crops", {"augment.local_crops": 0}, v2_one_crop),
    "v1": ("DeepCluster (v1), same data settings", V1, None),
    "v1-paper-aug": ("v1, crops and flips only, as the paper", {**V1, **PAPER_AUG}, None),
    "v1-head-decays": ("v1, head lr decays with the trunk's (before)", V1, head_follows_trunk),
    "v1-batch-bn": ("v1, batch-statistics BN at feature extraction", V1, lambda: features_with("batch-bn")),
    "v1-trunk-layer": ("v1 clusters the trunk's output, not the MLP's", V1, lambda: features_with("trunk")),
    "v1-k-half": ("v1, half the auto k", {**V1, "cluster.k": "half"}, None),
    "v1-pca-16": ("v1, PCA to 16 dimensions", {**V1, "cluster.pca_dim": 16}, None),
    "v1-constant-lr": ("v1, constant learning rate (the paper)", {**V1, "train.schedule": "constant"}, None),
}
# colour: the paper's Sobel layer against DeepCluster-v2's strong colour augmentation, each one
# change from the settings before colour had auto values (no Sobel, jitter 0.4, grayscale 0.2)
BEFORE = {"model.sobel": False, "augment.jitter": 0.4, "augment.grayscale": 0.2}
SOBEL, STRONG = {"model.sobel": True}, {"augment.jitter": 0.8}
GREY, WIDE_CROPS = {"augment.grayscale": 0.5}, {"augment.crop_scale": [0.14, 1.0]}
for prefix, method in (("v1", V1), ("v2", {})):
    before = {**method, **BEFORE}
    VARIANTS |= {
        f"{prefix}-colour-before": (f"{prefix}, no Sobel, jitter 0.4 (before)", before, None),
        f"{prefix}-sobel": (f"{prefix}, Sobel input layer", {**before, **SOBEL}, None),
        f"{prefix}-jitter-0.8": (f"{prefix}, colour jitter 0.8 (the v2 paper's)", {**before, **STRONG}, None),
        f"{prefix}-sobel-jitter-0.8": (f"{prefix}, Sobel and jitter 0.8", {**before, **SOBEL, **STRONG}, None),
        f"{prefix}-grey-0.5": (f"{prefix}, grayscale with p = 0.5", {**before, **GREY}, None),
        f"{prefix}-crops-0.14": (f"{prefix}, crops of 0.14-1.0 of the area", {**before, **WIDE_CROPS}, None),
    }
RELATIVE = {"quarter": 0.25, "half": 0.5, "double": 2.0}


def params_for(overrides: dict, dataset: str, epochs: int | None, seed: int):
    """Default params for the set with `overrides`; `half`/`double` scale the auto value."""
    relative = {k: v for k, v in overrides.items() if isinstance(v, str) and v in RELATIVE}
    plain = {k: v for k, v in overrides.items() if k not in relative}
    base = quality.default_params({**plain, "train.seed": seed})
    ds = quality.load_dataset(dataset, base)
    params = quality.resolved(base, ds)
    scaled = {}
    for key, how in relative.items():
        section, name = key.split(".")
        scaled[key] = max(2, round(getattr(getattr(params, section), name) * RELATIVE[how]))
    if epochs is not None and "train.epochs" not in scaled:
        scaled["train.epochs"] = epochs
    if scaled:
        raw = params.to_dict()
        for key, value in scaled.items():
            section, name = key.split(".")
            raw[section][name] = value
        from deepcluster.config import params_from_dict

        params = params_from_dict(raw)
    return params, ds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", default="mnist5k")
    parser.add_argument("--epochs", type=int, default=None, help="budget for every variant (default: auto)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--only", nargs="*", default=None, help="variant names (default: all)")
    parser.add_argument("--redo", action="store_true")
    parser.add_argument("--table", action="store_true", help="print the stored results, train nothing")
    args = parser.parse_args()
    out = ROOT / "benchmarks/results" / f"ablations-{args.set}.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    if args.table:
        print(markdown(results, args.epochs, args.seeds, args.only))
        return 0
    print(quality.machine_line(), flush=True)
    for seed in args.seeds:
        for name in args.only or VARIANTS:
            run_variant(name, args.set, args.epochs, seed, results, args.redo)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=1) + "\n")
    print(markdown(results, args.epochs, args.seeds))
    print(quality.machine_line())
    return 0


def run_variant(name: str, dataset: str, epochs: int | None, seed: int, results: dict, redo: bool):
    """Train and score one variant at one seed into `results`, unless it is there already."""
    description, overrides, hook = VARIANTS[name]
    key = f"{name}@{epochs or 'auto'}:{seed}"
    if key in results and not redo:
        return
    params, ds = params_for(overrides, dataset, epochs, seed)
    with hook() if hook else contextlib.nullcontext():
        scores = quality.run_training(ds, params)
    results["_baselines"] = {
        b: {m: scores[f"{m}_{b}"] for m in quality.METRICS} for b in quality.BASELINES
    }
    results[key] = {"description": description, **scores, "params": params.flat()}
    figures = " ".join(f"{m} {scores[m]:.3f}" for m in quality.METRICS)
    print(f"{name:18s} seed {seed} {figures} cpu {scores['cpu_seconds']:.0f}s", flush=True)


def markdown(results: dict, epochs: int | None, seeds: list[int], only: list[str] | None = None) -> str:
    """One row per variant: the mean over the `seeds` run so far (± std when there are several;
    how many in the last column), and in brackets the untrained network with its settings (Sobel
    changes it, so it has no row of its own); raw pixels first."""
    metrics = [m for m in quality.METRICS if all(m in r for k, r in results.items() if "@" in k)]
    header = "| variant | " + " | ".join(metrics) + " | CPU-s | seeds |"
    lines = [header, "|" + " --- |" * (len(metrics) + 3)]
    shown = {name: [r for seed in seeds if (r := results.get(f"{name}@{epochs or 'auto'}:{seed}"))]
             for name in VARIANTS if not only or name in only}  # fmt: skip
    everyone = [r for runs in shown.values() for r in runs]
    if everyone:  # pixels depend on the seed's split only: the mean over the runs shown
        pixels = [np.mean([r[f"{m}_pixels"] for r in everyone]) for m in metrics]
        lines.append("| *pixels (baseline)* | " + " | ".join(f"{p:.3f}" for p in pixels) + " | | |")
    for name, runs in shown.items():
        description = VARIANTS[name][0]
        if runs:
            cells = [  # the untrained network of the same settings beside each (Sobel moves it)
                f"{quality.mean_std([r[m] for r in runs])} "
                f"({sum(r[m + '_random_init'] for r in runs) / len(runs):.3f})"
                for m in metrics
            ]
            cpu = sum(r["cpu_seconds"] for r in runs) / len(runs)
            lines.append(f"| {description} | " + " | ".join(cells) + f" | {cpu:.0f} | {len(runs)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
