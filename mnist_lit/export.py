"""``python -m mnist_lit export``: the trained network as one file that runs without this project.

The exported model takes what an application has, float pixels in [0, 1] of shape (N, 1, 28, 28) with
any N, and returns the 10 logits: the normalization training used (the checkpoint's own ``--data.mean``
and ``--data.std``) is built in, so nobody has to copy the constants.
"""

import importlib.util
import os
import warnings
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from mnist_lit.data import MNIST_MEAN, MNIST_STD
from mnist_lit.errors import UserError
from mnist_lit.messages import flag_error
from mnist_lit.model import ConvNet, MNISTClassifier
from mnist_lit.runs import (
    check_checkpoint_fits,
    check_writable,
    last_of_newest_run,
    load_checkpoint,
    newest_run,
)

SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt"}  # the default output's
# The names each format's files go by: an --output with the other format's is refused.
KNOWN_SUFFIXES = {"onnx": (".onnx",), "torchscript": (".pt", ".pth", ".ts")}
NAMES = {"onnx": "an ONNX", "torchscript": "a TorchScript"}


class PixelsToLogits(nn.Module):
    """The trained network with training's normalization in front: pixels in [0, 1] -> logits (N, 10)."""

    def __init__(self, net: nn.Module, mean: float, std: float) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean))
        self.register_buffer("std", torch.tensor(std))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net((pixels - self.mean) / self.std)


# Where the networks a checkpoint may name are defined (the seed's, the lessons', torch's own layers).
TRUSTED_NETWORK_MODULES = ("mnist_lit.", "torch.nn.")


def network(path: Path, spec: dict | None) -> nn.Module:
    """The network a checkpoint's ``hyper_parameters["net"]`` names ({class_path, init_args}; None: the seed's
    ConvNet), built fresh; UserError when it names no network class that can be imported here."""
    if spec is None:
        return ConvNet()
    class_path = str(spec.get("class_path"))
    module, _, name = class_path.rpartition(".")
    if not module.startswith(TRUSTED_NETWORK_MODULES):
        # A checkpoint is data: it must not choose which code is imported and run here.
        raise UserError(
            f"{path} names the network {class_path}: only networks defined in "
            f"{' or '.join(m.rstrip('.') for m in TRUSTED_NETWORK_MODULES)} are rebuilt from a checkpoint"
        )
    try:
        net_class = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        net_class = None
    if not (isinstance(net_class, type) and issubclass(net_class, nn.Module)):
        raise UserError(
            f"{path} was trained with the network {class_path}, which cannot be imported here as a "
            "torch.nn.Module: install the code that defines it"
        )
    return net_class(**spec.get("init_args", {}))


def from_checkpoint(path: Path) -> PixelsToLogits:
    """The network and normalization a ``fit`` checkpoint holds, in eval mode (BatchNorm's running stats)."""
    state = load_checkpoint(path)
    net = network(path, state.get("hyper_parameters", {}).get("net"))
    model = MNISTClassifier(channels_last=False)
    model.net = net  # the checkpoint's network in the LightningModule that saved it: the same keys
    check_checkpoint_fits(state, path, model)
    # Lightning saves the datamodule's init arguments next to the model's; a checkpoint made without the
    # datamodule was trained on MNIST's own constants, the defaults.
    data = {"mean": MNIST_MEAN, "std": MNIST_STD, **state.get("datamodule_hyper_parameters", {})}
    net.load_state_dict(
        {k.removeprefix("net."): v for k, v in state["state_dict"].items() if k.startswith("net.")}
    )
    return PixelsToLogits(net, float(data["mean"]), float(data["std"])).eval()


def check_suffix(target: Path, format: str) -> None:
    """A flag error when ``target``'s name says the other format (a TorchScript file named .onnx)."""
    for other, suffixes in KNOWN_SUFFIXES.items():
        if other != format and target.suffix.lower() in suffixes:
            flag_error(
                f"--output {target} names {NAMES[other]} file, but --format is {format}: name it "
                f"{target.with_suffix(SUFFIXES[format]).name}, or pass --format {other}"
            )


def checkpoint_to_use(ckpt_path: str | None, command: str) -> Path:
    """``--ckpt_path`` as export and serve take it: a file; ``last``, the newest run's last.ckpt (as for
    test); or, not given, the newest run's best checkpoint."""
    if ckpt_path == "last":
        return Path(last_of_newest_run(Path("lightning_logs"), command))
    if ckpt_path is not None:
        return Path(ckpt_path)
    checkpoint, score = newest_run(Path("lightning_logs")).best_checkpoint()
    print(f"{command}: using {checkpoint}" + ("" if score is None else f" (val/acc {score:.4f})"))
    return checkpoint


def export(
    format: Literal["onnx", "torchscript"] = "onnx",
    output: str | None = None,
    ckpt_path: str | None = None,
    overwrite: bool = False,
) -> None:
    """Export a trained model that maps pixels in [0, 1], shape (N, 1, 28, 28), to the 10 logits.

    Args:
        format: ``onnx`` (for onnxruntime and other ONNX runtimes) or ``torchscript`` (``torch.jit.load``;
            deprecated by PyTorch in favour of ``torch.export``, kept for libtorch/mobile users).
        output: file to write; default ``model.onnx`` or ``model.pt`` in the current folder. A name that
            says the other format (``.onnx`` for torchscript; ``.pt``, ``.pth``, ``.ts`` for onnx) is refused.
        ckpt_path: checkpoint to export, or ``last`` (the newest run's last.ckpt); default the best
            checkpoint of the newest run in ./lightning_logs.
        overwrite: replace ``output`` if it exists (otherwise an existing file is an error).
    """
    target = Path(output or f"model{SUFFIXES[format]}")
    check_suffix(target, format)
    # The checkpoint before the output: a missing or bad one is the error to fix first.
    checkpoint = checkpoint_to_use(ckpt_path, "export")
    model = from_checkpoint(checkpoint)
    if target.is_dir():  # never replaced, --overwrite or not
        raise UserError(f"--output {target} is a folder: give the name of a file to write")
    if target.exists() and not overwrite:
        raise UserError(
            f"{target} already exists: choose another --output, or pass --overwrite true to replace it"
        )
    if format == "onnx" and not all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript")):
        raise UserError(
            "--format onnx needs the onnx and onnxscript packages: pip install 'mnist_lit[export]'"
        )
    example = torch.rand(2, 1, 28, 28)  # batch 2, not 1, so that the batch size is not taken as a constant
    check_writable(target, "--output")
    # Written next to the target and renamed when complete: a failed export never leaves half a file.
    partial = target.with_name(f".{target.name}.partial")
    try:
        with torch.no_grad():
            if format == "onnx":
                torch.onnx.export(
                    model, (example,), partial, input_names=["pixels"], output_names=["logits"],
                    dynamic_shapes={"pixels": {0: torch.export.Dim("batch")}}, external_data=False,
                    verbose=False,
                )  # fmt: skip
            else:
                with warnings.catch_warnings():  # the user chose TorchScript, which --help says is deprecated
                    warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", FutureWarning)
                    torch.jit.trace(model, example).save(str(partial))
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)  # left only when writing or renaming failed (a full disk...)
    print(
        f"Exported {checkpoint} to {target} ({format}): input pixels (N, 1, 28, 28) in [0, 1], output 10 "
        f"logits; normalization built in (mean {model.mean.item():.4f}, std {model.std.item():.4f})"
    )


def main(argv: list[str]) -> None:
    """``python -m mnist_lit export ARGS`` (routed here by __main__.py)."""
    from mnist_lit.cli import run_function

    run_function(export, argv)
