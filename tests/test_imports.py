"""The package's shape: no import cycle, and each command loads only what it uses.

A command's modules are listed by a fresh interpreter that runs it as a user does (``python -m mnist_lit``),
since imports are process-wide. Compared with the floor (lightning.pytorch, torchvision, torchmetrics,
which every command needs), none may add a package that another command needs, and a ``fit`` loads at
most FIT_BUDGET lines of this project's code (not counting comments, docstrings and blank lines).
"""

import ast
import io
import json
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

from tests.helpers import QUICK, subprocess_env

PACKAGE = Path(__file__).resolve().parents[1] / "mnist_lit"
FIT_BUDGET = 825
FLOOR = "import lightning.pytorch, torchvision, torchmetrics"
# Imported by Python at start-up when on the path: lists every module the process holds as it exits.
LIST_AT_EXIT = """
import atexit, json, os, sys

def _list_modules():
    with open(os.environ["MODULES_FILE"], "w") as f:
        json.dump({name: getattr(module, "__file__", None) for name, module in list(sys.modules.items())}, f)

atexit.register(_list_modules)
"""
# Packages (or parts) only some commands need: figures for test, ONNX for export, event-file reading for
# the figures tool and tests, optional extras of other commands.
ELSEWHERE = (
    "matplotlib",
    "onnx",
    "onnxscript",
    "onnxruntime",
    "optuna",
    "litserve",
    "tensorboard.backend.event_processing",
)
# The project's modules that a fit must not load: other commands' plug-ins, and the explanations of
# errors that did not happen.
NOT_FOR_FIT = (
    "report", "predict", "images", "tune", "export", "stats", "serve", "digit_api",
    "messages", "data_checks", "runs", "precision",
)  # fmt: skip


def project_imports(path: Path) -> set[str]:
    """The mnist_lit modules that ``path`` imports anywhere: at the top, or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("mnist_lit."))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mnist_lit"):
            if node.module == "mnist_lit":
                found.update(f"mnist_lit.{alias.name}" for alias in node.names)
            else:
                found.add(node.module)
    return found


def test_no_import_cycle_among_the_modules():
    graph = {f"mnist_lit.{p.stem}": project_imports(p) for p in PACKAGE.glob("*.py")}

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            pytest.fail("import cycle: " + " -> ".join([*path[path.index(module) :], module]))
        for imported in sorted(graph.get(module, ())):
            visit(imported, [*path, module])

    for module in graph:
        visit(module, [])


def code_lines(path: Path) -> int:
    """Lines of ``path`` that hold code: not comments, docstrings or blank lines."""
    source = path.read_text()
    docstrings = set()
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and body:
            first = body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.update(range(first.lineno, first.end_lineno + 1))
    lines = set()
    skipped = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in (*skipped, tokenize.ENDMARKER):
            lines.update(n for n in range(token.start[0], token.end[0] + 1) if n not in docstrings)
    return len(lines)


def test_code_lines_counts_code_only(tmp_path):
    module = tmp_path / "m.py"
    lines = ['"""Doc', 'string."""', "", "# a comment", "x = 1  # why", "", "def f():", '    """Doc."""']
    module.write_text("\n".join([*lines, "    return (x,", "        2)", ""]))
    assert code_lines(module) == 4  # x = 1, def f, and the two lines of its return


def modules_after(args: list[str], cwd: Path) -> dict[str, str | None]:
    """The modules (name: file) held at exit by ``python -m mnist_lit ARGS``, or by ``python -c FLOOR``."""
    hook = cwd / "startup_hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(LIST_AT_EXIT)
    env = subprocess_env()
    env.update(PYTHONPATH=f"{hook}:{env['PYTHONPATH']}", MODULES_FILE=str(hook / "modules.json"))
    command = ["-c", FLOOR] if args == ["FLOOR"] else ["-m", "mnist_lit", *args]
    proc = subprocess.run(
        [sys.executable, *command], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert (hook / "modules.json").is_file(), proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads((hook / "modules.json").read_text())


def added(modules: dict, floor: dict, packages: tuple[str, ...]) -> list[str]:
    """The modules of ``packages`` in ``modules`` that the floor did not already import."""
    return sorted(
        m for m in set(modules) - set(floor) if any(m == p or m.startswith(p + ".") for p in packages)
    )


def ours(modules: dict) -> dict[str, Path]:
    """The project's modules among ``modules`` (``__main__`` included), by the file they came from."""
    files = {name: Path(file).resolve() for name, file in modules.items() if file}
    return {name: file for name, file in files.items() if file.is_relative_to(PACKAGE)}


@pytest.fixture(scope="module")
def floor(tmp_path_factory) -> dict:
    return modules_after(["FLOOR"], tmp_path_factory.mktemp("floor"))


@pytest.mark.slow
def test_fit_then_test_load_only_what_each_uses(floor, tmp_path, mnist_dir):
    fit = modules_after(["fit", f"--data.data_dir={mnist_dir}", "--data.val_size=100", *QUICK], tmp_path)
    assert (tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt").is_file()  # it really trained
    assert added(fit, floor, ELSEWHERE) == []
    loaded = ours(fit)
    assert not [name for name in loaded if name.removeprefix("mnist_lit.") in NOT_FOR_FIT]
    lines = {file.name: code_lines(file) for file in set(loaded.values())}  # __main__ is __mp_main__ too
    assert sum(lines.values()) <= FIT_BUDGET, lines

    test = modules_after(["test", *QUICK[1:]], tmp_path)
    assert (tmp_path / "lightning_logs/version_0/test_0").is_dir()
    # test draws its report with matplotlib (report.py); nothing else from the list, and no tune.
    assert added(test, floor, tuple(p for p in ELSEWHERE if p != "matplotlib")) == []
    assert "mnist_lit.tune" not in test and "mnist_lit.report" in test


@pytest.mark.slow
def test_the_command_list_loads_no_command(floor, tmp_path):
    modules = modules_after(["--help"], tmp_path)
    assert "lightning.pytorch" not in modules and list(ours(modules)) in (
        ["__main__"],
        ["__main__", "mnist_lit"],
    )
