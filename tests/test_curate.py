"""Curated subsets on real digits images, clustered by the pipeline's own step (faiss).

The features here are raw pixels: curation reads whatever features.npy holds, and no network has
to be trained to test it. Duplicates are planted in the image folder as files ingest accepts
(other bytes): exact copies (the same pixels re-encoded) and near copies (one pixel changed).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import numpy as np
import polars as pl
import pytest
from dagster import DagsterInstance, materialize
from mlflow.tracking import MlflowClient
from PIL import Image
from sklearn.datasets import load_digits

from deepcluster import checkpoint, pipeline, tracking
from deepcluster.cluster import cluster_features
from deepcluster.config import CurateParams, params_from_dict
from deepcluster.curate import (
    Pool,
    class_coverage,
    curate,
    curate_step,
    distance_bins,
    water_fill,
)
from deepcluster.data import load_cache
from deepcluster.errors import MissingArtifact, ParamError
from deepcluster.evaluate import pixel_features
from deepcluster.models import build_model
from deepcluster.paths import Artifacts
from orchestration.defs.assets.curation import curated_subset
from orchestration.defs.resources import ArtifactStore, MlflowTracking

from .conftest import fast_params, run_cli

PARAMS = fast_params()  # k = 30 clusters at 16 px
BUDGET = 150  # 5 per cluster: more than the 4 bins


def plant(folder: Path, source: Path, name: str, bump: int) -> tuple[str, str]:
    """A copy of `source` re-encoded by PIL (other bytes), its darkest pixel raised by `bump`."""
    pixels = np.array(Image.open(source))
    pixels.flat[np.argmin(pixels)] += bump
    target = folder / source.parent.name / name
    Image.fromarray(pixels).save(target, format="PNG", optimize=True)
    assert target.read_bytes() != source.read_bytes()
    return f"{source.parent.name}/{name}", f"{source.parent.name}/{source.name}"


@pytest.fixture(scope="module")
def planted(digits_subset: Path, tmp_path_factory: pytest.TempPathFactory):
    """300 digits + 3 exact and 3 near copies, ingested, pixel features, clustered (k=30)."""
    tmp = tmp_path_factory.mktemp("curate")
    folder = tmp / "images"
    shutil.copytree(digits_subset, folder)
    firsts = [min((digits_subset / str(d)).iterdir()) for d in range(1, 7)]
    pairs = {
        "exact": [plant(folder, src, "exact_copy.png", 0) for src in firsts[:3]],
        "near": [plant(folder, src, "near_copy.png", 16) for src in firsts[3:]],
    }
    art = Artifacts(tmp / "artifacts")
    pipeline.ingest(folder, PARAMS, art, show=False)
    art.features.parent.mkdir(parents=True)
    np.save(art.features, pixel_features(load_cache(art.cache)))
    resolved, _ = pipeline.resolve_training(PARAMS, art, *pipeline.ingested(art))
    checkpoint.export_model(build_model(resolved.model, [30]), resolved, art.model)  # its params
    pipeline.cluster(art, PARAMS)
    return art, pairs


@pytest.fixture(scope="module")
def curated(planted):
    art, _ = planted
    return curate_step(art, CurateParams(budget=BUDGET))


def test_water_fill_gives_equal_shares_capped_by_size() -> None:
    assert water_fill([100, 3, 1, 50], 20).tolist() == [8, 3, 1, 8]  # the small give back
    assert water_fill([1000, 2, 2], 9).tolist() == [5, 2, 2]  # the large one cannot take all
    assert water_fill([5, 2], 100).tolist() == [5, 2]  # a budget beyond the pool takes it all
    assert water_fill([5, 5, 5, 5], 2).tolist() == [1, 0, 0, 1]  # leftovers evenly spaced
    assert water_fill([5, 5, 5], 0).tolist() == [0, 0, 0]


def test_equal_frequency_bins_follow_the_distance() -> None:
    distances = np.array([0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.8])
    bins = distance_bins(np.arange(7), distances, 3)
    assert [b.tolist() for b in bins] == [[1, 5, 3], [2, 4], [6, 0]]
    assert len(distance_bins(np.arange(2), distances, 4)) == 2  # never more bins than images


def test_subset_respects_the_budget_and_covers_every_cluster_and_bin(planted, curated) -> None:
    art, _ = planted
    subset = pl.read_parquet(art.curated_subset)
    assert subset.equals(curated.subset)
    assert subset.height == BUDGET and subset["path"].n_unique() == BUDGET
    assert subset.columns[:4] == ["path", "row", "cluster", "bin"] and "reason" in subset.columns
    clusters = pl.read_parquet(art.assignments)["cluster"]
    assert set(subset["cluster"]) == set(clusters) and clusters.n_unique() == PARAMS.cluster.k
    sizes = dict(zip(*np.unique(clusters.to_numpy(), return_counts=True)))
    for (cluster,), group in subset.group_by("cluster"):
        expected = min(4, sizes[cluster] - _dropped_in(curated, cluster))
        assert sorted(set(group["bin"])) == list(range(expected)), f"cluster {cluster}"
    assert subset["reason"].str.contains("distance bin").all()
    sheets = sorted(art.contact_sheets.glob("cluster_*.png"))
    assert len(sheets) == PARAMS.cluster.k


def _dropped_in(result, cluster: int) -> int:
    return int((result.duplicates["cluster"] == cluster).sum())


def test_planted_duplicates_are_dropped_and_recorded_with_their_twin(planted, curated) -> None:
    art, pairs = planted
    dups = pl.read_parquet(art.curate_duplicates)
    assert dups.height == 6  # only the planted ones: no real digit is dropped
    for kind, planted_pairs in pairs.items():
        for copy, original in planted_pairs:
            [row] = dups.filter(pl.col("path").is_in([copy, original])).to_dicts()
            assert row["kind"] == kind and {row["path"], row["twin"]} == {copy, original}
            assert row["similarity"] > 1 - CurateParams().eps
    chosen = set(curated.subset["path"])
    assert not chosen & set(dups["path"])
    assert curated.summary["exact_duplicates"] == 3 and curated.summary["near_duplicates"] == 3
    everything = curate_step(art, CurateParams(budget=10_000, eps=0.0))  # no near-duplicate removal
    assert everything.summary["exact_duplicates"] == 3  # exact copies go whatever eps is
    assert everything.subset.height == 306 - 3


def test_hierarchical_sampling_shares_the_budget_between_parent_groups(planted) -> None:
    art, _ = planted
    result = curate_step(art, CurateParams(budget=60, method="hierarchical", parents=5))
    subset = result.subset
    assert subset.height == 60 and subset["parent"].null_count() == 0
    pool = pl.read_parquet(art.assignments).filter(
        ~pl.col("path").is_in(result.duplicates["path"].to_list())
    )
    parent_of = subset.select("cluster", "parent").unique()
    capacity = pool.join(parent_of, on="cluster", how="left").group_by("parent").len()
    counts = subset.group_by("parent").len().join(capacity, on="parent", suffix="_pool")
    open_groups = counts.filter(pl.col("len") < pl.col("len_pool"))["len"]
    full_groups = counts.filter(pl.col("len") == pl.col("len_pool"))["len"]
    assert open_groups.max() - open_groups.min() <= 1  # equal shares where the size allows
    assert full_groups.is_empty() or full_groups.max() <= open_groups.min()


def skewed_digits(major: int = 0, minor_count: int = 18, seed: int = 0):
    """sklearn's digits with one class ten times as frequent as each other class."""
    digits = load_digits()
    rng = np.random.default_rng(seed)
    keep = [
        np.flatnonzero(digits.target == c)
        if c == major
        else rng.choice(np.flatnonzero(digits.target == c), minor_count, replace=False)
        for c in range(10)
    ]
    rows = np.concatenate(keep)
    return digits.data[rows].astype(np.float32), digits.target[rows].astype(str)


