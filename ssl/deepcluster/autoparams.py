"""`auto` hyperparameters, resolved from the data the run sees.

params.yaml may say `auto` for the resolution, k, the PCA dimension, the batch size, the
number of epochs and DeeperCluster's super-clusters and epochs per clustering. Each rule below reads only the manifest (image count and sizes), so the same
folder always resolves to the same values on every machine; the resolved values are printed,
stored in model.pt, logged to MLflow and shown in Dagster. The rules and the figures behind them
are in docs/learning.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .config import AUTO, Params, params_from_dict

# the side an architecture trains at: small images are upsampled to the lower bound, large ones
# are reduced to the upper bound (the small net is built for 16-64 px; the paper's nets for 224)
RESOLUTION_BOUNDS = {
    "smallconv": (16, 64),
    "alexnet": (64, 224),
    "vgg16": (32, 224),
    "resnet18": (32, 224),
    "resnet50": (32, 224),
}
IMAGES_PER_CLUSTER = 25  # k = n / 25: over-clustering, as the paper's 10,000 for 1.3M images
K_BOUNDS = (10, 10_000)
BATCH_BOUNDS = (32, 256)
STEPS_PER_EPOCH = 40  # at least this many SGD steps per clustering, while the batch allows
# epochs x images: enough passes over small sets, not endless on large. v1's hard pseudo-labels
# peak early (digits NMI 0.81 after 30 epochs, 0.74 after 100; MNIST-5k 0.70 after 10, 0.69 after
# 40); v2 keeps improving (MNIST-5k NMI 0.43 after 10 epochs, 0.73 after 40): docs/learning.md
# deepercluster trains v1's linear heads on hard labels: v1's figure
SAMPLES_SEEN = {"deepcluster": 60_000, "deepcluster-v2": 200_000, "deepercluster": 60_000}
EPOCH_BOUNDS = (10, 100)
# deepercluster: a sub-head per (rotation, super-cluster) learns only from its own images, so each
# should see at least this many per epoch; and S <= sqrt(k) keeps both levels about as wide
IMAGES_PER_SUPER_CLASS = 250
REASSIGN_EVERY = 3  # the paper's epochs per clustering: the heads get time to learn the labels
CLUSTERINGS = 10  # a run still clusters about this many times when it is short
ROTATIONS = 4


COLOUR_CHROMA = 8  # mean (max - min) over the channels, 0..255: above it an image is in colour
COLOUR_SAMPLE = 512  # images looked at to tell colour from grey


@dataclass(frozen=True)
class DataFacts:
    """What the rules read: the number of images, their typical shorter side and whether they
    are in colour (None until they are decoded: ingest sizes the cache first)."""

    images: int
    median_side: int
    colour: bool | None = None

    @classmethod
    def of(cls, manifest, images: np.ndarray | None = None) -> DataFacts:
        sides = np.minimum(manifest["width"].to_numpy(), manifest["height"].to_numpy())
        colour = None if images is None else is_colour(images)
        return cls(images=int(manifest.height), median_side=int(np.median(sides)), colour=colour)


def is_colour(images: np.ndarray, sample: int = COLOUR_SAMPLE) -> bool:
    """Whether most of an even sample of the cache (uint8, N x 3 x H x W) is in colour. Grey
    files decode to three equal channels; a little chroma (JPEG noise on grey) does not count."""
    step = max(1, len(images) // sample)
    rows = np.asarray(images[::step], dtype=np.int16)
    chroma = (rows.max(axis=1) - rows.min(axis=1)).mean(axis=(1, 2))
    return bool(np.mean(chroma > COLOUR_CHROMA) >= 0.5)


def _clamp(value: float, bounds: tuple[int, int]) -> int:
    return int(min(max(round(value), bounds[0]), bounds[1]))


def _power_of_two(value: float) -> int:
    return int(2 ** round(np.log2(max(value, 1))))


def resolution(arch: str, facts: DataFacts) -> tuple[int, str]:
    lo, hi = RESOLUTION_BOUNDS[arch]
    side = _clamp(facts.median_side, (lo, hi))
    return side, f"median shorter side {facts.median_side} px, kept within {lo}..{hi} for {arch}"


def k(facts: DataFacts, multiple_of: int = 1) -> tuple[int, str]:
    value = _clamp(facts.images / IMAGES_PER_CLUSTER, K_BOUNDS)
    why = f"{facts.images} images / {IMAGES_PER_CLUSTER}, within {K_BOUNDS[0]}..{K_BOUNDS[1]}"
    if multiple_of == 1:
        return value, why
    value = max(1, round(value / multiple_of)) * multiple_of
    return value, f"{why}, rounded to a multiple of cluster.super_clusters ({multiple_of})"


def super_clusters(method: str, k_value: int, rotation: bool, facts: DataFacts) -> tuple[int, str]:
    if method != "deepercluster":
        return 1, f"{method} clusters in one level"
    heads = ROTATIONS if rotation else 1
    cap = max(1, min(math.isqrt(k_value), facts.images // (heads * IMAGES_PER_SUPER_CLASS)))
    value = max(d for d in range(1, cap + 1) if k_value % d == 0)
    return value, (
        f"the largest divisor of k ({k_value}) up to sqrt(k) and to {facts.images} images / "
        f"({heads} x {IMAGES_PER_SUPER_CLASS}), so each of the {heads} x S sub-heads sees "
        f"{IMAGES_PER_SUPER_CLASS}+ images an epoch"
    )


def reassign_every(method: str, epochs_value: int) -> tuple[int, str]:
    if method != "deepercluster":
        return 1, f"{method} clusters every epoch"
    value = min(REASSIGN_EVERY, max(1, epochs_value // CLUSTERINGS))
    return value, (
        f"the paper's {REASSIGN_EVERY}, fewer if {epochs_value} epochs would give under "
        f"{CLUSTERINGS} clusterings"
    )


def pca_dim(k_value: int, embed_dim: int) -> tuple[int, str]:
    value = int(min(embed_dim, max(16, _power_of_two(k_value / 4))))
    return value, f"about k/4 as a power of two, 16..model.embed_dim ({embed_dim})"


def batch_size(facts: DataFacts) -> tuple[int, str]:
    value = _clamp(_power_of_two(facts.images / STEPS_PER_EPOCH), BATCH_BOUNDS)
    return value, f"about {STEPS_PER_EPOCH} steps per epoch, within {BATCH_BOUNDS[0]}..{BATCH_BOUNDS[1]}"


def epochs(method: str, facts: DataFacts) -> tuple[int, str]:
    seen = SAMPLES_SEEN[method]
    value = _clamp(seen / facts.images, EPOCH_BOUNDS)
    return value, f"about {seen:,} images seen ({method}), within {EPOCH_BOUNDS[0]}..{EPOCH_BOUNDS[1]}"


# colour: k-means on a convnet's features groups colour first; the paper's Sobel layer takes it away
# (docs/learning.md, "Colour": stronger colour jitter or grayscale did not, for either method)
def sobel(facts: DataFacts) -> tuple[bool, str]:
    if facts.colour:
        return True, "colour images: k-means would group them by colour, not content"
    return False, "grey images: no colour to take away"


def resolve(params: Params, facts: DataFacts) -> tuple[Params, dict[str, str]]:
    """`params` with every `auto` replaced; and, for each one replaced, `value (why)`. The colour
    rule waits while `facts.colour` is unknown (ingest sizes the cache before decoding it)."""
    raw = params.to_dict()
    notes: dict[str, str] = {}

    def fill(section: str, key: str, rule) -> None:
        if raw[section][key] == AUTO:
            value, why = rule()
            raw[section][key] = value
            notes[f"{section}.{key}"] = f"{str(value).lower()} ({why})"

    if facts.colour is not None:
        fill("model", "sobel", lambda: sobel(facts))
    fill("data", "resolution", lambda: resolution(params.model.arch, facts))
    method, c = params.model.method, raw["cluster"]
    split = 1 if c["super_clusters"] == AUTO else c["super_clusters"]
    fill("cluster", "k", lambda: k(facts, split))
    fill("cluster", "pca_dim", lambda: pca_dim(c["k"], params.model.embed_dim))
    fill("cluster", "super_clusters", lambda: super_clusters(method, c["k"], c["rotation"], facts))
    fill("train", "batch_size", lambda: batch_size(facts))
    fill("train", "epochs", lambda: epochs(method, facts))
    fill("cluster", "reassign_every", lambda: reassign_every(method, raw["train"]["epochs"]))
    return params_from_dict(raw), notes


def with_resolution(params: Params, side: int) -> Params:
    """The params with `data.resolution` set to the image cache's side."""
    return params.replace("data", resolution=side)
