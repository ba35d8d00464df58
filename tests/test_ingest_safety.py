"""Ingest under hostile conditions: a corpus of bad files, a second writer, and a disk that fills up.

The disk tests mount a real 1 MiB tmpfs (root only; skipped elsewhere with the reason).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from benchmarks.bad_files import make_corpus, score
from deepcluster.data import load_cache
from deepcluster.io import DiskFullError, write_json

from .conftest import ROOT, run_cli


def test_bad_file_corpus_is_ingested_without_crash_or_loss(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    expected = make_corpus(corpus)
    result = score(corpus, expected, tmp_path / "cache.npy")
    print("\n" + result.line())  # the scoreboard, shown with pytest -s
    assert result.kinds >= 40
    assert (result.handled, result.crashes, result.good_lost) == (result.kinds, 0, 0), "\n".join(
        result.failures
    )

    # the EXIF-rotated JPEG is accepted and stored upright: blue on the left, red on the right
    manifest, _ = _scan(corpus)
    row = manifest["path"].to_list().index("odd/rotated.jpg")
    rotated = load_cache(tmp_path / "cache.npy")[row].astype(int)
    assert rotated[2, 8, 0] > 200 and rotated[0, 8, 0] < 60
    assert rotated[0, 8, 15] > 200 and rotated[2, 8, 15] < 60


def _scan(corpus: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    from benchmarks.bad_files import LIMITS
    from deepcluster.data import scan_images

    return scan_images(corpus, limits=LIMITS)


@pytest.fixture
def tiny_disk(tmp_path: Path):
    """A real 1 MiB filesystem."""
    mount = tmp_path / "disk"
    mount.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.slow
def test_a_full_disk_during_ingest_is_one_line_and_leaves_no_partial_file(
    tiny_disk: Path, digits_subset: Path
) -> None:
    """300 images at 64 px need a 3.7 MB cache on a 1 MiB disk: today's memory-mapped write died
    with SIGBUS (exit 135) and left the disk full."""
    art = tiny_disk / "artifacts"
    done = run_cli("ingest", str(digits_subset), "-a", str(art), "-S", "data.resolution=64",
                   cwd=Path(__file__).parents[1])  # fmt: skip
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    expected = f"no space left on the device to write {art}/cache/images.npy: free some space"
    assert errors == [f"error: {expected} and run again"]
    assert "Traceback" not in done.stderr
    assert not list(tiny_disk.rglob("*.tmp")) and not (art / "cache" / "images.npy").exists()


def test_an_atomic_write_on_a_full_disk_raises_disk_full_and_cleans_up(tiny_disk: Path) -> None:
    filler = tiny_disk / "filler.bin"
    with pytest.raises(OSError), open(filler, "wb") as handle:
        handle.write(np.zeros(2**21, np.uint8).tobytes())  # more than the disk holds
    with pytest.raises(DiskFullError, match=r"no space left on the device to write .*/m\.json"):
        write_json(tiny_disk / "m.json", {"values": list(range(100_000))})
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["filler.bin"]


def test_a_second_writer_is_refused_before_the_heavy_imports(tmp_path: Path) -> None:
    """The lock is taken before torch and MLflow are imported: refused at once, not after them."""
    art = tmp_path / "artifacts"
    hold = (
        "import sys, time\n"
        "from deepcluster.lock import writing\nfrom deepcluster.paths import Artifacts\n"
        "with writing(Artifacts(sys.argv[1]), 'ingest'):\n"
        "    print('held', flush=True)\n    time.sleep(120)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "ssl")}
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(art)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "held\n"
        for command in (["ingest", str(tmp_path)], ["train"], ["run", str(tmp_path)]):
            done = subprocess.run(
                [sys.executable, "-X", "importtime", "-m", "deepcluster.cli", *command, "-a", str(art)],
                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            lines = done.stderr.splitlines()
            errors = [line for line in lines if line.startswith("error:")]
            assert done.returncode == 2, (command, done.stderr[-2000:])
            holder_named = f"error: {art} is being written by `deepcluster ingest` (pid {holder.pid}"
            assert len(errors) == 1 and errors[0].startswith(holder_named), done.stderr[-2000:]
            imported = {line.rsplit("|", 1)[-1].strip() for line in lines if "import time:" in line}
            assert "deepcluster.lock" in imported, command
            assert not {"torch", "mlflow", "polars"} & imported, command
    finally:
        holder.kill()
        holder.wait()
