"""Every command in README.md's bash blocks, and its python block, run as a user copies them
(`bash -c`) in a copy of the repo as `make demo` leaves it. Each command is in one list: run for
real (`RUNS`), a server started, polled on its port and stopped (`SERVERS`), or not run, with the
reason (`NOT_RUN`: `make -n` only); a command in none fails the fast test below."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT
from tests.test_dvc_pipeline import GIT_IDENTITY, TINY, copy_working_tree

README = ROOT / "README.md"

# Not run in the suite, each for its reason; `make -n` checks that the target exists.
NOT_RUN = {
    "make install": "creates .venv and .dvc-venv (minutes of pip): the suite runs inside them",
    "make demo": "trains on all 1,797 digits at the `auto` settings (minutes of CPU); the state "
    "it leaves is what this test builds with small params",
    "make test": "runs this suite",
}
# Servers: (pattern, URL that answers once the server is up); the port is the README's own.
SERVERS = [
    (r"make dagster", "http://127.0.0.1:3000/server_info"),
    (r"\.venv/bin/mlflow ui", "http://127.0.0.1:5000/health"),
    (r'PATH="\$PWD/\.venv/bin:\$PATH" \.venv/bin/mlflow models serve .* -p (?P<port>\d+)',
     "http://127.0.0.1:{port}/ping"),
]  # fmt: skip
# Run for real, to the end: the project's commands, and requests to a server started before.
RUNS = [
    r"\.venv/bin/deepcluster \S.*",
    r"\.venv/bin/dg check defs",
    r'(PATH="\$PWD/\.venv/bin:\$PATH" )?\.dvc-venv/bin/dvc \S.*',
    r"curl -s http://127\.0\.0\.1:\d+/invocations .*",
]
SERVER_START_SECONDS = 240  # dg dev loads the code location in a subprocess of its own
COMMAND_SECONDS = 600


@dataclass(frozen=True)
class Command:
    text: str  # as it stands, continuation lines included
    line: int  # where it starts in README.md

    @property
    def flat(self) -> str:
        """One line, continuation joined, for matching against the lists."""
        return " ".join(self.text.replace("\\\n", " ").split())


def split_comment(line: str) -> tuple[str, str]:
    """The code and the comment of one shell line: `#` starts a comment at the start of a word,
    outside quotes."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1 :]
    return line.rstrip(), ""


def bash_commands(markdown: str) -> list[Command]:
    """The commands of the ```bash blocks: comments dropped (a comment naming a `.venv/bin/...`
    command in backquotes names a command too), a line ending in `\\` continued on the next."""
    commands, block, pending, start = [], False, "", 0
    for number, line in enumerate(markdown.splitlines(), 1):
        if line.startswith("```"):
            block = line.strip() == "```bash"
            continue
        if not block:
            continue
        code, comment = split_comment(line)
        for named in re.findall(r"`(\.(?:dvc-)?venv/bin/[^`]+)`", comment):
            commands.append(Command(named, number))
        if not code.strip():
            continue
        start = start if pending else number
        pending += code + "\n"
        if not code.endswith("\\"):
            commands.append(Command(pending.strip(), start))
            pending = ""
    return commands


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown, re.MULTILINE | re.DOTALL)


def kind(command: Command) -> str:
    """`not run`, `server` or `run`; an AssertionError for a command in none of the lists."""
    if command.flat in NOT_RUN:
        return "not run"
    if any(re.fullmatch(pattern, command.flat) for pattern, _ in SERVERS):
        return "server"
    if any(re.fullmatch(pattern, command.flat) for pattern in RUNS):
        return "run"
    raise AssertionError(
        f"README.md:{command.line}: `{command.flat}` is in none of tests/test_readme.py's lists "
        "(RUNS, SERVERS, NOT_RUN): add it to one, so that it is tested"
    )


