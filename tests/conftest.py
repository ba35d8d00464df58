"""Shared fixtures: the real digits sample exported as PNG files and ingested once per session.

DEEPCLUSTER_TEST_COMPUTE="amp=false,threads=1" runs every test that trains under those `compute`
settings (docs/testing.md): they go into FAST's compute section, into COMPUTE_OVERRIDES for tests
that load the repo's params.yaml, and so into every params.yaml a test writes for a CLI, DVC or
Dagster subprocess. OMP_NUM_THREADS follows `threads` (else the cores; unless set), so every
process that leaves `compute.threads` at auto gets one fixed count.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deepcluster import pipeline
from deepcluster.config import ComputeParams, ParamError, params_from_dict
from deepcluster.paths import Artifacts
from deepcluster.sample import export_digits

ROOT = Path(__file__).resolve().parents[1]

# Small, quick settings for tests on two CPU cores; the pipeline code is the same as the demo's.
FAST = {
    "data": {"resolution": 16},
    "cluster": {"k": 30, "pca_dim": 16, "heads": [1.0, 2.0]},
    "train": {"epochs": 2, "batch_size": 32},
    "augment": {"crop_scale": [0.7, 1.0], "local_crops": 2},
    "eval": {"probe_epochs": 200},
    "compute": {"device": "cpu"},
}

COMPUTE_ENV = "DEEPCLUSTER_TEST_COMPUTE"


def compute_settings(text: str) -> dict:
    """`key=value,...` of params.yaml's compute section (values in YAML), checked as params are."""
    keys = set(ComputeParams.model_fields)
    settings = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or key not in keys:
            raise pytest.UsageError(
                f"{COMPUTE_ENV}={text!r}: {item!r} is not key=value with a key of "
                f"{', '.join(sorted(keys))}"
            )
        settings[key] = yaml.safe_load(value)
    try:
        params_from_dict({"compute": settings})
    except ParamError as error:
        raise pytest.UsageError(f"{COMPUTE_ENV}={text!r}: {error}") from None
    return settings


TEST_COMPUTE = compute_settings(os.environ.get(COMPUTE_ENV, ""))
FAST["compute"].update(TEST_COMPUTE)
# `section.key` overrides for tests that train with the repo's params.yaml (load_params)
COMPUTE_OVERRIDES = {f"compute.{key}": value for key, value in FAST["compute"].items()}
# `threads: auto` follows the machine's load epoch by epoch, while runs the suite compares bit for
# bit need one count: OMP_NUM_THREADS (which auto obeys) fixes it, at the cores this process may use
# unless the numerics settings name one
_threads = TEST_COMPUTE.get("threads")
os.environ.setdefault(
    "OMP_NUM_THREADS", str(_threads if isinstance(_threads, int) else len(os.sched_getaffinity(0)))
)


def run_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`python -m deepcluster.cli ARGS` in `cwd` (environment `env`, default this one) with the
    library on PYTHONPATH, as a user's shell runs it."""
    env = {**(os.environ if env is None else env), "PYTHONPATH": str(ROOT / "ssl")}
    return subprocess.run(
        [sys.executable, "-m", "deepcluster.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def fast_params(**sections):
    raw = {name: dict(values) for name, values in FAST.items()}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return params_from_dict(raw)


@pytest.fixture(scope="session", autouse=True)
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Every training is an MLflow run: the suite's go to a store of its own, never the repo's."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("digits")
    export_digits(folder)
    return folder


@pytest.fixture(scope="session")
def ingested(digits_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Artifacts:
    """Digits ingested at the test resolution; tests copy it before writing anything."""
    art = Artifacts(tmp_path_factory.mktemp("ingested"))
    pipeline.ingest(digits_folder, fast_params(), art, show=False)
    return art


@pytest.fixture
def workspace(ingested: Artifacts, tmp_path: Path) -> Artifacts:
    """A private artifacts folder holding the shared ingest outputs."""
    import shutil

    art = Artifacts(tmp_path / "artifacts")
    shutil.copytree(ingested.root, art.root)
    return art


# The Dagster tests run the whole graph several times (in process, through the webserver, with a
# retry), so they use 30 images per digit: 300 PNGs from the real export.
PER_CLASS = 30


@pytest.fixture(scope="session")
def digits_subset(digits_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first PER_CLASS images of each digit, in the export's class-per-folder layout."""
    folder = tmp_path_factory.mktemp("digits_subset")
    for label_dir in sorted(p for p in digits_folder.iterdir() if p.is_dir()):
        (folder / label_dir.name).mkdir()
        for image in sorted(label_dir.iterdir())[:PER_CLASS]:
            shutil.copy2(image, folder / label_dir.name / image.name)
    return folder


def build_artifacts(art: Artifacts, images: Path, params, trained: bool = True) -> Artifacts:
    """ingest -> train -> features -> cluster -> evaluate in `art`, as `deepcluster run` does.

    `trained=False` publishes the network training would start from (same seed and input
    statistics) instead: a real, worse model."""
    import torch

    from deepcluster import checkpoint, lineage, tracking
    from deepcluster.models import build_model
    from deepcluster.train import data_statistics, head_sizes

    pipeline.ingest(images, params, art, show=False)
    if trained:
        pipeline.train(params, art, show=False)
    else:
        manifest, cache = pipeline.ingested(art)
        resolved, _ = pipeline.resolve_training(params, art, manifest, cache)
        torch.manual_seed(resolved.train.seed)
        model = build_model(resolved.model, head_sizes(resolved))
        model.normalize.set(*data_statistics(cache))
        checkpoint.export_model(model, resolved, art.model)
        tracking.use_store()  # its own run, as a training would have
        version = lineage.recorded_version(art)
        run_id = tracking.start_training_run(resolved, version, art.manifest)
        tracking.record_run(art.run_file, run_id)
    pipeline.features(art, params, show=False)
    pipeline.cluster(art, params)
    pipeline.evaluate_step(art, params, show=False)
    return art


def pytest_report_header() -> str:
    """The numeric path the suite trains on, in its header (docs/testing.md)."""
    import torch

    from deepcluster.device import bf16_enabled

    settings = ",".join(f"{key}={value}" for key, value in TEST_COMPUTE.items()) or "none"
    caps = [
        f"{name}={os.environ[name]}"
        for name in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")
        if name in os.environ
    ]
    amp = bf16_enabled(torch.device("cpu"), bool(FAST["compute"].get("amp", True)))
    return (
        f"numerics: {COMPUTE_ENV}={settings}; {' '.join(caps) or 'no CPU capability cap'}; "
        f"CPU training in {'bf16 autocast' if amp else 'fp32'}; "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    )
