"""The deployment files (deploy/), checked without a cluster or a Docker engine: they parse, every
image is built here or pinned, every host:port a service uses is one another service serves, every
environment variable set on the project's image is one that something in it reads, and the
Kubernetes objects validate against the Kubernetes API models that dagster-k8s itself uses.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import kubernetes.client as k8s
import pytest
import typer
import yaml
from dagster_k8s.models import k8s_model_from_dict, k8s_snake_case_dict

from orchestration.defs.assets.training import checkpoint
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
OUR_IMAGE_DOCKERFILE = "deploy/Dockerfile"
URL = re.compile(r"[a-z][a-z0-9+]*://(?:[^@/\s]+@)?([A-Za-z0-9.-]+):(\d+)")
ENV_REF = re.compile(r"\$\(([A-Z0-9_]+)\)")  # Kubernetes' $(VAR) in command and args


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def load_all(path: Path) -> dict[str, dict]:
    """Kubernetes objects in a multi-document file, by kind."""
    return {doc["kind"]: doc for doc in yaml.safe_load_all(path.read_text()) if doc}


# --- what the code reads --------------------------------------------------------------------------


def _string(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _is_environ(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "environ"


@cache
def variables_read_by_code() -> frozenset[str]:
    """Names in os.environ[...] / .get / .setdefault, os.getenv, EnvVar("VAR") and the resources'
    `ENV = {field: "VAR"}` across the library, the code location and deploy/'s scripts."""
    names: set[str] = set()
    files = [*(ROOT / "ssl").rglob("*.py"), *(ROOT / "orchestration").rglob("*.py"),
             *DEPLOY.rglob("*.py")]  # fmt: skip
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Subscript) and _is_environ(node.value):
                names.add(_string(node.slice))
            elif isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "ENV":
                names.update(_string(value) for value in getattr(node.value, "values", []))
            elif isinstance(node, ast.Call):
                func = node.func
                attr = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                first = _string(node.args[0]) if node.args else None
                on_environ = isinstance(func, ast.Attribute) and _is_environ(func.value)
                if (attr in ("get", "setdefault", "pop") and on_environ) or attr in (
                    "getenv",
                    "EnvVar",
                ):
                    names.add(first)
    names.discard(None)
    return frozenset(names)


def variables_read_by_instance_yaml() -> set[str]:
    """`{env: VAR}` references in deploy/dagster.yaml."""
    found: set[str] = set()

    def walk(tree) -> None:
        if isinstance(tree, dict):
            if set(tree) == {"env"}:
                found.add(tree["env"])
            for value in tree.values():
                walk(value)
        elif isinstance(tree, list):
            for value in tree:
                walk(value)

    walk(load(DEPLOY / "dagster.yaml"))
    return found


@cache
def read_by_library(
    name: str, packages: tuple[str, ...] = ("dagster", "mlflow", "botocore")
) -> bool:
    """Whether an installed library the image runs mentions `name` as a string in its source."""
    needle = f'"{name}"'
    for package in packages:
        spec = importlib.util.find_spec(package)
        for path in Path(spec.origin).parent.rglob("*.py"):
            text = path.read_text(errors="ignore")
            if needle in text or f"'{name}'" in text:
                return True
    return False


def unread(names, also_read: set[str] = frozenset()) -> list[str]:
    known = variables_read_by_code() | variables_read_by_instance_yaml() | also_read
    return sorted(n for n in names if n not in known and not read_by_library(n))


def test_the_scan_finds_the_variables_the_resources_read() -> None:
    """The scan itself can fail: these are read in orchestration/defs/resources.py."""
    assert {"DEEPCLUSTER_ARTIFACTS", "MLFLOW_TRACKING_URI", "DEEPCLUSTER_EXECUTOR"} <= (
        variables_read_by_code()
    )
    assert read_by_library("MLFLOW_S3_ENDPOINT_URL")
    assert unread(["DEEPCLUSTER_NO_SUCH_SETTING"]) == ["DEEPCLUSTER_NO_SUCH_SETTING"]


# --- compose --------------------------------------------------------------------------------------


@cache
def compose() -> dict:
    return load(COMPOSE)


def ours(service: dict) -> bool:
    return service.get("build", {}).get("dockerfile") == OUR_IMAGE_DOCKERFILE


