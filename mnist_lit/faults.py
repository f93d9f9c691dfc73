"""When training goes wrong: the loss blows up, or the user stops the run (Ctrl-C, SIGTERM).

Lightning already handles SIGTERM well: its handler only raises a flag, the loop finishes the current
batch and then raises ``SIGTERMException``, so the state at that moment is consistent (step counts,
the loader's position) and a checkpoint of it resumes exactly. Ctrl-C is routed to that same handler
instead of raising ``KeyboardInterrupt`` wherever Python happens to be, e.g. between a backward pass
and its optimizer step.
"""

import contextlib
import shutil
import signal
import threading
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mnist_lit.errors import UserError


class TrainingDiverged(UserError):
    """The training loss became NaN or infinite: the weights from that step on are worthless."""


class LastCheckpoint(ModelCheckpoint):
    """The ModelCheckpoint that writes ``last.ckpt``; with ``save_on_exception`` also when fit is stopped.

    Only an orderly stop (SIGTERM or Ctrl-C, which end the current batch first) is saved: after any
    other exception the model may be half-updated, and after a divergence its weights are NaN, so the
    last good ``last.ckpt`` is kept instead.
    """

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, SIGTERMException):
            super().on_exception(trainer, pl_module, exception)

    def saved_path(self) -> Path | None:
        """``last.ckpt`` if it has been written, else None."""
        path = Path(self.format_checkpoint_name({})) if self.dirpath else None
        return path if path is not None and path.is_file() else None


def last_checkpoints(trainer: L.Trainer) -> list[Path]:
    """The ``last.ckpt`` files this run's LastCheckpoint callbacks have written."""
    paths = [cb.saved_path() for cb in trainer.checkpoint_callbacks if isinstance(cb, LastCheckpoint)]
    return [path for path in paths if path is not None]


class StopOnDivergence(Callback):
    """Stops ``fit`` at the first non-finite training loss it sees, saying at which epoch and step.

    Looking at the loss waits for the GPU to finish the step and, under DDP, for every rank, so only a
    single CPU process looks at every step (where it costs nothing); otherwise the loss is looked at
    every ``log_every_n_steps`` steps and at each epoch's last batch. A NaN never heals, so a late look
    still finds it, and always before the epoch's checkpoints are written.
    """

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        every_step = pl_module.device.type == "cpu" and trainer.world_size == 1
        interval = 1 if every_step else max(1, trainer.log_every_n_steps)
        last_batch = batch_idx + 1 == trainer.num_training_batches
        if trainer.global_step % interval and not last_batch:
            return
        diverged = not bool(torch.isfinite(loss).all())
        # Every rank stops at the same step, or DDP would wait forever for the one that stopped.
        if not trainer.strategy.reduce_boolean_decision(diverged, all=False):
            return
        kept = last_checkpoints(trainer)
        kept_text = (
            f"kept the last good checkpoint {kept[0]}" if kept else "no checkpoint was saved before it"
        )
        seen = "" if every_step else f" (looked at every {interval} steps)"
        raise TrainingDiverged(
            f"training diverged: the loss became {float(loss)} at epoch {trainer.current_epoch}, "
            f"step {trainer.global_step} (batch {batch_idx}){seen}; {kept_text}; lower the learning rate"
        )


class GracefulInterrupt(Callback):
    """During training, Ctrl-C (SIGINT) stops the run the way Lightning stops it on SIGTERM.

    A second Ctrl-C, while the first is still being honoured, stops at once. Under DDP a terminal's
    Ctrl-C reaches every rank and the launching rank forwards it to the ranks it started: each rank
    hands only the first to Lightning, whose handler broadcasts to the other ranks (a second broadcast
    on one rank only would wait for ever), and only rank 0 takes a second one as "stop at once".
    """

    def __init__(self) -> None:
        self._previous = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():  # signals reach only the main thread
            return
        # Lightning installs its SIGTERM handler before training starts, and restores it at teardown.
        sigterm = signal.getsignal(signal.SIGTERM)
        if not callable(sigterm):
            return

        routed = False

        def on_sigint(signum: int, frame) -> None:
            nonlocal routed
            if routed:
                if trainer.is_global_zero:
                    raise KeyboardInterrupt
                return
            routed = True
            sigterm(signum, frame)

        self._previous = signal.signal(signal.SIGINT, on_sigint)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


class DiscardFailedRun(Callback):
    """A command that fails leaves no run folder behind, unless the folder holds what the user needs.

    Kept: a ``fit`` stopped by a signal (its ``last.ckpt`` is being written) or one that trained at
    least a step (its checkpoints and curves show what happened). Removed: the folder of a run that
    failed before any training step, and of a failed evaluation, which have nothing to show.
    """

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        fitting = trainer.state.fn == "fit"
        if not trainer.is_global_zero or (fitting and isinstance(exception, SIGTERMException)):
            return
        if fitting and trainer.global_step > 0:
            return
        for logger in trainer.loggers:
            folder = Path(logger.log_dir) if logger.log_dir else None
            if folder is None or not folder.is_dir() or any(folder.rglob("*.ckpt")):
                continue
            shutil.rmtree(folder, ignore_errors=True)
            with contextlib.suppress(OSError):  # the log root too, if this run was all it held
                folder.parent.rmdir()


def interrupted_message(trainer: L.Trainer) -> str:
    """The one line a stopped ``fit`` ends with: where it was, and how to go on from there."""
    saved = last_checkpoints(trainer)
    where = f"epoch {trainer.current_epoch}, step {trainer.global_step}"
    if not saved:
        return f"training stopped by a signal at {where}, before any checkpoint was saved"
    return (
        f"training stopped by a signal at {where}; saved {saved[0]}: continue with the same command "
        f"plus --ckpt_path={saved[0]}"
    )
