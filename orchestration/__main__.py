"""`python -m orchestration materialize | sync | dev`: the whole graph in a real Dagster instance,
recording what `dvc repro` made, the UI; all on DAGSTER_HOME (default .dagster/). A stopped
`materialize` says in one line where it stopped and what that leaves."""

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import NoReturn

ROOT = Path(__file__).resolve().parents[1]
TRAIN_STEP = "checkpoint.train_epochs"
EPOCH_LINE = re.compile(r"epoch (\d+/\d+)\s")  # epochs.py's line for a finished epoch
SESSION_ENV = "DEEPCLUSTER_MATERIALIZE_PARENT"  # the supervisor's pid, in the run's own session


def dagster_home(args: argparse.Namespace | None = None) -> Path:
    """DAGSTER_HOME (absolute, as Dagster insists), and --data/--artifacts as the resources' env."""
    for name in ("data", "artifacts"):
        if getattr(args, name, None) is not None:
            os.environ[f"DEEPCLUSTER_{name.upper()}"] = str(Path(getattr(args, name)).resolve())
    home = Path(os.environ.get("DAGSTER_HOME", ROOT / ".dagster")).resolve()
    os.environ["DAGSTER_HOME"] = str(home)
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():
        shutil.copy(Path(__file__).with_name("dagster.yaml"), home / "dagster.yaml")
    return home


def in_own_session() -> int:
    """Run this command again in a session of its own and relay a stop (SIGINT, SIGTERM) to it:
    Ctrl-C reaches the whole foreground group, whose Dagster helpers each printed a traceback."""
    command = [sys.executable, "-m", "orchestration", *sys.argv[1:]]
    env = {**os.environ, SESSION_ENV: str(os.getpid())}
    child = subprocess.Popen(command, env=env, start_new_session=True)

    def relay(signum: int, _frame) -> None:
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGINT, relay)
    signal.signal(signal.SIGTERM, relay)
    return child.wait()  # retried after each relayed signal (PEP 475)


class StopSignal:
    """Which signal stopped the run, whatever handler Dagster has installed: every handled signal's
    number is also written to the wakeup fd, polled here."""

    def __init__(self) -> None:
        self.name: str | None = None
        self._read, write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(write, False)
        signal.set_wakeup_fd(write, warn_on_full_buffer=False)

    def poll(self) -> str | None:
        try:
            numbers = os.read(self._read, 512)
        except BlockingIOError:
            numbers = b""
        for number in numbers:
            if self.name is None and number in (signal.SIGINT, signal.SIGTERM):
                self.name = signal.Signals(number).name
        return self.name


def _stop_when_orphaned(parent: int) -> None:
    """The supervising process is gone (killed): stop the run as if it had relayed a SIGTERM."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True, name="orphan-watch").start()


def quiet_after(stop: StopSignal):
    """Dagster's console logger, silent after a stop (its failure events carry stack traces)."""
    from dagster import LoggerDefinition, colored_console_logger

    def make(init_context):
        made = colored_console_logger.logger_fn(init_context)
        made.addFilter(lambda _record: stop.poll() is None)
        return made

    schema = colored_console_logger.config_schema
    return LoggerDefinition(make, config_schema=schema, description="console, quiet after a stop")


def stopped_line(signame: str, result) -> str:
    """Where the stop found the run and what that leaves, in one line."""
    if result is not None:
        for failure in result.get_step_failure_events():
            data = failure.step_failure_data
            said = data.user_failure_data and data.user_failure_data.description
            epoch = last_epoch(result.run_id) if failure.step_key == TRAIN_STEP else None
            return f"stopped by {signame} in {failure.step_key}: " + (
                said or "it published nothing; the steps finished before it stay published"
            ) + (f"; it had finished epoch {epoch}" if epoch else "")
    return f"stopped by {signame}: the steps finished before the stop stay published"


def last_epoch(run_id: str) -> str | None:
    """The last epoch the run's training reported ("3/20"), read back from its event log."""
    from dagster import DagsterInstance

    with DagsterInstance.get() as instance:
        said = [m[1] for e in instance.all_logs(run_id) if e.step_key == TRAIN_STEP
                and (m := EPOCH_LINE.match(e.user_message or ""))]  # fmt: skip
    return said[-1] if said else None


