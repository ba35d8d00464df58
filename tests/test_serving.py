"""`mlflow models serve` on the champion, over HTTP on 127.0.0.1, as a remote caller sees it.

Two live servers: the README's serve command exactly as written (only the port changed), run from
a folder whose `.venv` is this environment and with `.venv/bin` not on PATH; and the same command
with DEEPCLUSTER_SERVE_ROOT and a small byte limit, as an operator would run it.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import polars as pl
import pytest

from benchmarks.bad_files import png, zeros_stream
from deepcluster import registry
from deepcluster.paths import Artifacts
from deepcluster.serving import ALLOW_PATHS

from .registry_fixtures import PARAMS, build, register_as_champion, store

pytestmark = pytest.mark.slow  # mlflow models serve

__all__ = ["store"]  # a fixture, used through `model`

ROOT = Path(__file__).resolve().parents[1]
MAX_BYTES = 200_000  # the operator's limit on the second server
SERVER_PATH = re.compile(r"/(tmp|work|usr|root|home|proc|etc|srv|var)/")


@pytest.fixture(scope="module")
def model(store: str, digits_subset: Path, tmp_path_factory: pytest.TempPathFactory) -> Artifacts:
    """The untrained network on 300 digits, made champion by hand (it does not beat its
    baselines, and serving it is what these tests are about)."""
    art = build(Artifacts(tmp_path_factory.mktemp("model")), digits_subset, 0)
    register_as_champion(art)
    return art


def readme_request(port: int, image: Path) -> str:
    """The README's curl request, as written, to `port` and with `image` for its example file."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("curl ") and "invocations" in line)
    request = "\n".join(lines[start : start + 2])
    assert "5001" in request and "data/3/0003.png" in request, request
    return request.replace("5001", str(port)).replace("data/3/0003.png", str(image))


def readme_serve_command() -> str:
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("PATH=") and "mlflow models serve" in line:
            return line.split("#")[0].strip()
    raise AssertionError("README.md has no `mlflow models serve` command")


@pytest.fixture(scope="module")
def servers(model: Artifacts, store: str, digits_subset: Path, tmp_path_factory):
    home = tmp_path_factory.mktemp("user")
    (home / ".venv").symlink_to(Path(sys.executable).parents[1])  # this environment
    root, outside = _serve_root(tmp_path_factory.mktemp("served"), digits_subset)
    venv_bin = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the model brings its code
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if p != venv_bin)
    env["MLFLOW_TRACKING_URI"] = store
    rooted_env = {**env, "DEEPCLUSTER_SERVE_ROOT": str(root),
                  "DEEPCLUSTER_MAX_IMAGE_BYTES": str(MAX_BYTES)}  # fmt: skip
    started = [_start(home, env, "open"), _start(home, rooted_env, "rooted")]
    try:
        for _, process, log, url in started:
            wait_until_up(f"{url}/ping", process, log)
        yield {"open": started[0][3], "rooted": started[1][3], "root": root, "outside": outside}
    finally:
        for _, process, _, _ in started:
            os.killpg(process.pid, signal.SIGTERM)  # the server and the uvicorn it started
            process.wait(timeout=30)


def _serve_root(folder: Path, images: Path) -> tuple[Path, Path]:
    """A root an operator allows: one image, a FIFO, a folder, a link out; a secret beside it."""
    root, outside = folder / "root", folder / "outside"
    root.mkdir(), outside.mkdir()
    first = sorted(images.rglob("*.png"))
    (root / "inside.png").write_bytes(first[0].read_bytes())
    (outside / "secret.png").write_bytes(first[1].read_bytes())
    os.mkfifo(root / "pipe.png")
    (root / "folder.png").mkdir()
    (root / "link.png").symlink_to(outside / "secret.png")
    return root, outside


def _start(home: Path, env: dict, name: str):
    port = free_port()
    command = readme_serve_command().replace("-p 5001", f"-p {port}")
    assert f"-p {port}" in command, command
    log = home / f"{name}.log"
    with open(log, "w") as sink:
        process = subprocess.Popen(["bash", "-c", command], cwd=home, env=env, stdout=sink,
                                   stderr=sink, start_new_session=True)  # fmt: skip
    return name, process, log, f"http://127.0.0.1:{port}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, server: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the model server exited:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(1)
    pytest.fail(f"the model server did not answer {url} within {timeout}s")


def invoke(url: str, column: str, values: list, params: dict | None = None) -> tuple[int, str]:
    """POST one request as the README writes it; (status, body), with the time it took checked."""
    return post(url, {"inputs": {column: values}, **({"params": params} if params else {})})


def post(url: str, body: dict) -> tuple[int, str]:
    request = urllib.request.Request(f"{url}/invocations", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})  # fmt: skip
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read().decode()
    assert time.monotonic() - started < 30, "a request must not hang the server"
    return status, text


