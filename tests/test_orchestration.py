"""The Dagster code location: definitions, config, versions, automation, checks, and the whole graph
materialised in process on real digits images with every check passing."""

import json
import os
import shutil
import signal
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from dagster import (
    AssetCheckKey,
    AssetKey,
    AssetSelection,
    DefaultSensorStatus,
    Definitions,
    evaluate_automation_conditions,
    instance_for_test,
    load_from_defs_folder,
    materialize,
)

import orchestration
from deepcluster import config as library_config
from deepcluster import promotion
from deepcluster.data import read_manifest
from deepcluster.lineage import dvc_md5, observed_version
from deepcluster.paths import Artifacts
from orchestration import expectations
from orchestration.config import (
    DEFAULTS,
    AugmentConfig,
    ClusterConfig,
    CurateConfig,
    DataConfig,
    EvalConfig,
    ModelConfig,
    TrainConfig,
    TrainingConfig,
    params_from_config,
    run_config_for,
)
from orchestration.definitions import defs
from orchestration.defs import checks
from orchestration.defs.assets.curation import curated_subset
from orchestration.defs.assets.steps import (
    cluster_assignments,
    eval_report,
    features,
    ingest,
    raw_images,
    registered_model,
)
from orchestration.defs.assets.training import GPU_TAGS, checkpoint
from orchestration.defs.automation import observe_data_job
from orchestration.defs.resources import ComputeResource
from tests.conftest import fast_params
from tests.orchestration_fixtures import (
    CHECK_NAMES,
    MATERIALISED,
    PARTITIONED,
    WARNING_CHECKS,
    fast_run_config,
    resources_in,
    store_in,
)

pytestmark = pytest.mark.slow  # whole Dagster graph in a real instance

ASSETS = [
    raw_images,
    ingest,
    checkpoint,
    features,
    cluster_assignments,
    eval_report,
    registered_model,
    curated_subset,
]
CHECKS = [
    checks.manifest_is_valid,
    checks.features_are_sound,
    checks.no_cluster_collapse,
    checks.whitened_features_unit_norm,
    checks.clusters_follow_content,
]


def write_dvc(path: Path, md5: str) -> Path:
    path.write_text(f"outs:\n- md5: {md5}\n  size: 1\n  nfiles: 1\n  hash: md5\n  path: data\n")
    return path


# --- definitions ----------------------------------------------------------------------------------


def test_definitions_load_and_validate() -> None:
    Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    assert {k.to_user_string() for k in graph.get_all_asset_keys()} == {
        "raw_images",
        *MATERIALISED,
        *PARTITIONED,
    }
    job = defs.resolve_job_def("deepcluster_job")
    assert {k.to_user_string() for k in job.asset_layer.selected_asset_keys} == set(MATERIALISED)
    assert {k.name for k in job.asset_layer.asset_graph.asset_check_keys} == CHECK_NAMES


def test_training_op_is_a_retried_gpu_step() -> None:
    train = checkpoint.node_def.node_named("train_epochs").definition
    assert train.pool == "gpu"
    assert json.loads(train.tags["dagster-k8s/config"]) == GPU_TAGS["dagster-k8s/config"]
    assert train.retry_policy.max_retries >= 1


def test_every_asset_has_a_code_version() -> None:
    graph = defs.resolve_asset_graph()
    for key in MATERIALISED:
        assert graph.get(AssetKey(key)).code_version, key


def test_string_selections_parse() -> None:
    """`dagster ... --select` strings need the antlr4 runtime that Dagster pins."""
    graph = defs.resolve_asset_graph()
    chosen = AssetSelection.from_string("key:checkpoint+").resolve(graph)
    assert {k.to_user_string() for k in chosen} == set(MATERIALISED[2:] + PARTITIONED)
    chosen = AssetSelection.from_string("key:image_cache or kind:faiss").resolve(graph)
    assert {k.to_user_string() for k in chosen} == {
        "image_cache",
        "cluster_assignments",
        "curated_subset",
    }


# --- config ---------------------------------------------------------------------------------------


