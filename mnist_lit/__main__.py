"""``python -m mnist_lit COMMAND``: the one place that routes a command to the module that runs it.

Lightning's four commands go to the LightningCLI (cli.py); the tools are modules of their own, imported
only when they run, so no command waits for what another one needs. The process is ours, so process-wide
settings (warning filters, log levels, what a DDP rank does when its launcher dies) are made here too.
"""

import ctypes
import difflib
import importlib
import logging
import os
import signal
import sys
import warnings

# command -> (module whose main(argv) runs it, what it does). Lightning's four say what LightningCLI says.
COMMANDS = {
    "fit": ("mnist_lit.cli", "Runs the full optimization routine."),
    "validate": ("mnist_lit.evaluate", "Perform one evaluation epoch over the validation set."),
    "test": ("mnist_lit.evaluate", "Perform one evaluation epoch over the test set."),
    "predict": ("mnist_lit.evaluate", "Run inference on your data."),
    "export": ("mnist_lit.export", "The trained model as one ONNX or TorchScript file."),
    "stats": ("mnist_lit.stats", "The training set's pixel mean and std (the normalization constants)."),
    "serve": ("mnist_lit.serve", "The trained model behind an HTTP API, and a page to draw digits on."),
    "tune": ("mnist_lit.tune", "Hyperparameter search with Optuna, each trial a fit."),
}
USAGE = f"usage: python -m mnist_lit {{{','.join(COMMANDS)}}} [--help] ..."

# Noise a user can do nothing about: deprecations inside torchdata and Lightning, and ModelCheckpoint
# noting, when test/validate/predict restore a fit checkpoint, that they log to a folder of their own.
QUIET = (
    "'set_vital' is deprecated",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    "The dirpath has changed",
    "Checkpoint directory .* exists and is not empty",  # on resume: a new run's folder is new (logger.py)
    # Epoch values here are torchmetrics results, synced by compute() on every rank (distributed.py).
    r"It is recommended to use `self.log\(.*sync_dist=True\)`",
    # bf16-mixed keeps the weights in float32, so the summary's size in MB, counted at 32 bits, is right.
    "Precision bf16-mixed is not supported by the model summary",
)


def quiet() -> None:
    for message in QUIET:
        warnings.filterwarnings("ignore", message=message)
    # Lightning's info lines ("Seed set to 42", "GPU available: False", a product tip, "`Trainer.fit`
    # stopped") say nothing that the command's own output does not.
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)


def end_with_launcher() -> None:
    """A DDP rank started by a launcher (Lightning's, torchrun) is killed by the kernel if the launcher dies.

    Otherwise a rank that stalled stays behind when the launching process gives up on it (Linux only).
    """
    if "LOCAL_RANK" not in os.environ or not sys.platform.startswith("linux"):
        return
    launcher = os.getppid()  # compared below, not 1: in a container the launcher may itself be pid 1
    PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != launcher:  # the launcher died before the line above took effect
        os._exit(1)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        commands = "\n".join(f"  {name:<9} {summary}" for name, (_, summary) in COMMANDS.items())
        print(f"{USAGE}\n\nTrain and use the seed notebook's MNIST CNN with PyTorch Lightning.\n\n{commands}")
        sys.exit(0 if argv else 2)
    if argv[0] not in COMMANDS:
        close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        if argv[0].startswith("-"):  # a flag before the command: `--config x.yaml` for `fit --config x.yaml`
            hint = f"a command comes first, then its flags (python -m mnist_lit fit {argv[0]} ...): "
        print(
            f"mnist_lit: error: unknown command {argv[0]!r}: {hint}choose from {', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        sys.exit(2)
    end_with_launcher()
    try:
        run(argv)
    except KeyboardInterrupt:  # Ctrl-C while importing, parsing or loading data; in training: faults.py
        sys.exit("mnist_lit: error: interrupted")


def run(argv: list[str]) -> None:
    """Runs ``argv``'s command, its errors as one line."""
    # A Ctrl-C that lands inside an import can leave a library half-imported, which then fails in a
    # traceback of its own (numpy's lazy attributes recurse without end): it waits for the imports.
    held = []
    previous = signal.signal(signal.SIGINT, lambda *_: held.append(True))
    try:
        if argv[0] in ("fit", "tune"):
            from mnist_lit.allocator import keep_freed_memory

            keep_freed_memory()  # before training allocates anything: faster CPU steps (allocator.py)
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        from mnist_lit.errors import UserError

        module = importlib.import_module(COMMANDS[argv[0]][0])
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        raise KeyboardInterrupt
    quiet()  # after the import: importing Lightning sets its loggers' levels
    try:
        module.main(argv)
    except (UserError, MisconfigurationException) as err:  # Lightning's: settings that do not fit together
        sys.exit(f"mnist_lit: error: {err}")
    # A DDP rank lost, ranks that stopped agreeing, a file or folder the system refused; else a bug: traceback
    except (RuntimeError, OSError) as err:
        from mnist_lit.messages import explained

        if (line := explained(err)) is None:
            raise
        sys.exit(f"mnist_lit: error: {line}")


if __name__ == "__main__":
    main()
    # Done: only the interpreter's shutdown is left, where a Ctrl-C would end it silently with status 130.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
