"""Ingest under hostile conditions: a corpus of bad files, a planted folder, failures while
publishing, a second writer, and a disk that fills up.

The disk tests mount a real 1 MiB tmpfs (root only; skipped elsewhere with the reason).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from benchmarks.bad_files import make_corpus, score
from deepcluster import lineage, pipeline
from deepcluster.data import load_cache, read_manifest
from deepcluster.io import DiskFullError, write_json
from deepcluster.paths import Artifacts

from .conftest import ROOT, fast_params, run_cli
from .test_data import BLUE, GREEN, RED, plant_special_entries, png_bytes, solid

# the published set of an ingest: all of it changes together, or none of it
SET_FILES = (
    "ingest/manifest.parquet",
    "ingest/rejected.parquet",
    "ingest/data_version.json",
    "cache/images.npy",
    "cache/images.json",
)


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
    staged = art / ".staging" / "ingest"  # the set is written there, published only when whole
    expected = f"no space left on the device to write {staged}/cache/images.npy: free some space"
    assert errors == [f"error: {expected} and run again"]
    assert "Traceback" not in done.stderr
    assert not list(tiny_disk.rglob("*.tmp")) and not (art / "cache" / "images.npy").exists()
    assert not staged.exists() and not (art / "ingest").exists()


def test_an_atomic_write_on_a_full_disk_raises_disk_full_and_cleans_up(tiny_disk: Path) -> None:
    filler = tiny_disk / "filler.bin"
    with pytest.raises(OSError), open(filler, "wb") as handle:
        handle.write(np.zeros(2**21, np.uint8).tobytes())  # more than the disk holds
    with pytest.raises(DiskFullError, match=r"no space left on the device to write .*/m\.json"):
        write_json(tiny_disk / "m.json", {"values": list(range(100_000))})
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["filler.bin"]


def ingest_cli(
    folder: str | Path, art: Path, *args: str, cwd: Path, file_limit: int | None = None
) -> subprocess.CompletedProcess:
    """`deepcluster ingest` in a subprocess that must end within two minutes (a FIFO once made it
    hang for ever); `file_limit`: the largest file it may write (RLIMIT_FSIZE), to make it fail
    while writing its set."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    return subprocess.run(
        [sys.executable, "-m", "deepcluster.cli", "ingest", str(folder), "-a", str(art), "-q", *args],
        cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT / "ssl")}, capture_output=True,
        text=True, timeout=120, preexec_fn=limit if file_limit else None, check=False,
    )  # fmt: skip


def published(art: Path) -> dict[str, bytes]:
    return {name: (art / name).read_bytes() for name in SET_FILES}


def test_a_planted_folder_is_ingested_with_a_row_for_every_bad_entry(tmp_path: Path) -> None:
    """A FIFO, a socket, a link to /dev/zero, a link loop, a dangling link, hidden names, empty
    folders: once a hang, an unbounded read, or an abort after half the set was written."""
    data, art = tmp_path / "data", tmp_path / "artifacts"
    expected = plant_special_entries(data)
    done = ingest_cli(data, art, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"2 images ingested at 16 px, {len(expected)} rejected")
    assert read_manifest(art / "ingest" / "manifest.parquet")["path"].to_list() == [
        "a/good.png", "b/good.png"
    ]  # fmt: skip
    rejected = dict(pl.read_parquet(art / "ingest" / "rejected.parquet").iter_rows())
    assert sorted(rejected) == sorted(expected)
    for path, reason in expected.items():
        assert rejected[path].startswith(reason), (path, rejected[path])
    # links and hidden files were not read, so DVC's md5 of the folder is not claimed
    assert json.loads((art / "ingest" / "data_version.json").read_text())["source"] == "manifest"

    done = ingest_cli(data, art, "--follow-links", cwd=tmp_path)  # /dev/zero: refused, not read
    assert done.returncode == 0, done.stderr
    rejected = dict(pl.read_parquet(art / "ingest" / "rejected.parquet").iter_rows())
    assert rejected["a/zero.png"] == "not a regular file (a character device)"