def readme_commands() -> list[Command]:
    """Each distinct command once, in README order."""
    seen, unique = set(), []
    for command in bash_commands(README.read_text()):
        if command.flat not in seen:
            seen.add(command.flat)
            unique.append(command)
    return unique


# --- fast: the parser, and every command classified ---------------------------------------------


def test_the_parser_reads_commands_as_a_shell_would() -> None:
    markdown = """```bash
make demo   # one
            # two: `.venv/bin/dg check defs` too
curl -s 'http://x/#frag' -H 'A: b' \\
  -d "#$(echo hi)"   # three
```
```python
make nothing
```
"""
    commands = bash_commands(markdown)
    assert [c.text for c in commands] == [
        "make demo",
        ".venv/bin/dg check defs",
        "curl -s 'http://x/#frag' -H 'A: b' \\\n  -d \"#$(echo hi)\"",
    ]
    assert [c.line for c in commands] == [2, 3, 4]
    assert commands[2].flat == "curl -s 'http://x/#frag' -H 'A: b' -d \"#$(echo hi)\""


def test_every_readme_command_is_in_one_list() -> None:
    commands = readme_commands()
    kinds = {command.flat: kind(command) for command in commands}  # fails on an unlisted one
    assert set(NOT_RUN) <= set(kinds), "a command NOT_RUN names is gone from README.md"
    assert "run" in kinds.values() and "server" in kinds.values()
    assert python_blocks(README.read_text()), "README.md's python block is gone"


# --- slow: each command run in a copy of the repo in the state `make demo` leaves ---------------


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5):
            return True
    except urllib.error.HTTPError:
        return True  # it answered
    except OSError:
        return False


