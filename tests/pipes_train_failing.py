"""orchestration.pipes_train, failing after epoch 1 when it trains from scratch (the first attempt
of train_epochs): its retry resumes the epoch checkpoint and runs unchanged."""

import sys

from orchestration import pipes_train

train = pipes_train.run_step


def failing_once(extras: dict, on_epoch=None):
    def fail_after_epoch_one(stats) -> None:
        if extras["fresh"] and stats.epoch == 1:
            raise RuntimeError("injected failure after epoch 1")

    return train(extras, fail_after_epoch_one)


pipes_train.run_step = failing_once
sys.exit(pipes_train.main())
