"""``python -m mnist_lit {fit,validate,test,predict}``: LightningCLI with this project's defaults.

Everything a recipe sets lives in ``configs/*.yaml``; this file only adds what LightningCLI cannot
know: which checkpoint a bare ``test`` means, and the summaries printed at the end.
"""

import importlib
import inspect
import json
import logging
import re
import sys
import warnings
from pathlib import Path

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mnist_lit.data import MNISTDataModule
from mnist_lit.distributed import EndStalledRanks, stalled_message, with_timeout
from mnist_lit.errors import UserError
from mnist_lit.faults import (
    DiscardFailedRun,
    GracefulInterrupt,
    LastCheckpoint,
    StopOnDivergence,
    interrupted_message,
)
from mnist_lit.logger import RunLogger
from mnist_lit.model import MNISTClassifier
from mnist_lit.precision import apply_bf16_where_native
from mnist_lit.predict import PredictionWriter
from mnist_lit.report import TestReport
from mnist_lit.runs import Run, check_checkpoint_fits, epochs_completed, load_checkpoint, newest_run
from mnist_lit.tracking import EpochTimer, HparamsRow, LearningRateLog, print_fit_summary

PROG = "python -m mnist_lit"
EVALUATION_COMMANDS = ("validate", "test", "predict")
RUN_LOGGER = f"{RunLogger.__module__}.{RunLogger.__name__}"
# --ckpt_path values that Lightning resolves itself rather than reading a file.
SPECIAL_CHECKPOINTS = ("best", "last", "hpc", "registry")


class CommandParser(LightningArgumentParser):
    """jsonargparse's parser that knows which command it parses, refuses abbreviated flags, and ends a
    bad flag or config in one line instead of the whole usage text.

    Args:
        command: the subcommand this parser is for (``fit``, ``test``...), or None for the top level.
    """

    def __init__(self, *args, command: str | None = None, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)  # `--trainer.max_epoch 3` must not mean max_epochs
        super().__init__(*args, **kwargs)
        self.command = command

    def add_method_arguments(self, *args, **kwargs) -> list[str]:
        added = super().add_method_arguments(*args, **kwargs)
        # Lightning's default (None) means full unpickling for URLs and old torch versions: a checkpoint
        # never runs code here.
        if "weights_only" in added:
            self.set_defaults(weights_only=True)
        return added

    def error(self, message: str, ex: Exception | None = None) -> None:
        if not self.exit_on_error:  # jsonargparse parsing internally, and catching its own errors
            super().error(message, ex)
        sys.stderr.write(f"mnist_lit: error: {readable(message)} (see --help)\n")
        self.exit(2)


# jsonargparse's words for a value of the wrong type, e.g. "Subtypes: [<class 'int'>, <class 'NoneType'>]".
TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}
UNION_ERROR = re.compile(
    r"Does not validate against any of the Union subtypes.*Subtypes: \[(?P<types>[^]]*)\]"
    r".*Given value: (?P<value>.*)$"
)
BAD_COMMAND = re.compile(r"argument subcommand: invalid choice: '(?P<command>[^']*)'.*")


def readable(message: str) -> str:
    """jsonargparse's error message as one line a user can act on."""
    text = " ".join(line.strip() for line in message.splitlines())
    text = re.sub(r'Parser key "([^"]+)":?', r"--\1:", text)
    union = UNION_ERROR.search(text)
    if union:
        names = re.findall(r"<class '(?:[\w.]+\.)?(\w+)'>", union["types"])
        words = [TYPE_WORDS.get(name, name) for name in names if name != "NoneType"]
        expected = " or ".join(words) + (" (or null)" if "NoneType" in names else "")
        text = text[: union.start()] + f"expected {expected}, got {union['value'].strip()!r}"
    command = BAD_COMMAND.search(text)
    if command:
        commands = ", ".join([*LightningCLI.subcommands(), *TOOLS, "tune"])
        text = f"unknown command {command['command']!r}: choose from {commands}"
    return text


