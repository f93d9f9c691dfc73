"""What every run records about itself: its HPARAMS row, learning rate, epoch times, and a closing summary.

The CLI adds these callbacks to every command (``--hparams_row.*``, ``--lr_monitor.*``, ...).
"""

import os
import time
from pathlib import Path

import lightning as L
import yaml
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.loggers import TensorBoardLogger
from rich.console import Console
from rich.table import Table
from torch.utils.tensorboard.summary import hparams

from mnist_lit.runs import load_checkpoint

# The HPARAMS tab's metric columns. TensorBoard fills each from the run's own scalar of that tag (a fit
# run has val/acc_best, a test run test/acc and its checkpoint's val/acc_best), so no placeholder value
# is ever written; the logger's default_hp_metric=False keeps Lightning's hp_metric=-1 away too.
HPARAM_METRICS = ("val/acc_best", "test/acc")
EPOCH_TIME_TAG = "time/epoch_s"


class HparamsRow(Callback):
    """Gives each ``fit`` and ``test`` run a row in TensorBoard's HPARAMS tab.

    A fit run's row holds its model and data settings, epochs and seed. A test run's row holds those of the
    checkpoint it tested (read from the checkpoint, so ``--ckpt_path`` to any run is described right),
    the checkpoint's path, and the checkpoint's ``val/acc_best`` next to the ``test/acc`` it measured.
    """

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        params = {**pl_module.hparams_initial}
        if trainer.datamodule is not None:
            params.update(trainer.datamodule.hparams_initial)
        params["max_epochs"] = trainer.max_epochs  # a setting of the recipe too, and one that tune searches
        if "PL_GLOBAL_SEED" in os.environ:  # set by seed_everything, which the CLI always calls
            params["seed"] = int(os.environ["PL_GLOBAL_SEED"])
        self._write(trainer, params, "fit")

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.ckpt_path:  # testing the weights in memory: they have no other record
            self.on_fit_start(trainer, pl_module)
            return
        checkpoint = load_checkpoint(Path(trainer.ckpt_path))
        params = {
            **checkpoint.get("hyper_parameters", {}),
            **checkpoint.get("datamodule_hyper_parameters", {}),
            "ckpt_path": str(trainer.ckpt_path),
        }
        config = Path(trainer.ckpt_path).parent.parent / "config.yaml"  # the run that wrote the checkpoint
        if config.is_file():
            settings = yaml.safe_load(config.read_text()) or {}
            epochs = (settings.get("trainer") or {}).get("max_epochs")
            if isinstance(epochs, int):
                params["max_epochs"] = epochs
            seed = settings.get("seed_everything")
            if isinstance(seed, int):
                params["seed"] = seed
        self._write(trainer, params, "test")
        best = checkpoint["state_dict"].get("val_acc_best.max_value")
        if best is not None:
            for logger in trainer.loggers:
                logger.log_metrics({"val/acc_best": float(best)}, step=trainer.global_step)

    @staticmethod
    def _write(trainer: L.Trainer, params: dict, command: str) -> None:
        if not trainer.is_global_zero:
            return
        params = {"command": command, **{k: _hparam_value(v) for k, v in params.items() if k[0] != "_"}}
        summaries = hparams(params, dict.fromkeys(HPARAM_METRICS, 0.0))
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                # Lightning's own log_hyperparams would also log the metrics as scalars at this step;
                # writing only the plugin's summaries leaves the metric curves untouched.
                writer = logger.experiment._get_file_writer()
                for summary in summaries:
                    writer.add_summary(summary)


def _hparam_value(value: object) -> bool | int | float | str:
    """The hparams plugin takes numbers, booleans and strings; anything else is shown as its text."""
    return value if isinstance(value, bool | int | float | str) else str(value)


class LearningRateLog(LearningRateMonitor):
    """Lightning's LearningRateMonitor (``lr-Adam`` at every logged step), silent in runs without a logger.

    The plain callback raises when ``--trainer.logger false``; this one just has nothing to do then.
    """

    def on_train_start(self, trainer: L.Trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer: L.Trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer: L.Trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_epoch_start(trainer, *args, **kwargs)


class EpochTimer(Callback):
    """Logs ``time/epoch_s``: wall time of each epoch, its training and its validation together."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A run resumed mid-epoch gets no on_train_epoch_start for that epoch: time it from here.
        self.start = time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.times.append(time.perf_counter() - self.start)
        # sync_dist: the mean over DDP ranks, which all ran the same epoch.
        pl_module.log(EPOCH_TIME_TAG, self.times[-1], sync_dist=True)


def print_fit_summary(trainer: L.Trainer) -> None:
    """Prints a small table when ``fit`` ends: epochs, steps, epoch time, final losses and accuracies.

    (``test`` needs none of its own: Lightning prints its table of test metrics.)
    """
    if not trainer.is_global_zero:
        return
    table = Table(title="fit summary", show_header=False)
    table.add_row("epochs", str(trainer.current_epoch))
    table.add_row("steps", str(trainer.global_step))
    times = next((cb.times for cb in trainer.callbacks if isinstance(cb, EpochTimer) and cb.times), None)
    if times:
        table.add_row("time/epoch_s", f"{sum(times) / len(times):.1f} (mean of {len(times)})")
    metrics = trainer.callback_metrics
    for name in ("train/loss_epoch", "train/acc", "val/loss", "val/acc", "val/acc_best"):
        if name in metrics:
            table.add_row(name.removesuffix("_epoch"), f"{float(metrics[name]):.4f}")
    Console().print(table)
