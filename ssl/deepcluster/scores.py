"""eval/scores/: one small file per compared figure of metrics.json, the trained model beside its
baselines, so that `dvc metrics show` prints a table of figures (rows) by pixels, random_init and
trained (columns) that fits 80 columns, and `dvc metrics diff` compares what people compare."""

from __future__ import annotations

from .figures import BASELINES, beside_baselines
from .io import write_json
from .paths import Artifacts


def rows(metrics: dict) -> dict[str, dict[str, float]]:
    """{figure: {"trained": value, baseline: value, ...}} for each compared figure measured."""
    return {
        row["metric"]: {"trained": row["trained"]}
        | {base: row[base] for base in BASELINES if row[base] is not None}
        for row in beside_baselines(metrics)
    }


def write(art: Artifacts, metrics: dict) -> None:
    """The files of `rows(metrics)`, each written atomically; then those of figures no longer
    measured are removed."""
    table = rows(metrics)
    for figure, row in table.items():
        write_json(art.score_file(figure), row)
    for stale in set(art.scores_dir.glob("*.json")) - {art.score_file(f) for f in table}:
        stale.unlink()