def command(service: dict) -> list[str]:
    cmd = service.get("command", [])
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def listen_ports(tokens: list[str]) -> set[int]:
    """Ports a server command binds: -p/--port N, --port=N, --address :N, -c port=N."""
    ports: set[int] = set()
    for flag, value in zip(tokens, [*tokens[1:], ""], strict=True):
        if flag in ("-p", "--port") and value.isdigit():
            ports.add(int(value))
        elif flag.startswith("--port="):
            ports.add(int(flag.split("=", 1)[1]))
        elif flag in ("--address", "--console-address"):
            ports.add(int(value.rsplit(":", 1)[1]))
        elif flag == "-c" and value.startswith("port="):
            ports.add(int(value.split("=", 1)[1]))
    return ports


def published(service: dict) -> dict[int, int]:
    """host port -> container port."""
    pairs = (str(p).split(":")[-2:] for p in service.get("ports", []))
    return {int(host): int(container) for host, container in pairs}


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    return dict(env) if isinstance(env, dict) else dict(e.split("=", 1) for e in env)


def test_compose_images_are_built_here_or_pinned() -> None:
    for name, service in compose()["services"].items():
        if ours(service):
            assert (ROOT / service["build"]["dockerfile"]).is_file(), name
            assert (COMPOSE.parent / service["build"]["context"]).resolve() == ROOT, name
            continue
        image = service.get("image", "")
        repository, _, tag = image.rpartition(":")
        assert repository and tag and tag != "latest" and re.search(r"\d", tag), (
            f"{name}: image {image!r} is neither built from {OUR_IMAGE_DOCKERFILE} nor pinned"
        )


def test_compose_ports_match_what_each_service_serves() -> None:
    services = compose()["services"]
    serves = {name: listen_ports(command(s)) for name, s in services.items()}
    assert serves["codelocation"] and serves["mlflow"] and serves["webserver"], serves
    for name, service in services.items():
        for container_port in published(service).values():
            assert container_port in serves[name], f"{name} publishes {container_port}"
        texts = [*environment(service).values(), *command(service)]
        for text in texts:
            for host, port in URL.findall(str(text)):
                if host == "localhost":  # a link for the browser: a published port
                    assert any(int(port) in published(s) for s in services.values()), text
                else:
                    assert int(port) in serves.get(host, ()), f"{name}: {text} -> {host}:{port}"


def test_dagster_services_reach_postgres_as_the_instance_yaml_reads_it() -> None:
    services = compose()["services"]
    storage = load(DEPLOY / "dagster.yaml")["storage"]["postgres"]["postgres_db"]
    for name in ("codelocation", "webserver", "daemon"):
        env = environment(services[name])
        missing = variables_read_by_instance_yaml() - set(env)
        assert not missing, f"{name} lacks {sorted(missing)} (read by deploy/dagster.yaml)"
        host, port = env[storage["hostname"]["env"]], int(env[storage["port"]["env"]])
        assert port in listen_ports(command(services[host])), f"{name}: {host}:{port}"
        db = env[storage["db_name"]["env"]]
        assert db == environment(services[host])["POSTGRES_DB"]
    created = (DEPLOY / "postgres-init.sql").read_text()
    backend = command(services["mlflow"])[
        command(services["mlflow"]).index("--backend-store-uri") + 1
    ]
    assert f"CREATE DATABASE {backend.rsplit('/', 1)[1]};" in created


def test_instance_yaml_queues_runs_and_keeps_the_one_slot_gpu_pool() -> None:
    instance = load(DEPLOY / "dagster.yaml")
    project = load(ROOT / "orchestration" / "dagster.yaml")
    assert instance["concurrency"]["pools"] == project["concurrency"]["pools"]
    assert instance["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert set(instance["storage"]) == {"postgres"}


def test_env_vars_set_on_the_project_image_are_read_by_something_in_it() -> None:
    for name, service in compose()["services"].items():
        if ours(service):
            assert not unread(environment(service)), f"{name}: {unread(environment(service))}"
    override = load(DEPLOY / "compose.gpu.yaml")["services"]
    for name, service in override.items():
        assert name in compose()["services"], name
        assert not unread(environment(service)), name


def test_mlflow_server_accepts_the_host_the_code_location_uses() -> None:
    services = compose()["services"]
    uri = environment(services["codelocation"])["MLFLOW_TRACKING_URI"]
    host, port = URL.findall(uri)[0]
    mlflow = command(services["mlflow"])
    allowed = mlflow[mlflow.index("--allowed-hosts") + 1].split(",")
    assert f"{host}:{port}" in allowed
    bucket = mlflow[mlflow.index("--artifacts-destination") + 1].split("/")[2]
    assert bucket in command(services["buckets"]), "the artifact bucket is never created"


def test_workspace_points_at_the_code_location() -> None:
    services = compose()["services"]
    [entry] = load(DEPLOY / "workspace.yaml")["load_from"]
    server = entry["grpc_server"]
    code = command(services[server["host"]])
    assert server["port"] in listen_ports(code)
    assert code[code.index("--location-name") + 1] == server["location_name"]
    assert code[code.index("--module-name") + 1] == "orchestration.definitions"
    for name in ("webserver", "daemon"):
        cmd = command(services[name])
        assert (ROOT / cmd[cmd.index("--workspace") + 1]) == DEPLOY / "workspace.yaml", name


def test_gpu_override_reserves_an_nvidia_gpu_for_the_code_location() -> None:
    [device] = load(DEPLOY / "compose.gpu.yaml")["services"]["codelocation"]["deploy"]["resources"][
        "reservations"
    ]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]


