"""The versions Dagster compares to tell what is stale: the data's (DVC md5) and the code's (a hash
of the source of the library modules each step runs, `deepcluster.pipeline.step_modules`, which
dvc.yaml's `deps` follow too: no constant to forget to bump)."""

import hashlib
import importlib
import inspect
import os
from pathlib import Path

from deepcluster import lineage
from deepcluster.pipeline import step_modules


def dvc_md5(dvc_file: Path | str) -> str | None:
    """The md5 that a `.dvc` pointer pins (`outs[0].md5`), or None when there is no pointer."""
    recorded = lineage.recorded_md5(dvc_file)
    return None if recorded is None else recorded[0]


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


def observed_version(dvc_file: Path | str, data_dir: Path | str) -> tuple[str, str]:
    """(version, where it came from) of the image folder, without reading an image: DVC's md5 when
    a data.dvc pointer exists, else a hash of the folder listing."""
    md5 = dvc_md5(dvc_file)
    if md5 is not None:
        return md5, f"md5 pinned by {dvc_file}"
    if not Path(data_dir).is_dir():
        return "missing", f"neither {dvc_file} nor {data_dir} exists"
    listing = listing_hash(Path(data_dir))[:16]
    return f"listing-{listing}", f"{dvc_file} not found: hash of file names and sizes in {data_dir}"


def code_version(step: str) -> str:
    """A short hash of the source of the library modules the pipeline step runs."""
    digest = hashlib.sha256()
    for name in step_modules(step):
        digest.update(inspect.getsource(importlib.import_module(f"deepcluster.{name}")).encode())
    return digest.hexdigest()[:12]
