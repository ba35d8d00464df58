"""Where each pipeline step writes: the one layout the CLI, the DVC stages and Dagster share.

Every file name lives here and nowhere else. A step publishes its outputs atomically (each file is
written beside its final name and renamed over it); ingest and training work in `.staging` and
publish only when they finish, so a failed or stopped run never touches the last good outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

LOCK_SUFFIX = ".lock"  # a lock file is the name it guards plus this

# `dvc plots show`'s page with the chart scripts inlined (dvcstages.write_plots_page, run by
# `make install`); DVC reads its `plots.html_template` setting relative to .dvc/
PLOTS_PAGE = Path(".dvc") / "plots" / "offline.html"
# the scripts it inlines, as the PyPI package django-js-lib-vega-embed ships them: vega 5,
# vega-lite 5 and vega-embed 6, the versions DVC's plot templates are written for
VEGA_SCRIPTS = tuple(f"static/js_lib_vega_embed/{name}.js"
                     for name in ("vega5", "vega-lite5", "vega-embed6"))  # fmt: skip


@dataclass(frozen=True)
class TrainFiles:
    """The files of one training folder: the same names in progress and published."""

    folder: Path

    @property
    def model(self) -> Path:
        return self.folder / "model.pt"

    @property
    def params(self) -> Path:
        """The resolved parameters of model.pt, readable without loading the weights."""
        return self.folder / "params.json"

    @property
    def history(self) -> Path:
        return self.folder / "history.json"

    @property
    def checkpoint(self) -> Path:
        """The last epoch's state: resumed when in progress; continued by a longer run when
        published."""
        return self.folder / "checkpoint.pt"

    @property
    def run_file(self) -> Path:
        """The MLflow run of the model, which the later steps log into."""
        return self.folder / "mlflow_run.json"

    @property
    def trained_on(self) -> Path:
        """The digest of the manifest the model was trained on: a checkpoint is resumed or
        continued only on those images."""
        return self.folder / "data.json"


def cluster_png(folder: Path, cluster: int) -> Path:
    """One cluster's picture (a grid of its images, a contact sheet) in `folder`."""
    return Path(folder) / f"cluster_{int(cluster):04d}.png"


def cluster_pngs(folder: Path) -> list[Path]:
    """The pictures `cluster_png` wrote into `folder`, in cluster order."""
    return sorted(Path(folder).glob("cluster_*.png"))


def cache_description(cache: Path) -> Path:
    """Resolution, count and the digest of the manifest the cache was decoded from."""
    return Path(cache).with_suffix(".json")


@dataclass(frozen=True)
class Artifacts:
    root: Path = Path("artifacts")

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # ingest: the manifest, the rejected table, the data version and the decoded cache are one
    # set, published together (io.publish_set); the cache and the version record the manifest's
    # digest, and every later step checks that they still belong together
    @property
    def ingest_dir(self) -> Path:
        return self.root / "ingest"

    @property
    def manifest(self) -> Path:
        return self.ingest_dir / "manifest.parquet"

    @property
    def rejected(self) -> Path:
        return self.ingest_dir / "rejected.parquet"

    @property
    def data_version(self) -> Path:
        """The data version of this manifest (DVC's md5 of the folder as scanned, from the scan's
        own hashes), with the digest of the manifest it belongs to."""
        return self.ingest_dir / "data_version.json"

    @property
    def ingest_staging(self) -> Path:
        """An ingest in progress: `ingest/` and `cache/` as it will publish them, together."""
        return self.root / ".staging" / "ingest"

    @property
    def cache(self) -> Path:
        return self.root / "cache" / "images.npy"

    @property
    def cache_description(self) -> Path:
        return cache_description(self.cache)

    # train: a training works in `staging` and publishes it whole, as `published`, when it ends
    @property
    def published(self) -> TrainFiles:
        return TrainFiles(self.root / "train")

    @property
    def staging(self) -> TrainFiles:
        """A training in progress: its checkpoint, history and run file until it finishes."""
        return TrainFiles(self.root / ".staging" / "train")

    @property
    def train_dir(self) -> Path:
        return self.published.folder

    @property
    def staging_dir(self) -> Path:
        return self.staging.folder

    @property
    def model(self) -> Path:
        return self.published.model

    @property
    def history(self) -> Path:
        return self.published.history

    @property
    def run_file(self) -> Path:
        return self.published.run_file

    @property
    def checkpoint(self) -> Path:
        """The epoch checkpoint of the training in progress (resumed by the next `train`)."""
        return self.staging.checkpoint

    @property
    def features(self) -> Path:
        return self.root / "features" / "features.npy"

    @property
    def cluster_dir(self) -> Path:
        return self.root / "cluster"

    @property
    def assignments(self) -> Path:
        return self.cluster_dir / "assignments.parquet"

    @property
    def clustering(self) -> Path:
        """Centroids and the PCA-whitening that maps embeddings into their space."""
        return self.cluster_dir / "clustering.npz"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def metrics(self) -> Path:
        return self.eval_dir / "metrics.json"

    @property
    def scores_dir(self) -> Path:
        """One small file per figure, the model beside its baselines (`dvc metrics show`)."""
        return self.eval_dir / "scores"

    def score_file(self, figure: str) -> Path:
        return self.scores_dir / f"{figure}.json"

    @property
    def eval_history(self) -> Path:
        return self.eval_dir / "history.json"

    @property
    def cluster_sizes(self) -> Path:
        return self.eval_dir / "cluster_sizes.json"

    @property
    def curves_png(self) -> Path:
        return self.eval_dir / "curves.png"

    @property
    def sizes_png(self) -> Path:
        return self.eval_dir / "cluster_sizes.png"

    @property
    def overview_png(self) -> Path:
        return self.eval_dir / "clusters.png"

    @property
    def grids_dir(self) -> Path:
        return self.eval_dir / "grids"

    def grid_png(self, cluster: int) -> Path:
        return cluster_png(self.grids_dir, cluster)

    # curate: a subset for labelling, chosen across clusters (deepcluster.curate)
    @property
    def curate_dir(self) -> Path:
        return self.root / "curate"

    @property
    def curated_subset(self) -> Path:
        return self.curate_dir / "subset.parquet"

    @property
    def curate_duplicates(self) -> Path:
        return self.curate_dir / "duplicates.parquet"

    @property
    def curate_summary(self) -> Path:
        return self.curate_dir / "summary.json"

    @property
    def contact_sheets(self) -> Path:
        """One picture per cluster: the images chosen from it."""
        return self.curate_dir / "sheets"

    # new images: one folder of outputs per incoming batch (deepcluster.inbox)
    def batch_dir(self, batch: str) -> Path:
        return self.root / "inbox" / batch

    def batch_assignments(self, batch: str) -> Path:
        return self.batch_dir(batch) / "assignments.parquet"

    def batch_rejected(self, batch: str) -> Path:
        return self.batch_dir(batch) / "rejected.parquet"

    def batch_info(self, batch: str) -> Path:
        """Written last: its presence says the batch is complete."""
        return self.batch_dir(batch) / "batch.json"

    @property
    def registration(self) -> Path:
        return self.root / "register" / "registered.json"

    @property
    def lock(self) -> Path:
        """Held by the one process writing into this folder."""
        return self.root / LOCK_SUFFIX


def require(path: Path, step: str) -> Path:
    """An input made by an earlier step; its absence is a user error naming the step to run."""
    from .errors import MissingArtifact

    if not Path(path).exists():
        raise MissingArtifact(f"{path} not found: run `deepcluster {step}` first")
    return Path(path)