def _fields(cls) -> set[str]:
    return set(cls.model_fields)


def test_config_classes_mirror_params_yaml() -> None:
    """Every hyperparameter is configurable; the `compute` section is ComputeResource's."""
    assert set(DataConfig.model_fields) == _fields(library_config.DataParams)
    assert set(ModelConfig.model_fields) == _fields(library_config.ModelParams)
    assert set(ClusterConfig.model_fields) == _fields(library_config.ClusterParams)
    assert set(TrainConfig.model_fields) == _fields(library_config.TrainParams)
    assert set(AugmentConfig.model_fields) == _fields(library_config.AugmentParams)
    assert set(EvalConfig.model_fields) == _fields(library_config.EvalParams)
    assert set(CurateConfig.model_fields) == _fields(library_config.CurateParams)
    assert ClusterConfig().k == "auto" == DEFAULTS.cluster.k  # auto values are strings here
    assert AugmentConfig().crop_scale == list(DEFAULTS.augment.crop_scale)


def test_run_config_carries_params_to_the_library() -> None:
    params = fast_params(train={"lr": 0.2}, cluster={"k": 12})
    config = run_config_for(params)
    training = TrainingConfig(**config["ops"]["checkpoint"]["config"])
    compute = ComputeResource(**config["resources"]["compute"]["config"])
    built = params_from_config(training, compute.section())
    assert built.to_dict() | {"eval": {}} == params.to_dict() | {"eval": {}}
    assert (
        EvalConfig(**config["ops"]["eval_report"]["config"]).model_dump()
        == params.to_dict()["eval"]
    )
    auto = params_from_config(TrainingConfig(), compute.section())
    assert auto.cluster.k == "auto" and auto.train.epochs == "auto"  # resolved by the train step


# --- versions and automation ----------------------------------------------------------------------


def test_observed_version_is_the_dvc_md5_else_a_listing_hash(
    digits_subset: Path, tmp_path: Path
) -> None:
    dvc = tmp_path / "data.dvc"
    version, source = observed_version(dvc, digits_subset)
    assert version.startswith("listing-") and "not found" in source
    assert observed_version(dvc, digits_subset)[0] == version  # stable
    write_dvc(dvc, "72e131e0cd93ceeb743a1f9fa75849e9.dir")
    pinned = observed_version(dvc, digits_subset)
    assert pinned == ("72e131e0cd93ceeb743a1f9fa75849e9.dir", f"md5 pinned by {dvc}")


def test_repo_data_dvc_parses() -> None:
    repo_dvc = Path(__file__).resolve().parents[1] / "data.dvc"
    if not repo_dvc.exists():
        pytest.skip("no data.dvc in this checkout")
    assert dvc_md5(repo_dvc).endswith(".dir")


def test_a_new_data_version_requests_the_graph_and_an_unchanged_one_does_not(
    digits_subset: Path, tmp_path: Path
) -> None:
    """The automation conditions on the assets, evaluated as the (stopped by default) sensor would:
    raw_images is observed on its schedule; a data version not seen before requests every asset
    after it, the same one again nothing."""
    resources = resources_in(tmp_path, digits_subset)
    graph = Definitions(assets=ASSETS, asset_checks=CHECKS, jobs=[observe_data_job],
                        resources=resources)  # fmt: skip
    keys = graph.resolve_asset_graph().get_all_asset_keys()
    with instance_for_test() as instance:
        cursor, now = None, datetime(2026, 1, 1, 0, 1)

        def tick() -> set[str]:
            nonlocal cursor, now
            result = evaluate_automation_conditions(
                defs=graph, instance=instance, cursor=cursor, evaluation_time=now
            )
            cursor, now = result.cursor, now + timedelta(minutes=5)
            return {k.to_user_string() for k in keys if result.get_requested_partitions(k)}

        def observe() -> None:
            graph.resolve_job_def("observe_data").execute_in_process(instance=instance)

        assert tick() == set()  # the first evaluation only starts the clocks
        assert tick() == {"raw_images"}  # observed every five minutes
        observe()  # no data.dvc: a hash of the folder listing, a version never built
        assert tick() == {"raw_images", *MATERIALISED}
        observe()
        assert tick() == {"raw_images"}  # the same version again: nothing to run
        write_dvc(Path(resources["artifacts"].dvc_file), "aaaa.dir")
        observe()
        assert tick() == {"raw_images", *MATERIALISED}  # data.dvc pins a new md5
        observe()
        assert tick() == {"raw_images"}
    sensor = defs.resolve_sensor_def("data_version_sensor")
    assert sensor.default_status == DefaultSensorStatus.STOPPED  # off unless switched on


