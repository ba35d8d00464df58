"""`deepcluster`: the command line over the pipeline steps (the DVC stages call these commands)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from .errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="DeepCluster: learn image features and clusters from a folder of unlabelled images.",
)

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="Hyperparameter file.")]
ArtifactsOpt = Annotated[Path, typer.Option("--artifacts", "-a", help="Folder for every output.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-S", help="Override a parameter, e.g. -S train.epochs=3 (repeatable)."),
]
DataArg = Annotated[
    Path, typer.Argument(help="Image folder (class-per-folder layout gives labels).")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]


def _params(path: Path, overrides: list[str] | None):
    import yaml

    from .config import ParamError, load_params

    parsed = {}
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ParamError(f"--set {item!r}: write it as section.key=value")
        parsed[key.strip()] = yaml.safe_load(value)
    return load_params(path, parsed)


def _artifacts(root: Path):
    from .paths import Artifacts

    return Artifacts(root)


@app.command("sample-data")
def sample_data(
    name: Annotated[str, typer.Argument(help="Sample set to export: digits.")],
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the images into.")],
) -> None:
    """Export a bundled sample set as image files (byte-identical on every machine)."""
    from .sample import export_digits

    if name != "digits":
        raise UserError(f"unknown sample set {name!r}: available: digits")
    count = export_digits(out_dir)
    typer.echo(f"wrote {count} images to {out_dir}")


@app.command()
def ingest(
    data_dir: DataArg = Path("data"),
    params: ParamsOpt = Path("params.yaml"),
    artifacts: ArtifactsOpt = Path("artifacts"),
    set_: SetOpt = None,
) -> None:
    """Scan the image folder (manifest + rejected tables) and decode it once into the cache."""
    from . import pipeline

    art = _artifacts(artifacts)
    summary = pipeline.ingest(data_dir, _params(params, set_), art)
    typer.echo(
        f"{summary['images']} images ingested, {summary['rejected']} rejected "
        f"(reasons in {art.rejected}); labels from folders: {summary['labelled']}"
    )


FreshOpt = Annotated[
    bool, typer.Option("--fresh", help="Delete the epoch checkpoint first: train from scratch.")
]


@app.command()
def train(
    params: ParamsOpt = Path("params.yaml"),
    artifacts: ArtifactsOpt = Path("artifacts"),
    set_: SetOpt = None,
    quiet: QuietOpt = False,
    fresh: FreshOpt = False,
) -> None:
    """Train with DeepCluster; resumes from the last epoch checkpoint if one is there.

    Logged as an MLflow run (MLFLOW_TRACKING_URI, default sqlite:///mlflow.db here).
    """
    art = _artifacts(artifacts)
    result = _tracked_train(_params(params, set_), art, None, fresh, quiet)
    typer.echo(f"trained {len(result.history)} epochs; model at {art.model}")


def _tracked_train(params, art, data_dir: Path | None, fresh: bool, quiet: bool):
    """train_step inside an MLflow run; the run id is recorded for evaluate and register."""
    from . import pipeline, tracking
    from .train import CHECKPOINT

    if fresh:
        (art.train_dir / CHECKPOINT).unlink(missing_ok=True)
    pipeline.require(art.manifest, "ingest")
    run_id = tracking.training_run(art, params, data_dir)
    with tracking.run_status(run_id):
        result = pipeline.train_step(
            params, art, on_epoch=tracking.EpochLogger(run_id), progress=not quiet
        )
    typer.echo(f"MLflow run {run_id}")
    return result


def _log_evaluation(art, metrics: dict) -> None:
    from . import tracking

    tracking.log_evaluation(tracking.run_for(art), metrics, art.eval_dir)


@app.command()
def features(
    params: ParamsOpt = Path("params.yaml"),
    artifacts: ArtifactsOpt = Path("artifacts"),
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Embed every image with the trained model."""
    from . import pipeline

    art = _artifacts(artifacts)
    feats = pipeline.features_step(_params(params, set_), art, progress=not quiet)
    typer.echo(f"{feats.shape[0]} x {feats.shape[1]} features at {art.features}")


@app.command()
def cluster(
    params: ParamsOpt = Path("params.yaml"),
    artifacts: ArtifactsOpt = Path("artifacts"),
    set_: SetOpt = None,
) -> None:
    """Cluster the final features: assignments table and centroids."""
    from . import pipeline

    art = _artifacts(artifacts)
    table = pipeline.cluster_step(_params(params, set_), art)
    typer.echo(
        f"{table.height} images in {table['cluster'].n_unique()} clusters at {art.assignments}"
    )


@app.command()
def evaluate(
    params: ParamsOpt = Path("params.yaml"),
    artifacts: ArtifactsOpt = Path("artifacts"),
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Metrics against labels and baselines, training curves, cluster pictures."""
    from . import pipeline

    art = _artifacts(artifacts)
    metrics = pipeline.evaluate_step(_params(params, set_), art, progress=not quiet)
    _log_evaluation(art, metrics)
    typer.echo(_summary(metrics))
    typer.echo(f"metrics at {art.metrics}; pictures in {art.eval_dir}")


@app.command()
def run(
    data_dir: DataArg = Path("data"),
    params: ParamsOpt = Path("params.yaml"),
    artifacts: ArtifactsOpt = Path("artifacts"),
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Every step: ingest, train, features, cluster, evaluate (training logged to MLflow)."""
    from . import pipeline

    art, p = _artifacts(artifacts), _params(params, set_)
    # the steps of pipeline.run_all, with the MLflow run opened once the manifest exists
    pipeline.ingest(data_dir, p, art, progress=not quiet)
    _tracked_train(p, art, data_dir, fresh=False, quiet=quiet)
    pipeline.features_step(p, art, progress=not quiet)
    pipeline.cluster_step(p, art)
    metrics = pipeline.evaluate_step(p, art, progress=not quiet)
    _log_evaluation(art, metrics)
    typer.echo(_summary(metrics))
    typer.echo(f"results in {art.root}/: metrics {art.metrics}, clusters {art.assignments}")


@app.command()
def register(
    artifacts: ArtifactsOpt = Path("artifacts"),
    metric: Annotated[
        str,
        typer.Option(
            help="metrics.json key deciding `champion` (higher wins); auto: nmi, "
            "else nmi_stability."
        ),
    ] = "auto",
    name: Annotated[str, typer.Option(help="Registered model name.")] = "deepcluster",
) -> None:
    """Register the model in MLflow: alias `candidate`; `champion` only if its metric is higher."""
    from . import registry

    art = _artifacts(artifacts)
    reg = registry.register_model(art, metric=metric, name=name)
    registry.write_registration(reg, registry.registration_path(art))
    typer.echo(reg.summary())


@app.command()
def predict(
    paths: Annotated[
        list[Path], typer.Argument(help="Image files and folders (searched recursively).")
    ],
    model: Annotated[str, typer.Option(help="MLflow model URI.")] = "models:/deepcluster@champion",
    out: Annotated[
        Path | None, typer.Option(help="Write assignments to .parquet (with embeddings) or .csv.")
    ] = None,
) -> None:
    """Assign images to the learned clusters with a registered model."""
    from . import registry

    table, rejected = registry.predict_files(model, paths)
    for row in rejected.iter_rows(named=True):
        typer.echo(f"skipped {row['path']}: {row['reason']}", err=True)
    if out is None:
        typer.echo(table.select("path", "cluster", "distance").write_csv(separator="\t"), nl=False)
        return
    registry.write_predictions(table, out)
    typer.echo(f"{table.height} images assigned, {rejected.height} skipped; written to {out}")


def _summary(metrics: dict) -> str:
    """One line per figure, beside its baselines where they exist."""
    lines = [f"k={metrics['k']}, largest cluster {metrics['largest_cluster_share']:.1%} of images"]
    for key in ("nmi", "ari", "accuracy", "nmi_k", "knn_top1", "linear_top1"):
        if key in metrics:
            random_init = metrics.get(f"{key}_random_init")
            pixels = metrics.get(f"{key}_pixels")
            lines.append(
                f"{key:12s} {metrics[key]:.3f}   random init {random_init:.3f}   raw pixels {pixels:.3f}"
            )
    return "\n".join(lines)


def main() -> None:
    try:
        app()
    except UserError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
