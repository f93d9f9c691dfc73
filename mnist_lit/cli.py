"""``python -m mnist_lit {fit,validate,test,predict}``: LightningCLI with this project's defaults.

Everything a recipe sets lives in ``configs/*.yaml``; this file only adds what LightningCLI cannot
know: which checkpoint a bare ``test`` means, and the summaries printed at the end.
"""

import json
import re
import sys
import warnings
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mnist_lit.allocator import keep_freed_memory
from mnist_lit.data import MNISTDataModule
from mnist_lit.errors import UserError
from mnist_lit.export import export
from mnist_lit.faults import GracefulInterrupt, LastCheckpoint, StopOnDivergence, interrupted_message
from mnist_lit.logger import RunLogger
from mnist_lit.model import MNISTClassifier
from mnist_lit.predict import PredictionWriter
from mnist_lit.report import TestReport
from mnist_lit.runs import check_checkpoint_fits, load_checkpoint, newest_run
from mnist_lit.stats import stats
from mnist_lit.tracking import EpochTimer, HparamsRow, LearningRateLog, print_fit_summary

EVALUATION_COMMANDS = ("validate", "test", "predict")
RUN_LOGGER = f"{RunLogger.__module__}.{RunLogger.__name__}"
# --ckpt_path values that Lightning resolves itself rather than reading a file.
SPECIAL_CHECKPOINTS = ("best", "last", "hpc", "registry")


class OneLineErrorParser(LightningArgumentParser):
    """jsonargparse's parser, but a bad flag or config ends in one line, not the whole usage text."""

    def error(self, message: str, ex: Exception | None = None) -> None:
        if not self.exit_on_error:  # jsonargparse parsing internally, and catching its own errors
            super().error(message, ex)
        one_line = " ".join(line.strip() for line in message.splitlines())
        text = re.sub(r'Parser key "([^"]+)":?', r"--\1:", one_line)
        sys.stderr.write(f"mnist_lit: error: {text} (see --help)\n")
        self.exit(2)


class MNISTCLI(LightningCLI):
    _checkpoint: dict | None = None  # what --ckpt_path holds, loaded once (weights only) and checked

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # --checkpoint.*: the best epoch by val/acc. --last_checkpoint.*: last.ckpt, rewritten every epoch
        # for resuming (Lightning 2.6's save_last only rewrites it when the best one improves).
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(LastCheckpoint, "last_checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.filename": "epoch{epoch:02d}-val_acc{val/acc:.4f}",
                "checkpoint.auto_insert_metric_name": False,
                "last_checkpoint.filename": "last",
                "last_checkpoint.enable_version_counter": False,
                # Ctrl-C or SIGTERM during fit saves where training was to last.ckpt (see faults.py).
                "last_checkpoint.save_on_exception": True,
            }
        )

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
        with warnings.catch_warnings():  # "args and sys.argv both given": on purpose, args extends argv
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            super().parse_arguments(
                parser, [*given[:at], *inherited, *given[at:], f"--ckpt_path={checkpoint}"]
            )
        score_text = "" if score is None else f" (val/acc {score:.4f})"
        print(f"{command}: using {checkpoint}{score_text}")

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        # Callbacks of one command only: Lightning calls every callback's hooks at every step, so fit
        # carries none it does not use. TensorBoard extras: lr-Adam every logged step in fit; after
        # test, the confusion matrix, mistakes grid and per-class accuracy (report.py).
        if subcommand == "fit":
            parser.add_lightning_class_args(LearningRateLog, "lr_monitor")
            parser.set_defaults({"lr_monitor.logging_interval": "step"})
        elif subcommand == "test":
            parser.add_lightning_class_args(TestReport, "test_report")
        elif subcommand == "predict":
            parser.add_lightning_class_args(PredictionWriter, "predictions")
        # --weights_only is added here, after add_arguments_to_parser. Lightning's default (None) means
        # full unpickling for URLs and old torch versions: never run code from a checkpoint.
        if "weights_only" in self._subcommand_method_arguments[subcommand]:
            parser.set_defaults(weights_only=True)
        return parser

    def before_instantiate_classes(self) -> None:
        trainer = self.config[self.subcommand].trainer if self.subcommand else self.config.trainer
        logger = trainer.logger
        # RunLogger's save_dir "." stands for the trainer's root dir, as for Lightning's own default logger.
        ours = getattr(logger, "class_path", None) == RUN_LOGGER
        if trainer.default_root_dir and ours and logger.init_args.save_dir == ".":
            logger.init_args.save_dir = trainer.default_root_dir

    def _checkpoint_file(self) -> Path | None:
        """The local file --ckpt_path names, if it names one (not "last", "best", a URL...)."""
        command = self.config.get("subcommand")
        path = self.config[command].get("ckpt_path") if command else None
        if path is None or str(path).startswith(SPECIAL_CHECKPOINTS) or "://" in str(path):
            return None
        return Path(path)

    def _parse_ckpt_path(self) -> None:
        # Lightning reads the checkpoint's hyperparameters here, right after parsing, and a bad file
        # would end in torch's traceback: load it the safe way first, which says what is wrong in a line.
        path = self._checkpoint_file()
        self._checkpoint = load_checkpoint(path) if path else None
        super()._parse_ckpt_path()

    def _check_checkpoint(self) -> None:
        if self._checkpoint is not None:
            check_checkpoint_fits(self._checkpoint, self._checkpoint_file(), self.model)

    before_fit = before_validate = before_test = before_predict = _check_checkpoint

    def fit(self, **kwargs) -> None:
        """``trainer.fit``; stopped by SIGTERM or Ctrl-C, it ends with a checkpoint and one line."""
        try:
            self.trainer.fit(**kwargs)
        except SIGTERMException:
            raise UserError(interrupted_message(self.trainer)) from None

    def after_fit(self) -> None:
        print_fit_summary(self.trainer)  # here, not in a callback, so it comes after the progress bar
        checkpoint = self.trainer.checkpoint_callback
        if self.trainer.is_global_zero and checkpoint is not None and checkpoint.best_model_path:
            score = checkpoint.best_model_score
            score_text = "" if score is None else f" with {checkpoint.monitor} {float(score):.4f}"
            print(f"Best checkpoint: {checkpoint.best_model_path}{score_text}")

    def after_test(self) -> None:
        metrics = self.trainer.callback_metrics
        if self.trainer.is_global_zero and "test/acc" in metrics:
            print(f"test/acc {float(metrics['test/acc']):.2%}  test/loss {float(metrics['test/loss']):.4f}")