class MNISTCLI(LightningCLI):
    """LightningCLI with this project's checks and summaries.

    Args:
        command: the subcommand on the command line, if known: only its parser is built, since building
            all four is part of every command's start-up (docs/performance.md); None builds them all.
        listing: the command line only asks for the list of commands (``--help``): the subcommands get
            empty parsers, which is all that list needs.
    """

    checkpoint: dict | None = None  # what --ckpt_path holds, loaded once (weights only) and checked

    def __init__(self, *args, command: str | None = None, listing: bool = False, **kwargs) -> None:
        self.command = command
        self.listing = listing
        super().__init__(*args, **kwargs)

    def subcommands(self) -> dict[str, set[str]]:
        every = LightningCLI.subcommands()
        return {self.command: every[self.command]} if self.command in every else every

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict, subparser_kwargs: dict) -> None:
        if not (add_subcommands and self.listing):
            super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
            return
        # Each command listed by the first line of its Trainer method's docstring, as LightningCLI lists
        # it; building their parsers (a hundred flags each) was most of what `--help` added to the imports.
        self.parser = self.init_parser(**main_kwargs)
        subcommands = self.parser.add_subcommands()
        for command in self.subcommands():
            summary = inspect.getdoc(getattr(self.trainer_class, command)).splitlines()[0]
            parser = self.init_parser(**subparser_kwargs.get(command, {}), description=summary)
            subcommands.add_subcommand(command, parser, help=summary)

    def add_arguments_to_parser(self, parser: CommandParser) -> None:
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
        # Callbacks of one command only, so that each command's --help lists what it uses. TensorBoard
        # extras: lr-Adam every logged step in fit; after test, the confusion matrix, mistakes grid and
        # per-class accuracy (report.py).
        if parser.command == "fit":
            parser.add_lightning_class_args(LearningRateLog, "lr_monitor")
            parser.set_defaults({"lr_monitor.logging_interval": "step"})
        elif parser.command == "test":
            parser.add_lightning_class_args(TestReport, "test_report")
        elif parser.command == "predict":
            parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.add_argument(
            "--bf16_where_native",
            type=bool,
            default=False,
            help="When --trainer.precision is not set: bf16-mixed where the device computes bf16 natively "
            "(CUDA compute capability >= 8.0, CPUs with AMX or AVX512-BF16), 32-true elsewhere.",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        super().parse_arguments(parser, args)
        command = self.config.get("subcommand")
        if command in EVALUATION_COMMANDS and self.config[command].ckpt_path is None:
            self._use_newest_run(parser, command, list(sys.argv[1:] if args is None else args))
        # Lightning reads the checkpoint's hyperparameters right after parsing, and a bad file would end
        # in torch's traceback: load it the safe way first, which says what is wrong in one line.
        path = self._checkpoint_file()
        self.checkpoint = load_checkpoint(path) if path else None

    def _use_newest_run(self, parser: LightningArgumentParser, command: str, given: list[str]) -> None:
        """A bare ``test`` means: the best checkpoint of the newest run, with that run's data settings.

        They go before the user's own flags, so that any ``--data.*`` flag given still wins. (The model's
        settings come from the checkpoint itself: Lightning restores them after parsing.)
        """
        root = Path(self.config[command].trainer.default_root_dir or ".") / "lightning_logs"
        run = newest_run(root)
        checkpoint, score = run.best_checkpoint()
        at = given.index(command) + 1
        inherited = f"--data={json.dumps(run.settings('data'))}"
        self.config = parser.parse_args([*given[:at], inherited, *given[at:], f"--ckpt_path={checkpoint}"])
        score_text = "" if score is None else f" (val/acc {score:.4f})"
        print(f"{command}: using {checkpoint}{score_text}")

    def before_instantiate_classes(self) -> None:
        command = self.subcommand
        apply_bf16_where_native(self.config[command] if command else self.config)  # precision.py
        trainer = self.config[command].trainer if command else self.config.trainer
        logger = trainer.logger
        if getattr(logger, "class_path", None) != RUN_LOGGER:
            return
        settings = logger.init_args
        # RunLogger's save_dir "." stands for the trainer's root dir, as for Lightning's own default logger.
        if trainer.default_root_dir and settings.save_dir == ".":
            settings.save_dir = trainer.default_root_dir
        # An evaluation logs inside the run whose checkpoint it evaluates (version_N/test_M), so that
        # the training runs stay the only version_N folders and TensorBoard shows each under its run.
        checkpoint = self._checkpoint_file()
        run = Run.of_checkpoint(checkpoint) if command in EVALUATION_COMMANDS and checkpoint else None
        if command in EVALUATION_COMMANDS:
            settings.folder_prefix = command
            if run is not None and settings.name == "lightning_logs" and settings.version is None:
                settings.save_dir, settings.name = str(run.log_dir), ""

    def instantiate_trainer(self, **kwargs) -> Trainer:
        # Plain DDP waits DEFAULT_TIMEOUT for a rank instead of torch's 30 minutes (distributed.py).
        trainer = self.config_init[self.subcommand].trainer if self.subcommand else self.config_init.trainer
        strategy = with_timeout(trainer.strategy, trainer.accelerator, trainer.devices, trainer.num_nodes)
        kwargs.setdefault("strategy", strategy)
        return super().instantiate_trainer(**kwargs)

    def _checkpoint_file(self) -> Path | None:
        """The local file --ckpt_path names, if it names one (not "last", "best", a URL...)."""
        command = self.config.get("subcommand")
        path = self.config[command].get("ckpt_path") if command else None
        if path is None or str(path).startswith(SPECIAL_CHECKPOINTS) or "://" in str(path):
            return None
        return Path(path)

    def _check_checkpoint(self) -> None:
        if self.checkpoint is not None:
            check_checkpoint_fits(self.checkpoint, self._checkpoint_file(), self.model)

    def before_fit(self) -> None:
        self._check_checkpoint()
        path, max_epochs = self._checkpoint_file(), self.trainer.max_epochs
        done = epochs_completed(self.checkpoint) if self.checkpoint else 0
        if path and max_epochs is not None and max_epochs >= 0 and done >= max_epochs:
            raise UserError(
                f"{path} has already trained {done} epoch(s), and --trainer.max_epochs is {max_epochs}: "
                f"there is nothing left to train; to train further, pass --trainer.max_epochs {done + 5} "
                "(or any number above the epochs done)"
            )

    before_validate = before_test = before_predict = _check_checkpoint

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


# `export` and `stats` are not Trainer methods, so LightningCLI cannot host them: each gets a parser of
# its own, built from its signature and docstring, with the same --help and one-line errors. Each is
# imported only when it runs, so no other command waits for what it needs (onnx, ...).
TOOLS = {  # command -> (module, function, flag prefix)
    "export": ("mnist_lit.export", "export", None),
    "stats": ("mnist_lit.stats", "stats", "data"),
    "serve": ("mnist_lit.serve", "serve", None),
}
TOOLS_HELP = (
    "Train and evaluate the MNIST CNN (fit, validate, test, predict). Also: `export` (the trained model as "
    "ONNX or TorchScript), `stats` (the training set's pixel mean and std), `serve` (an HTTP API and a "
    "page to draw digits on) and `tune` (hyperparameter search with Optuna); add --help to any of them."
)


def run_tool(argv: list[str]) -> None:
    """``python -m mnist_lit export|stats ARGS``."""
    module, name, prefix = TOOLS[argv[0]]
    function = getattr(importlib.import_module(module), name)
    summary = function.__doc__.split("\n\n")[0]  # the rest is Args, which --help shows per flag
    parser = CommandParser(prog=f"{PROG} {argv[0]}", description=summary)
    parser.add_function_arguments(function, prefix)
    config = parser.parse_args(argv[1:])
    function(**(config[prefix] if prefix else config).as_dict())


# Noise a user can do nothing about: deprecations inside torchdata and Lightning, and ModelCheckpoint
# noting, when test/validate/predict restore a fit checkpoint, that they log to a folder of their own.
QUIET = (
    "'set_vital' is deprecated",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    "The dirpath has changed",
    # Epoch values here are torchmetrics results, synced by compute() on every rank (distributed.py).
    r"It is recommended to use `self.log\(.*sync_dist=True\)`",
)


def build_cli(args: ArgsType = None, run: bool = True, callbacks: tuple = ()) -> MNISTCLI:
    """The project's LightningCLI: its Trainer defaults (logger, the callbacks every run carries, plus
    ``callbacks``) and parsers; with ``run=False``, a ``fit`` whose classes are built but not run (tune)."""
    argv = sys.argv[1:] if args is None else args
    given = argv[0] if run and isinstance(argv, list) and argv else None
    listing = given in ("-h", "--help")
    commands = [given] if given in LightningCLI.subcommands() else list(LightningCLI.subcommands())
    per_command = {command: {"command": command} for command in commands}
    return MNISTCLI(
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
                DiscardFailedRun(),
                EndStalledRanks(),
                *callbacks,
            ],
        },
        save_config_kwargs={"overwrite": False},
        args=args,
        run=run,
        parser_class=CommandParser,
        parser_kwargs={"prog": PROG, "description": TOOLS_HELP, **per_command} if run else {"command": "fit"},
        command=given,
        listing=listing,
    )


def main(args: ArgsType = None) -> None:
    for message in QUIET:
        warnings.filterwarnings("ignore", message=message)
    # Lightning's info lines ("Seed set to 42", "GPU available: False", a product tip, "`Trainer.fit`
    # stopped", "Received SIGTERM: 2") say nothing that the command's own output does not.
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    argv = sys.argv[1:] if args is None else args
    try:
        if isinstance(argv, list) and argv and argv[0] in TOOLS:
            run_tool(argv)
            return
        if isinstance(argv, list) and argv and argv[0] == "tune":
            from mnist_lit.tune import tune  # here, not at the top: only tune pays Optuna's import time

            tune(argv[1:])
            return
        build_cli(args)
    except UserError as err:
        sys.exit(f"mnist_lit: error: {err}")
    except RuntimeError as err:  # DDP ranks that stopped agreeing; anything else is a bug: traceback
        if (line := stalled_message(err)) is None:
            raise
        sys.exit(f"mnist_lit: error: {line}")
    except KeyboardInterrupt:  # Ctrl-C outside training (loading data, parsing); in training see faults.py
        sys.exit("mnist_lit: error: interrupted")
