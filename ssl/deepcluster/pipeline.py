"""The pipeline steps, one implementation each: the CLI (and through it the DVC stages), Dagster
and the tests call these and add nothing but their own surface. Each step holds the folder's lock,
refuses inputs that do not belong together, writes atomically and does its own MLflow logging;
after `train`, a step uses the parameters the model was trained with (docs/architecture.md)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import inspect
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

# torch (~2 s), MLflow (~4 s) and scikit-learn (~1.5 s) are imported inside the steps that use
# them, so ingest, `deepcluster --help` and Dagster's definitions start without them
from . import autoparams, data, io, lineage, lock, progress, sources
from .config import Params
from .epochs import EpochStats
from .errors import UserError
from .paths import Artifacts, TrainFiles, require

# The library modules each step runs. Dagster's code versions and dvc.yaml's `deps` both come
# from this table (tests/test_dvc_dagster_graph.py keeps dvc.yaml in step with it).
# the modules each step calls (besides this one); `step_modules` adds everything they import, read
# from the source (`sources.closure`), so a step's code version and its DVC stage's deps follow an
# import without anyone keeping the table: editing embed.py marks features and train stale
STEP_CALLS: dict[str, tuple[str, ...]] = {
    "ingest": ("data", "imagefile", "autoparams", "lineage"),
    "train": ("train", "cluster", "health", "checkpoint", "autoparams", "embed"),
    "features": ("embed", "checkpoint", "device"),
    "cluster": ("cluster",),
    "evaluate": ("evaluate", "plots", "cluster", "embed", "shortcut", "scores"),
    "register": ("registry", "serving", "promotion", "figures"),
    "curate": ("curate", "dedup", "plots"),
    "assign": ("inbox", "data", "imagefile", "drift"),
}


@functools.cache
def step_modules(step: str) -> tuple[str, ...]:
    """The library modules behind `step`: this one, those it calls, and all they import (read
    on first use, not at import: parsing the sources costs about 0.1 s)."""
    return ("pipeline", *sources.closure(STEP_CALLS[step]))


def code_version(step: str) -> str:
    """A short hash of the source of the modules behind `step` (Dagster's code version)."""
    digest = hashlib.sha256()
    for name in step_modules(step):
        digest.update(inspect.getsource(importlib.import_module(f"deepcluster.{name}")).encode())
    return digest.hexdigest()[:12]


def observed_data_version(data_dir: Path | str, dvc_file: Path | str) -> tuple[str, str]:
    """The image folder's version without reading an image, and where it came from."""
    return lineage.observed_version(dvc_file, data_dir)


def module_paths(step: str) -> list[str]:
    """`ssl/deepcluster/<module>.py` for each module of `step`, as dvc.yaml lists them."""
    return [f"ssl/deepcluster/{sources.path_of(name)}" for name in step_modules(step)]


def labels_of(manifest: pl.DataFrame) -> np.ndarray | None:
    """Folder labels as an array, or None when the layout gives none."""
    if manifest["label"].null_count() == manifest.height:
        return None
    return manifest["label"].to_numpy().astype(str)


def resolve_params(
    params: Params, manifest: pl.DataFrame, images: np.ndarray | None = None
) -> tuple[Params, dict[str, str]]:
    """`auto` values resolved from the manifest (and the decoded images: colour or grey); the
    notes say what each became and why."""
    return autoparams.resolve(params, autoparams.DataFacts.of(manifest, images))


# ---------------------------------------------------------------------------------------------
# ingest


@dataclass(frozen=True)
class IngestSummary:
    images: int
    rejected: int
    labelled: bool
    resolution: int
    auto: dict[str, str]  # `auto` values resolved here -> "value (why)"
    data_version: lineage.DataVersion
    classes: int  # folder labels (0: none)
    columns: dict[str, str]  # the manifest's column -> type
    rejected_examples: list[dict[str, str]]  # the first rejected files with their reasons
    cache_shape: tuple[int, ...]
    cache_megabytes: float

    def line(self, art: Artifacts) -> str:
        return (
            f"{self.images} images ingested at {self.resolution} px, {self.rejected} rejected "
            f"(reasons in {art.rejected}); labels from folders: {self.labelled}"
        )


def ingest(
    data_dir: Path | str,
    params: Params,
    art: Artifacts,
    show: bool = True,
    dvc_file: Path | str = lineage.DVC_FILE,
    follow_links: bool = False,
) -> IngestSummary:
    """Scan the folder into manifest + rejected tables, decode the cache once, record the version.

    Symbolic links that leave the folder are rejected unless `follow_links`.

    The manifest, the rejected table, the data version and the cache are written into a staging
    folder and published as one set (`io.publish_set`): a failed or stopped ingest leaves the
    previous set in force, whole."""
    with lock.writing(art, "ingest"):
        io.finish_set(art.ingest_staging, art.root)  # a publish a crash interrupted, or leftovers
        root = data.data_folder(data_dir)
        workers = params.compute.workers
        scan = data.scan_folder(root, workers, follow_external_links=follow_links)
        data.require_images(scan.manifest, scan.rejected, root)
        resolved, notes = resolve_params(params, scan.manifest)
        # what ingest decides; the training's values are said once, when it resolves them
        _say_auto({key: note for key, note in notes.items() if key.startswith("data.")}, show)
        side = int(resolved.data.resolution)
        version = lineage.scanned_version(scan, root, dvc_file)
        _publish_ingest(art, root, scan, side, version, workers, follow_links)
        decoded = resolve_params(params, scan.manifest, data.load_cache(art.cache))[1]
        notes |= {key: note for key, note in decoded.items() if key not in notes}  # colour
    return _ingest_summary(scan, side, notes, version, art)


def _ingest_summary(scan, side, notes, version, art: Artifacts, shown: int = 20) -> IngestSummary:
    labels = labels_of(scan.manifest)
    cache = np.load(art.cache, mmap_mode="r")
    return IngestSummary(
        scan.manifest.height, scan.rejected.height, labels is not None, side, notes, version,
        classes=0 if labels is None else len(set(labels)),
        columns={name: str(kind) for name, kind in scan.manifest.schema.items()},
        rejected_examples=scan.rejected.head(shown).to_dicts(),
        cache_shape=tuple(cache.shape), cache_megabytes=round(cache.nbytes / 2**20, 2),
    )  # fmt: skip


def _publish_ingest(art, root, scan, side, version, workers, follow_links) -> None:
    """Write the set into the staging folder, then publish it whole; a failure leaves no trace."""
    staged = Artifacts(art.ingest_staging)  # the same layout, under the staging folder
    try:
        io.save_parquet(staged.manifest, scan.manifest)
        io.save_parquet(staged.rejected, scan.rejected)
        lineage.write_version(staged.data_version, version, scan.manifest)
        data.build_cache(root, scan.manifest, side, staged.cache, workers,
                         follow_external_links=follow_links)  # fmt: skip
        io.publish_set(art.ingest_staging, art.root, _set_names(art))
    finally:
        io.finish_set(art.ingest_staging, art.root)  # drops a failed one's part; else nothing left


def _set_names(art: Artifacts) -> list[str]:
    """The folders an ingest publishes, relative to the artifacts folder."""
    return [
        folder.relative_to(art.root).as_posix() for folder in (art.ingest_dir, art.cache.parent)
    ]


def ingested(art: Artifacts) -> tuple[pl.DataFrame, np.ndarray]:
    """The manifest and its decoded cache, refused unless the cache was made from this manifest."""
    if lock.holds(art):
        io.finish_set(art.ingest_staging, art.root)  # an ingest stopped between its renames
    manifest = data.read_manifest(require(art.manifest, "ingest"))
    images = data.load_cache(require(art.cache, "ingest"))
    if not data.cache_is_current(art.cache, manifest, images.shape[-1]):
        raise UserError(
            f"{art.cache} was not decoded from {art.manifest} (an interrupted or failed ingest?): "
            "run `deepcluster ingest` again"
        )
    return manifest, images


def _say_auto(notes: dict[str, str], show: bool) -> None:
    for key, note in notes.items():
        progress.say(f"auto: {key} = {note}", show)


# ---------------------------------------------------------------------------------------------
# train


@dataclass(frozen=True)
class TrainSummary:
    params: Params  # resolved: what the model was trained with
    history: list[EpochStats]
    resumed_from: int  # epochs already done when this call started
    run_id: str
    auto: dict[str, str]
    published: bool  # False after a scheduled stop (`stop_after`): the checkpoint waits in staging
    code: dict[str, str | bool]  # the commit it ran, and whether the checkout had changes

    def line(self, art: Artifacts) -> str:
        epochs = int(self.params.train.epochs)
        if self.resumed_from >= epochs:  # the published model already holds them all
            return (f"already trained: {art.model} holds all {epochs} epochs of these parameters "
                    "(nothing to do; --fresh trains again from scratch)")  # fmt: skip
        done = f"resumed at epoch {self.resumed_from}, " if self.resumed_from else ""
        return f"trained {len(self.history)} epochs ({done}model at {art.model}; MLflow run {self.run_id})"


def resolve_training(
    params: Params, art: Artifacts, manifest: pl.DataFrame, images: np.ndarray
) -> tuple[Params, dict[str, str]]:
    """The experiment's parameters resolved against the ingested data (and its cache's side)."""
    from .train import check_clusters

    side = images.shape[-1]
    if params.data.resolution not in ("auto", side):
        raise UserError(
            f"{art.cache} holds {side} px images but data.resolution = {params.data.resolution}: "
            "run `deepcluster ingest` again"
        )
    resolved, notes = resolve_params(autoparams.with_resolution(params, side), manifest, images)
    check_clusters(resolved, manifest.height, given=params)
    return resolved, notes


def train(
    params: Params,
    art: Artifacts,
    fresh: bool = False,
    on_epoch: Callable[[EpochStats], None] | None = None,
    show: bool = True,
    stop_after: int | None = None,
    tags: dict[str, str] | None = None,
    source: str = "deepcluster train",
    dvc_file: Path | str = lineage.DVC_FILE,
) -> TrainSummary:
    """Train in the staging folder as one MLflow run, then publish model, params and history.

    Resumes the staged checkpoint of an interrupted run with the same parameters (`fresh` discards
    it). A failed or stopped run leaves the published model untouched. Under torchrun every
    process trains; rank 0 alone holds the lock, prepares the staging folder, tracks the run and
    publishes (the others wait for it at the start and the end)."""
    from . import distributed
    from .device import resolve_device
    from .resume import check_resumable
    from .train import train as train_loop

    ranks = distributed.start(resolve_device(params.compute.device))
    try:
        with lock.writing(art, "train") if ranks.main else contextlib.nullcontext():
            manifest, images = ingested(art)
            resolved, notes = resolve_training(params, art, manifest, images)
            if not fresh and art.checkpoint.exists():  # refused on every rank, before any run
                check_resumable(art.checkpoint, resolved, ranks.world)
            run = TrainingRun(None, [on_epoch] if on_epoch else [], contextlib.nullcontext())
            if ranks.main:
                io.recover_dir(art.train_dir)  # a publish a crash interrupted
                _say_auto(notes, show)
                _stage(art, resolved, fresh, data.manifest_digest(manifest))
                run = _open_run(
                    art, resolved, manifest, notes, run.callbacks, tags, source, dvc_file
                )
                progress.say(f"MLflow run {run.run_id}", show)
            distributed.barrier(ranks)  # the staged checkpoint is in place for every rank
            with run.status:
                result = train_loop(
                    resolved, images, art.staging_dir, labels_of(manifest),
                    on_epoch=lambda stats: [callback(stats) for callback in run.callbacks],
                    stop_after=stop_after, progress=show and ranks.main, ranks=ranks,
                )  # fmt: skip
            distributed.barrier(ranks)
            published = ranks.main and art.staging.model.exists()
            if published:
                io.publish_dir(art.staging_dir, art.train_dir)
    finally:
        distributed.finish(ranks)
    return TrainSummary(resolved, result.history, result.resumed_from, run.run_id, notes,
                        published, lineage.code_state())  # fmt: skip


@dataclass(frozen=True)
class TrainingRun:
    """The MLflow run a training logs into (rank 0 only), and what each epoch is handed to."""

    run_id: str | None
    callbacks: list[Callable[[EpochStats], None]]
    status: contextlib.AbstractContextManager


def _open_run(art, params, manifest, notes, callbacks, tags, source, dvc_file) -> TrainingRun:
    """The training's MLflow run: the recorded data version, what each `auto` became and why."""
    from . import tracking

    tracking.use_store()
    version = lineage.recorded_version(art, dvc_file, manifest)  # of the manifest trained on
    run_tags = {**(tags or {}), **{f"auto/{key}": note for key, note in notes.items()}}
    run_id = tracking.training_run(art, params, version, _staged_history(art), run_tags, source)
    status = tracking.run_status(run_id, system_metrics=True)
    return TrainingRun(run_id, [tracking.EpochLogger(run_id), *callbacks], status)


def _stage(art: Artifacts, params: Params, fresh: bool, images: str) -> None:
    """Prepare the staging folder: keep an interrupted run's checkpoint, or start from the
    published run's last state when these parameters continue it (a longer constant-rate run).

    Either only on the images it was trained on (`images`: the manifest's digest, recorded in the
    staging folder and so published with the model): a run on other images is another run."""
    from .checkpoint import load, params_fingerprint

    if fresh and art.staging_dir.exists():
        shutil.rmtree(art.staging_dir)
    art.staging_dir.mkdir(parents=True, exist_ok=True)
    io.remove_stale_temporaries(art.staging_dir)
    if art.checkpoint.exists() and _trained_on(art.staging) != images:
        raise UserError(
            f"{art.checkpoint} was trained on other images than {art.manifest} holds now (an "
            "ingest since?): train from scratch with --fresh (Dagster: resume: false)"
        )
    io.write_json(art.staging.trained_on, {"manifest_sha256": images})
    if fresh or art.checkpoint.exists() or not art.published.checkpoint.exists():
        return
    if _trained_on(art.published) != images:
        return  # the published model saw other images: train from scratch
    published = load(art.published.checkpoint)
    if published["fingerprint"] != params_fingerprint(params):
        return  # another run: train from scratch, the published model stays until this one ends
    if int(published["epoch"]) > int(params.train.epochs):
        raise UserError(
            f"{art.published.checkpoint} already holds {published['epoch']} epochs, more than "
            f"train.epochs = {params.train.epochs}: train longer, or from scratch with --fresh"
        )
    for name in ("checkpoint", "run_file"):
        if getattr(art.published, name).exists():
            shutil.copy2(getattr(art.published, name), getattr(art.staging, name))


def _trained_on(files: TrainFiles) -> str | None:
    """The digest of the manifest the checkpoint in `files` was trained on (None: unknown)."""
    try:
        return json.loads(files.trained_on.read_text())["manifest_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _staged_history(art: Artifacts) -> list[dict]:
    from .checkpoint import load

    return load(art.checkpoint)["history"] if art.checkpoint.exists() else []


# ---------------------------------------------------------------------------------------------
# features, cluster


def model_params(art: Artifacts, params: Params) -> Params:
    """The model's own parameters, with the caller's `eval` and `compute` sections."""
    from .checkpoint import saved_params

    trained = saved_params(require(art.model, "train"))
    return trained.model_copy(
        update={"eval": params.eval, "curate": params.curate, "compute": params.compute}
    )


def model_run(art: Artifacts) -> str:
    """The model's MLflow run, which every step after training logs into."""
    from . import tracking

    tracking.use_store()
    return tracking.run_for(art)


def features(art: Artifacts, params: Params, show: bool = True) -> np.ndarray:
    """Embeddings of every image under the final model (features.npy, one row per manifest row)."""
    from .checkpoint import load_model
    from .device import resolve_device, set_threads
    from .embed import ImageSource, compute_features, eval_batch_size

    with lock.writing(art, "features"):
        p = model_params(art, params)
        _, images = ingested(art)
        _check_side(images, p, art)
        device = resolve_device(p.compute.device)
        set_threads(p.compute.threads)
        model = load_model(art.model, device)
        feats = compute_features(
            model, ImageSource(images, device), eval_batch_size(p), p.compute.amp, show
        )
        io.save_npy(art.features, feats)
    return feats


def _check_side(images: np.ndarray, params: Params, art: Artifacts) -> None:
    if images.shape[-1] != params.data.resolution:
        raise UserError(
            f"{art.model} was trained at {params.data.resolution} px but {art.cache} holds "
            f"{images.shape[-1]} px images: run `deepcluster train` again"
        )


@dataclass(frozen=True)
class ClusterSummary:
    table: pl.DataFrame  # path, label, cluster, distance: one row per image
    sizes: dict[str, float]  # `cluster.size_summary`

    def line(self, art: Artifacts) -> str:
        s = self.sizes
        return (
            f"{self.table.height} images in {s['k'] - s['empty_clusters']} clusters (largest "
            f"{s['largest_cluster_share']:.1%} of the images) at {art.assignments}"
        )


def cluster(art: Artifacts, params: Params) -> ClusterSummary:
    """Cluster the final embeddings the way training did; one row per image: path, label,
    cluster, distance to its centroid. Centroids and whitening go to clustering.npz."""
    from .cluster import cluster_as_trained, save_clustering

    with lock.writing(art, "cluster"):
        p = model_params(art, params)
        feats = np.load(require(art.features, "features"))
        manifest, _ = ingested(art)
        if len(feats) != manifest.height:
            raise UserError(f"{art.features} does not match {art.manifest}: run `deepcluster features`")
        clustering = cluster_as_trained(feats, p)
        table = manifest.select("path", "label").with_columns(
            pl.Series("cluster", clustering.assignments, dtype=pl.Int64),
            pl.Series("distance", clustering.distances, dtype=pl.Float32),
        )
        io.save_parquet(art.assignments, table)
        save_clustering(art.clustering, clustering)
    return ClusterSummary(table, clustering.size_summary())


# ---------------------------------------------------------------------------------------------
# evaluate


def evaluate_step(art: Artifacts, params: Params, show: bool = True, log: bool = True) -> dict:
    """metrics.json, the history and the pictures under eval/; logged into the model's MLflow run."""
    from . import health, methods, scores, tracking
    from .checkpoint import load_model
    from .cluster import saved_size_summary

    with lock.writing(art, "evaluate"):
        p = model_params(art, params)
        manifest, images = ingested(art)
        table = pl.read_parquet(require(art.assignments, "cluster"))
        assignments = table["cluster"].to_numpy()
        history = json.loads(art.history.read_text()) if art.history.exists() else []
        metrics: dict = saved_size_summary(require(art.clustering, "cluster"), assignments)
        metrics["images"] = len(assignments)
        metrics["nmi_stability"] = history[-1]["nmi_prev"] if history else None
        metrics |= _compare(art, p, manifest, images, assignments, labels_of(table), show)
        metrics |= methods.for_params(p).figures(lambda: load_model(require(art.model, "train")), images)
        for warning in health.shortcut_problems(metrics, p):
            progress.say(f"warning: {warning}", show)
        if note := health.training_collapse_note(history, metrics, p.model.method):
            metrics["training_collapse"] = note  # the clusters collapsed during training
        _write_pictures(p, art, images, table, history)
        io.write_json(art.eval_history, history)
        sizes = np.bincount(assignments, minlength=int(p.cluster.k))
        io.write_json(
            art.cluster_sizes, [{"cluster": i, "size": int(s)} for i, s in enumerate(sizes)]
        )
        io.write_json(art.metrics, metrics)
        scores.write(art, metrics)  # the figures by model and baselines: `dvc metrics show`
    if log:
        tracking.use_store()
        tracking.log_evaluation(tracking.run_for(art), metrics, art.eval_dir)
    return metrics


def _compare(art, params, manifest, images, assignments, labels, show) -> dict:
    """The trained clusters and network beside both baselines (`evaluate.against_baselines`)."""
    from . import evaluate
    from .checkpoint import load_model

    def trained() -> evaluate.Views:
        return evaluate.network_views(load_model(require(art.model, "train")), images, params, show)

    return evaluate.against_baselines(images, manifest, labels, params, assignments, trained, show)


def _write_pictures(params: Params, art: Artifacts, images, table: pl.DataFrame, history) -> None:
    from . import plots

    ids = table["cluster"].to_numpy()
    dist = table["distance"].to_numpy()
    e, k = params.eval, int(params.cluster.k)
    if history:
        plots.training_curves(history, art.curves_png)
    plots.cluster_size_histogram(ids, k, art.sizes_png)
    plots.clusters_overview(images, ids, dist, art.overview_png, e.grid_clusters, e.grid_images)
    plots.cluster_grids(images, ids, dist, art.grids_dir, e.grid_images)


# ---------------------------------------------------------------------------------------------
# read back by the asset checks, which check the files where the steps left them


def saved_features(art: Artifacts) -> tuple[np.ndarray, int, int]:
    """features.npy (memory-mapped), the manifest's row count and the model's embedding width."""
    from .checkpoint import saved_params

    feats = np.load(art.features, mmap_mode="r")
    return feats, _manifest_rows(art), saved_params(art.model).model.embed_dim


def saved_clusters(art: Artifacts) -> tuple[np.ndarray, int, dict[str, float]]:
    """The assignments, the manifest's row count and k with k-means' own figures."""
    from .cluster import saved_size_summary

    clusters = pl.read_parquet(art.assignments, columns=["cluster"])["cluster"].to_numpy()
    kmeans = saved_size_summary(art.clustering, np.zeros(0, dtype=np.int64))
    return clusters, _manifest_rows(art), kmeans


def _manifest_rows(art: Artifacts) -> int:
    return pl.scan_parquet(art.manifest).select(pl.len()).collect().item()


def whitened_features(art: Artifacts) -> np.ndarray:
    """features.npy as k-means saw it: PCA-whitened and L2-normalised."""
    from .cluster import load_clustering

    whitening, _ = load_clustering(art.clustering)
    return whitening.apply(np.load(art.features))


def saved_metrics(art: Artifacts) -> tuple[dict, Params | None]:
    """metrics.json and the parameters the model was trained with (None: no model)."""
    from .checkpoint import saved_params

    params = saved_params(art.model) if art.model.exists() else None
    return json.loads(art.metrics.read_text()), params


# ---------------------------------------------------------------------------------------------
# register


def register(art: Artifacts, metric: str = "auto", name: str = "deepcluster", tags=None):
    """A new registry version of the model (alias candidate; champion if it beats both baselines
    and the champion), unless this very model (weights, clustering, figures) is already
    registered: then that version is reported and none is added. registered.json records the
    outcome; `reg.summary()`, the step's one line, names any baseline it did not beat."""
    from . import registry, tracking

    with lock.writing(art, "register"):
        tracking.use_store()
        reg = registry.register_model(art, metric=metric, name=name, tags=tags)
        registry.write_registration(reg, art.registration)
    return reg


# ---------------------------------------------------------------------------------------------
# curate, new images


def curate(art: Artifacts, settings, log: bool = True):
    """A subset for labelling (subset, duplicates, summary, contact sheets under curate/),
    logged into the model's MLflow run."""
    from . import curate as curation
    from . import tracking

    with lock.writing(art, "curate"):
        result = curation.curate_step(art, settings)
    if log:
        tracking.use_store()
        curation.log_curation(art, result)
    return result


def assign_batch(art: Artifacts, folder: Path, batch: str, model_uri: str):
    """One incoming batch folder: validated as at ingest, embedded and assigned by a registered
    model (the champion by default); its table under inbox/<batch>/."""
    from . import inbox, tracking

    tracking.use_store(create=False)
    loaded = inbox.load_registered(model_uri)
    with lock.writing(art, f"assign {batch}"):
        return loaded, inbox.assign_batch(Path(folder), art, batch, loaded)
