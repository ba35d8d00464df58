"""The commands behind `deepcluster curate` and the drift lines of `deepcluster predict`.

Plain functions with typed arguments that print, so cli.py only declares the options and calls
them (the wiring is in docs/curation.md). Errors are `UserError`s, which cli.main prints as one
line.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

import polars as pl

from .curate import CurationPaths, Settings, curate_step, log_curation
from .dedup import DEFAULT_EPS
from .drift import MAX_FAR_SHARE, MAX_JS, DriftReport, measure, reference_from
from .drift import require_same_clustering as _same_clustering
from .paths import Artifacts


def summary_line(summary: dict) -> str:
    return (
        f"{summary['chosen']} of {summary['candidates']} images chosen ({summary['method']}, "
        f"budget {summary['budget']}); {summary['clusters_covered']} of {summary['clusters']} "
        f"clusters covered; dropped {summary['exact_duplicates']} exact and "
        f"{summary['near_duplicates']} near duplicates"
    )


def curate(
    artifacts: Path = Path("artifacts"),
    budget: int = 200,
    method: str = "bins",
    bins: int = 4,
    eps: float = DEFAULT_EPS,
    parents: int | None = None,
    seed: int = 0,
    track: bool = True,
) -> dict:
    """`deepcluster curate --budget N`: write the subset and log it to the model's MLflow run."""
    art = Artifacts(Path(artifacts))
    settings = Settings(budget, method, bins, eps, parents, seed)
    result = curate_step(art, settings)
    out = CurationPaths(art.root)
    print(summary_line(result.summary))
    print(f"subset: {out.subset}; duplicates: {out.duplicates}; contact sheets: {out.sheets}/")
    if track:
        print(f"logged to MLflow run {log_curation(art, result)}")
    return result.summary


def print_drift(
    table: pl.DataFrame,
    artifacts: Path = Path("artifacts"),
    model_uri: str | None = None,
    max_far_share: float = MAX_FAR_SHARE,
    max_js: float = MAX_JS,
    stream: TextIO | None = None,
) -> DriftReport:
    """`deepcluster predict`'s drift lines for its assignments (cluster, distance columns).

    With `model_uri`, the model's centroids must be those in `artifacts` (else a UserError).
    `stream` defaults to stdout; predict sends them to stderr when stdout carries its table.
    """
    stream = stream or sys.stdout
    ref = reference_from(Artifacts(Path(artifacts)))
    if model_uri is not None:
        from .inbox import load_registered

        _same_clustering(load_registered(model_uri).fingerprint, ref, model_uri)
    report = measure(table["cluster"].to_numpy(), table["distance"].to_numpy(), ref)
    for line in report.lines():
        print(f"drift: {line}", file=stream)
    problems = report.problems(max_far_share, max_js)
    verdict = (
        "DRIFTED, a reason to retrain: " + "; ".join(problems)
        if problems
        else "no drift past the limits"
    )
    print(f"drift: {verdict}", file=stream)
    return report
