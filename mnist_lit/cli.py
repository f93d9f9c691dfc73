"""``python -m mnist_lit fit``: LightningCLI over the model and the data module (and, through evaluate.py,
``validate``, ``test`` and ``predict``).

Settings live in YAML: the recipes in ``configs/``, and what every run of a command carries (its logger
and callbacks) in ``mnist_lit/defaults/<command>.yaml``. This file adds only what LightningCLI cannot
know: which run a checkpoint belongs to (a resumed fit goes on in it; ``--ckpt_path last`` is the newest
run's last.ckpt), safe checkpoint loading, and one-line errors, for a signal too.
"""

import inspect
import sys
from pathlib import Path

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from mnist_lit.data import MNISTDataModule
from mnist_lit.errors import UserError
from mnist_lit.model import MNISTClassifier

DEFAULTS = Path(__file__).parent / "defaults"
RUN_LOGGER = "mnist_lit.logger.RunLogger"
# --ckpt_path values that Lightning resolves itself rather than reading a file.
SPECIAL_CHECKPOINTS = ("best", "last", "hpc", "registry")


class CommandParser(LightningArgumentParser):
    """jsonargparse's parser, refusing abbreviated flags and ending a bad flag or config in one line.

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
        from mnist_lit.messages import flags_of, readable

        sys.stderr.write(f"mnist_lit: error: {readable(message, flags_of(self))}\n")
        self.exit(2)


class MNISTCLI(LightningCLI):
    """LightningCLI that knows runs: the newest one, the one a checkpoint belongs to, the one it resumes.

    Args:
        command: the subcommand on the command line: only its parser is built (building all four is part
            of every command's start-up, docs/performance.md).
    """

    checkpoint: dict | None = None  # what --ckpt_path holds, loaded once (weights only) and checked
    given = None  # the command's settings as parsed, before the checkpoint's model settings replace them

    def __init__(self, *args, command: str, **kwargs) -> None:
        self.command = command
        super().__init__(*args, **kwargs)

    def subcommands(self) -> dict[str, set[str]]:
        every = LightningCLI.subcommands()
        return {self.command: every[self.command]} if self.command in every else every

    def add_arguments_to_parser(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--bf16_where_native",
            type=bool,
            default=False,
            help="When --trainer.precision is not set: bf16-mixed where the device computes bf16 natively "
            "(CUDA compute capability >= 8.0, CPUs with AMX or AVX512-BF16), 32-true elsewhere.",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        super().parse_arguments(parser, args)
        given = list(sys.argv[1:] if args is None else args)
        root = Path(self._section(self.config).trainer.default_root_dir or ".") / "lightning_logs"
        if self._section(self.config).get("ckpt_path") == "last":  # Lightning's "last" is in the new run
            from mnist_lit.runs import last_of_newest_run

            given.append(f"--ckpt_path={last_of_newest_run(root, self.command)}")
            self.config = parser.parse_args(given)
        self.add_run_settings(parser, given, root)
        # Lightning reads the checkpoint's hyperparameters right after parsing, and a bad file would end
        # in torch's traceback: load it the safe way first, which says what is wrong in one line.
        if path := self._checkpoint_file():
            from mnist_lit.runs import load_checkpoint

            self.checkpoint = load_checkpoint(path)
            # As given, before Lightning replaces the model's settings with the checkpoint's (resume.py).
            self.given = self._section(self.config).clone()

    def add_run_settings(self, parser: LightningArgumentParser, given: list[str], log_root: Path) -> None:
        """What the run of the checkpoint adds to an evaluation's flags (evaluate.py); nothing for fit."""

    def _section(self, config):
        """The part of ``config`` (parsed, or instantiated) for the command being run (tune's fits have no
        subcommand level)."""
        command = config.get("subcommand")
        return config[command] if command else config

    def _checkpoint_file(self) -> Path | None:
        """The local file --ckpt_path names, if it names one (not "last", "best", a URL...)."""
        path = self._section(self.config).get("ckpt_path")
        if path is None or str(path).startswith(SPECIAL_CHECKPOINTS) or "://" in str(path):
            return None
        return Path(path)

    def before_instantiate_classes(self) -> None:
        config = self._section(self.config)
        if config.bf16_where_native and config.trainer.precision is None:  # recorded in config.yaml too
            from mnist_lit.precision import precision_for

            config.trainer.precision, reason = precision_for(config.trainer.accelerator)
            if rank_zero_only.rank == 0:  # DDP starts one process per device, each making the same choice
                print(f"precision: {config.trainer.precision} ({reason})")
        logger, checkpoint = config.trainer.logger, self._checkpoint_file()
        if getattr(logger, "class_path", None) != RUN_LOGGER:
            return
        settings = logger.init_args
        if config.trainer.default_root_dir and settings.save_dir == ".":  # as for Lightning's own logger
            settings.save_dir = config.trainer.default_root_dir
        if checkpoint is not None and settings.name == "lightning_logs" and settings.version is None:
            from mnist_lit.runs import log_into_run

            if log_into_run(settings, checkpoint, self.command) == "resumed":
                self.save_config_kwargs["overwrite"] = True  # the run's config.yaml: how it ended

    def instantiate_trainer(self, **kwargs) -> Trainer:
        # Lightning's default progress bar, without v_num (tracking.ProgressBar), where Lightning would
        # add its own; given here, not in YAML, so that a run's config.yaml never names it. Redrawn ten
        # times a second, as tqdm does, not Rich's 100: each redraw holds the GIL that the training step
        # needs, and at 100 a second the bar slowed the seed recipe's epochs visibly (docs/performance.md).
        trainer = self._section(self.config_init).trainer
        callbacks = list(trainer.callbacks or [])
        if trainer.enable_progress_bar is not False and not any(
            isinstance(c, ProgressBar) for c in callbacks
        ):
            from mnist_lit.tracking import ProgressBar as WithoutVersion

            kwargs["callbacks"] = [*callbacks, WithoutVersion(refresh_rate=10)]
        try:
            return super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError, ImportError) as err:  # Lightning checking the flags
            from mnist_lit.messages import trainer_refused

            raise UserError(trainer_refused(err)) from None

    def _check_checkpoint(self) -> None:
        if self.checkpoint is not None:
            from mnist_lit.runs import check_checkpoint_fits

            check_checkpoint_fits(self.checkpoint, self._checkpoint_file(), self.model)

    def before_fit(self) -> None:
        max_epochs = self.trainer.max_epochs
        if max_epochs == 0:
            raise UserError("--trainer.max_epochs 0 trains nothing: give 1 or more (the seed recipe's is 10)")
        if self.trainer.limit_train_batches == 0:
            raise UserError(
                "--trainer.limit_train_batches 0 trains nothing: give a number of batches, or a fraction "
                "of them (1.0, the default, is every batch)"
            )
        if self.trainer.logger is None:  # else config.yaml lands in the working folder and fails the next fit
            raise UserError(
                "--trainer.logger false: a run lives in the folder its logger makes, "
                "lightning_logs/version_N (checkpoints, config.yaml, curves), where test, predict, export "
                "and serve find it"
            )
        self._check_checkpoint()
        if self.checkpoint is not None:
            from mnist_lit.resume import check_resumable, check_same_training

            check_same_training(self.checkpoint, self._checkpoint_file(), self.given, self.trainer.callbacks)
            check_resumable(self.checkpoint, self._checkpoint_file(), max_epochs)

    def fit(self, **kwargs) -> None:
        """``trainer.fit``; stopped by SIGTERM or Ctrl-C, it ends with a checkpoint and one line."""
        self._stoppable(self.trainer.fit, **kwargs)

    def _stoppable(self, run, **kwargs) -> None:
        """``run`` (a Trainer method); stopped by a signal, it ends in one line, with where a fit was."""
        try:
            run(**kwargs)
        except (SIGTERMException, SystemExit) as stop:
            # Ctrl-C outside training steps (an evaluation, fit's sanity check): Lightning's silent exit(1)
            if isinstance(stop, SystemExit) and not self.trainer.interrupted:
                raise
            if not self.trainer.is_global_zero:  # said once, by rank 0
                sys.exit(1)
            from mnist_lit.messages import interrupted

            raise UserError(interrupted(self.trainer) if self.command == "fit" else "interrupted") from None

    def after_fit(self) -> None:
        from mnist_lit.tracking import print_fit_summary  # here, after the progress bar's last line

        print_fit_summary(self.trainer)


