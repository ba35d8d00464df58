"""dvc.lock describes this commit: every stage's command, dependencies and parameters as they are
in the working tree, so `dvc status` on a fresh clone lists no stage as changed (only the outputs
not built yet) and `dvc metrics diff` / `dvc exp show` have a baseline.

The hashes are computed here the way DVC computes them, without DVC: md5 of a file's bytes, the
`.dir` md5 of a folder (deepcluster.lineage), the `data.dvc` md5 for the data folder, and for a
dependency that another stage produces, that stage's recorded output. Parameters are compared as
YAML 1.2 reads them (DVC's reader: `1e-05` is a number).
"""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path
from typing import Any

import yaml

from deepcluster import lineage

ROOT = Path(__file__).resolve().parents[1]
REFRESH = (
    "refresh it with `make dvc-lock` (re-runs the stages concerned on the demo data: "
    "PATH=\"$PWD/.venv/bin:$PATH\" .dvc-venv/bin/dvc repro), then commit dvc.lock "
    "(docs/tracking.md, 'Keeping dvc.lock current')"
)


class Yaml12(yaml.SafeLoader):
    """PyYAML with YAML 1.2's floats (1e-05 is a number, as ruamel, DVC's reader, has it)."""


Yaml12.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$"),
    list("-+0123456789."),
)


def read(root: Path, name: str) -> Any:
    return yaml.load((root / name).read_text(), Loader=Yaml12)


def declared(stage: dict, *kinds: str) -> list[str]:
    """The paths dvc.yaml lists under `kinds` (entries are strings or {path: options})."""
    return [e if isinstance(e, str) else next(iter(e)) for k in kinds for e in stage.get(k, [])]


def source_md5(path: Path) -> str:
    if path.is_dir():
        return lineage.dvc_dir_md5(lineage.folder_hashes(path))
    return hashlib.md5(path.read_bytes()).hexdigest()


def param_value(params: dict, dotted: str) -> Any:
    value: Any = params
    for part in dotted.split("."):
        value = value[part]
    return value


def listed(what: str, locked, in_dvc_yaml) -> list[str]:
    added = [f"{what} {x} is not in dvc.lock" for x in sorted(set(in_dvc_yaml) - set(locked))]
    return added + [f"{what} {x} is no longer in dvc.yaml" for x in sorted(set(locked) - set(in_dvc_yaml))]


def stale_entries(root: Path = ROOT) -> list[str]:
    """What in dvc.lock disagrees with dvc.yaml, params.yaml, data.dvc and the source files."""
    stages, locked = read(root, "dvc.yaml")["stages"], read(root, "dvc.lock")["stages"]
    params = read(root, "params.yaml")
    produced = {o["path"]: o["md5"] for entry in locked.values() for o in entry.get("outs", [])}
    produced |= {o["path"]: o["md5"] for o in read(root, "data.dvc")["outs"]}
    out_dirs = [path for path, md5 in produced.items() if md5.endswith(".dir")]
    problems = [f"{name}: in dvc.lock but not in dvc.yaml" for name in set(locked) - set(stages)]
    for name, stage in stages.items():
        entry = locked.get(name)
        if entry is None:
            problems.append(f"{name}: not in dvc.lock")
            continue
        if entry["cmd"] != stage["cmd"]:
            problems.append(f"{name}: command {entry['cmd']!r} in dvc.lock, {stage['cmd']!r} in dvc.yaml")
        deps = {d["path"]: d for d in entry.get("deps", [])}
        problems += listed(f"{name}: dependency", deps, declared(stage, "deps"))
        for path in sorted(set(deps) & set(declared(stage, "deps"))):
            if deps[path].get("hash") != "md5":
                problems.append(f"{name}: {path} has a DVC 2 hash (no `hash: md5`)")
            elif path in produced:  # another stage's output (or data.dvc's): as recorded there
                if deps[path]["md5"] != produced[path]:
                    problems.append(f"{name}: {path} is not the output dvc.lock records for it")
            elif not any(path.startswith(f"{folder}/") for folder in out_dirs):
                if not (root / path).exists():
                    problems.append(f"{name}: {path} does not exist")
                elif deps[path]["md5"] != source_md5(root / path):
                    problems.append(f"{name}: {path} changed")
        recorded = entry.get("params", {}).get("params.yaml", {})
        keys = declared(stage, "params")
        problems += listed(f"{name}: parameter", recorded, keys)
        for key in sorted(set(recorded) & set(keys)):
            if recorded[key] != param_value(params, key):
                problems.append(f"{name}: params.yaml {key} changed")
        outs = {o["path"] for o in entry.get("outs", [])}
        problems += listed(f"{name}: output", outs, declared(stage, "outs", "metrics"))
    return problems


def test_dvc_lock_matches_the_working_tree() -> None:
    problems = stale_entries()
    listing = "".join(f"\n  {problem}" for problem in problems)
    assert not problems, f"dvc.lock does not describe this working tree; {REFRESH}:{listing}"


def test_the_check_sees_a_changed_source_parameter_and_command(tmp_path: Path) -> None:
    """The check itself, on a copy of the pipeline's files with one thing changed at a time."""
    for name in ("dvc.yaml", "dvc.lock", "params.yaml", "data.dvc", "orchestration/sync.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tmp_path / name)

    def dagster_and_params() -> list[str]:  # the library's files are not in the copy
        return [p for p in stale_entries(tmp_path) if "ssl/deepcluster" not in p]

    assert dagster_and_params() == []
    (tmp_path / "orchestration/sync.py").write_text("# edited\n")
    assert dagster_and_params() == ["dagster: orchestration/sync.py changed"]
    params = (tmp_path / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(params.replace("knn_k: 20", "knn_k: 5"))
    assert "evaluate: params.yaml eval changed" in dagster_and_params()
    stages = (tmp_path / "dvc.yaml").read_text()
    edited = stages.replace("cmd: deepcluster curate", "cmd: deepcluster curate -S curate.bins=8")
    (tmp_path / "dvc.yaml").write_text(edited)
    assert "curate: command 'deepcluster curate' in dvc.lock, " \
        "'deepcluster curate -S curate.bins=8' in dvc.yaml" in dagster_and_params()