# --- Dockerfile -----------------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]


def test_dockerfile_runs_as_a_user_and_installs_faiss_gpu() -> None:
    steps = dockerfile()
    users = [args for op, args in steps if op == "USER"]
    assert users and users[-1] not in ("root", "0"), users
    run = " ".join(args for op, args in steps if op == "RUN")
    assert "faiss-gpu" in run and "--force-reinstall" in run
    extras = re.findall(r"pip install -e '\.\[([a-z,]+)\]'", run)
    optional = load_pyproject()["project"]["optional-dependencies"]
    assert extras and set(extras[0].split(",")) <= set(optional), extras
    [base] = [args for op, args in steps if op == "FROM"]
    assert ":" in base and not base.endswith(":latest"), base


def test_dockerfile_copies_what_exists_and_sets_only_variables_that_are_read() -> None:
    steps = dockerfile()
    for op, args in steps:
        if op == "COPY":
            for source in args.split()[:-1]:
                assert (ROOT / source).exists(), source
        if op == "ENV":
            names = [pair.split("=", 1)[0] for pair in args.split()]
            assert not unread(names, {"PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED"}
                              | {n for n in names if n.startswith("PIP_")}), names  # fmt: skip
    [cmd] = [json.loads(args) for op, args in steps if op == "CMD"]
    assert cmd == command(compose()["services"]["codelocation"])  # the image's default is compose's


def test_an_image_without_git_reports_the_commit_it_was_built_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from deepcluster import lineage

    monkeypatch.delenv("DEEPCLUSTER_GIT_COMMIT", raising=False)
    assert lineage.git_commit(tmp_path) is None  # not a git work tree
    monkeypatch.setenv("DEEPCLUSTER_GIT_COMMIT", "0123abc")
    assert lineage.git_commit(tmp_path) == "0123abc"
    assert lineage.git_commit(ROOT) != "0123abc"  # a checkout's HEAD wins
    args = dict(arg.split("=", 1) for op, arg in dockerfile() if op == "ENV" and "GIT" in arg)
    assert args == {"DEEPCLUSTER_GIT_COMMIT": "$GIT_COMMIT"}


def load_pyproject() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


# --- Helm values for dagster/dagster -----------------------------------------------------------------


@cache
def helm() -> dict:
    return load(DEPLOY / "helm" / "values.yaml")


def user_deployment() -> dict:
    [deployment] = helm()["dagster-user-deployments"]["deployments"]
    return deployment


def helm_env() -> dict[str, str]:
    return {e["name"]: e["value"] for e in user_deployment()["env"]}


