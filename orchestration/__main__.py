"""`python -m orchestration materialize` runs the whole graph through a real Dagster instance,
`sync` records what `dvc repro` made, `dev` opens the UI on the same instance: DAGSTER_HOME, by
default .dagster/ at the repo root, given this project's settings (dagster.yaml) the first time."""

import argparse
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import NoReturn

ROOT = Path(__file__).resolve().parents[1]
QUIET = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}  # no step-event chatter


def dagster_home(args: argparse.Namespace | None = None) -> Path:
    """DAGSTER_HOME (absolute, as Dagster insists), and --data/--artifacts as the resources' env."""
    for name in ("data", "artifacts"):
        if getattr(args, name, None) is not None:
            os.environ[f"DEEPCLUSTER_{name.upper()}"] = str(Path(getattr(args, name)).resolve())
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(ROOT / ".dagster"))).resolve()
    os.environ["DAGSTER_HOME"] = str(home)
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():
        shutil.copy(Path(__file__).with_name("dagster.yaml"), home / "dagster.yaml")
    return home


def materialize(args: argparse.Namespace) -> int:
    # SIGTERM (a scheduler, `kill`) stops the run like Ctrl-C: Dagster sees an interrupt, which
    # the training step turns into a stop of its process group, never a retry
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    home = dagster_home(args)
    from dagster import DagsterInstance

    from deepcluster.config import load_params

    from .config import run_config_for
    from .definitions import defs

    run_config = {**(run_config_for(load_params(args.params)) if args.params else {}), **QUIET}
    with DagsterInstance.get() as instance:
        defs.resolve_job_def("observe_data").execute_in_process(run_config=QUIET, instance=instance)
        result = defs.resolve_job_def("deepcluster_job").execute_in_process(
            run_config=run_config, instance=instance, raise_on_error=False
        )
    for check in result.get_asset_check_evaluations():
        verdict = "passed" if check.passed else "FAILED"
        print(f"check {check.asset_key.to_user_string()}:{check.check_name}: {verdict}")
    for failure in result.get_step_failure_events():
        data = failure.step_failure_data
        user = data.user_failure_data
        print(f"step {failure.step_key} failed: {user.description if user else data.error.message}")
    print(f"run {result.run_id}: {'success' if result.success else 'FAILED'} (instance in {home})")
    if result.success:
        print(_record_for_dvc(args))
    print(f"Open the UI with `python -m orchestration dev` (`dg dev` with DAGSTER_HOME={home}),")
    print("then http://127.0.0.1:3000 -> Assets: eval_report shows the metrics and the pictures.")
    return 0 if result.success else 1


def _record_for_dvc(args: argparse.Namespace) -> str:
    """dvc.lock describes this run's outputs, when they are the repo's own pipeline's."""
    from .sync import dvc_commit

    if args.params or args.data or args.artifacts:
        return "dvc.lock not updated: the run used other params, data or artifacts than dvc.yaml"
    problem = dvc_commit()
    if problem:
        return f"dvc.lock not updated: {problem}"
    return "dvc.lock updated: dvc status is clean"


def sync(args: argparse.Namespace) -> int:
    """After `dvc repro`: record its outputs in the Dagster instance, so none shows as stale."""
    home = dagster_home(args)
    from dagster import DagsterInstance

    from .definitions import defs
    from .defs.resources import ArtifactStore
    from .sync import record_materialisations

    store = ArtifactStore.from_env().process_config_and_initialize()
    with DagsterInstance.get() as instance:
        recorded = record_materialisations(instance, defs, store.layout)
    print(f"recorded in the Dagster instance at {home}: {', '.join(recorded) or 'nothing'}")
    return 0


def dev(extra: list[str]) -> NoReturn:
    """`dg dev` on this project ([tool.dg] in pyproject.toml), with DAGSTER_HOME set so the UI
    shows the same instance as `materialize` rather than a temporary one."""
    home = dagster_home()
    bin_dir = Path(sys.executable).parent
    os.environ["VIRTUAL_ENV"] = str(bin_dir.parent)  # dg warns unless the project venv is active
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    os.chdir(home)  # from anywhere; --target-path names the project
    os.execv(bin_dir / "dg", [str(bin_dir / "dg"), "dev", "--target-path", str(ROOT), *extra])


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestration", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("materialize", help="materialise every asset and check once")
    run.add_argument("--params", type=Path, help="a params.yaml other than the repo's")
    record = commands.add_parser("sync", help="record dvc repro's outputs as materialisations")
    for command in (run, record):
        command.add_argument("--data", type=Path, help="image folder (default: data/)")
        command.add_argument("--artifacts", type=Path, help="artifacts root (default: artifacts/)")
    commands.add_parser("dev", add_help=False, help="dg dev on the instance (other args go to it)")
    args, extra = parser.parse_known_args()
    if args.command == "dev":
        return dev(extra)
    if extra:
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    return sync(args) if args.command == "sync" else materialize(args)


if __name__ == "__main__":
    sys.exit(main())