def test_on_a_skewed_set_curation_covers_more_classes_than_random() -> None:
    features, labels = skewed_digits()
    clustering = cluster_features(features, k=30, pca_dim=16, seed=0)
    pool = Pool(
        paths=np.array([f"img{i}" for i in range(len(labels))]),
        clusters=clustering.assignments,
        distances=clustering.distances,
        embeddings=features,
        centroids=clustering.centroids,
        labels=labels,
    )
    budget = 30
    curated = [curate(pool, CurateParams(budget=budget, seed=s)).subset["row"] for s in range(5)]
    rng = np.random.default_rng(0)
    randoms = [rng.choice(len(labels), budget, replace=False) for _ in range(20)]

    def present(rows) -> int:
        return class_coverage(labels[np.asarray(rows)], labels)["classes_present"]

    curated_classes = [present(rows) for rows in curated]
    random_classes = [present(rows) for rows in randoms]
    assert min(curated_classes) > np.mean(random_classes)
    assert np.mean(curated_classes) >= np.mean(random_classes) + 1


def test_class_coverage_figures() -> None:
    figures = class_coverage(np.array(["a", "a", "a", "b"]), np.array(["a", "b", "c", "d"]))
    assert figures["classes_present"] == 2 and figures["classes"] == 4
    assert figures["imbalance"] == 3.0
    assert figures["entropy_bits"] == pytest.approx(0.811, abs=1e-3)
    assert figures["normalised_entropy"] == pytest.approx(0.811 / 2, abs=1e-3)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"budget": 0}, r"curate.budget = 0: must be a whole number >= 1$"),
        ({"method": "kmeans"}, r"curate.method = 'kmeans': must be one of bins, hierarchical"),
        ({"eps": 1.5}, r"curate.eps = 1.5: must be a number in \[0, 1\)"),
        ({"bins": 0}, r"curate.bins = 0: must be a whole number in 1..1000"),
    ],
)
def test_bad_settings_get_a_one_line_error(settings, message) -> None:
    with pytest.raises(ParamError, match=message):
        params_from_dict({"curate": settings})