def build_cli(
    args: ArgsType = None, run: bool = True, callbacks: tuple = (), cli_class: type = MNISTCLI
) -> MNISTCLI:
    """The project's LightningCLI for ``args`` (a command and its flags); with ``run=False``, a ``fit`` of
    these flags whose classes are built but not run (tune), with ``callbacks`` added to the run's own.
    ``cli_class``: MNISTCLI for fit, evaluate.EvaluationCLI for the evaluations."""
    argv = list(sys.argv[1:] if args is None else args)
    command = argv[0] if run else "fit"
    kwargs = {"command": command, "default_config_files": [DEFAULTS / f"{command}.yaml"]}
    # --help's description: the Trainer method's first paragraph (LightningCLI shows its first line only).
    kwargs["description"] = " ".join(inspect.getdoc(getattr(Trainer, command)).split("\n\n")[0].split())
    cli = cli_class(
        MNISTClassifier,
        MNISTDataModule,
        seed_everything_default=42,
        save_config_kwargs={"overwrite": False},
        parser_class=CommandParser,
        parser_kwargs={"prog": "python -m mnist_lit", command: kwargs} if run else kwargs,
        args=args,
        run=run,
        command=command,
    )
    cli.trainer.callbacks.extend(callbacks)
    return cli


def main(argv: list[str], cli_class: type = MNISTCLI) -> None:
    """``python -m mnist_lit fit ARGS`` (routed here by __main__.py; evaluate.py's with its CLI class)."""
    # None: LightningCLI reads sys.argv itself
    build_cli(None if argv == sys.argv[1:] else argv, cli_class=cli_class)


def run_function(function, argv: list[str], prefix: str | None = None) -> None:
    """``python -m mnist_lit COMMAND ARGS`` for a tool that is a plain function: its parameters are the flags
    (``--prefix.name`` with a prefix), its docstring the help, with the same one-line errors."""
    summary = function.__doc__.split("\n\n")[0]  # the rest is Args, which --help shows per flag
    parser = CommandParser(prog=f"python -m mnist_lit {argv[0]}", description=summary)
    parser.add_function_arguments(function, prefix)
    config = parser.parse_args(argv[1:])
    function(**(config[prefix] if prefix else config).as_dict())
