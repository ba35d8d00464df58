"""The shortcut detector: clusters that follow colour score high, clusters of content score near
zero, and the health check warns only when the trained clusters follow colour as much as the
untrained network's."""

from __future__ import annotations

import numpy as np
import pytest

from deepcluster import evaluate, health, shortcut
from deepcluster.cluster import assign, kmeans
from deepcluster.config import load_params
from deepcluster.sample import load_mnist5k
from deepcluster.sample_colour import colour_nuisance


@pytest.fixture(scope="module")
def nuisance() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The colour-nuisance images (n, 3, 28, 28), their digits and their colour groups."""
    pixels, labels = colour_nuisance(*load_mnist5k())
    images = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))
    stats = shortcut.image_statistics(evaluate.downsample(images, shortcut.SAMPLE_SIDE))
    return images, labels, shortcut.statistics_groups(stats, seed=0)


def test_colour_groups_say_nothing_about_the_class_where_colour_is_a_nuisance(nuisance) -> None:
    _, labels, groups = nuisance
    assert len(np.unique(groups)) == shortcut.GROUPS
    assert abs(shortcut.scores(groups, {"trained": labels})["shortcut"]) < 0.02


def test_clusters_by_mean_colour_score_high_and_random_clusters_near_zero(nuisance) -> None:
    images, _, groups = nuisance
    by_colour = evaluate.downsample(images, 1).reshape(len(images), 3)  # mean colour per image
    centroids, _ = kmeans(np.ascontiguousarray(by_colour), 30, seed=1)
    colour_ids = assign(by_colour, centroids)[0]
    rng = np.random.default_rng(0)
    figures = shortcut.scores(
        groups, {"trained": colour_ids, "random": rng.integers(0, 30, len(groups))}
    )
    assert figures["shortcut"] > 0.3, figures
    assert abs(figures["shortcut_random"]) < 0.02, figures


def test_size_and_aspect_count_when_images_differ_in_size() -> None:
    x = np.full((40, 3, 4, 4), 0.5, dtype=np.float32)  # every image alike in colour
    widths = np.array([64] * 20 + [640] * 20)
    heights = np.array([64] * 20 + [480] * 20)
    groups = shortcut.statistics_groups(shortcut.image_statistics(x, widths, heights), groups=2)
    assert len(np.unique(groups[:20])) == 1 and len(np.unique(groups[20:])) == 1
    assert groups[0] != groups[-1]
    alike = shortcut.statistics_groups(shortcut.image_statistics(x))
    assert (alike == 0).all()  # nothing varies: nothing to follow


def test_the_warning_fires_only_when_training_follows_colour_as_much_as_random_weights() -> None:
    assert health.shortcut_problems({"shortcut": 0.35, "shortcut_random_init": 0.33})
    assert not health.shortcut_problems({"shortcut": 0.14, "shortcut_random_init": 0.33})
    # far below the floor: statistics barely matter, whatever the untrained network does
    assert not health.shortcut_problems({"shortcut": 0.05, "shortcut_random_init": 0.02})
    assert not health.shortcut_problems({"nmi": 0.5})  # figures from before the detector
    (message,) = health.shortcut_problems({"shortcut": 0.4, "shortcut_random_init": 0.3})
    assert "colour" in message and "model.sobel: true" in message
    # the advice names only what the run has not tried
    tried = load_params(None, {"model.sobel": True, "augment.jitter": 0.8})
    (message,) = health.shortcut_problems({"shortcut": 0.4, "shortcut_random_init": 0.3}, tried)
    assert "augment.grayscale: 0.5" in message and "model.sobel" not in message
    everything = load_params(None, {"model.sobel": True, "augment.jitter": 0.8,
                                    "augment.grayscale": 0.5})  # fmt: skip
    (message,) = health.shortcut_problems({"shortcut": 0.4, "shortcut_random_init": 0.3}, everything)
    assert "train longer" in message
