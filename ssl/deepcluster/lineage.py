"""Where a run came from: the git commit and the data version (DVC's md5 of the image folder).
The md5 is computed in pure Python from ingest's own hashes and published with its manifest. When
it cannot be DVC's (the scan skipped a file DVC would hash) or belongs to another manifest, the
manifest's own digest stands in, so a run never claims a DVC version it was not trained on."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import yaml

from . import data
from .io import write_json

DVC_FILE = Path("data.dvc")
# DVC never looks inside these folders, whatever .dvcignore says
DVC_SKIPPED_DIRS = {".git", ".dvc", ".hg"}


@dataclass(frozen=True)
class DataVersion:
    md5: str  # DVC md5 of the folder ("<hex>.dir"), or the manifest digest's first 32 hex digits
    source: str  # "dvc": the folder's DVC md5; "manifest": the manifest's digest (see above)
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


def code_state(cwd: Path | str = ".") -> dict[str, str | bool]:
    """The commit the code in `cwd` is at, and whether it has uncommitted changes."""
    return {"git_commit": git_commit(cwd) or "not a git checkout", "git_dirty": bool(git_dirty(cwd))}


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


def folder_hashes(folder: Path) -> dict[str, str]:
    """relative POSIX path -> md5 of every file under `folder`, as DVC walks it: a check for tools
    and tests (ingest takes the version from its own scan). Only regular files are opened, never
    following a link nor blocking, and read in blocks; any other file is an OSError naming it."""
    hashes = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d not in DVC_SKIPPED_DIRS]
        for name in files:
            path = Path(root, name)
            hashes[path.relative_to(folder).as_posix()] = _md5_of_regular(path)
    return hashes


def _md5_of_regular(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise OSError(f"not a regular file: {path}")
        digest = hashlib.md5()
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def dvc_dir_md5(hashes: dict[str, str]) -> str:
    """DVC's directory hash: md5 of the sorted JSON listing of {md5, relpath}, plus '.dir'."""
    listing = [{"md5": md5, "relpath": path} for path, md5 in sorted(hashes.items())]
    return hashlib.md5(json.dumps(listing, sort_keys=True).encode()).hexdigest() + ".dir"


def scanned_version(
    scan: data.Scan, folder: Path | str, dvc_file: Path | str = DVC_FILE
) -> DataVersion:
    """The version of `folder` as `scan` saw it, from the scan's own hashes: DVC's md5 when the
    scan read every file DVC hashes (DVC skips its own and git's folders), else the manifest's."""
    unread = [path for path in scan.unread if path.rsplit("/", 1)[-1] not in DVC_SKIPPED_DIRS]
    if unread:
        return manifest_version(scan.manifest, folder)
    md5 = dvc_dir_md5(scan.md5)
    recorded = recorded_md5(dvc_file)
    return DataVersion(md5, "dvc", str(folder), recorded is not None and recorded[0] == md5)


def manifest_version(manifest: pl.DataFrame, folder: Path | str | None = None) -> DataVersion:
    digest = data.manifest_digest(manifest)[:32]  # MLflow keeps dataset digests up to 36 chars
    return DataVersion(digest, "manifest", None if folder is None else str(folder), False)


def write_version(path: Path, version: DataVersion, manifest: pl.DataFrame) -> None:
    """Record `version` as the version of `manifest`, whose digest it carries."""
    write_json(path, {"md5": version.md5, "source": version.source, "folder": version.folder,
                      "manifest_sha256": data.manifest_digest(manifest)})  # fmt: skip


def recorded_version(
    art, dvc_file: Path | str = DVC_FILE, manifest: pl.DataFrame | None = None
) -> DataVersion:
    """The version of `manifest` (default: the published one): the one ingest published with it
    when it was recorded for this very manifest, else the manifest's own digest. Whether DVC
    tracks it is decided now, against `dvc_file` (a data.dvc committed after the ingest counts)."""
    manifest = data.read_manifest(art.manifest) if manifest is None else manifest
    try:
        saved = json.loads(art.data_version.read_text())
    except (OSError, ValueError):
        saved = {}
    if not isinstance(saved, dict) or saved.get("manifest_sha256") != data.manifest_digest(manifest):
        return manifest_version(manifest)
    recorded = recorded_md5(dvc_file)
    tracked = saved["source"] == "dvc" and recorded is not None and recorded[0] == saved["md5"]
    return DataVersion(saved["md5"], saved["source"], saved["folder"], tracked)


def listing_hash(folder: Path) -> str:
    """sha256 over the relative paths and sizes of the non-hidden files under `folder`."""
    digest = hashlib.sha256()
    for current, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(n for n in filenames if not n.startswith(".")):
            path = Path(current, name)
            relative = path.relative_to(folder).as_posix()
            digest.update(f"{relative}\t{path.stat().st_size}\n".encode())
    return digest.hexdigest()


def dvc_md5(dvc_file: Path | str) -> str | None:
    """The md5 that a `.dvc` pointer pins (`outs[0].md5`), or None when there is no pointer."""
    recorded = recorded_md5(dvc_file)
    return None if recorded is None else recorded[0]


def observed_version(dvc_file: Path | str, data_dir: Path | str) -> tuple[str, str]:
    """(version, where it came from) of the image folder, without reading an image: DVC's md5 when
    a data.dvc pointer exists, else a hash of the folder listing (Dagster's data version)."""
    md5 = dvc_md5(dvc_file)
    if md5 is not None:
        return md5, f"md5 pinned by {dvc_file}"
    if not Path(data_dir).is_dir():
        return "missing", f"neither {dvc_file} nor {data_dir} exists"
    listing = listing_hash(Path(data_dir))[:16]
    return f"listing-{listing}", f"{dvc_file} not found: hash of file names and sizes in {data_dir}"