class Repo:
    """The copy, its environment (the user's: MLflow's and Dagster's defaults, a HOME of its own),
    and the commands run in it."""

    def __init__(self, path: Path, home: Path) -> None:
        self.path = path
        drop = {"MLFLOW_TRACKING_URI", "DAGSTER_HOME", "VIRTUAL_ENV", "PYTHONPATH"}
        self.env = {k: v for k, v in os.environ.items()
                    if k not in drop and not k.startswith("DEEPCLUSTER_")}  # fmt: skip
        self.env.update(GIT_IDENTITY, HOME=str(home), DVC_NO_ANALYTICS="1")
        self.env["DAGSTER_DISABLE_TELEMETRY"] = "1"

    def run(self, text: str, timeout: float = COMMAND_SECONDS) -> str:
        done = subprocess.run(["bash", "-c", text], cwd=self.path, env=self.env, text=True,
                              capture_output=True, timeout=timeout, check=False)  # fmt: skip
        output = done.stdout + done.stderr
        assert done.returncode == 0, f"`{text}` exited {done.returncode}:\n{output[-4000:]}"
        assert "Traceback" not in output, f"`{text}`:\n{output[-4000:]}"
        return done.stdout

    def start(self, text: str, url: str, log: Path) -> subprocess.Popen:
        port = int(url.split(":")[2].split("/")[0])
        assert _port_is_free(port), f"port {port} is in use: `{text}` needs it"
        with log.open("w") as sink:
            server = subprocess.Popen(["bash", "-c", text], cwd=self.path, env=self.env,
                                      stdout=sink, stderr=subprocess.STDOUT,
                                      start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + SERVER_START_SECONDS
        while not _answers(url):
            if server.poll() is not None or time.monotonic() > deadline:
                stop(server)
                pytest.fail(f"`{text}` did not answer {url}:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        return server


def stop(server: subprocess.Popen) -> None:
    """Ctrl-C as a terminal sends it, to the server's whole process group (make, dg dev and its
    webserver, daemon and code server; mlflow and its uvicorn); SIGKILL to what is left after a
    minute."""
    try:
        os.killpg(server.pid, signal.SIGINT)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 60
    while _group_alive(server):
        if time.monotonic() > deadline:
            os.killpg(server.pid, signal.SIGKILL)
        time.sleep(0.5)


def _group_alive(server: subprocess.Popen) -> bool:
    server.poll()  # reaps the shell, so that only live members count
    try:
        os.killpg(server.pid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture(scope="module")
def repo(digits_subset: Path, tmp_path_factory: pytest.TempPathFactory) -> Repo:
    """This working tree copied (a git repo, for `dvc`), as `make demo` leaves it, made cheaply:
    `data/` holds 30 digits per class (`digits_subset`: the export `deepcluster sample-data digits
    data` writes), `path/to/images` (the README's placeholder for your folder) the same images, and
    params.yaml the small settings of tests/test_dvc_pipeline.py (16 px, 2 epochs) instead of
    `auto`: no command takes a flag that shortens it, and params.yaml is the documented home of
    every hyperparameter. `deepcluster run data` trains, `deepcluster register` registers into the
    copy's MLflow store (`mlflow.db`, MLflow's default there), and `champion` is set by hand: a
    2-epoch model need not beat its baselines. The servers' ports are the README's, so must be free.
    """
    scratch = tmp_path_factory.mktemp("readme")
    path = copy_working_tree(scratch / "repo")
    for venv in (".venv", ".dvc-venv"):  # the suite's environments, as `make install` made them
        (path / venv).symlink_to(ROOT / venv)
    # make targets depend on `install`, whose stamps are in those environments: older inputs, so
    # that `make dagster` never re-installs them (from the copy, which then goes)
    for name in ("Makefile", "pyproject.toml"):
        os.utime(path / name, (0, 0))
    stamps = ["make", "-q", ".venv/.installed", ".dvc-venv/.installed"]
    assert subprocess.run(stamps, cwd=path, check=False).returncode == 0, "run `make install`"
    (scratch / "home").mkdir()
    repo = Repo(path, scratch / "home")
    params = yaml.safe_load((path / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for folder in ("data", "path/to/images"):
        shutil.copytree(digits_subset, path / folder)
    repo.run("git init -q && git add -A && git commit -q -m 'as make demo leaves it'")
    repo.run(".venv/bin/deepcluster run data -q && .venv/bin/deepcluster register")
    _make_champion(path)
    return repo


def _make_champion(path: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{path / 'mlflow.db'}")
    versions = client.search_model_versions("name = 'deepcluster'")
    latest = max(int(version.version) for version in versions)
    client.set_registered_model_alias("deepcluster", "champion", str(latest))


@pytest.mark.slow
def test_every_readme_command_works_copied(repo: Repo, tmp_path: Path) -> None:
    """In README order; a server stays up for the requests (curl) that follow it."""
    server = None
    try:
        for command in readme_commands():
            what, began = kind(command), time.monotonic()
            if server is not None and not command.flat.startswith("curl "):
                stop(server)
                server = None
            if what == "not run":
                repo.run(command.text.replace("make ", "make -n ", 1))
            elif what == "server":
                [url] = [url.format(**match.groupdict()) for pattern, url in SERVERS
                         if (match := re.fullmatch(pattern, command.flat))]  # fmt: skip
                server = repo.start(command.text, url, tmp_path / f"server{command.line}.log")
            else:
                out = repo.run(command.text)
                if command.flat.startswith("curl "):
                    predictions = json.loads(out)["predictions"]
                    assert len(predictions) == 1 and "cluster" in predictions[0], out
            print(f"{time.monotonic() - began:6.1f} s  {what:8s} {command.flat[:70]}")  # -s shows
    finally:
        if server is not None:
            stop(server)


@pytest.mark.slow
def test_the_readme_python_block_predicts_with_the_champion(repo: Repo, tmp_path: Path) -> None:
    [block] = python_blocks(README.read_text())
    script = tmp_path / "block.py"
    script.write_text(block)
    out = repo.run(f".venv/bin/python {script}")
    assert "cluster" in out and "distance" in out, out
