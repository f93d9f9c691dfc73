"""Fixtures: a tiny MNIST folder for the session, and an empty working folder per test."""

from pathlib import Path

import pytest

from tests.helpers import write_mnist


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory) -> Path:
    """A tiny MNIST folder (600 train, 200 test images) shared by the whole session (read-only use)."""
    return write_mnist(tmp_path_factory.mktemp("mnist"))


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """Run the CLI inside an empty folder, as a user would, so lightning_logs/ lands there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
