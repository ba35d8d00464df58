"""evaluate.py's metrics against brute force and scikit-learn on small random cases."""

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier

from deepcluster import evaluate


@pytest.mark.parametrize("seed", range(5))
def test_best_map_accuracy_is_the_best_of_every_one_to_one_map(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, 60)
    clusters = rng.integers(0, 4, 60)
    brute = max(
        np.mean(np.array(perm)[clusters] == labels) for perm in itertools.permutations(range(4))
    )
    assert evaluate.best_map_accuracy(labels, clusters) == pytest.approx(brute)


def test_best_map_accuracy_with_more_clusters_than_labels_maps_the_extras_to_nothing() -> None:
    labels = np.array([0, 0, 1, 1, 1, 1])
    clusters = np.array([5, 5, 7, 7, 9, 9])  # 9's two images have no label left to take
    assert evaluate.best_map_accuracy(labels, clusters) == pytest.approx(4 / 6)


def test_knn_top1_matches_brute_force_weighted_cosine_votes() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 8)).astype(np.float32)
    y = rng.integers(0, 3, 120)
    train, test = np.arange(90), np.arange(90, 120)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    right = 0
    for i in test:
        sims = unit[train] @ unit[i]
        top = np.argsort(-sims)[:7]
        votes = np.bincount(y[train][top], weights=sims[top], minlength=3)
        right += votes.argmax() == y[i]
    assert evaluate.knn_top1(x, y, train, test, k=7) == pytest.approx(right / len(test))


def test_knn_top1_with_one_neighbour_matches_scikit_learn() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(150, 5)).astype(np.float32)
    y = rng.integers(0, 4, 150)
    train, test = np.arange(100), np.arange(100, 150)
    sk = KNeighborsClassifier(n_neighbors=1, metric="cosine").fit(x[train], y[train])
    assert evaluate.knn_top1(x, y, train, test, k=1) == pytest.approx(sk.score(x[test], y[test]))


def test_linear_probe_separates_separable_classes_and_not_noise() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 300)
    separable = rng.normal(size=(300, 6)) + 4 * np.eye(3, 6)[y]
    train, test = evaluate.split(300, y, 0.3, seed=0)
    assert evaluate.linear_probe(separable, y, train, test, max_iter=200) > 0.95
    noise = rng.normal(size=(300, 6))
    assert evaluate.linear_probe(noise, y, train, test, max_iter=200) < 0.6


def test_split_is_stratified_disjoint_and_seeded() -> None:
    y = np.repeat(np.arange(4), 25)
    train, test = evaluate.split(len(y), y, 0.2, seed=3)
    assert set(train).isdisjoint(test) and len(train) + len(test) == len(y)
    assert np.bincount(y[test]).tolist() == [5, 5, 5, 5]
    again = evaluate.split(len(y), y, 0.2, seed=3)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])


def test_split_of_a_tiny_labelled_folder_falls_back_to_a_random_split() -> None:
    """3 images of each of 10 classes: a 30% test share of 9 images cannot hold every class, which
    made scikit-learn's stratified split raise; the split is then a plain seeded one."""
    y = np.repeat(np.arange(10), 3)
    train, test = evaluate.split(len(y), y, 0.3, seed=0)
    assert set(train).isdisjoint(test) and sorted([*train, *test]) == list(range(30))
    assert len(test) == 9
    again = evaluate.split(len(y), y, 0.3, seed=0)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])


@pytest.mark.slow  # ingest, features, clustering and every probe on 30 real digits
def test_evaluate_step_on_three_images_per_class(tmp_path: Path, digits_folder: Path) -> None:
    from deepcluster.paths import Artifacts

    from .conftest import build_artifacts, fast_params

    tiny = tmp_path / "tiny"
    for label_dir in sorted(p for p in digits_folder.iterdir() if p.is_dir()):
        (tiny / label_dir.name).mkdir(parents=True)
        for image in sorted(label_dir.iterdir())[:3]:
            shutil.copy2(image, tiny / label_dir.name / image.name)
    art = build_artifacts(Artifacts(tmp_path / "artifacts"), tiny, fast_params(cluster={"k": 5}),
                          trained=False)  # fmt: skip
    metrics = json.loads(art.metrics.read_text())
    assert metrics["images"] == 30
    for key in ("nmi", "knn_top1", "linear_top1", "knn_top1_pixels", "linear_top1_random_init"):
        assert 0 <= metrics[key] <= 1, key


