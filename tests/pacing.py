"""Test helper callbacks for real training subprocesses: pacing a run so a test can signal it mid-epoch,
and stalling one DDP rank."""

import time
from pathlib import Path

import lightning as L


class Pace(L.Callback):
    """From epoch 1 on, sleeps ``ms`` after each batch, and touches ``marker`` once batch 3 is done.

    Epochs on tiny data take a fraction of a second; this makes epoch 1 last long enough that a signal
    sent when ``marker`` appears lands inside it. It only waits: what the run computes is unchanged.
    """

    def __init__(self, marker: str, ms: float = 40) -> None:
        self.marker = Path(marker)
        self.ms = ms

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.current_epoch < 1:
            return
        if batch_idx == 3:
            self.marker.touch()
        time.sleep(self.ms / 1000)


class StallRank(L.Callback):
    """Rank ``rank`` stalls for ``seconds`` at the end of epoch 0, before the epoch's collectives.

    The other ranks wait for it inside a collective: this is a rank that stopped agreeing.
    """

    def __init__(self, rank: int = 1, seconds: float = 600) -> None:
        self.rank = rank
        self.seconds = seconds

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.global_rank == self.rank and trainer.current_epoch == 0:
            time.sleep(self.seconds)


class Moment(L.Callback):
    """Touches ``marker`` the ``nth`` time (from 0) that this run reaches ``phase``, then holds rank
    ``hold_rank`` there for ``hold`` seconds, so that a signal sent when ``marker`` appears lands in that
    phase while the other rank runs on into its next collective and waits there.

    Phases: ``step`` (after a training batch's forward pass, before backward's gradient all-reduce),
    ``step_end`` (after a training step, before the per-step stop decision), ``validation`` (a validation
    batch), ``checkpoint`` (a checkpoint being saved, before it is written), ``epoch_end`` (the training
    epoch's end, before its collectives), ``sanity_check`` (its start, before training starts), ``test``
    (a test batch). Every batch also sleeps ``ms``, to spread the steps out.
    """

    def __init__(
        self, marker: str, phase: str, nth: int = 0, hold: float = 0.3, hold_rank: int = 0, ms: float = 20
    ):
        self.marker = Path(marker)
        self.phase, self.nth, self.hold, self.hold_rank, self.ms = phase, nth, hold, hold_rank, ms
        self.seen = 0

    def reached(self, trainer: L.Trainer, phase: str) -> None:
        if phase != self.phase:
            return
        self.seen += 1
        if self.seen - 1 != self.nth:
            return
        if trainer.global_rank == 0:
            self.marker.touch()
        if trainer.global_rank == self.hold_rank:
            time.sleep(self.hold)

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module) -> None:
        self.reached(trainer, "sanity_check")

    def on_before_backward(self, trainer: L.Trainer, pl_module, loss) -> None:
        self.reached(trainer, "step")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        time.sleep(self.ms / 1000)
        self.reached(trainer, "step_end")

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ):
        time.sleep(self.ms / 1000)
        if not trainer.sanity_checking:
            self.reached(trainer, "validation")

    def on_test_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.reached(trainer, "test")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module, checkpoint) -> None:
        self.reached(trainer, "checkpoint")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        self.reached(trainer, "epoch_end")
