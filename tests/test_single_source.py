"""Facts written in one place: a second copy of a file name or of the epoch fields fails here."""

import ast
import inspect
from dataclasses import fields
from pathlib import Path

from deepcluster import dvcstages, paths
from deepcluster.epochs import EpochStats

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(ROOT / "ssl" / "deepcluster").rglob("*.py"), *(ROOT / "orchestration").rglob("*.py")])


def _layout_names() -> set[str]:
    """Every file and folder name the layout (Artifacts, TrainFiles) gives."""
    art, names = paths.Artifacts(Path("root")), set()
    for layout in (art, art.published):
        for name, member in inspect.getmembers(type(layout)):
            value = getattr(layout, name) if isinstance(member, property) else None
            if isinstance(value, Path):
                names.add(value.name)
    names |= {art.grid_png(0).parent.name, art.batch_assignments("b").name, art.batch_info("b").name}
    return names - {"root"}


def _constants(source: Path) -> list[tuple[int, str]]:
    tree = ast.parse(source.read_text())
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)]  # fmt: skip


def test_artifact_file_names_are_written_only_in_paths_py() -> None:
    names = {name for name in _layout_names() if "." in name}  # files: "model.pt", ...
    assert {"model.pt", "params.json", "manifest.parquet", "images.npy"} <= names
    found = [f"{src.relative_to(ROOT)}:{line}: {text!r}" for src in SOURCES if src.name != "paths.py"
             for line, text in _constants(src) if text.rsplit("/", 1)[-1] in names]  # fmt: skip
    assert not found, "file names to take from deepcluster.paths:\n" + "\n".join(found)


def test_the_epoch_fields_are_listed_only_in_epoch_stats() -> None:
    """A literal naming three or more EpochStats fields is a second list of them."""
    names = {f.name for f in fields(EpochStats)} - {"epoch"}
    found = []
    for src in SOURCES:
        if src.name == "epochs.py":
            continue
        for node in ast.walk(ast.parse(src.read_text())):
            items = node.keys if isinstance(node, ast.Dict) else getattr(node, "elts", [])
            listed = {k.value for k in items if isinstance(k, ast.Constant)} & names
            if len(listed) >= 3:
                found.append(f"{src.relative_to(ROOT)}:{node.lineno}: {sorted(listed)}")
    assert not found, "epoch fields to take from deepcluster.epochs:\n" + "\n".join(found)


def test_dvc_yaml_is_generated_from_the_step_registry() -> None:
    """dvc.yaml's deps, outs and params come from deepcluster.pipeline and deepcluster.paths."""
    assert (ROOT / "dvc.yaml").read_text() == dvcstages.render(), "run `deepcluster dvc-yaml`"
