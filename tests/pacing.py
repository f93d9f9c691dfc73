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