def test_dvc_repro_outputs_are_recorded_as_fresh_until_the_data_changes(
    digits_subset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`python -m orchestration sync` after `dvc repro`: Dagster's own stale-status rule sees every
    asset whose files exist as fresh, and image_manifest as stale once data.dvc pins another md5."""
    from dagster._utils.test.data_versions import get_stale_status_resolver  # the UI's rule

    from orchestration.sync import asset_files, record_materialisations

    art = Artifacts(tmp_path / "artifacts")
    for path in (p for paths in asset_files(art).values() for p in paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("made by dvc repro")  # only their existence counts
    dvc = write_dvc(tmp_path / "data.dvc", "aaaa.dir")
    for name, value in (("ARTIFACTS", art.root), ("DATA", digits_subset), ("DVC_FILE", dvc)):
        monkeypatch.setenv(f"DEEPCLUSTER_{name}", str(value))
    location = load_from_defs_folder(path_within_project=Path(orchestration.__file__).parent)
    with instance_for_test() as instance:
        assert sorted(record_materialisations(instance, location, art)) == sorted(MATERIALISED)
        status = get_stale_status_resolver(instance, list(location.assets)).get_status
        assert {status(AssetKey(name)).value for name in MATERIALISED} == {"FRESH"}
        write_dvc(dvc, "bbbb.dir")
        location.resolve_job_def("observe_data").execute_in_process(instance=instance)
        status = get_stale_status_resolver(instance, list(location.assets)).get_status
        assert status(AssetKey("image_manifest")).value == "STALE"


# --- checks on crafted arrays and tables ---------------------------------------------------------


HEALTHY = {"largest_cluster_share_kmeans": 0.05, "empty_clusters_kmeans": 0}


def test_collapse_check_fails_on_one_giant_cluster() -> None:
    k, n = 30, 600
    giant = np.zeros(n, dtype=np.int64)
    giant[:30] = np.arange(30)  # every cluster used, but cluster 0 holds 571 of 600 images
    result = checks.collapse_result(giant, n, {**HEALTHY, "k": k}, 0.5, 0.1)
    assert not result.passed
    assert result.description == "the largest cluster holds 95% of the images (at most 50%)"
    assert result.metadata["largest_cluster_share"].value == pytest.approx(571 / 600)
    assert checks.collapse_result(np.arange(n) % k, n, {**HEALTHY, "k": k}, 0.5, 0.1).passed


def test_collapse_check_sees_what_reseeding_hides() -> None:
    """Balanced final assignments can hide a collapse: k-means put 90% in one cluster and the
    empty ones were re-seeded by splitting it. The check reads k-means' own figures too."""
    k, n = 10, 100
    collapsed = {"largest_cluster_share_kmeans": 0.9, "empty_clusters_kmeans": 8, "k": k}
    result = checks.collapse_result(np.arange(n) % k, n, collapsed, 0.5, 0.5)
    assert not result.passed
    assert [part.split(" before")[0] for part in result.description.split("; ")] == [
        "k-means put 90% in one cluster", "k-means left 8 of 10 clusters empty"
    ]  # fmt: skip


def test_collapse_check_counts_empty_clusters_and_invalid_ids() -> None:
    k, n = 10, 100
    clusters = np.arange(n) % 9  # cluster 9 is empty
    assert checks.collapse_result(clusters, n, {**HEALTHY, "k": k}, 0.5, max_empty=0.1).passed
    result = checks.collapse_result(clusters, n, {**HEALTHY, "k": k}, 0.5, max_empty=0.0)
    assert result.description == "1 of 10 clusters are empty (at most 0% of them)"
    clusters[:3] = [-1, 10, 11]
    result = checks.collapse_result(clusters, n + 1, {**HEALTHY, "k": k}, 0.5, 0.5)
    assert result.description == "100 assignments for 101 images; 3 cluster ids outside 0..9"


def test_unit_norm_check() -> None:
    rng = np.random.default_rng(0)
    unit = rng.normal(size=(50, 8))
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    assert checks.unit_norm_result(unit, 1e-3).passed
    unit[4] *= 2
    unit[7] = np.nan
    result = checks.unit_norm_result(unit, 1e-3)
    assert result.description == "2 of 50 norms are further than 0.001 from 1"
    assert result.metadata["max_norm"].value == pytest.approx(2.0)


def test_shortcut_check_warns_when_clusters_follow_colour(tmp_path: Path) -> None:
    from dagster import AssetCheckSeverity

    store = store_in(tmp_path, tmp_path / "data")
    store.layout.metrics.parent.mkdir(parents=True)
    figures = {"shortcut_random_init": 0.33, "shortcut_pixels": 0.4}
    store.layout.metrics.write_text(json.dumps({"shortcut": 0.35, **figures}))
    warned = checks.clusters_follow_content(artifacts=store)
    assert not warned.passed and warned.severity == AssetCheckSeverity.WARN
    assert "model.sobel" in warned.description and warned.metadata["shortcut"].value == 0.35
    store.layout.metrics.write_text(json.dumps({"shortcut": 0.1, **figures}))
    assert checks.clusters_follow_content(artifacts=store).passed


def test_manifest_check_fails_on_duplicates_and_rejections(digits_subset: Path) -> None:
    from deepcluster.data import scan_images

    manifest, rejected = scan_images(digits_subset)
    ok = expectations.manifest_outcome(manifest, rejected, 100, 10_000, ["L"], 0.05)
    assert ok.passed, ok.rows
    duplicated = pl.concat(
        [manifest, manifest.head(1).with_columns(pl.lit("copy.png").alias("path"))]
    )
    many_rejected = pl.DataFrame(
        {"path": [f"bad{i}" for i in range(50)], "reason": ["corrupt"] * 50}
    )
    bad = expectations.manifest_outcome(duplicated, many_rejected, 1000, 10_000, ["RGB"], 0.05)
    assert set(bad.failed) == {
        "expect_table_row_count_to_be_between",
        "expect_column_values_to_be_unique",
        "expect_column_values_to_be_in_set",
    }
    assert [r["frame"] for r in bad.rows if not r["passed"]].count("files") == 1


def test_features_check_fails_on_nan_and_wrong_shape() -> None:
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(50, 8)).astype(np.float32)
    assert checks.features_result(feats, 50, 8, 0.5).passed
    feats[3, 2] = np.nan
    result = checks.features_result(feats, 50, 8, 0.5)
    assert result.description == "1 rows hold NaN or infinity" and result.metadata["rows"].value == 50
    still = checks.features_result(np.ones((50, 8)), 50, 8, 0.5)  # no dimension varies
    assert still.description == "0% of the dimensions vary (least 50%)"
    zero = checks.features_result(np.zeros((50, 8)), 50, 8, 0.0)
    assert zero.description == "50 rows are zero vectors"
    wrong = checks.features_result(rng.normal(size=(40, 8)), 50, 16, 0.5)
    assert wrong.description == "40 rows for 50 images; 8 dimensions, the model embeds in 16"