def test_a_failed_ingest_leaves_the_previous_set_in_force(tmp_path: Path) -> None:
    data, art = tmp_path / "data", tmp_path / "artifacts"
    for label, colours in (("a", (RED, GREEN, BLUE)), ("b", ((9, 9, 9), (99, 9, 9), (9, 99, 9)))):
        for i, colour in enumerate(colours):
            (data / label).mkdir(parents=True, exist_ok=True)
            (data / label / f"{i}.png").write_bytes(png_bytes(solid(colour, (8, 8))))
    assert ingest_cli(data, art, cwd=tmp_path).returncode == 0
    before = published(art)

    only_bad = tmp_path / "only_bad"
    plant_special_entries(only_bad)
    for good in only_bad.glob("*/good.png"):
        good.unlink()
    (data / "a" / "new.png").write_bytes(png_bytes(solid((1, 2, 3), (8, 8))))  # a changed folder
    failures = [
        (("",), {}, "error: data folder: the path is empty"),
        ((only_bad,), {}, f"error: no usable images in {only_bad}: "),
        # 7 images at 256 px need a 1.4 MB cache: writing it fails, after the tables were written
        ((data, "-S", "data.resolution=256"), {"file_limit": 2**19}, "error: cannot use "),
    ]
    for args, limits, message in failures:
        done = ingest_cli(args[0], art, *args[1:], cwd=tmp_path, **limits)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.startswith(message), (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
        assert published(art) == before, args  # byte for byte
        assert not (art / ".staging" / "ingest").exists()

    assert ingest_cli(data, art, cwd=tmp_path).returncode == 0  # and then the new set, whole
    assert read_manifest(art / "ingest" / "manifest.parquet").height == 7
    assert load_cache(art / "cache" / "images.npy").shape[0] == 7


def test_a_version_recorded_for_another_manifest_is_not_believed(tmp_path: Path) -> None:
    """The version is read only beside the manifest it was computed for."""
    sets = []
    for name, colour in (("one", RED), ("two", BLUE)):
        folder = tmp_path / name
        (folder / "x").mkdir(parents=True)
        (folder / "x" / "image.png").write_bytes(png_bytes(solid(colour, (8, 8))))
        (folder / "x" / "other.png").write_bytes(png_bytes(solid(GREEN, (8, 8 + len(name)))))
        art = Artifacts(tmp_path / f"artifacts-{name}")
        summary = pipeline.ingest(folder, fast_params(), art, show=False)
        assert summary.data_version.source == "dvc"
        assert lineage.recorded_version(art).md5 == summary.data_version.md5
        sets.append((art, summary.data_version))
    (art_one, _), (art_two, two) = sets
    shutil.copy(art_two.data_version, art_one.data_version)  # a stale side file
    version = lineage.recorded_version(art_one)
    own = lineage.manifest_version(read_manifest(art_one.manifest))
    assert version == own and version.md5 != two.md5 and version.source == "manifest"


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


def test_an_ingest_stopped_by_sigterm_says_so_and_publishes_nothing(tmp_path: Path) -> None:
    """SIGTERM arrives while the cache is decoded, after the tables were staged (delivered from a
    hook, so the moment is certain): one `stopped:` line about ingest, not about a checkpoint."""
    data, art = tmp_path / "data", tmp_path / "artifacts"
    for name, colour in (("a.png", RED), ("b.png", BLUE)):
        data.mkdir(exist_ok=True)
        (data / name).write_bytes(png_bytes(solid(colour, (8, 8))))
    assert ingest_cli(data, art, cwd=tmp_path).returncode == 0
    before = published(art)
    (data / "c.png").write_bytes(png_bytes(solid(GREEN, (8, 8))))
    stop_in_cache_build = (
        "import os, signal, sys\n"
        "from deepcluster import cli, data\n"
        "build = data.build_cache\n"
        "def stopped_build(*args, **kwargs):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return build(*args, **kwargs)\n"
        "data.build_cache = stopped_build\n"
        "sys.argv = ['deepcluster', 'ingest', sys.argv[1], '-a', sys.argv[2], '-q']\n"
        "cli.main()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", stop_in_cache_build, str(data), str(art)], cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT / "ssl")}, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 130, done.stderr[-2000:]
    assert done.stderr == (
        "stopped (signal SIGTERM): nothing half-written was published; run the command again\n"
    )
    assert published(art) == before and not (art / ".staging" / "ingest").exists()