# `export` and `stats` are not Trainer methods, so LightningCLI cannot host them: each gets a parser of
# its own, built from its signature and docstring, with the same --help and one-line errors.
TOOLS = {"export": (export, None), "stats": (stats, "data")}  # command -> (function, flag prefix)
TOOLS_HELP = (
    "Train and evaluate the MNIST CNN (fit, validate, test, predict). Also: `export` (the trained model as "
    "ONNX or TorchScript) and `stats` (the training set's pixel mean and std); add --help to any of them."
)


def run_tool(argv: list[str]) -> None:
    """``python -m mnist_lit export|stats ARGS``."""
    function, prefix = TOOLS[argv[0]]
    summary = function.__doc__.split("\n\n")[0]  # the rest is Args, which --help shows per flag
    parser = OneLineErrorParser(prog=f"python -m mnist_lit {argv[0]}", description=summary)
    parser.add_function_arguments(function, prefix)
    config = parser.parse_args(argv[1:])
    function(**(config[prefix] if prefix else config).as_dict())


# Noise a user can do nothing about: deprecations inside torchdata and Lightning, and ModelCheckpoint
# noting, when test/validate/predict restore a fit checkpoint, that they log to a folder of their own.
QUIET = (
    "'set_vital' is deprecated",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    "The dirpath has changed",
)


def main(args: ArgsType = None) -> None:
    keep_freed_memory()  # before training allocates anything: faster CPU steps (allocator.py)
    for message in QUIET:
        warnings.filterwarnings("ignore", message=message)
    argv = sys.argv[1:] if args is None else args
    try:
        if isinstance(argv, list) and argv and argv[0] in TOOLS:
            run_tool(argv)
            return
        if isinstance(argv, list) and argv and argv[0] == "tune":
            from mnist_lit.tune import tune  # here, not at the top: only tune pays Optuna's import time

            tune(argv[1:])
            return
        MNISTCLI(
            MNISTClassifier,
            MNISTDataModule,
            seed_everything_default=42,
            trainer_defaults={
                "max_epochs": 10,
                "logger": {"class_path": RUN_LOGGER, "init_args": {"save_dir": "."}},
                "callbacks": [
                    StopOnDivergence(),
                    GracefulInterrupt(),
                    HparamsRow(),
                    EpochTimer(),
                ],
            },
            save_config_kwargs={"overwrite": False},
            args=args,
            parser_class=OneLineErrorParser,
            parser_kwargs={"description": TOOLS_HELP},
        )
    except UserError as err:
        sys.exit(f"mnist_lit: error: {err}")
    except KeyboardInterrupt:  # Ctrl-C outside training (loading data, parsing); in training see faults.py
        sys.exit("mnist_lit: error: interrupted")