def refused(url: str, column: str, value, match: str, params: dict | None = None) -> str:
    """The request gets a 400 whose message is one line that says `match`: no traceback, no
    server path, and not the caller's input repeated back (MLflow's server once put it first)."""
    status, text = invoke(url, column, [value], params)
    assert status == 400, (status, text[:500])
    answer = json.loads(text)
    assert set(answer) <= {"error_code", "message", "sqlstate", "error_class"}, answer
    message = answer["message"]
    assert re.search(match, message) and "\n" not in message, message
    assert "Traceback" not in text and not SERVER_PATH.search(message), message
    assert "Failed to predict" not in message and (len(value) < 12 or value not in message)
    return message


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_the_readme_command_serves_base64_images(servers, model: Artifacts, digits_subset: Path):
    table = pl.read_parquet(model.assignments).head(20)
    images = [b64((digits_subset / p).read_bytes()) for p in table["path"]]
    status, text = invoke(servers["open"], "image", images)
    assert status == 200, text[:2000]
    predictions = json.loads(text)["predictions"]
    assert [p["cluster"] for p in predictions] == table["cluster"].to_list()
    assert len(predictions[0]["embedding"]) == PARAMS.model.embed_dim
    status, text = post(servers["open"], {"inputs": [{"image": image} for image in images[:3]]})
    assert [p["cluster"] for p in json.loads(text)["predictions"]] == table["cluster"][:3].to_list()


def test_the_readme_request_as_written(servers, model: Artifacts, digits_subset: Path):
    table = pl.read_parquet(model.assignments).head(1)
    port = int(servers["open"].rsplit(":", 1)[1])
    request = readme_request(port, digits_subset / table["path"][0])
    done = subprocess.run(["bash", "-c", request], capture_output=True, text=True, check=True)
    [prediction] = json.loads(done.stdout)["predictions"]
    assert prediction["cluster"] == table["cluster"][0]


def test_a_request_in_another_format_gets_one_line(servers):
    """MLflow's `dataframe_split` is refused by MLflow itself (the model checks its own input),
    in one line; a frame without `image` or `path` gets the model's own line."""
    url = servers["open"]
    status, text = post(url, {"dataframe_split": {"columns": ["image"], "data": [["aGk="]]}})
    assert status == 400 and "'inputs'" in json.loads(text)["message"], text[:500]
    status, text = post(url, {"inputs": {"file": ["a.png"], "size": [1]}})
    message = json.loads(text)["message"]
    assert status == 400 and message.endswith("got columns ['file', 'size']"), text[:500]
    assert message.startswith("expected a list or Series of image paths") and "\n" not in message


def test_a_server_reads_no_file_unless_its_operator_allows_a_folder(servers, digits_subset):
    url, existing = servers["open"], str(next(digits_subset.rglob("*.png")))
    for path in (existing, "../" * 12 + existing.lstrip("/"), "/etc/hostname"):
        refused(url, "path", path, "this server does not read files")
    refused(url, "path", existing, "`allow_paths` is not accepted by a model server",
            params={"allow_paths": True})  # fmt: skip


def test_a_serve_root_confines_paths_to_regular_files_inside_it(servers):
    url, root, outside = servers["rooted"], servers["root"], servers["outside"]
    for inside in ("inside.png", str(root / "inside.png"), "folder.png/../inside.png"):
        assert invoke(url, "path", [inside])[0] == 200, inside
    secret = str(outside / "secret.png")
    for escape in (secret, "../outside/secret.png", "link.png", "../" * 12 + "etc/hostname"):
        refused(url, "path", escape, "outside the folder this server may read")
    refused(url, "path", "pipe.png", r"not a regular file \(a named pipe \(FIFO\)\)")
    refused(url, "path", "folder.png", r"not a regular file \(a folder\)")
    refused(url, "path", "missing.png", "no such file")
    refused(url, "path", "bad\0name.png", "not a valid file name")
    with urllib.request.urlopen(f"{url}/ping", timeout=5) as response:
        assert response.status == 200  # no worker is stuck
    assert invoke(url, "path", ["inside.png"])[0] == 200


def test_oversized_images_and_pixel_bombs_are_refused_before_decoding(servers):
    url = servers["rooted"]
    noise = np.random.default_rng(0).bytes(MAX_BYTES + 1)
    refused(url, "image", b64(noise), r"file too large \(200,001 bytes; limit 200,000")
    needle = png(2, 2_000_000, zeros_stream(2, 2_000_000))  # 6 KB, once 1.6 GB and 39 s
    assert len(needle) < 10_000
    refused(url, "image", b64(needle), r"extreme aspect ratio \(2x2000000")
    bomb = png(12_000, 12_000, zeros_stream(12_000, 12_000))  # 140 KB, 144 Mpx
    refused(url, "image", b64(bomb), r"too many pixels \(12000x12000")
    refused(url, "image", "not base64!", "`image` is not valid base64")
    refused(url, "image", b64(b"GIF89a broken"), "not a decodable image")


def test_the_registry_shows_the_inputs_and_a_list_still_works(model: Artifacts, digits_subset):
    """The version's signature names `image` and `path` (both optional) and `allow_paths`; MLflow
    leaves them to the model to check, so a plain list of paths is still taken in-process."""
    uri = f"models:/{registry.MODEL_NAME}@{registry.CHAMPION}"
    signature = mlflow.models.get_model_info(uri).signature
    inputs = {spec.name: spec for spec in signature.inputs.inputs}
    assert set(inputs) == {"image", "path"} and not any(s.required for s in inputs.values())
    assert [p.name for p in signature.params.params] == [ALLOW_PATHS]
    table = pl.read_parquet(model.assignments).head(3)
    paths = [str(digits_subset / p) for p in table["path"]]
    out = mlflow.pyfunc.load_model(uri).predict(paths, params={ALLOW_PATHS: True})
    assert out["cluster"].tolist() == table["cluster"].to_list()
