"""Fixtures: a tiny MNIST folder and one trained run for the session, and an empty working folder per test."""

import shutil
from pathlib import Path

import pytest

from tests.helpers import QUICK, cli, fit_args, write_mnist

# The session's one trained run: barely trained (2 steps, so the test set has mistakes and the one-cycle
# rate differs at each step), with normalization constants of its own (so they must be read back).
TRAINED_RUN = [
    "--trainer.max_epochs=2", "--trainer.limit_train_batches=1", "--trainer.log_every_n_steps=1",
    "--model.lr=0.002", "--model.lr_schedule=onecycle", "--data.mean=0.2", "--data.std=0.4",
]  # fmt: skip


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory) -> Path:
    """A tiny MNIST folder (600 train, 200 test images) shared by the whole session (read-only use)."""
    return write_mnist(tmp_path_factory.mktemp("mnist"))


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """Run the CLI inside an empty folder, as a user would, so lightning_logs/ lands there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, mnist_dir) -> Path:
    """A folder holding lightning_logs/version_0 (TRAINED_RUN) and a bare `test` of it (version_0/test_0).

    Shared by every test that needs a trained run: read it, never write into it (see ``trained_copy``).
    """
    folder = tmp_path_factory.mktemp("trained_run")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        cli(*fit_args(mnist_dir, *TRAINED_RUN))
        cli("test", *QUICK[1:])
    return folder


@pytest.fixture
def trained_copy(trained_run, tmp_path, monkeypatch) -> Path:
    """A copy of ``trained_run`` to work in (the current folder), for tests that write beside the run."""
    folder = tmp_path / "trained"
    shutil.copytree(trained_run, folder)
    monkeypatch.chdir(folder)
    return folder
