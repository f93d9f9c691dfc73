"""Helpers the tests share: tiny MNIST folders in the real IDX format, ways to drive the real CLI, and the
real server in a subprocess."""

import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from mnist_lit.__main__ import main

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Flags that shrink any run to a few seconds on two cores; tests add what they are about.
QUICK = [
    "--trainer.max_epochs=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]
# configs/best.yaml's weight averaging, with a decay short enough to show in a few steps of tiny data.
AVERAGED = [
    "--trainer.callbacks+=lightning.pytorch.callbacks.EMAWeightAveraging",
    "--trainer.callbacks.decay=0.9",
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
    """`python -m mnist_lit ARGS`, in-process: the flags arrive as a user's would, on the command line."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["mnist_lit", *args])
        main(list(args))


def parse_error_of(capsys, *args: str) -> str:
    """The one-line error a bad flag or config exits with (the parsers' path), and its exit status 2."""
    with pytest.MonkeyPatch.context() as patch, pytest.raises(SystemExit) as exit_info:
        patch.setattr(sys, "argv", ["mnist_lit"])  # else LightningCLI warns that pytest's argv is ignored
        cli(*args)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mnist_lit: error: "), lines
    return lines[0]


def error_of(*args: str) -> str:
    """The one-line error `python -m mnist_lit ARGS` exits with (UserError's path through main)."""
    with pytest.raises(SystemExit) as exit_info:
        cli(*args)
    message = str(exit_info.value.code)
    assert message.startswith("mnist_lit: error: ") and "\n" not in message, message
    return message


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


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc): torchrun starts its workers in sessions of their own."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def session_processes(session: int) -> list[int]:
    """The processes still alive in session ``session`` (one that Guarded or running_server started)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        if int(fields[3]) == session and fields[0] != "Z":  # fields: state, ppid, pgrp, session
            alive.append(int(stat.parent.name))
    return alive


def _signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)


class Guarded:
    """A subprocess (and every process it starts) that a test waits on for at most ``timeout`` seconds.

    Its output goes to files, so that several can run side by side without filling a pipe. If the time
    runs out, every process of the tree gets SIGABRT: PYTHONFAULTHANDLER makes each Python process (each
    DDP rank) print its stack, and the test fails with those stacks instead of hanging CI.
    """

    def __init__(self, cmd: list, cwd: Path, timeout: float = 300, env: dict | None = None) -> None:
        self.cmd = [str(part) for part in cmd]
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        # Open for the process's whole life; read and closed by wait_all.
        self.files = [tempfile.TemporaryFile("w+") for _ in range(2)]  # noqa: SIM115
        env = {**(env or subprocess_env()), "PYTHONFAULTHANDLER": "1"}
        self.proc = subprocess.Popen(
            self.cmd, cwd=cwd, env=env, stdout=self.files[0], stderr=self.files[1], text=True,
            start_new_session=True,
        )  # fmt: skip

    def output(self) -> tuple[str, str]:
        """stdout and stderr so far."""
        texts = []
        for file in self.files:
            file.seek(0)
            texts.append(file.read())
        return texts[0], texts[1]

    def wait(self) -> subprocess.CompletedProcess:
        return wait_all([self])[0]

    def abort(self) -> None:
        """SIGABRT to each process of the tree (each Python process prints its stack), then SIGKILL."""
        pids = [*reversed(descendants(self.proc.pid)), self.proc.pid]
        for pid in pids:  # one at a time, so that the stacks do not interleave
            _signal_all([pid], signal.SIGABRT)
            time.sleep(1)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=15)
        _signal_all(pids, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=15)

    def stacks(self) -> str:
        """stderr without faulthandler's list of extension modules, which says nothing about a hang."""
        lines = self.output()[1].splitlines()
        return "\n".join(line for line in lines if not line.startswith("Extension modules:"))


def wait_all(runs: list[Guarded]) -> list[subprocess.CompletedProcess]:
    """The finished runs; if any overruns its time, all are aborted and the test fails with their stacks."""
    for run in runs:
        try:
            run.proc.wait(timeout=max(0.0, run.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for other in runs:
                other.abort()
            report = "\n".join(f"$ {' '.join(other.cmd)}\n{other.stacks()[-15000:]}" for other in runs)
            pytest.fail(
                f"still running after {run.timeout:.0f} s; each process's stack:\n{report}", pytrace=False
            )
    results = []
    for run in runs:
        stdout, stderr = run.output()
        for file in run.files:
            file.close()
        results.append(subprocess.CompletedProcess(run.cmd, run.proc.returncode, stdout, stderr))
    return results


def run_guarded(cmd: list, cwd: Path, timeout: float = 300, env: dict | None = None):
    """Run ``cmd`` to its end, or fail the test with its processes' stacks after ``timeout`` seconds."""
    return Guarded(cmd, cwd, timeout, env).wait()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass(frozen=True)
class Server:
    url: str
    log: Path  # the server's stdout and stderr

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            return response.status == 200
    except OSError:  # refused while starting, or not ready until the inference worker is
        return False


@contextlib.contextmanager
def running_server(folder: Path, *args: str, timeout: float = 300) -> Iterator[Server]:
    """`python -m mnist_lit serve ARGS` in a subprocess inside ``folder``, on a free port, until /health
    says ok; stopped (with LitServe's worker processes) when the block ends, whatever happened."""
    port = free_port()
    log = folder / f"serve_{port}.log"
    command = [sys.executable, "-m", "mnist_lit", "serve", f"--port={port}", *args]
    with log.open("wb") as out:
        # A session of its own, so that the server and the workers it spawns are stopped together.
        process = subprocess.Popen(
            command, cwd=folder, env=subprocess_env(), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    server = Server(f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + timeout
        while not _healthy(server.url):
            if process.poll() is not None:
                pytest.fail(f"serve exited ({process.returncode}) before /health said ok:\n{server.output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"serve's /health did not say ok within {timeout} s:\n{server.output()}")
            time.sleep(0.5)
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        finally:
            with contextlib.suppress(ProcessLookupError):  # workers that outlived the main process
                os.killpg(process.pid, signal.SIGKILL)


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


def run_state(run: Path) -> dict[str, bytes]:
    """Every file of a run folder and its contents."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
