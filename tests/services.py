"""Real servers on 127.0.0.1 for the deployment tests: PostgreSQL (Debian's binaries), an S3
endpoint (moto in server mode) and an MLflow tracking server backed by both.

Each `running_*` context manager starts its process, waits until it answers, yields how to reach
it, and stops it (and only it) on the way out. Nothing here is a mock: clients talk to the real
server over TCP exactly as they would in `deploy/compose.yaml`.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

BIN = Path(sys.executable).parent  # the virtual environment's console scripts
# PostgreSQL refuses to run as root; Debian's package creates this account for it.
PG_ACCOUNT = "postgres"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(ready, what: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    """Poll `ready()` until it is true; fail with the server's log if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{tail(log)}")
        if ready():
            return
        time.sleep(0.3)
    raise RuntimeError(f"{what} not ready after {timeout:.0f}s:\n{tail(log)}")


def tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"


def http_ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).ok
    except requests.RequestException:
        return False


def stop(process: subprocess.Popen) -> None:
    """SIGTERM the process group the server was started in (its workers too), then SIGKILL."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=5)  # test servers: no need for a long graceful shutdown
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


# --- PostgreSQL -----------------------------------------------------------------------------------


def postgres_bindir() -> Path | None:
    """Where initdb and pg_ctl are: on PATH, else Debian's /usr/lib/postgresql/<version>/bin."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version, reverse=True)
    return Path(versions[0]).parent if versions else None


def _version(path: str) -> float:
    try:
        return float(Path(path).parents[1].name)
    except ValueError:
        return 0.0


def missing_servers() -> str | None:
    """Why the servers cannot start here, or None when they can."""
    if postgres_bindir() is None:
        return "PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(PG_ACCOUNT)
        except KeyError:
            return f"running as root and there is no '{PG_ACCOUNT}' account to run PostgreSQL as"
    for script in ("moto_server", "mlflow"):
        if not (BIN / script).exists():
            return f"{BIN / script} missing: pip install -e '.[services]'"
    return None


@dataclass(frozen=True)
class Postgres:
    port: int
    user: str
    password: str
    host: str = "127.0.0.1"

    def url(self, database: str, scheme: str = "postgresql") -> str:
        return f"{scheme}://{self.user}:{self.password}@{self.host}:{self.port}/{database}"

    def query(self, database: str, sql: str, *args) -> list[tuple]:
        import psycopg

        with psycopg.connect(self.url(database)) as connection:
            return connection.execute(sql, args).fetchall()


@contextmanager
def running_postgres(databases: Sequence[str]) -> Iterator[Postgres]:
    """A throwaway cluster listening on 127.0.0.1 (password login), with `databases` created."""
    import psycopg

    bindir = postgres_bindir()
    # Not under pytest's tmp_path: its parents are root-only, and the server may run as postgres.
    folder = Path(tempfile.mkdtemp(prefix="deepcluster-pg-"))
    account = _account()
    server = Postgres(port=free_port(), user="deepcluster", password="deepcluster-test")
    (folder / "pwfile").write_text(server.password + "\n")
    if account:
        for path in (folder, folder / "pwfile"):
            os.chown(path, account.pw_uid, account.pw_gid)

    def run(*args: str) -> None:
        done = subprocess.run(
            args,
            check=False,
            cwd=folder,
            user=account and account.pw_uid,
            group=account and account.pw_gid,
            capture_output=True,
            text=True,
        )
        if done.returncode:
            raise RuntimeError(
                f"{Path(args[0]).name} failed: {done.stdout}{done.stderr}"
                f"\n{tail(folder / 'server.log')}"
            )

    data = folder / "data"
    run(
        str(bindir / "initdb"),
        "-D",
        str(data),
        "-U",
        server.user,
        "--pwfile",
        str(folder / "pwfile"),
        "--auth-host=scram-sha-256",
        "--auth-local=trust",
        "-E",
        "UTF8",
        "--locale=C",
        "--no-sync",
    )
    # the unix socket goes to the private folder, so no system directory is needed; fsync off: a
    # test database is thrown away
    options = f"-c listen_addresses=127.0.0.1 -p {server.port} -k {folder} -c fsync=off"
    run(
        str(bindir / "pg_ctl"),
        "-D",
        str(data),
        "-l",
        str(folder / "server.log"),
        "-o",
        options,
        "-w",
        "-t",
        "60",
        "start",
    )
    try:
        with psycopg.connect(server.url("postgres"), autocommit=True) as connection:
            for name in databases:
                connection.execute(f'CREATE DATABASE "{name}"')
        yield server
    finally:
        run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


def _account() -> pwd.struct_passwd | None:
    return pwd.getpwnam(PG_ACCOUNT) if os.geteuid() == 0 else None


# --- S3 (moto server mode) ------------------------------------------------------------------------


@dataclass(frozen=True)
class S3:
    endpoint: str
    access_key: str = "deepcluster-test"
    secret_key: str = "deepcluster-test-secret"
    region: str = "us-east-1"

    def env(self) -> dict[str, str]:
        """What boto3, MLflow's S3 store and dvc-s3 read to reach this endpoint."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
        }

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
        )

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        )
        return [item["Key"] for page in pages for item in page.get("Contents", [])]


@contextmanager
def running_s3(folder: Path) -> Iterator[S3]:
    """moto's S3 server; it starts with no buckets."""
    port = free_port()
    log = folder / "moto.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        store = S3(endpoint=f"http://127.0.0.1:{port}")
        wait_until(lambda: http_ok(f"{store.endpoint}/moto-api/"), "moto_server", process, log, 60)
        yield store
    finally:
        stop(process)


# --- MLflow tracking server -----------------------------------------------------------------------


@contextmanager
def running_mlflow(
    folder: Path, backend_store_uri: str, artifacts_destination: str, s3: S3
) -> Iterator[str]:
    """`mlflow server` as deploy/compose.yaml runs it: runs and registry in the backend store,
    artifacts proxied by the server to `artifacts_destination`. Yields the tracking URI."""
    port = free_port()
    log = folder / "mlflow.log"
    env = {**os.environ, **s3.env()}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [
                str(BIN / "mlflow"),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
                "--backend-store-uri",
                backend_store_uri,
                "--artifacts-destination",
                artifacts_destination,
            ],
            cwd=folder,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        uri = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_ok(f"{uri}/health"), "mlflow server", process, log, 180)
        yield uri
    finally:
        stop(process)
