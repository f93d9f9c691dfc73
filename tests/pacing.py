"""A test helper callback that paces a real training subprocess, so a test can signal it mid-epoch."""

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