@pytest.mark.slow
def test_helm_env_is_read_by_the_code_and_names_a_real_executor() -> None:
    env = helm_env()
    assert not unread(env), unread(env)
    # the code location loads with exactly this environment and the executor config validates
    probe = (
        "from dagster import validate_run_config\n"
        "from orchestration.definitions import defs\n"
        "job = defs.resolve_job_def('deepcluster_job')\n"
        "print(job.executor_def.name)\n"
        "validate_run_config(job, {})\n"
    )
    run_env = {**os.environ, **env, "PYTHONPATH": f"{ROOT / 'ssl'}{os.pathsep}{ROOT}"}
    done = subprocess.run([sys.executable, "-c", probe], env=run_env, capture_output=True,
                          text=True, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["k8s"]


def test_gpu_placement_goes_to_the_training_op_only() -> None:
    per_step = yaml.safe_load(helm_env()["DEEPCLUSTER_EXECUTOR_CONFIG"])["per_step_k8s_config"]
    train = checkpoint.node_def.node_named("train_epochs").definition
    assert set(per_step) == {train.name} and train.pool == "gpu"
    gpu_tag = json.loads(train.tags["dagster-k8s/config"])
    assert "nvidia.com/gpu" in gpu_tag["container_config"]["resources"]["limits"]
    pod = k8s_snake_case_dict(k8s.V1PodSpec, per_step[train.name]["pod_spec_config"])
    assert pod["node_selector"] and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    base = helm()["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfig"]
    k8s_snake_case_dict(k8s.V1PodSpec, base["podSpecConfig"])  # raises on a misspelt key
    container = k8s_snake_case_dict(k8s.V1Container, base["containerConfig"])
    assert "nvidia.com/gpu" not in json.dumps(container), "every step pod would ask for a GPU"


def test_helm_launches_runs_on_kubernetes_with_postgres_and_one_gpu_slot() -> None:
    values = helm()
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert values["dagsterDaemon"]["runCoordinator"]["type"] == "QueuedRunCoordinator"
    project_pools = load(ROOT / "orchestration" / "dagster.yaml")["concurrency"]["pools"]
    assert values["concurrency"]["enabled"] is True
    assert values["concurrency"]["pools"]["defaultLimit"] == project_pools["default_limit"]
    assert values["postgresql"]["postgresqlDatabase"] == "dagster"
    deployment = user_deployment()
    assert deployment["includeConfigInLaunchedRuns"]["enabled"] is True  # env reaches step pods
    assert deployment["dagsterApiGrpcArgs"][-1] == "orchestration.definitions"


def test_helm_volume_and_mlflow_service_exist_in_the_manifests() -> None:
    deployment = user_deployment()
    volumes = {v["name"]: v for v in deployment["volumes"]}
    for mount in deployment["volumeMounts"]:
        claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
        assert (
            claim
            == load_all(DEPLOY / "k8s" / "data-volume.yaml")["PersistentVolumeClaim"]["metadata"][
                "name"
            ]
        )
        assert helm_env()["DEEPCLUSTER_ARTIFACTS"].startswith(mount["mountPath"])
    service = load_all(DEPLOY / "k8s" / "mlflow.yaml")["Service"]
    host, port = URL.findall(helm_env()["MLFLOW_TRACKING_URI"])[0]
    assert host == service["metadata"]["name"]
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}


# --- Kubernetes manifests -------------------------------------------------------------------------


def pod_template(template: dict) -> k8s.V1PodTemplateSpec:
    """Validated against the Kubernetes API model; raises on unknown or missing fields."""
    return k8s_model_from_dict(
        k8s.V1PodTemplateSpec, k8s_snake_case_dict(k8s.V1PodTemplateSpec, template)
    )


@cache
def cli_options() -> dict[str, set[str]]:
    """Every option of every `deepcluster` subcommand, from the CLI itself."""
    from deepcluster.cli import app

    group = typer.main.get_command(app)
    return {
        name: {opt for p in cmd.params if p.param_type_name == "option" for opt in p.opts}
        for name, cmd in group.commands.items()
    }


def check_cli_call(args: list[str]) -> None:
    """`... -m deepcluster.cli SUBCOMMAND --opt ...` uses options the subcommand has."""
    i = args.index("deepcluster.cli") if "deepcluster.cli" in args else args.index("deepcluster")
    sub, rest = args[i + 1], args[i + 2 :]
    for token in rest:
        if token.startswith("-"):
            assert token.split("=", 1)[0] in cli_options()[sub], f"deepcluster {sub} {token}"


def check_volumes(spec: k8s.V1PodSpec) -> None:
    claims = {
        v.persistent_volume_claim.claim_name for v in spec.volumes if v.persistent_volume_claim
    }
    assert claims == {"deepcluster-data"}, claims
    names = {v.name for v in spec.volumes}
    for container in [*spec.containers, *(spec.init_containers or [])]:
        assert {m.name for m in container.volume_mounts} <= names, container.name


