"""``python -m mnist_lit validate|test|predict``: fit's LightningCLI (cli.py), plus what an evaluation adds.

A bare evaluation means the newest run's best checkpoint, a run's checkpoint brings the data settings that
run was trained with (runs.py), and a validation or test ends with its accuracy and loss in one line.
"""

import warnings
from pathlib import Path

from lightning.pytorch.cli import LightningArgumentParser

from mnist_lit import cli
from mnist_lit.cli import MNISTCLI, CommandParser
from mnist_lit.errors import UserError

STAGES = {"validate": "val", "test": "test", "predict": "predict"}  # as Lightning names their limits


class EvaluationCLI(MNISTCLI):
    """MNISTCLI for the evaluations: the checkpoint, and the settings of the run it comes from."""

    def add_arguments_to_parser(self, parser: CommandParser) -> None:
        super().add_arguments_to_parser(parser)
        if parser.command == "predict":  # a callback with flags of its own: --predictions.output
            from mnist_lit.predict import PredictionWriter

            parser.add_lightning_class_args(PredictionWriter, "predictions")

    def add_run_settings(self, parser: LightningArgumentParser, given: list[str], log_root: Path) -> None:
        from mnist_lit.runs import evaluation_args

        with_run = evaluation_args(given, self.command, self._checkpoint_file(), log_root)
        if with_run != given:
            self.config = parser.parse_args(with_run)

    def _before_evaluation(self) -> None:
        # An evaluation needs none of the callbacks that wrote the checkpoint, which Lightning warns about.
        warnings.filterwarnings("ignore", message="Be aware that when using `ckpt_path`, callbacks used")
        limit = f"limit_{STAGES[self.command]}_batches"
        if getattr(self.trainer, limit) == 0:  # Lightning would run nothing, say nothing and exit 0
            raise UserError(
                f"--trainer.{limit} 0: {self.command} would see no batch: give a number of batches, or a "
                "fraction of them (1.0, the default, is every batch)"
            )
        self._check_checkpoint()

    before_validate = before_test = before_predict = _before_evaluation

    def _evaluate(self, **kwargs) -> None:
        self._stoppable(getattr(self.trainer, self.command), **kwargs)

    validate = test = predict = _evaluate

    def after_validate(self) -> None:
        self._print_summary("val")

    def after_test(self) -> None:
        self._print_summary("test")

    def _print_summary(self, stage: str) -> None:
        """The evaluation's accuracy and loss in one line, under Lightning's table."""
        metrics = self.trainer.callback_metrics
        if self.trainer.is_global_zero and f"{stage}/acc" in metrics:
            acc, loss = float(metrics[f"{stage}/acc"]), float(metrics[f"{stage}/loss"])
            print(f"{stage}/acc {acc:.2%}  {stage}/loss {loss:.4f}")


def main(argv: list[str]) -> None:
    """``python -m mnist_lit validate|test|predict ARGS`` (routed here by __main__.py)."""
    cli.main(argv, cli_class=EvaluationCLI)
