"""`auto` parameters resolve to sensible values on real folders of small, MNIST-sized and
photo-sized images (scanned by the ingest step itself)."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepcluster import data, pipeline
from deepcluster.config import load_params
from deepcluster.paths import Artifacts
from tests.conftest import ROOT


def folder_of(tmp_path: Path, count: int, side: tuple[int, int]) -> Path:
    """`count` random RGB PNGs of `side` (w, h) in two class folders."""
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = tmp_path / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (side[1], side[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.png")
    return tmp_path


def resolved_for(folder: Path, count: int) -> tuple[dict, dict[str, str]]:
    """The repo's params.yaml resolved against the folder's manifest, scaled to `count` images
    (the rules read only the image count and sizes, so a manifest repeated stands for more)."""
    manifest, _ = data.scan_images(folder, workers=0)
    repeats = -(-count // manifest.height)
    manifest = manifest.sample(count, with_replacement=True, seed=0) if repeats > 1 else manifest
    params, notes = pipeline.resolve_params(load_params(ROOT / "params.yaml"), manifest)
    return params.to_dict(), notes


@pytest.mark.parametrize(
    ("side", "count", "expected"),
    [
        # the bundled digits: 8 px upsampled to smallconv's 16, ~100 epochs over 1,797 images
        ((8, 8), 1797, {"resolution": 16, "k": 72, "pca_dim": 16, "batch_size": 32, "epochs": 100}),
        # MNIST-5k
        (
            (28, 28),
            5000,
            {"resolution": 28, "k": 200, "pca_dim": 64, "batch_size": 128, "epochs": 40},
        ),
        # a folder of photos: reduced to smallconv's 64 px; k grows, epochs shrink to the floor
        (
            (200, 150),
            100_000,
            {"resolution": 64, "k": 4000, "pca_dim": 128, "batch_size": 256, "epochs": 10},
        ),
    ],
)
def test_auto_values_fit_the_folder(tmp_path: Path, side, count, expected) -> None:
    folder = folder_of(tmp_path, 12, side)
    raw, notes = resolved_for(folder, count)
    got = {
        "resolution": raw["data"]["resolution"],
        "k": raw["cluster"]["k"],
        "pca_dim": raw["cluster"]["pca_dim"],
        "batch_size": raw["train"]["batch_size"],
        "epochs": raw["train"]["epochs"],
    }
    assert got == expected
    # every auto value says why it is what it is
    assert set(notes) == {
        "data.resolution",
        "cluster.k",
        "cluster.pca_dim",
        "cluster.super_clusters",
        "cluster.reassign_every",
        "train.batch_size",
        "train.epochs",
    }
    assert f"median shorter side {min(side)} px" in notes["data.resolution"]


def test_a_large_image_folder_is_ingested_at_the_resolved_side(tmp_path: Path) -> None:
    folder = folder_of(tmp_path / "photos", 6, (200, 150))
    art = Artifacts(tmp_path / "artifacts")
    summary = pipeline.ingest(folder, load_params(ROOT / "params.yaml"), art, show=False)
    assert summary.resolution == 64
    assert pipeline.ingested(art)[1].shape[1:] == (3, 64, 64)


@pytest.mark.parametrize(("count", "expected"), [(1797, 33), (5000, 12), (100_000, 10)])
def test_v1_trains_fewer_epochs_than_v2(tmp_path: Path, count: int, expected: int) -> None:
    manifest, _ = data.scan_images(folder_of(tmp_path, 4, (28, 28)), workers=0)
    manifest = manifest.sample(count, with_replacement=True, seed=0)
    v1 = load_params(ROOT / "params.yaml", {"model.method": "deepcluster"})
    params, notes = pipeline.resolve_params(v1, manifest)
    assert params.train.epochs == expected
    assert "60,000 images seen (deepcluster)" in notes["train.epochs"]


@pytest.mark.parametrize(
    ("count", "super_clusters", "reassign_every", "epochs"),
    # digits: too few images to split the heads further than the rotations; more images: up to
    # sqrt(k) super-clusters; the paper's 3 epochs per clustering unless that leaves under 10
    [(1797, 1, 3, 33), (5000, 5, 1, 12), (100_000, 50, 1, 10), (1_281_167, 100, 1, 10)],
)
def test_deepercluster_autos_follow_the_data(
    tmp_path: Path, count: int, super_clusters: int, reassign_every: int, epochs: int
) -> None:
    manifest, _ = data.scan_images(folder_of(tmp_path, 4, (28, 28)), workers=0)
    manifest = manifest.sample(count, with_replacement=True, seed=0)
    deeper = load_params(ROOT / "params.yaml", {"model.method": "deepercluster"})
    params, notes = pipeline.resolve_params(deeper, manifest)
    c = params.cluster
    assert (c.super_clusters, c.reassign_every, params.train.epochs) == (
        super_clusters, reassign_every, epochs
    )
    assert c.k % c.super_clusters == 0
    assert "largest divisor of k" in notes["cluster.super_clusters"]
    assert "the paper's 3" in notes["cluster.reassign_every"]
    # the other methods: one level, a clustering every epoch
    v2, notes = pipeline.resolve_params(load_params(ROOT / "params.yaml"), manifest)
    assert (v2.cluster.super_clusters, v2.cluster.reassign_every) == (1, 1)
    assert "clusters every epoch" in notes["cluster.reassign_every"]


def test_an_explicit_super_cluster_count_rounds_auto_k_to_a_multiple(tmp_path: Path) -> None:
    manifest, _ = data.scan_images(folder_of(tmp_path, 4, (28, 28)), workers=0)
    manifest = manifest.sample(1797, with_replacement=True, seed=0)
    deeper = load_params(
        ROOT / "params.yaml", {"model.method": "deepercluster", "cluster.super_clusters": 5}
    )
    params, notes = pipeline.resolve_params(deeper, manifest)
    assert params.cluster.k == 70 and "multiple of cluster.super_clusters (5)" in notes["cluster.k"]


def test_explicit_values_are_kept(tmp_path: Path) -> None:
    folder = folder_of(tmp_path, 4, (28, 28))
    manifest, _ = data.scan_images(folder, workers=0)
    explicit = load_params(ROOT / "params.yaml", {"cluster.k": 30, "train.epochs": 3})
    params, notes = pipeline.resolve_params(explicit, manifest)
    assert params.cluster.k == 30 and params.train.epochs == 3
    assert "cluster.k" not in notes and "train.epochs" not in notes


def test_colour_is_told_from_grey_and_near_grey(tmp_path: Path) -> None:
    from deepcluster.autoparams import is_colour

    rng = np.random.default_rng(0)
    grey = np.repeat(rng.integers(0, 256, (50, 1, 16, 16), dtype=np.uint8), 3, axis=1)
    assert not is_colour(grey)
    noisy = grey.astype(int) + rng.integers(-3, 4, grey.shape)  # JPEG-like chroma noise on grey
    assert not is_colour(np.clip(noisy, 0, 255).astype(np.uint8))
    assert is_colour(rng.integers(0, 256, (50, 3, 16, 16), dtype=np.uint8))
    mostly_grey = np.concatenate([grey[:40], rng.integers(0, 256, (10, 3, 16, 16), dtype=np.uint8)])
    assert not is_colour(mostly_grey)


@pytest.mark.parametrize("colour", [True, False])
def test_sobel_resolves_once_the_images_are_decoded(tmp_path: Path, colour: bool) -> None:
    from deepcluster import autoparams

    manifest, _ = data.scan_images(folder_of(tmp_path, 4, (28, 28)), workers=0)
    params = load_params(ROOT / "params.yaml")
    _, before = pipeline.resolve_params(params, manifest)  # sizes only: colour waits
    assert "model.sobel" not in before
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 3, 28, 28), dtype=np.uint8)
    if not colour:
        images = np.repeat(images[:, :1], 3, axis=1)
    resolved, notes = pipeline.resolve_params(params, manifest, images)
    assert resolved.model.sobel is colour
    assert resolved.model.sobel is autoparams.sobel(autoparams.DataFacts(4, 28, colour))[0]
    assert not resolved.auto_keys()
    assert ("colour images" if colour else "grey images") in notes["model.sobel"]