# --- the whole graph, in process ------------------------------------------------------------------


@pytest.fixture(scope="module")
def whole_graph(digits_subset: Path, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("whole_graph")
    with instance_for_test() as instance:
        result = materialize(
            [*ASSETS, *CHECKS],
            instance=instance,
            resources=resources_in(tmp, digits_subset),
            run_config=fast_run_config(),
        )
        yield result, Artifacts(tmp / "artifacts"), digits_subset, instance


def _metadata(result, key: str) -> dict:
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key == AssetKey(key)]
    return {k: v.value for k, v in event.step_materialization_data.materialization.metadata.items()}


@pytest.mark.numerics
def test_whole_graph_materialises_with_every_check_passing(whole_graph) -> None:
    result, art, _, _ = whole_graph
    assert result.success
    materialised = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert materialised == set(MATERIALISED)
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert set(checks) == CHECK_NAMES
    assert all(checks[name] for name in CHECK_NAMES - WARNING_CHECKS), checks
    for path in (
        art.manifest,
        art.rejected,
        art.cache,
        art.model,
        art.history,
        art.features,
        art.assignments,
        art.clustering,
        art.metrics,
    ):
        assert path.is_file(), path  # the CLI's layout


def test_metadata_people_read(whole_graph) -> None:
    result, art, _, _ = whole_graph
    manifest = _metadata(result, "image_manifest")
    assert manifest["dagster/row_count"] == 300 and manifest["rejected"] == 0
    assert manifest["data_version"].endswith(".dir")  # DVC's md5 of the folder as ingested
    assert manifest["data_version_tracked_by_dvc"] is False  # no data.dvc points at it
    trained = _metadata(result, "checkpoint")
    assert trained["epochs"] == 2 and trained["resumed_from_epoch"] == 0
    per_epoch = trained["per_epoch"]
    assert [r.data["epoch"] for r in per_epoch.records] == [1, 2]
    assert "NMI(t-1,t)" in [c.name for c in per_epoch.schema.columns]
    assert trained["params"]["cluster"]["k"] == 30
    clusters = _metadata(result, "cluster_assignments")
    assert clusters["k"] == 30 and clusters["dagster/row_count"] == 300
    report = _metadata(result, "eval_report")
    assert 0 < report["nmi"] <= 1
    comparison = report["metrics"]  # the readable comparison comes first
    assert next(iter(report)) == "metrics"
    assert [c.name for c in comparison.schema.columns] == [
        "metric",
        "trained",
        "random init",
        "raw pixels",
    ]
    assert [r.data["metric"] for r in comparison.records][:3] == ["nmi", "ari", "accuracy"]
    assert report["cluster_grids"].count("](data:image/png;base64,") >= 24
    assert report["pictures"].count("](data:image/png;base64,") == 3
    assert report["mlflow_run_id"] == trained["mlflow_run_id"]
    assert f"/runs/{trained['mlflow_run_id']}?" in report["mlflow_run"]  # the classic view's link
    registered = _metadata(result, "registered_model")
    assert registered["model_uri"] == "models:/deepcluster/1"
    # promoted only if the short training beats both baselines; either way the asset says why
    shortfalls = promotion.baseline_shortfalls(json.loads(art.metrics.read_text()))
    assert registered["promoted"] == (not shortfalls)
    assert registered["aliases"] == "candidate" + ("" if shortfalls else ", champion")
    assert registered["reason"] == ("; ".join(shortfalls) or "no champion before")
    assert registered["metric"] == "nmi" and registered["value"] == report["nmi"]
    curated = _metadata(result, "curated_subset")
    assert curated["dagster/row_count"] == 200 and curated["clusters_covered"] == 30
    assert curated["mlflow_run_id"] == trained["mlflow_run_id"]
    assert "](data:image/png;base64," in curated["contact_sheets"]


