"""How good are the clusters and the features? Every figure comes with its baselines: NMI, ARI and
best-map accuracy of a clustering, kNN top-1 and a linear probe on frozen features over a held-out
split, each for the trained network, the same network at random initialisation and raw pixels."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import adjusted_rand_score
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from . import autoparams, progress, shortcut
from .cluster import assign, cluster_as_trained, cluster_features, kmeans, l2_normalize, nmi
from .config import Params
from .data import NO_CLASS
from .errors import ParamError


def _contingency(labels: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    """(clusters, labels) table of image counts."""
    label_ids = np.unique(labels, return_inverse=True)[1]
    cluster_ids = np.unique(clusters, return_inverse=True)[1]
    table = np.zeros((cluster_ids.max() + 1, label_ids.max() + 1), dtype=np.int64)
    np.add.at(table, (cluster_ids, label_ids), 1)
    return table


def best_map_accuracy(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Accuracy under the one-to-one cluster->label map that maximises it (Hungarian algorithm)."""
    table = _contingency(labels, clusters)
    rows, cols = linear_sum_assignment(-table)
    return float(table[rows, cols].sum() / len(labels))


def purity(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Share of the images whose cluster's most common label is their own: what a person
    browsing over-clustered groups sees. NMI cannot show it at large k: against 10 classes, 200
    pure clusters score at most 2 H(labels) / (H(clusters) + H(labels)), about 0.61."""
    return float(_contingency(labels, clusters).max(axis=1).sum() / len(labels))


def split(
    n: int, labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Train/test indices, the same for every feature set compared: stratified when both sides
    can hold every class, else (a tiny labelled folder) a plain seeded random split."""
    idx = np.arange(n)
    counts = np.unique(labels, return_counts=True)[1]
    n_test = math.ceil(test_fraction * n)  # as train_test_split rounds it
    stratify = labels if counts.min() >= 2 and min(n_test, n - n_test) >= len(counts) else None
    train, test = train_test_split(
        idx, test_size=test_fraction, random_state=seed, stratify=stratify
    )
    return np.sort(train), np.sort(test)


NEIGHBOUR_BLOCK = 256  # query rows per similarity block: 256 x n similarities in memory at once


def nearest(
    queries: np.ndarray, reference: np.ndarray, k: int, self_rows: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The k reference rows most similar to each query row (dot products: L2-normalised rows
    give cosines), unordered, and those similarities, a block of queries at a time.
    `self_rows[i]` is query i's own row of `reference`, which is not its neighbour."""
    found, sims = [np.zeros((0, k), dtype=np.int64)], [np.zeros((0, k), dtype=np.float32)]
    for start in range(0, len(queries), NEIGHBOUR_BLOCK):
        block = queries[start : start + NEIGHBOUR_BLOCK] @ reference.T
        if self_rows is not None:
            block[np.arange(len(block)), self_rows[start : start + NEIGHBOUR_BLOCK]] = -np.inf
        top = np.argpartition(-block, k - 1, axis=1)[:, :k]
        found.append(top)
        sims.append(np.take_along_axis(block, top, 1))
    return np.concatenate(found), np.concatenate(sims)


def knn_top1(
    features: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray, k: int
) -> float:
    """Cosine-similarity kNN, votes weighted by similarity."""
    f = l2_normalize(features)
    k = min(k, len(train))
    top, sims = nearest(f[test], f[train], k)
    classes, train_codes = np.unique(labels[train], return_inverse=True)
    votes = np.zeros((len(test), len(classes)))
    rows = np.repeat(np.arange(len(test)), k)
    np.add.at(votes, (rows, train_codes[top].ravel()), sims.ravel())
    return float((classes[votes.argmax(1)] == labels[test]).mean())


def linear_probe(
    features: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray, max_iter: int
) -> float:
    """Multinomial logistic regression on standardised frozen features."""
    scaler = StandardScaler().fit(features[train])
    clf = LogisticRegression(max_iter=max_iter)
    with warnings.catch_warnings():  # `eval.probe_epochs` is a chosen budget, the same for every
        warnings.simplefilter("ignore", ConvergenceWarning)  # baseline: stopping there is expected
        clf.fit(scaler.transform(features[train]), labels[train])
    return float(clf.score(scaler.transform(features[test]), labels[test]))


def _cluster_ids(
    features: np.ndarray, k: int, pca_dim: int | None, seed: int, whiten: bool, redo: int
) -> np.ndarray:
    """`whiten`: PCA-whiten to `pca_dim` (None: none) and L2-normalise, as training does;
    otherwise plain k-means on the raw features."""
    if whiten:
        return cluster_features(features, k, pca_dim, iters=30, redo=redo, seed=seed).assignments
    x = np.ascontiguousarray(features, dtype=np.float32)
    centroids, _ = kmeans(x, k, iters=30, redo=redo, seed=seed)
    return assign(x, centroids)[0]


def clustering_scores(
    features: np.ndarray, labels: np.ndarray, seed: int, redo: int = 20
) -> dict[str, float]:
    """Cluster into as many groups as there are classes (the usual protocol) and score it.

    Every feature set, pixels included, is clustered the way the paper clusters: PCA-whitened to
    the auto dimension for this k, L2-normalised, then k-means (the evidence: docs/learning.md).
    k-means restarts `redo` times and keeps the lowest objective: with k this small a single run
    lands in a different local optimum per seed.
    """
    k = len(np.unique(labels))
    pca_dim, _ = autoparams.pca_dim(k, features.shape[1])  # the auto rule, at this k
    ids = _cluster_ids(features, k, pca_dim, seed, True, redo)
    return {
        "nmi": nmi(labels, ids),
        "ari": float(adjusted_rand_score(labels, ids)),
        "accuracy": best_map_accuracy(labels, ids),
    }


def embedding_scores(embedding: np.ndarray, labels: np.ndarray, seed: int) -> dict[str, float]:
    """The same k = classes clustering of the embedding the method clusters (v2: the projection),
    reported beside the backbone's: the projection is fitted to the fine training k."""
    scores = clustering_scores(embedding, labels, seed)
    return {"nmi_embedding": scores["nmi"], "accuracy_embedding": scores["accuracy"]}


def feature_scores(
    features: np.ndarray,
    labels: np.ndarray,
    train: np.ndarray,
    test: np.ndarray,
    knn_k: int,
    probe_iters: int,
) -> dict[str, float]:
    return {
        "knn_top1": knn_top1(features, labels, train, test, knn_k),
        "linear_top1": linear_probe(features, labels, train, test, probe_iters),
    }


def downsample(images: np.ndarray, max_side: int) -> np.ndarray:
    """uint8 (n, 3, h, w) -> float (n, 3, s, s) in [0, 1], block-averaged to at most `max_side`."""
    x = np.asarray(images, dtype=np.float32) / 255.0
    side = x.shape[-1]
    factor = max(1, -(-side // max_side))
    if factor > 1:
        crop = side - side % factor
        x = x[..., :crop, :crop].reshape(
            *x.shape[:2], crop // factor, factor, crop // factor, factor
        )
        x = x.mean(axis=(3, 5))
    return x


def pixel_features(images: np.ndarray, max_side: int = 32) -> np.ndarray:
    """Raw pixels in [0, 1], block-averaged down to at most `max_side` px so large images stay
    cheap; grey images (three equal channels) keep one channel, so no pixel counts thrice."""
    x = downsample(images, max_side)
    if np.array_equal(x[:, 0], x[:, 1]) and np.array_equal(x[:, 1], x[:, 2]):
        x = x[:, :1]
    return x.reshape(len(x), -1)


def _check_knn(k: int, n_train: int) -> None:
    if k >= n_train:
        raise ParamError(
            f"eval.knn_k = {k}: must be smaller than the {n_train} images the kNN probe votes "
            "from (the labelled images outside the held-out share)"
        )


@dataclass(frozen=True)
class Views:
    """One feature set as the probes see it: `clusters` as training clusters them (the NMI at the
    training k), `probes` the backbone that every class-level figure reads (for raw pixels both
    are the pixels)."""

    clusters: np.ndarray
    probes: np.ndarray

    def rows(self, keep: np.ndarray) -> Views:
        return Views(self.clusters[keep], self.probes[keep])


def with_class(labels: np.ndarray) -> np.ndarray:
    """Which images have a class: the label-based figures leave the `none/` folder out (a class of
    leftovers no clustering should recover), while training and clustering keep it."""
    return np.asarray(labels) != NO_CLASS


def baseline_clusters(baselines: dict[str, Views], params: Params) -> dict[str, np.ndarray]:
    """Each baseline clustered at the training k, as a user would browse it: a network's
    embedding the way training clusters it, the pixels with plain k-means. Beside the pipeline's
    own clusters, these are what `nmi_k` and the shortcut score compare."""
    return {name: cluster_view(name, views, params)[0] for name, views in baselines.items()}


def shortcut_figures(
    images: np.ndarray, manifest, clusters: dict[str, np.ndarray], seed: int
) -> dict[str, float]:
    """How much each clustering follows colour, brightness and size (`deepcluster.shortcut`)."""
    stats = shortcut.image_statistics(
        downsample(images, shortcut.SAMPLE_SIDE),
        manifest["width"].to_numpy(),
        manifest["height"].to_numpy(),
    )
    return shortcut.scores(shortcut.statistics_groups(stats, seed), clusters)


AGREEMENT_QUERIES = 2000  # images whose neighbours `knn_agreement` reads: enough for 2 decimals


def knn_agreement(space: np.ndarray, ids: np.ndarray, k: int, seed: int) -> float:
    """Share of an image's k nearest neighbours in its own cluster, over a seeded sample of
    images, in `space`, where k-means saw them: clusters that follow the space's own
    neighbourhoods score high, without labels."""
    f = l2_normalize(np.asarray(space, dtype=np.float32))
    k = max(1, min(k, len(f) - 1))
    rng = np.random.default_rng(seed)
    queries = np.sort(rng.choice(len(f), min(len(f), AGREEMENT_QUERIES), replace=False))
    top, _ = nearest(f[queries], f, k, self_rows=queries)  # an image is not its own neighbour
    return int((ids[top] == ids[queries, None]).sum()) / (len(queries) * k)


def label_free_figures(
    views: dict[str, Views], clusters: dict[str, np.ndarray], params: Params
) -> dict[str, float]:
    """What a folder without labels can say about each set's `clusters` at the training k:
    `seed_stability`, the NMI between them and the same features clustered from another seed,
    and `knn_agreement`. The baselines get both, so promotion can ask the model to beat the
    untrained network's (`promotion.baseline_shortfalls`)."""
    seed = params.train.seed
    other = params.model_copy(update={"train": params.train.model_copy(update={"seed": seed + 1})})
    out: dict[str, float] = {}
    for name, view in views.items():
        suffix = "" if name == "trained" else f"_{name}"
        again, space = cluster_view(name, view, other)
        out[f"seed_stability{suffix}"] = nmi(clusters[name], again)
        out[f"knn_agreement{suffix}"] = knn_agreement(space, clusters[name], params.eval.knn_k, seed)
    return out


def cluster_view(name: str, view: Views, params: Params) -> tuple[np.ndarray, np.ndarray]:
    """`view` clustered at the training k from `params`' seed, and the space k-means saw: a
    network's embedding whitened as training does, the pixels raw with plain k-means."""
    if name == "pixels":
        c = params.cluster
        x = np.ascontiguousarray(view.clusters, dtype=np.float32)
        return _cluster_ids(x, int(c.k), None, params.train.seed, False, c.kmeans_redo), x
    clustering = cluster_as_trained(view.clusters, params)
    return clustering.assignments, clustering.whitening.apply(view.clusters)


def compare(
    feature_sets: dict[str, Views],
    labels: np.ndarray,
    params: Params,
    clusters: dict[str, np.ndarray],
    show: bool = True,
) -> dict[str, float]:
    """Every probe on every feature set: `name` for the trained features, `name_<set>` for the
    baselines (random_init, pixels), each line of progress naming the probe and its figure.

    The class-level figures (clustering at k = classes, kNN, linear) all read the backbone, one
    representation for all five; `nmi_k` scores `clusters`, each set's clusters at the training k
    (the pipeline's own for the trained network, `baseline_clusters` for the others)."""
    e, seed = params.eval, params.train.seed
    train_idx, test_idx = split(len(labels), labels, e.test_fraction, seed)
    _check_knn(e.knn_k, len(train_idx))
    probes = {
        "clusters": lambda v: clustering_scores(v.probes, labels, seed),
        "knn": lambda v: {"knn_top1": knn_top1(v.probes, labels, train_idx, test_idx, e.knn_k)},
        "linear": lambda v: {
            "linear_top1": linear_probe(v.probes, labels, train_idx, test_idx, e.probe_epochs)
        },
    }
    out: dict[str, float] = {}
    steps = len(feature_sets) * len(probes)
    with progress.bar(total=steps, desc="evaluate", enabled=show) as shown:
        for name, views in feature_sets.items():
            suffix = "" if name == "trained" else f"_{name}"
            for probe, run in probes.items():
                shown.set_postfix_str(f"{name} {probe}")
                out |= {f"{key}{suffix}": value for key, value in run(views).items()}
                shown.update()
            out[f"nmi_k{suffix}"] = nmi(labels, clusters[name])
            out[f"purity_k{suffix}"] = purity(labels, clusters[name])
            if name == "trained":
                out |= embedding_scores(views.clusters, labels, seed)
            progress.say(
                f"evaluate {name}: NMI {out['nmi' + suffix]:.3f}, kNN {out['knn_top1' + suffix]:.3f}"
                f", linear {out['linear_top1' + suffix]:.3f}",
                show,
            )
    return out


def against_baselines(
    images: np.ndarray,
    manifest,
    labels: np.ndarray | None,
    params: Params,
    clusters: np.ndarray,
    trained: Callable[[], Views],
    show: bool = True,
) -> dict[str, float]:
    """The shortcut score and the label-free figures of the trained `clusters` beside the
    untrained network's and the pixels'; with labels, every probe on the three, the images of no
    class left out."""
    baselines = {
        "random_init": network_views(random_init_network(params, images), images, params, show),
        "pixels": pixel_views(images),
    }
    ids = {"trained": clusters, **baseline_clusters(baselines, params)}
    out = shortcut_figures(images, manifest, ids, params.train.seed)
    every = {"trained": trained(), **baselines}
    out |= label_free_figures(every, ids, params)
    if labels is None:
        return out
    keep = with_class(labels)
    views = {name: v.rows(keep) for name, v in every.items()}
    return out | compare(views, labels[keep], params, {n: c[keep] for n, c in ids.items()}, show)


def network_views(model, images: np.ndarray, params: Params, show: bool = True) -> Views:
    """A network's embeddings (clustered) and backbone features (probed), in one pass."""
    from .device import resolve_device
    from .embed import ImageSource, compute_views, eval_batch_size

    device = resolve_device(params.compute.device)
    source = ImageSource(images, device)
    model = model.to(device)
    embed, backbone = compute_views(model, source, eval_batch_size(params), params.compute.amp, show)
    return Views(embed, backbone)


def random_init_network(params: Params, images: np.ndarray):
    """The network training started from: same seed, same input statistics, no training."""
    import torch

    from .models import build_model
    from .train import data_statistics

    torch.manual_seed(params.train.seed)
    model = build_model(params.model, [2])  # the heads play no part in the embedding
    if params.model.normalize == "dataset":
        model.normalize.set(*data_statistics(images))
    return model


def pixel_views(images: np.ndarray) -> Views:
    pixels = pixel_features(images)
    return Views(pixels, pixels)
