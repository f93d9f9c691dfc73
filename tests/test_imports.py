"""Each command imports only what it uses: start-up is most of what a user waits for on a short command.

Imports are process-wide, so each command runs in a fresh interpreter, which then lists its modules.
Compared with the floor (lightning.pytorch, torchvision, torchmetrics, which every command needs, and
which already bring matplotlib's core and PIL), none may add a package that another command needs.
"""

import json
import subprocess
import sys

import pytest

from tests.helpers import QUICK, subprocess_env

FLOOR = "import lightning.pytorch, torchvision, torchmetrics"
# Runs the real CLI, then prints every module the process holds (also after SystemExit: --help).
LIST_MODULES = """
import json, sys
try:
    {code}
finally:
    sys.stdout.flush()
    print("MODULES " + json.dumps(sorted(sys.modules)))
"""
# Packages (or parts) only some commands need: figures for test, ONNX for export, event-file reading for
# the figures tool and tests, optional extras of other branches.
ELSEWHERE = (
    "matplotlib",
    "onnx",
    "onnxscript",
    "onnxruntime",
    "optuna",
    "litserve",
    "tensorboard.backend.event_processing",
    "mnist_lit.export",
    "mnist_lit.stats",
)


def modules_after(code: str, cwd) -> set[str]:
    proc = subprocess.run(
        [sys.executable, "-c", LIST_MODULES.format(code=code)],
        cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    line = next((line for line in proc.stdout.splitlines() if line.startswith("MODULES ")), None)
    assert line is not None, proc.stdout[-2000:] + proc.stderr[-3000:]
    return set(json.loads(line.removeprefix("MODULES ")))


def added(modules: set[str], floor: set[str], packages: tuple[str, ...]) -> list[str]:
    """The modules of ``packages`` in ``modules`` that the floor did not already import."""
    return sorted(m for m in modules - floor if any(m == p or m.startswith(p + ".") for p in packages))


@pytest.fixture(scope="module")
def floor(tmp_path_factory) -> set[str]:
    return modules_after(FLOOR, tmp_path_factory.mktemp("floor"))


def cli_code(*args: str) -> str:
    return f"from mnist_lit.cli import main; main({list(args)!r})"


@pytest.mark.slow
@pytest.mark.parametrize("command", ["fit", "test"])
def test_help_imports_nothing_the_commands_do_not_need(floor, tmp_path, command):
    modules = modules_after(cli_code(command, "--help"), tmp_path)
    assert "mnist_lit.cli" in modules
    assert added(modules, floor, ELSEWHERE) == []


@pytest.mark.slow
def test_fit_then_test_import_only_what_each_uses(floor, tmp_path, mnist_dir):
    fit_args = ("fit", f"--data.data_dir={mnist_dir}", "--data.val_size=100", *QUICK)
    fit = modules_after(cli_code(*fit_args), tmp_path)
    assert (tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt").is_file()  # it really trained
    assert added(fit, floor, ELSEWHERE) == []
    test = modules_after(cli_code("test", *QUICK[1:]), tmp_path)
    assert (tmp_path / "lightning_logs/version_0/test_0").is_dir()
    # test draws its report with matplotlib (report.py); nothing else from the list.
    assert added(test, floor, tuple(p for p in ELSEWHERE if p != "matplotlib")) == []