def test_pytorchjob_runs_torchrun_on_a_master_and_workers_with_one_process_per_gpu() -> None:
    job = load_all(DEPLOY / "k8s" / "pytorchjob.yaml")["PyTorchJob"]
    assert job["apiVersion"] == "kubeflow.org/v1"
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"} and replicas["Master"]["replicas"] == 1
    nproc = int(job["spec"]["nprocPerNode"])
    for role, replica in replicas.items():
        spec = pod_template(replica["template"]).spec
        [container] = spec.containers
        assert container.name == "pytorch", role  # the container the operator configures
        line = [*container.command, *container.args]
        assert line[:3] == ["python", "-m", "torch.distributed.run"], role
        assert f"--nproc-per-node={nproc}" in line, role
        assert container.resources.limits["nvidia.com/gpu"] == str(nproc), role
        assert line[line.index("deepcluster.cli") + 1] == "train"
        check_cli_call(line)
        # the rendezvous flags come from the operator's variables
        used = set(ENV_REF.findall(" ".join(line)))
        assert used == {"WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"}, used
        assert not unread(e.name for e in container.env), role
        assert spec.tolerations and spec.node_selector, role
        check_volumes(spec)
        for init in spec.init_containers or []:
            check_cli_call(init.command)


def test_trainjob_uses_its_runtime_and_one_process_per_gpu() -> None:
    objects = load_all(DEPLOY / "k8s" / "trainjob.yaml")
    runtime, job = objects["TrainingRuntime"], objects["TrainJob"]
    assert job["apiVersion"] == runtime["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
    ref = job["spec"]["runtimeRef"]
    assert (ref["kind"], ref["name"]) == ("TrainingRuntime", runtime["metadata"]["name"])
    trainer = job["spec"]["trainer"]
    assert trainer["numNodes"] >= 2
    assert str(trainer["numProcPerNode"]) == trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"]
    line = [*trainer["command"], *trainer["args"]]
    assert line[:3] == ["python", "-m", "torch.distributed.run"]
    check_cli_call(line)
    [node] = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    labels = node["template"]["metadata"]["labels"]
    assert labels["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    spec = pod_template(node["template"]["spec"]["template"]).spec
    assert [c.name for c in spec.containers] == ["node"]  # the trainer container's name
    assert not unread(e.name for e in spec.containers[0].env)
    check_volumes(spec)


def test_mlflow_manifest_serves_on_its_service_port_with_s3_artifacts() -> None:
    objects = load_all(DEPLOY / "k8s" / "mlflow.yaml")
    deployment = k8s_model_from_dict(
        k8s.V1Deployment, k8s_snake_case_dict(k8s.V1Deployment, objects["Deployment"])
    )
    k8s_model_from_dict(k8s.V1Service, k8s_snake_case_dict(k8s.V1Service, objects["Service"]))
    [container] = deployment.spec.template.spec.containers
    line = [*container.command, *container.args]
    assert line[:2] == ["mlflow", "server"]
    [port] = listen_ports(line)
    assert port in {p.target_port for p in objects_ports(objects["Service"])}
    options = dict(arg.split("=", 1) for arg in container.args)
    assert options["--artifacts-destination"].startswith("s3://")
    assert f"{objects['Service']['metadata']['name']}:{port}" in options["--allowed-hosts"].split(
        ","
    )
    referenced = set(ENV_REF.findall(" ".join(line)))
    assert not unread((e.name for e in container.env), referenced)


def objects_ports(service: dict) -> list[k8s.V1ServicePort]:
    return [k8s_model_from_dict(k8s.V1ServicePort, k8s_snake_case_dict(k8s.V1ServicePort, p))
            for p in service["spec"]["ports"]]  # fmt: skip


def test_every_deploy_yaml_parses() -> None:
    files = sorted(DEPLOY.rglob("*.yaml"))
    assert len(files) >= 7, files
    for path in files:
        assert [doc for doc in yaml.safe_load_all(path.read_text()) if doc], path


def images_in(tree) -> set[str]:
    if isinstance(tree, dict):
        found = {tree["image"]} if isinstance(tree.get("image"), str) else set()
        return found.union(*(images_in(v) for v in tree.values()))
    if isinstance(tree, list):
        return set().union(*(images_in(v) for v in tree))
    return set()


def test_manifests_use_the_helm_image() -> None:
    """One image everywhere: the tag Dagster's pods use is the one the training jobs use."""
    image = user_deployment()["image"]
    found = set().union(
        *(images_in(list(load_all(p).values())) for p in (DEPLOY / "k8s").glob("*.yaml"))
    )
    assert found == {f"{image['repository']}:{image['tag']}"}, found
