"""Where a run came from: the git commit and the data version (DVC's md5 of the image folder).

The data version is DVC's own md5 of the folder (what `data.dvc` records), computed here in pure
Python so that the CLI, Dagster and the tests need no `dvc` in their environment. It is used only when
the folder still holds exactly the images that were ingested; otherwise the version falls back to a
digest of the manifest, so a run never claims a DVC version it was not trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import yaml

from . import data

DVC_FILE = Path("data.dvc")
# DVC never looks inside these folders, whatever .dvcignore says
DVC_SKIPPED_DIRS = {".git", ".dvc", ".hg"}


@dataclass(frozen=True)
class DataVersion:
    md5: str  # DVC md5 of the folder ("<hex>.dir"), or the manifest digest's first 32 hex digits
    source: str  # "dvc": the folder's DVC md5; "manifest": the folder was not available/unchanged
    folder: str | None  # the image folder the md5 describes
    tracked: bool  # the md5 equals the one the .dvc file records (data is at a committed version)


def git_commit(cwd: Path | str = ".") -> str | None:
    """HEAD's commit hash. Outside a git work tree (a copied folder, an image): the commit an image
    was built from, when its build recorded one (deploy/Dockerfile's GIT_COMMIT), else None."""
    return _git(cwd, "rev-parse", "HEAD") or os.environ.get("DEEPCLUSTER_GIT_COMMIT") or None


def git_dirty(cwd: Path | str = ".") -> bool | None:
    """Whether tracked files differ from HEAD (the commit alone does not describe the code).

    dvc.lock is left out: `dvc repro` rewrites it after each stage, before the next one runs.
    """
    status = _git(
        cwd, "status", "--porcelain", "--untracked-files=no", "--", ":/", ":(top,exclude)dvc.lock"
    )
    return None if status is None else bool(status)


def _git(cwd: Path | str, *args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def recorded_md5(dvc_file: Path | str = DVC_FILE) -> tuple[str, Path] | None:
    """(md5, tracked folder) as written in a `.dvc` file, or None when there is none."""
    dvc_file = Path(dvc_file)
    if not dvc_file.is_file():
        return None
    out = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs", [{}])[0]
    if "md5" not in out or "path" not in out:
        return None
    return out["md5"], dvc_file.parent / out["path"]


def folder_hashes(
    folder: Path, known: dict[str, tuple[str, str]] | None = None
) -> dict[str, tuple[str, str]]:
    """relative POSIX path -> (md5, sha256) of every file under `folder`, as DVC walks it.

    Files in `known` (hashed by the scan a moment ago) are not read again."""
    known = known or {}
    hashes = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d not in DVC_SKIPPED_DIRS]
        for name in files:
            path = Path(root, name)
            relative = path.relative_to(folder).as_posix()
            if relative in known:
                hashes[relative] = known[relative]
                continue
            content = path.read_bytes()
            hashes[relative] = (
                hashlib.md5(content).hexdigest(),
                hashlib.sha256(content).hexdigest(),
            )
    return hashes


def dvc_dir_md5(hashes: dict[str, tuple[str, str]]) -> str:
    """DVC's directory hash: md5 of the sorted JSON listing of {md5, relpath}, plus '.dir'."""
    listing = [{"md5": md5, "relpath": path} for path, (md5, _) in sorted(hashes.items())]
    return hashlib.md5(json.dumps(listing, sort_keys=True).encode()).hexdigest() + ".dir"


def _matches_manifest(hashes, manifest: pl.DataFrame, rejected: pl.DataFrame) -> bool:
    """The folder holds exactly the ingested images (same bytes) plus the rejected files."""
    visible = {path for path in hashes if not any(p.startswith(".") for p in path.split("/"))}
    if visible != set(manifest["path"]) | set(rejected["path"]):
        return False
    return all(hashes[p][1] == sha for p, sha in manifest.select("path", "sha256").iter_rows())


def data_version(
    manifest_path: Path,
    folder: Path | None = None,
    dvc_file: Path | str = DVC_FILE,
    just_scanned: bool = False,
) -> DataVersion:
    """The version of the data a manifest was made from.

    `folder` is the ingested image folder; when unknown the folder tracked by `dvc_file` is
    tried. The folder's files are read to make sure it still holds the ingested bytes, except
    right after the scan (`just_scanned`), whose own hashes are used: images are read once.
    """
    manifest = data.read_manifest(manifest_path)
    rejected_path = Path(manifest_path).with_name("rejected.parquet")
    rejected = pl.read_parquet(rejected_path) if rejected_path.exists() else manifest.head(0)
    recorded = recorded_md5(dvc_file)
    if folder is None and recorded is not None:
        folder = recorded[1]
    if folder is not None and Path(folder).is_dir():
        known = {}
        if just_scanned:
            rows = manifest.select("path", "md5", "sha256").iter_rows()
            known = {path: (md5, sha) for path, md5, sha in rows}
        hashes = folder_hashes(Path(folder), known)
        if _matches_manifest(hashes, manifest, rejected):
            md5 = dvc_dir_md5(hashes)
            tracked = recorded is not None and recorded[0] == md5
            return DataVersion(md5, "dvc", str(folder), tracked)
    digest = data.manifest_digest(manifest)[:32]  # MLflow keeps dataset digests up to 36 chars
    return DataVersion(digest, "manifest", None if folder is None else str(folder), False)


def record_version(art, folder: Path | None, dvc_file: Path | str = DVC_FILE) -> DataVersion:
    """Compute the data version once, at ingest, and keep it beside the manifest."""
    from .io import write_json

    version = data_version(art.manifest, folder, dvc_file, just_scanned=True)
    write_json(art.data_version, {"md5": version.md5, "source": version.source,
                                  "folder": version.folder})
    return version


def recorded_version(art, dvc_file: Path | str = DVC_FILE) -> DataVersion:
    """The version ingest recorded; whether DVC tracks it is decided now, against `dvc_file`
    (a data.dvc committed after the ingest still counts)."""
    if not art.data_version.exists():
        return data_version(art.manifest, None, dvc_file)
    saved = json.loads(art.data_version.read_text())
    recorded = recorded_md5(dvc_file)
    tracked = saved["source"] == "dvc" and recorded is not None and recorded[0] == saved["md5"]
    return DataVersion(saved["md5"], saved["source"], saved["folder"], tracked)
