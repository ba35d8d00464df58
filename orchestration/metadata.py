"""Metadata people read in the UI: tables, JSON, and pictures embedded as data URIs (the UI cannot
reach the artifacts folder)."""

import base64
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import polars as pl
from dagster import MetadataValue, TableColumn, TableMetadataValue, TableRecord, TableSchema

BESIDE_BASELINES = {"metric": "metric", "trained": "trained", "random_init": "random init",
                    "pixels": "raw pixels"}  # fmt: skip
SIZES = {"cluster": "cluster", "len": "images"}  # columns of a `group_by("cluster").len()` table


def figures(values: Mapping[str, Any]) -> dict[str, Any]:
    """The numbers of `values`, floats to 4 decimals: what a person reads in the UI."""
    return {key: _cell(v) for key, v in values.items() if isinstance(v, (int, float))}


def _cell(value: Any) -> Any:
    """Numbers as they are (floats rounded), anything else as text, None as '–'."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return round(value, 4)
    return value if isinstance(value, (bool, int)) else str(value)


def table(rows: Iterable[Mapping[str, Any]], columns: Mapping[str, str]) -> MetadataValue:
    """A Dagster table of `rows`; `columns` maps each row key to its column title."""
    rows = [{title: _cell(row.get(key)) for key, title in columns.items()} for row in rows]

    def kind(t: str) -> str:
        kinds = {TableMetadataValue.infer_column_type(row[t]) for row in rows if row[t] != "–"}
        return kinds.pop() if len(kinds) == 1 else "string"

    schema = TableSchema(columns=[TableColumn(title, kind(title)) for title in columns.values()])
    return MetadataValue.table([TableRecord(row) for row in rows], schema=schema)


def largest_clusters(table: pl.DataFrame, shown: int) -> pl.DataFrame:
    return table.group_by("cluster").len().sort("len", descending=True).head(shown)


def schema(columns: Mapping[str, Any]) -> TableSchema:
    return TableSchema(columns=[TableColumn(name, str(kind)) for name, kind in columns.items()])


def picture(path: Path, title: str) -> str:
    """Markdown showing the PNG at `path` inline."""
    return f"![{title}](data:image/png;base64,{base64.b64encode(Path(path).read_bytes()).decode()})"


def pictures(items: Mapping[str, Path]) -> MetadataValue:
    """One markdown block with a heading and a picture for each existing file."""
    parts = [f"**{title}**\n\n{picture(path, title)}" for title, path in items.items()
             if path.exists()]  # fmt: skip
    return MetadataValue.md("\n\n".join(parts) or "no pictures were written")


def as_json(payload: Any) -> MetadataValue:
    return MetadataValue.json(json.loads(json.dumps(payload, default=str)))
