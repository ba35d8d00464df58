"""Metadata a person reads in the Dagster UI: markdown tables and pictures embedded as data URIs."""

import base64
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dagster import MetadataValue

EPOCH_COLUMNS = {
    "epoch": "epoch",
    "loss": "loss",
    "kmeans_loss": "k-means loss",
    "nmi_prev": "NMI(t-1,t)",
    "nmi_labels": "NMI(labels)",
    "largest_cluster_share": "largest cluster",
    "reseeded": "re-seeded",
    "lr": "lr",
    "seconds": "seconds",
}


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Iterable[Mapping[str, Any]], columns: Mapping[str, str]) -> str:
    """A markdown table of `rows`; `columns` maps each key to its header."""
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(key)) for key in columns) + " |" for row in rows]
    return "\n".join(lines)


def epoch_table(history: Sequence[Mapping[str, Any]]) -> MetadataValue:
    return MetadataValue.md(markdown_table(history, EPOCH_COLUMNS))


def epoch_line(stats: Mapping[str, Any], epochs: int) -> str:
    """One epoch as a log line: `epoch 3/20: loss 2.91, k-means loss 104.7, NMI(t-1,t) 0.72, ...`."""
    shown = {key: header for key, header in EPOCH_COLUMNS.items() if key != "epoch"}
    return f"epoch {stats['epoch']}/{epochs}: " + ", ".join(
        f"{header} {_cell(stats.get(key))}" for key, header in shown.items()
    )


def picture(path: Path, title: str) -> str:
    """Markdown showing the PNG at `path` inline (the UI cannot reach the artifact folder)."""
    encoded = base64.b64encode(Path(path).read_bytes()).decode()
    return f"![{title}](data:image/png;base64,{encoded})"


def pictures(items: Mapping[str, Path]) -> MetadataValue:
    """One markdown block with a heading and a picture for each existing file."""
    parts = [
        f"**{title}**\n\n{picture(path, title)}" for title, path in items.items() if path.exists()
    ]
    return MetadataValue.md("\n\n".join(parts) or "no pictures were written")


def as_json(payload: Any) -> MetadataValue:
    return MetadataValue.json(json.loads(json.dumps(payload, default=str)))