def test_clustering_scores_are_perfect_on_well_separated_blobs() -> None:
    rng = np.random.default_rng(4)
    y = np.repeat(np.arange(3), 40)
    x = (rng.normal(scale=0.05, size=(120, 4)) + 10 * np.eye(3, 4)[y]).astype(np.float32)
    scores = evaluate.clustering_scores(x, y, seed=0, redo=3)
    assert scores == pytest.approx({"nmi": 1.0, "ari": 1.0, "accuracy": 1.0})


def test_pixel_features_keep_one_grey_channel_and_block_average() -> None:
    grey = np.repeat(np.arange(64, dtype=np.uint8).reshape(1, 1, 8, 8), 3, axis=1)
    assert evaluate.pixel_features(grey).shape == (1, 64)
    pooled = evaluate.pixel_features(grey, max_side=4)
    expected = np.arange(64).reshape(4, 2, 4, 2).mean(axis=(1, 3)) / 255.0
    assert np.allclose(pooled.reshape(4, 4), expected)


def test_purity_counts_images_in_clusters_led_by_their_own_label() -> None:
    from deepcluster.evaluate import purity

    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    assert purity(labels, np.arange(8)) == 1.0  # one image per cluster: every cluster is pure
    assert purity(labels, np.array([0, 0, 1, 1, 1, 2, 2, 2])) == pytest.approx(6 / 8)
    assert purity(labels, np.zeros(8, dtype=int)) == pytest.approx(3 / 8)


def test_images_of_no_class_are_clustered_but_left_out_of_the_label_figures(
    tmp_path: Path, digits_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A `none/` folder (noise, blanks, other sets' images) is no class to recover."""
    from deepcluster.data import NO_CLASS
    from deepcluster.paths import Artifacts

    from .conftest import build_artifacts, fast_params

    tiny = tmp_path / "tiny"
    for label_dir in sorted(p for p in digits_folder.iterdir() if p.is_dir()):
        (tiny / label_dir.name).mkdir(parents=True)
        for image in sorted(label_dir.iterdir())[:3]:
            shutil.copy2(image, tiny / label_dir.name / image.name)
    (tiny / NO_CLASS).mkdir()
    for image in sorted((digits_folder / "8").iterdir())[3:9]:  # digits beyond the 8/ kept
        shutil.copy2(image, tiny / NO_CLASS / image.name)
    seen, compare = {}, evaluate.compare

    def spy(views, labels, *rest, **kwargs):
        seen["labels"] = labels
        return compare(views, labels, *rest, **kwargs)

    monkeypatch.setattr(evaluate, "compare", spy)
    art = build_artifacts(Artifacts(tmp_path / "artifacts"), tiny, fast_params(cluster={"k": 5}),
                          trained=False)  # fmt: skip
    metrics = json.loads(art.metrics.read_text())
    assert metrics["images"] == 36  # clustered with the rest
    assert len(seen["labels"]) == 30 and NO_CLASS not in set(seen["labels"])


def test_knn_agreement_is_high_for_clusters_that_follow_the_space_and_chance_otherwise() -> None:
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(4), 60)
    blobs = np.eye(8)[groups] * 5 + rng.normal(0, 0.1, (240, 8))
    assert evaluate.knn_agreement(blobs, groups, 10, seed=0) == 1.0
    shuffled = evaluate.knn_agreement(blobs, rng.permutation(groups), 10, seed=0)
    assert 0.1 < shuffled < 0.4  # chance: a quarter
