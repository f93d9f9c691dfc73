"""``python -m mnist_lit {fit,validate,test,predict}``: LightningCLI with this project's defaults.

Everything a recipe sets lives in ``configs/*.yaml``; this file only adds what LightningCLI cannot
know: which checkpoint a bare ``test`` means, and the summaries printed at the end.
"""

import json
import sys
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from mnist_lit.data import MNISTDataModule
from mnist_lit.errors import UserError
from mnist_lit.model import MNISTClassifier
from mnist_lit.predict import PredictionWriter
from mnist_lit.runs import newest_run

EVALUATION_COMMANDS = ("validate", "test", "predict")


class MNISTCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # --checkpoint.*: the best epoch by val/acc. --last_checkpoint.*: last.ckpt, rewritten every epoch
        # for resuming (Lightning 2.6's save_last only rewrites it when the best one improves).
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.filename": "epoch{epoch:02d}-val_acc{val/acc:.4f}",
                "checkpoint.auto_insert_metric_name": False,
                "last_checkpoint.filename": "last",
                "last_checkpoint.enable_version_counter": False,
            }
        )
        parser.add_lightning_class_args(PredictionWriter, "predictions")

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        super().parse_arguments(parser, args)
        command = self.config.get("subcommand")
        if command not in EVALUATION_COMMANDS or self.config[command].ckpt_path is not None:
            return
        # A bare `test` means: the best checkpoint of the newest run, with the data and model settings
        # that run was trained with. They go first, so any flag the user gave still wins.
        root = Path(self.config[command].trainer.default_root_dir or ".") / "lightning_logs"
        run = newest_run(root)
        checkpoint, score = run.best_checkpoint()
        given = list(sys.argv[1:] if args is None else args)
        at = given.index(command) + 1
        inherited = [f"--{section}={json.dumps(run.settings(section))}" for section in ("data", "model")]
        super().parse_arguments(parser, [*given[:at], *inherited, *given[at:], f"--ckpt_path={checkpoint}"])
        score_text = "" if score is None else f" (val/acc {score:.4f})"
        print(f"{command}: using {checkpoint}{score_text}")

    def after_fit(self) -> None:
        checkpoint = self.trainer.checkpoint_callback
        if self.trainer.is_global_zero and checkpoint is not None and checkpoint.best_model_path:
            score = checkpoint.best_model_score
            score_text = "" if score is None else f" with {checkpoint.monitor} {float(score):.4f}"
            print(f"Best checkpoint: {checkpoint.best_model_path}{score_text}")

    def after_test(self) -> None:
        metrics = self.trainer.callback_metrics
        if self.trainer.is_global_zero and "test/acc" in metrics:
            print(f"test/acc {float(metrics['test/acc']):.2%}  test/loss {float(metrics['test/loss']):.4f}")


def main(args: ArgsType = None) -> None:
    try:
        MNISTCLI(
            MNISTClassifier,
            MNISTDataModule,
            seed_everything_default=42,
            trainer_defaults={"max_epochs": 10},
            save_config_kwargs={"overwrite": False},
            args=args,
        )
    except UserError as err:
        sys.exit(f"mnist_lit: error: {err}")
