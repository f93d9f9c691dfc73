"""When training goes wrong: the loss blows up, the user stops the run (Ctrl-C, SIGTERM), the disk fills.

A stop is honoured at a step boundary, where the state is consistent (step counts, the loader's
position) and a checkpoint of it resumes exactly: the signal handler only records the request, and
under DDP every rank learns of it from one small all-reduce per step, so no rank ever runs a collective
inside a signal handler (which would race the collective the other ranks are in).
"""

import contextlib
import os
import shutil
import signal
import threading
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mnist_lit.errors import UserError


class TrainingDiverged(UserError):
    """The training loss became NaN or infinite: the weights from that step on are worthless."""


class LastCheckpoint(ModelCheckpoint):
    """The ModelCheckpoint that writes ``last.ckpt`` at every epoch's end, and when fit is stopped (with
    ``filename: last``, ``save_on_exception: true``: mnist_lit/defaults/fit.yaml).

    A separate callback from the best-by-val/acc one, since Lightning's ``save_last`` only rewrites
    ``last.ckpt`` when that one improves. Only an orderly stop (SIGTERM or Ctrl-C, which end the current
    batch first) is saved: after any other exception the model may be half-updated, and after a
    divergence its weights are NaN, so the last good ``last.ckpt`` is kept instead, and named in a note
    on the exception for the one line that ends the run (a lost DDP rank's, messages.stalled_message).
    """

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, SIGTERMException):
            super().on_exception(trainer, pl_module, exception)
            return
        kept = Path(self.format_checkpoint_name({})) if self.dirpath else None
        if kept is not None and kept.is_file():  # where to resume from, for the one line (messages.py)
            from mnist_lit.messages import KEPT_NOTE

            # The list that Python 3.11's add_note appends to; 3.10 has no add_note.
            exception.__notes__ = [*getattr(exception, "__notes__", []), f"{KEPT_NOTE}{kept}"]


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
        from mnist_lit.messages import diverged

        raise TrainingDiverged(diverged(trainer, float(loss), batch_idx, None if every_step else interval))


class GracefulStop(Callback):
    """Ctrl-C (SIGINT) or SIGTERM during training stops ``fit`` after the current step, with ``last.ckpt``.

    A request made during an epoch's last step waits for that epoch's validation and checkpoints, so a
    resumed run validates every epoch the uninterrupted one did. Under DDP a SIGTERM may reach only the
    launching process (a scheduler's time limit), a terminal's Ctrl-C reaches every rank: either way the
    per-step all-reduce stops every rank at the same step. A second Ctrl-C on rank 0 stops at once.
    """

    def __init__(self) -> None:
        self.requested = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():  # signals reach only the main thread
            return

        def request(signum: int, frame) -> None:
            if self.requested and signum == signal.SIGINT and trainer.is_global_zero:
                raise KeyboardInterrupt
            self.requested = True

        # Replaces the handlers Lightning installs for fit (Lightning restores the originals at its end).
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, request)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        if batch_idx + 1 == trainer.num_training_batches:
            return  # the epoch's last step: stop after its validation, at the next epoch's first step
        if trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            raise SIGTERMException


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
            logger.finalize("failed")  # its writer thread stopped, else it may write into a removed folder
            shutil.rmtree(folder, ignore_errors=True)
            with contextlib.suppress(OSError):  # the log root too, if this run was all it held
                folder.parent.rmdir()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file beside the target, flushed to disk, then renamed into place.

    A checkpoint name then never holds a partial file, whatever stops the write (a kill, a full disk);
    Lightning's own writer goes through a temporary file elsewhere (fsspec's), copied in when the log
    folder is on another filesystem. A full disk ends the run with one line and keeps every earlier file.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        try:
            with partial.open("wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, path)
        except (OSError, RuntimeError) as err:
            partial.unlink(missing_ok=True)
            from mnist_lit.messages import disk_full, out_of_space

            if not out_of_space(err):
                raise
            raise UserError(disk_full(path, checkpoint)) from None
