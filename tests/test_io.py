"""Atomic writes: all or nothing, with the file mode a plain open() would give."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from deepcluster.io import atomic_path, write_json


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = write_json(tmp_path / "out.json", {"v": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text().strip().startswith("{") and '"v": 1' in target.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_written_files_get_the_umask_mode(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = write_json(tmp_path / "m.json", {})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
