"""metrics.json is checked against its schema (deepcluster.figures) before it can register or
promote a model: a file cut short, a forged figure or a lower-is-better promotion metric is one
line. No training: every refusal comes before the model files are read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from deepcluster import figures, promotion, registry
from deepcluster.errors import UserError
from deepcluster.paths import Artifacts

from .conftest import run_cli

# what evaluate writes for a labelled folder (figures as a short training gives them)
EVALUATED = {
    "k": 30, "images": 1797, "empty_clusters": 0, "empty_clusters_kmeans": 2,
    "largest_cluster_share": 0.06, "largest_cluster_share_kmeans": 0.07,
    "smallest_cluster_size": 21, "nmi_stability": 0.8,
    "nmi": 0.7, "ari": 0.55, "accuracy": 0.75, "knn_top1": 0.95, "linear_top1": 0.93,
    "nmi_k": 0.72, "purity_k": 0.9, "nmi_embedding": 0.69, "accuracy_embedding": 0.74,
    **{f"{key}_{base}": 0.3 for key in figures.PROBES for base in figures.BASELINES},
    "shortcut": -0.002, "shortcut_random_init": 0.3, "shortcut_pixels": 0.4,
    **{f"{key}{suffix}": 0.5 for key in figures.LABEL_FREE for suffix in ("", "_random_init", "_pixels")},
}  # fmt: skip


def with_metrics(tmp_path: Path, text: str) -> Artifacts:
    art = Artifacts(tmp_path / "artifacts")
    art.metrics.parent.mkdir(parents=True)
    art.metrics.write_text(text)
    return art


def test_what_evaluate_writes_passes_and_unlabelled_figures_suffice(tmp_path: Path) -> None:
    assert figures.validate(EVALUATED, "m") == EVALUATED
    unlabelled = {k: v for k, v in EVALUATED.items() if not figures.FIGURES[k].labelled}
    assert figures.validate({**unlabelled, "nmi_stability": None}, "m")
    # a valid file gets past the schema: the next refusal is the missing model
    art = with_metrics(tmp_path, json.dumps(EVALUATED))
    with pytest.raises(UserError, match=r"model.pt not found"):
        registry.register_model(art)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (json.dumps(EVALUATED)[:-40], r"not valid JSON \(.* at line 1, column \d+; cut short\?\)"),
        ("", r"not valid JSON \(Expecting value at line 1, column 1"),
        ("[1, 2]", "must be a JSON object of figures, got list"),
        (json.dumps({**EVALUATED, "nmi": 5.0}), r"nmi = 5.0: must be a finite number in 0..1$"),
        (json.dumps({**EVALUATED, "ari": -1.5}), r"ari = -1.5: must be a finite number in -1..1"),
        (json.dumps({**EVALUATED, "accuracy": "0.9"}), r"accuracy = '0.9': must be a finite"),
        (json.dumps({**EVALUATED, "nmi": float("nan")}), "NaN is not a finite number"),
        (json.dumps({**EVALUATED, "knn_top1": float("inf")}), "Infinity is not a finite number"),
        (json.dumps({**EVALUATED, "nmi": None}), r"nmi = None: must be a finite number in 0..1$"),
        (json.dumps({**EVALUATED, "empty_clusters_kmeans": 2.5}), "must be a whole number in 0"),
        (json.dumps({**EVALUATED, "empty_clusters": -1}), r"empty_clusters = -1: must be a whole"),
        (json.dumps({**EVALUATED, "empty_clusters_kmeans": 31}), "31: more than k = 30"),
        (json.dumps({**EVALUATED, "k": True}), r"k = True: must be a whole number in 1"),
        (json.dumps({**EVALUATED, "largest_cluster_share_kmeans": 1.5}), "must be a finite number"),
        (json.dumps({**EVALUATED, "nmi_best": 0.99}), r"'nmi_best' is not a figure evaluate writes"),
        (json.dumps({**EVALUATED, "shortcut": 1.2}), r"shortcut = 1.2: must be a finite number"),
        (
            json.dumps({k: v for k, v in EVALUATED.items() if k != "largest_cluster_share_kmeans"}),
            "largest_cluster_share_kmeans is missing",
        ),
    ],
)
def test_a_bad_metrics_file_is_one_line_naming_the_file(tmp_path, text: str, message: str) -> None:
    art = with_metrics(tmp_path, text)
    with pytest.raises(UserError, match=message) as refused:
        registry.register_model(art)
    assert str(refused.value).startswith(f"{art.metrics}: ")
    assert "\n" not in str(refused.value)


def test_the_cli_says_a_truncated_file_in_one_line(tmp_path: Path) -> None:
    art = with_metrics(tmp_path, json.dumps(EVALUATED)[:100])
    result = run_cli("register", "--artifacts", str(art.root), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"error: {art.metrics}: not valid JSON"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("metric", "why"),
    [
        ("largest_cluster_share", "lower is better for it"),
        ("empty_clusters", "lower is better for it"),
        ("empty_clusters_kmeans", "lower is better for it"),
        ("nmi_pixels", "a baseline's figure, not the model's"),
        ("images", "it describes the data or the clustering"),
        ("smallest_cluster_size", "it describes the data or the clustering"),
        ("accurcy", "not a figure of metrics.json"),
    ],
)
def test_only_higher_is_better_figures_of_the_model_can_decide_champion(
    tmp_path: Path, metric: str, why: str
) -> None:
    art = with_metrics(tmp_path, json.dumps(EVALUATED))
    message = rf"metric '{metric}': ({why}).*choose auto or one of: nmi_stability, nmi, ari"
    with pytest.raises(UserError, match=message):
        registry.register_model(art, metric=metric)
    with pytest.raises(UserError, match=message):
        promotion.promote(MlflowClient(), "never", promotion.Record("1", metric, 0.01, "md5"))
    assert metric not in figures.PROMOTION_METRICS


def test_the_cli_refuses_a_lower_is_better_metric_in_one_line(tmp_path: Path) -> None:
    art = with_metrics(tmp_path, json.dumps(EVALUATED))
    args = ("register", "--artifacts", str(art.root), "--metric", "largest_cluster_share")
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "error: metric 'largest_cluster_share': lower is better for it" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    shown = run_cli("register", "--help", cwd=tmp_path).stdout
    assert "nmi_stability" in shown and "largest_cluster_share" not in shown


def test_a_forged_or_unusable_champion_record_blocks_nothing() -> None:
    """A champion whose recorded value is out of its range (a tag edited to NMI 5) or ranked by a
    lower-is-better figure has no usable value: a real version takes over."""
    client = MlflowClient()
    name = "forged"
    client.create_registered_model(name)
    forged = [
        {"promotion_metric": "nmi", "promotion_value": "5.0"},
        {"promotion_metric": "largest_cluster_share", "promotion_value": "0.01"},
        {"promotion_metric": "nmi", "promotion_value": "nan"},
    ]
    for tags in forged:
        version = client.create_model_version(name, "file:///nowhere", tags={**tags, "data_md5": "m"})
        record = promotion.Record.of(client, version)
        assert record.value is None, tags
        verdict = promotion.judge(promotion.Record("9", "nmi", 0.2, "m"), record)
        assert verdict.promote and verdict.reason.endswith("has no usable value")
    with pytest.raises(UserError, match=r"version 9: nmi = 5.0: must be a finite number in 0..1"):
        promotion.promote(client, name, promotion.Record("9", "nmi", 5.0, "m"))