def materialize(args: argparse.Namespace) -> int:
    parent = os.environ.get(SESSION_ENV)
    if not parent:
        return in_own_session()
    _stop_when_orphaned(int(parent))
    stop = StopSignal()
    # SIGTERM (a scheduler, `kill`) stops the run like Ctrl-C: Dagster sees an interrupt, which
    # the training step turns into a stop of its process group, never a retry
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    home = dagster_home(args)
    from dagster import DagsterInstance

    from .config import run_config_for
    from .definitions import defs

    quiet_log = {"console": {"config": {"log_level": "INFO"}}}  # no step-event chatter
    params = chosen_params(args)
    run_config = run_config_for(params) if params else {}
    run_config["loggers"] = quiet_log
    loggers = {"console": quiet_after(stop)}
    result = None
    try:
        with DagsterInstance.get() as instance:
            observe = defs.resolve_job_def("observe_data").with_logger_defs(loggers)
            observe.execute_in_process(run_config={"loggers": quiet_log}, instance=instance)
            job = defs.resolve_job_def("deepcluster_job").with_logger_defs(loggers)
            result = job.execute_in_process(
                run_config=run_config, instance=instance, raise_on_error=False
            )
    except BaseException:  # KeyboardInterrupt, or Dagster's interrupt error between two steps
        if stop.poll() is None:
            raise
    if stop.poll() is not None:
        print(stopped_line(stop.name, result), file=sys.stderr)
        return 128 + signal.Signals[stop.name].value
    for check in result.get_asset_check_evaluations():
        print(f"check {check.asset_key.to_user_string()}:{check.check_name}: "
              f"{'passed' if check.passed else 'FAILED'}")  # fmt: skip
    for failure in result.get_step_failure_events():
        data, user = failure.step_failure_data, failure.step_failure_data.user_failure_data
        print(f"step {failure.step_key} failed: {user.description if user else data.error.message}")
    print(f"run {result.run_id}: {'success' if result.success else 'FAILED'} (instance in {home})")
    if result.success:
        print(_record_for_dvc(args))
    print(f"Open the UI with `python -m orchestration dev` (`dg dev` with DAGSTER_HOME={home}),")
    print("then http://127.0.0.1:3000 -> Assets: eval_report shows the metrics and the pictures."
          if result.success else f"then http://127.0.0.1:3000 -> Runs -> {result.run_id}.")
    return 0 if result.success else 1


def chosen_params(args: argparse.Namespace):
    """The run's parameters when they are not the repo's params.yaml as it stands (None then):
    another file, `-S` overrides, or `--demo`'s budget (`deepcluster.config.DEMO`)."""
    from deepcluster.config import DEMO, load_params, parse_overrides

    overrides = (DEMO if args.demo else {}) | parse_overrides(args.set)
    if not (args.params or overrides):
        return None
    return load_params(args.params or ROOT / "params.yaml", overrides)


def _record_for_dvc(args: argparse.Namespace) -> str:
    """dvc.lock describes this run's outputs, when they are the repo's own pipeline's."""
    from .sync import dvc_commit

    if args.demo:
        return ("dvc.lock not updated: the demo trains for its own budget (--demo), not params.yaml's;"
                " `dvc repro` runs params.yaml as it stands")  # fmt: skip
    if args.params or args.set or args.data or args.artifacts:
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

    layout = ArtifactStore.from_env().process_config_and_initialize().layout
    with DagsterInstance.get() as instance:
        recorded = record_materialisations(instance, defs, layout)
    print(f"recorded in the Dagster instance at {home}: {', '.join(recorded) or 'nothing'}")
    return 0


def dev(extra: list[str]) -> NoReturn:
    """`dg dev` on this project with DAGSTER_HOME set: the UI shows `materialize`'s instance."""
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
    run.add_argument("-S", "--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override one parameter for this run, as the CLI's -S")  # fmt: skip
    run.add_argument("--demo", action="store_true",
                     help="the demo's training budget (make demo; deepcluster.config.DEMO)")  # fmt: skip
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
    from deepcluster.errors import UserError

    try:
        return sync(args) if args.command == "sync" else materialize(args)
    except UserError as err:  # a bad -S value or --params file: one line
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
