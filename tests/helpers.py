"""Helpers the tests share: tiny MNIST folders in the real IDX format, and ways to drive the real CLI."""

import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mnist_lit.cli import main

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Flags that shrink any run to a few seconds on two cores; tests add what they are about.
QUICK = [
    "--trainer.max_epochs=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file as in the MNIST release: magic (0, 0, dtype 0x08 = ubyte, ndim), big-endian sizes, data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def synthetic_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable stand-ins for digits: label k is a bright 8x8 patch at one of ten places, on faint noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n)
    images = rng.integers(0, 40, size=(n, 28, 28))
    for image, label in zip(images, labels, strict=True):
        row, col = divmod(int(label), 5)
        image[2 + row * 14 : 10 + row * 14, 1 + col * 5 : 9 + col * 5] = 255
    return images, labels


def write_mnist(root: Path, n_train: int = 600, n_test: int = 200) -> Path:
    """Write ``root/MNIST/raw/`` with the four files torchvision reads, and return ``root``."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = synthetic_digits(n, seed)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(idx_bytes(images))
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    return root


def cli(*args: str) -> None:
    """`python -m mnist_lit ARGS`, in-process."""
    main(list(args))


def last_checkpoint_of_fit(folder: Path, *args: str) -> dict:
    """Run `fit ARGS` in-process inside ``folder`` and return its last.ckpt, loaded."""
    from mnist_lit.runs import load_checkpoint

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        cli(*args)
    return load_checkpoint(folder / "lightning_logs/version_0/checkpoints/last.ckpt")


def fit_args(data_dir: Path, *extra: str) -> list[str]:
    return ["fit", f"--data.data_dir={data_dir}", "--data.val_size=100", *QUICK, *extra]


def subprocess_env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # The repository root, so that a subprocess can load test helpers (tests.pacing) as callbacks.
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def run_command(cwd: Path, *args: str, timeout: float = 600) -> str:
    """`python -m mnist_lit ARGS` in a subprocess inside ``cwd``; its stdout and stderr together.

    Fails the test, with the output's end, when the command fails or runs past ``timeout``.
    """
    cmd = [sys.executable, "-m", "mnist_lit", *args]
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            timeout=timeout,
        )  # fmt: skip
    except subprocess.TimeoutExpired as err:
        output = err.output.decode(errors="replace") if isinstance(err.output, bytes) else err.output or ""
        pytest.fail(f"{' '.join(args)} ran past {timeout} s:\n{output[-5000:]}")
    assert proc.returncode == 0, proc.stdout[-5000:]
    return proc.stdout


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until ``path`` exists, failing with the output if ``proc`` ends or ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)