def test_the_training_is_an_mlflow_run_with_the_dagster_run_id(whole_graph) -> None:
    """The real MLflow store of the run: epochs, evaluation, lineage tags and the registry."""
    from mlflow.tracking import MlflowClient

    result, art, _, _ = whole_graph
    client = MlflowClient(f"sqlite:///{art.root.parent / 'mlflow.db'}")
    run = client.get_run(_metadata(result, "checkpoint")["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["dagster_run_id"] == result.run_id
    assert run.data.tags["data_md5"] == _metadata(result, "image_manifest")["data_version"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "epoch/loss")] == [1, 2]
    shown = _metadata(result, "eval_report")["nmi"]  # rounded to 4 decimals for people
    assert run.data.metrics["eval/nmi"] == pytest.approx(shown, abs=5e-5)
    version = client.get_model_version("deepcluster", "1")  # champion or not (the rule decides)
    assert version.run_id == run.info.run_id and version.tags["dagster_run_id"] == result.run_id


def test_training_progress_is_in_the_dagster_log(whole_graph) -> None:
    result, _, _, instance = whole_graph
    messages = [
        e.user_message
        for e in instance.all_logs(result.run_id)
        if e.step_key == "checkpoint.train_epochs"
    ]
    assert any("epoch 1/2" in m for m in messages) and any("epoch 2/2" in m for m in messages)


def test_blocking_collapse_check_stops_the_report(whole_graph, tmp_path: Path) -> None:
    """A crafted one-giant-cluster assignments file: the check fails and eval_report does not run."""
    _, art, data_dir, _ = whole_graph
    copy = Artifacts(tmp_path / "artifacts")
    shutil.copytree(art.root, copy.root)
    shutil.rmtree(copy.eval_dir)
    table = pl.read_parquet(copy.assignments)
    table.with_columns(pl.lit(0, dtype=pl.Int64).alias("cluster")).write_parquet(copy.assignments)

    selection = AssetSelection.checks(
        AssetCheckKey(AssetKey("cluster_assignments"), "no_cluster_collapse")
    ) | AssetSelection.assets(eval_report)
    with instance_for_test() as instance:
        result = materialize(
            [*ASSETS, *CHECKS],
            selection=selection,
            instance=instance,
            resources=resources_in(tmp_path, data_dir),
            run_config={"ops": {"eval_report": fast_run_config()["ops"]["eval_report"]}},
            raise_on_error=False,
        )
    [evaluation] = result.get_asset_check_evaluations()
    assert evaluation.check_name == "no_cluster_collapse" and not evaluation.passed
    assert evaluation.metadata["largest_cluster_share"].value == 1.0
    assert not result.get_asset_materialization_events()
    assert not copy.metrics.exists()
    assert read_manifest(copy.manifest).height == 300


# --- a stop while the training process writes its checkpoint ------------------------------------


class _StopsWhileSaved:
    """Pickled in the middle of torch.save: SIGTERM to this process, as Dagster's stop of the
    training process group arrives."""

    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        return (int, (7,))


def test_a_stop_during_a_checkpoint_save_waits_for_the_file(tmp_path: Path) -> None:
    """Raised inside torch's zip writer, the stop became torch's own RuntimeError and a traceback
    in the training process; now the file is finished first, then the stop is raised as such."""
    from deepcluster import checkpoint
    from deepcluster.errors import Stopped, stop_on_signals

    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    stop_on_signals()  # as the training process (orchestration/pipes_train.py) does
    try:
        with pytest.raises(Stopped, match="SIGTERM"):
            checkpoint.save({"weights": np.zeros(4096), "late": _StopsWhileSaved()}, tmp_path / "c.pt")
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    assert torch.load(tmp_path / "c.pt", weights_only=False)["late"] == 7  # complete on disk


def test_materialize_takes_the_demo_budget_and_overrides() -> None:
    """`make demo`'s --demo trains config.DEMO's epochs over params.yaml; -S overrides on top;
    neither given: None, the repo's params.yaml as the resources read it (and dvc.lock's)."""
    from argparse import Namespace

    from orchestration.__main__ import chosen_params

    def args(**given) -> Namespace:
        return Namespace(**({"params": None, "set": [], "demo": False} | given))

    assert chosen_params(args()) is None
    demo = chosen_params(args(demo=True))
    assert demo.train.epochs == library_config.DEMO["train.epochs"] != "auto"
    assert demo.cluster.k == "auto"  # only the budget changes
    both = chosen_params(args(demo=True, set=["train.epochs=5", "cluster.k=20"]))
    assert (both.train.epochs, both.cluster.k) == (5, 20)
    with pytest.raises(library_config.ParamError, match="section.key=value"):
        chosen_params(args(set=["epochs=5"]))
