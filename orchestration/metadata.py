"""Metadata a person reads in the Dagster UI: tables, and pictures embedded as data URIs."""

import base64
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dagster import MetadataValue, TableColumn, TableRecord, TableSchema

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
_KINDS = {bool: "bool", int: "int", float: "float"}


def _plain(value: Any) -> Any:
    """A table cell: numbers as they are (rounded floats), anything else as text, None as '–'."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return round(value, 4)
    return value if isinstance(value, (bool, int)) else str(value)


def table(rows: Iterable[Mapping[str, Any]], columns: Mapping[str, str]) -> MetadataValue:
    """A Dagster table of `rows`; `columns` maps each row key to its column title."""
    rows = [{title: _plain(row.get(key)) for key, title in columns.items()} for row in rows]
    schema = TableSchema(
        columns=[
            TableColumn(title, _column_kind([row[title] for row in rows]))
            for title in columns.values()
        ]
    )
    return MetadataValue.table([TableRecord(row) for row in rows], schema=schema)


def _column_kind(values: list[Any]) -> str:
    kinds = {_KINDS.get(type(v), "string") for v in values if v != "–"}
    return kinds.pop() if len(kinds) == 1 else "string"


def epoch_table(history: Sequence[Mapping[str, Any]]) -> MetadataValue:
    return table(history, EPOCH_COLUMNS)


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
