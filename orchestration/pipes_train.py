"""The training process `train_epochs` launches (under torchrun too): the train step, its progress
lines as Dagster log lines, its result (or its user error: no retry) as a Pipes message."""

import ctypes
import os
import signal
import sys
from dataclasses import asdict

from dagster_pipes import open_dagster_pipes

from deepcluster import pipeline, progress
from deepcluster.config import params_from_dict
from deepcluster.errors import Stopped, UserError, stop_on_signals
from deepcluster.paths import Artifacts


def _die_with_parent() -> None:
    """SIGTERM when the Dagster process dies, even by SIGKILL (a force-terminated run), so no
    training outlives its run. Set here, not by the parent (a fork of a threaded process)."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() == 1:  # the parent died before the line above
        raise Stopped("the Dagster process is gone")


def run_step(extras: dict, on_epoch=None) -> pipeline.TrainSummary:
    return pipeline.train(
        params_from_dict(extras["params"]), Artifacts(extras["artifacts"]), fresh=extras["fresh"],
        on_epoch=on_epoch, tags={"dagster_run_id": extras["dagster_run_id"]},
        source="dagster train_epochs", dvc_file=extras["dvc_file"],
    )  # fmt: skip


def main() -> int:
    stop_on_signals()  # Dagster stops the process group with SIGTERM
    _die_with_parent()
    with open_dagster_pipes() as pipes, progress.lines_to(pipes.log.info):
        extras = dict(pipes.extras)
        try:
            summary = run_step(extras)
        except UserError as err:
            pipes.report_custom_message({"user_error": str(err)})
            return 2
        pipes.report_custom_message({"result": {
            "history": [asdict(h) for h in summary.history], "resumed_from": summary.resumed_from,
            "epochs": summary.params.train.epochs, "params": summary.params.to_dict(),
            "auto": summary.auto, "mlflow_run_id": summary.run_id, "code": summary.code,
        }})  # fmt: skip
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Stopped:  # Dagster stopped the run (SIGTERM to this process group); its op says so
        sys.exit(128 + signal.SIGTERM)
