"""Clones on one machine share one DVC remote (`~/.cache/deepcluster/dvc-remote`): the Makefile's
`data` and `push-data` recipes, as `make demo` runs them, in several clones under one HOME that
starts with nothing cached. The remote is content-addressed (an object's name is the md5 of its
bytes), DVC writes it atomically, and pulls re-hash what they fetch (`verify = true` in
.dvc/config), so no clone's push, concurrent or damaged, can hand another clone wrong data.

The clones use this environment's .venv and .dvc-venv (the stamps are not remade: `make -o`)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .test_dvc_pipeline import DVC, GIT_IDENTITY, copy_working_tree, require_dvc, tree_digest

pytestmark = pytest.mark.slow  # dvc pull, export and commit of 1,797 images in four clones

VENV = Path(sys.executable).parents[1]
DVC_VENV = DVC.parents[1]
REMOTE = ".cache/deepcluster/dvc-remote"


class Machine:
    """A HOME with nothing cached, and clones of this working tree that share it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = root / "home"
        self.home.mkdir()

    def clone(self, name: str) -> Path:
        path = copy_working_tree(self.root / name)
        for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "clone"]):
            subprocess.run(["git", *args], cwd=path, env=self.env(path), check=True)
        return path

    def env(self, clone: Path) -> dict[str, str]:
        return {
            **os.environ,
            **GIT_IDENTITY,
            "HOME": str(self.home),
            "PYTHONPATH": str(clone / "ssl"),  # this clone's library, before the venv's
            "DVC_NO_ANALYTICS": "1",
        }

    def make(self, clone: Path, target: str, wait: bool = True):
        command = [
            "make", "--no-print-directory", f"VENV={VENV}", f"DVC_VENV={DVC_VENV}",
            "-o", f"{VENV}/.installed", "-o", f"{DVC_VENV}/.installed", target,
        ]  # fmt: skip
        run = subprocess.Popen(
            command, cwd=clone, env=self.env(clone), text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        return self.finish(run) if wait else run

    @staticmethod
    def finish(run: subprocess.Popen) -> str:
        output = run.communicate(timeout=600)[0]
        assert run.returncode == 0, output[-4000:]
        return output


def left_over(clone: Path) -> str:
    """What git would show as changed or new: data/ and .dvc/cache are ignored."""
    return subprocess.run(
        ["git", "status", "--porcelain"], cwd=clone, capture_output=True, text=True, check=True
    ).stdout


def misnamed_objects(remote: Path) -> list[str]:
    """Objects whose bytes do not have the md5 their name says."""
    bad = []
    for path in sorted(remote.rglob("*")):
        if path.is_file():
            name = path.parent.name + path.name.removesuffix(".dir")
            if hashlib.md5(path.read_bytes()).hexdigest() != name:
                bad.append(str(path.relative_to(remote)))
    return bad


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two clones export (nothing cached yet), then push at once, as two demos ending together."""
    require_dvc()
    box = Machine(tmp_path_factory.mktemp("machine"))
    a, b = box.clone("a"), box.clone("b")
    exported = {clone: box.make(clone, "data") for clone in (a, b)}
    pushes = [box.make(clone, "push-data", wait=False) for clone in (a, b)]
    pushed = [box.finish(run) for run in pushes]
    return {"box": box, "a": a, "b": b, "exported": exported, "pushed": pushed}


def test_two_clones_export_and_push_at_once_into_a_sound_remote(machine) -> None:
    for output in machine["exported"].values():
        assert "data/ not in the DVC remote (or its copy there is damaged)" in output, output
        assert "data/ matches data.dvc" in output, output
    assert all("data/ pushed to the DVC remote" in output for output in machine["pushed"])
    remote = machine["box"].home / REMOTE
    assert len(list(remote.rglob("*.dir"))) == 1 and not misnamed_objects(remote)
    assert tree_digest(machine["a"] / "data") == tree_digest(machine["b"] / "data")
    assert left_over(machine["a"]) == left_over(machine["b"]) == ""


def test_a_third_clone_pulls_the_same_bytes(machine) -> None:
    box = machine["box"]
    c = box.clone("c")
    output = box.make(c, "data")
    assert "data/ pulled from the DVC remote" in output and "exporting" not in output, output
    assert tree_digest(c / "data") == tree_digest(machine["a"] / "data")
    assert left_over(c) == ""


def test_a_damaged_object_in_the_remote_is_not_pulled(machine) -> None:
    """An object with the wrong bytes (a disk error, a hand edit) used to land in data/, and
    `make data` then failed in every later clone; now the pull fails and the clone exports."""
    box = machine["box"]
    remote = box.home / REMOTE
    victim = next(p for p in sorted(remote.rglob("*")) if p.is_file() and p.suffix != ".dir")
    victim.chmod(0o644)
    victim.write_bytes(b"not the image this name promises")
    d = box.clone("d")
    output = box.make(d, "data")
    assert "its copy there is damaged): exporting the digits" in output, output
    assert "data/ matches data.dvc" in output, output
    assert tree_digest(d / "data") == tree_digest(machine["a"] / "data")
    assert left_over(d) == ""
