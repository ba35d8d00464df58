"""orchestration.pipes_train, failing after epoch 1 when it trains from scratch (the first attempt
of train_epochs): its retry resumes the epoch checkpoint and runs unchanged."""

import sys

from orchestration import pipes_train

train = pipes_train._train


def failing_once(extras: dict, on_epoch):
    def on_epoch_then_fail(stats) -> None:
        on_epoch(stats)
        if extras["fresh"] and stats.epoch == 1:
            raise RuntimeError("injected failure after epoch 1")

    return train(extras, on_epoch_then_fail)


pipes_train._train = failing_once
sys.exit(pipes_train.main())
