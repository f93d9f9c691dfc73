"""What a run records about itself: its row in TensorBoard's HPARAMS tab, its epoch times, and a summary.

Callbacks that mnist_lit/defaults/*.yaml gives each command.
"""

import math
import os
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback, RichProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from rich.console import Console
from rich.table import Table

# The HPARAMS tab's metric columns. TensorBoard fills each from the run's own scalar of that tag (a fit
# run has val/acc_best, a test run test/acc and its checkpoint's val/acc_best), so no placeholder value
# is ever written; the logger's default_hp_metric=False keeps Lightning's hp_metric=-1 away too.
HPARAM_METRICS = ("val/acc_best", "test/acc")
EPOCH_TIME_TAG = "time/epoch_s"


class HparamsRow(Callback):
    """Gives each run a row in TensorBoard's HPARAMS tab: its command, model and data settings and seed.

    An evaluation run (``validate``, ``test``, ``predict``) of a checkpoint is described by that
    checkpoint's settings (Lightning restores the model's from it) and path, and shows the checkpoint's
    ``val/acc_best`` next to what it measured.
    """

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module, "fit")

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "validate":  # not the validation epochs inside fit
            self._write(trainer, pl_module, "validate")

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module, "test")

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module, "predict")

    @staticmethod
    def _write(trainer: L.Trainer, pl_module: L.LightningModule, command: str) -> None:
        if not trainer.is_global_zero:
            return
        params = {"command": command, **pl_module.hparams_initial}
        if trainer.datamodule is not None:
            params.update(trainer.datamodule.hparams_initial)
        params["max_epochs"] = trainer.max_epochs  # a setting of the recipe too, and one that tune searches
        if "PL_GLOBAL_SEED" in os.environ:  # set by seed_everything, which the CLI always calls
            params["seed"] = int(os.environ["PL_GLOBAL_SEED"])
        if command != "fit" and trainer.ckpt_path:
            from mnist_lit.runs import Run

            params["ckpt_path"] = str(trainer.ckpt_path)
            run = Run.of_checkpoint(Path(trainer.ckpt_path))
            seed = run.seed() if run else None  # the seed and epochs it was trained with
            params.pop("seed", None) if seed is None else params.update(seed=seed)
            epochs = (run.settings("trainer") if run else {}).get("max_epochs")
            params.pop("max_epochs") if epochs is None else params.update(max_epochs=epochs)
        params = {k: _hparam_value(v) for k, v in params.items() if k[0] != "_"}
        # Imported here, where a run logs: it loads tensorboard (and boto3), which --help does not need.
        from torch.utils.tensorboard.summary import hparams

        summaries = hparams(params, dict.fromkeys(HPARAM_METRICS, 0.0))
        # The checkpoint's best val/acc, restored with its weights (a fit run logs its own as it goes).
        best = getattr(pl_module, "val_acc_best", None)
        best_value = float(best.max_value) if command != "fit" and best is not None else None
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                # Lightning's own log_hyperparams would also log the metrics as scalars at this step;
                # writing only the plugin's summaries leaves the metric curves untouched.
                for summary in summaries:
                    logger.experiment.file_writer.add_summary(summary)
            if best_value is not None and math.isfinite(best_value):
                logger.log_metrics({"val/acc_best": best_value}, step=trainer.global_step)


def _hparam_value(value: object) -> bool | int | float | str:
    """The hparams plugin takes numbers, booleans and strings; anything else is shown as its text."""
    return value if isinstance(value, bool | int | float | str) else str(value)


class ProgressBar(RichProgressBar):
    """Lightning's default progress bar without ``v_num``: the run's number, which the bar's number format
    shows as ``0.000``, is in its folder's name already. The CLI adds it unless a progress bar is given or
    turned off (``--trainer.enable_progress_bar false``)."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


class EpochTimer(Callback):
    """Logs ``time/epoch_s``: wall time of each epoch, its training and its validation together."""

    def __init__(self) -> None:
        self.times: list[float] = []
        # None until an epoch starts: a run resumed mid-epoch gets no on_train_epoch_start for that epoch,
        # and what it runs of it is no epoch's time.
        self.start: float | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.start is not None:
            self.times.append(time.perf_counter() - self.start)
            # Each rank's own time, no sync_dist: Lightning would sync wherever the value is first read,
            # which is rank 0's progress bar alone (a deadlock, see distributed.py). Ranks wait for each
            # other at every step, so rank 0's time, the one its logger writes, is the epoch's.
            pl_module.log(EPOCH_TIME_TAG, self.times[-1])


def print_fit_summary(trainer: L.Trainer) -> None:
    """When ``fit`` ends: a small table (epochs, steps, epoch time, final losses and accuracies) and the best
    checkpoint. (``test`` needs none of its own: Lightning prints its table of test metrics.)"""
    if not trainer.is_global_zero:
        return
    table = Table(title="fit summary", show_header=False)
    table.add_row("epochs", str(trainer.current_epoch))
    table.add_row("steps", str(trainer.global_step))
    times = next((cb.times for cb in trainer.callbacks if isinstance(cb, EpochTimer) and cb.times), None)
    if times:
        table.add_row(EPOCH_TIME_TAG, f"{sum(times) / len(times):.1f} (mean of {len(times)})")
    metrics = trainer.callback_metrics
    for name in ("train/loss_epoch", "train/acc", "val/loss", "val/acc", "val/acc_best"):
        if name in metrics:
            table.add_row(name.removesuffix("_epoch"), f"{float(metrics[name]):.4f}")
    Console().print(table)
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None and checkpoint.best_model_path:
        score = checkpoint.best_model_score
        score_text = "" if score is None else f" with {checkpoint.monitor} {float(score):.4f}"
        print(f"Best checkpoint: {checkpoint.best_model_path}{score_text}")
    if trainer.fast_dev_run:  # Lightning then runs without its loggers and checkpoints
        print("fast_dev_run: a trial of a few batches; nothing was saved (no run folder, no checkpoint)")