def test_missing_inputs_name_the_step_to_run(tmp_path: Path) -> None:
    with pytest.raises(MissingArtifact, match=r"run `deepcluster cluster` first"):
        curate_step(Artifacts(tmp_path), CurateParams(budget=5))


@pytest.mark.slow
def test_the_curate_command_prints_a_summary(planted, tmp_path: Path) -> None:
    art, _ = planted
    copy = Artifacts(tmp_path / "artifacts")
    shutil.copytree(art.root, copy.root)
    done = run_cli("curate", "--budget", "40", "--artifacts", str(copy.root), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "40 of 300 images chosen (bins, budget 40); 30 of 30 clusters covered" in out
    assert "dropped 3 exact and 3 near duplicates" in out
    assert len(pl.read_parquet(copy.curated_subset)) == 40


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)
    monkeypatch.chdir(tmp_path)  # ./mlruns (the artifact store) lands here
    return uri


@pytest.mark.slow
def test_the_dagster_asset_shows_contact_sheets_and_logs_to_mlflow(
    planted, mlflow_store: str, tmp_path: Path
) -> None:
    art, _ = planted
    copy = Artifacts(tmp_path / "artifacts")
    shutil.copytree(art.root, copy.root)
    run_id = MlflowClient().create_run(tracking.experiment_id()).info.run_id
    tracking.record_run(copy.run_file, run_id)  # the training run the model would have
    resources = {
        "artifacts": ArtifactStore(root=str(copy.root)),
        "mlflow": MlflowTracking(tracking_uri=mlflow_store),
    }
    config = {"ops": {"curated_subset": {"config": {"budget": 60, "method": "hierarchical"}}}}
    with DagsterInstance.ephemeral() as instance:
        result = materialize(
            [curated_subset], instance=instance, resources=resources, run_config=config
        )
    [event] = result.get_asset_materialization_events()
    meta = {k: v.value for k, v in event.step_materialization_data.materialization.metadata.items()}
    assert meta["dagster/row_count"] == 60 and meta["method"] == "hierarchical"
    assert meta["contact_sheets"].count("](data:image/png;base64,") == 12
    dropped = [record.data["dropped"] for record in meta["duplicates"].records]
    assert "1/exact_copy.png" in dropped and meta["mlflow_run_id"] == run_id
    client = MlflowClient()
    metrics = client.get_run(run_id).data.metrics
    assert metrics["subset/chosen"] == 60
    # MLflow lists chart sections by name: the curation's must follow the training curves'
    assert min(key for key in metrics if key.startswith("subset/")) > "epoch/~"
    logged = {f.path for f in client.list_artifacts(run_id, "curate")}
    assert {"curate/subset.parquet", "curate/duplicates.parquet", "curate/sheets"} <= logged
