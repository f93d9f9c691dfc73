"""`tune`: real Optuna studies of real fits on tiny data: pruning, best.yaml, bad input, Ctrl-C, dead and
parallel workers, a real PostgreSQL server."""

import contextlib
import glob
import io
import os
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.storages import RetryHeartbeatStaleTrialCallback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mnist_lit.runs import load_checkpoint
from tests.helpers import CONFIGS, Guarded, cli, error_of, free_port, parse_error_of, run_guarded, wait_all

# 500 training images in batches of 50, half of them a trial (the search's budget flag): 5 steps an epoch.
TRIAL_FLAGS = [
    "--data.val_size=100",
    "--data.batch_size=50",
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=0.5",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]
NO_PRUNING = {"class_path": "optuna.pruners.NopPruner"}
SEARCH = {
    "params": {"model.lr": {"low": 1e-7, "high": 0.05, "log": True}, "model.lr_schedule": ["onecycle"]},
    # Prune from the first epoch on, once two trials have finished.
    "pruner": {"class_path": "optuna.pruners.MedianPruner", "init_args": {"n_startup_trials": 2}},
    # Two learning rates that learn, then one that cannot: it must be pruned.
    "enqueue": [{"model.lr": 0.01}, {"model.lr": 0.005}, {"model.lr": 1e-7}],
}
TIMEOUT = 600


def write_search(folder: Path, search: dict = SEARCH) -> Path:
    path = folder / "search.yaml"
    path.write_text(yaml.safe_dump(search))
    return path


def tune_args(data_dir, search: Path, n_trials: int, *extra: str) -> list[str]:
    data = f"--data.data_dir={data_dir}"
    return ["tune", f"--search={search}", f"--n_trials={n_trials}", data, *TRIAL_FLAGS, *extra]


def tune_in(folder: Path, *args: str) -> str:
    """`python -m mnist_lit tune ARGS` in-process inside ``folder``; what it printed."""
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out):
        patch.chdir(folder)
        cli(*args)
    return out.getvalue()


def tune_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "mnist_lit", *args]


def trials_of(storage, name: str = "search") -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=storage).get_trials()


def finished(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return [t for t in trials if t.state in states]


def best_trial(root: Path) -> optuna.trial.FrozenTrial:
    return optuna.load_study(
        study_name="search", storage=f"sqlite:///{root / 'tune/search/study.db'}"
    ).best_trial


def retried_from(trial: optuna.trial.FrozenTrial) -> int | None:
    with pytest.warns(optuna.exceptions.ExperimentalWarning):
        return RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)


def wait_for_file(path: Path, run: Guarded, timeout: float = TIMEOUT) -> None:
    """Wait until ``path`` exists; fail with the run's output if it ends or ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if run.proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{path} never appeared:\n{''.join(run.output())[-5000:]}", pytrace=False)
        time.sleep(0.05)


@pytest.fixture(scope="module")
def study(tmp_path_factory, mnist_dir) -> tuple[Path, str]:
    """Three one-epoch trials in-process, the third hopeless; on half the batches (a budget flag)."""
    root = tmp_path_factory.mktemp("study")
    output = tune_in(root, *tune_args(mnist_dir, write_search(root), 3))
    return root, output


def test_study_prunes_the_hopeless_trial_and_keeps_every_trial_as_a_run(study):
    root, output = study
    folder = root / "tune/search"
    trials = trials_of(f"sqlite:///{folder / 'study.db'}")
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "PRUNED"], output
    assert trials[2].params["model.lr"] == pytest.approx(1e-7)
    assert "trial 2: pruned at epoch 0" in output
    # Each trial is a fit run of its own under the study's folder, in TensorBoard with an HPARAMS row.
    for t in trials:
        run = folder / "trials" / f"trial_{t.number:03d}"
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["model"]["lr"] == pytest.approx(t.params["model.lr"])
        accumulator = EventAccumulator(str(run))
        accumulator.Reload()
        assert "_hparams_/session_start_info" in accumulator.PluginTagToContent("hparams")
    assert len(list((folder / "trials/trial_000/checkpoints").glob("*.ckpt"))) == 2
    for plot in ("history.png", "importances.png", "intermediate.png"):
        assert (folder / plot).read_bytes()[:4] == b"\x89PNG", plot
    assert "best trials of 'search'" in output and f"Best recipe: {Path('tune/search/best.yaml')}" in output


def test_best_yaml_is_the_recipe_and_the_searched_values_without_the_search_budget(study, mnist_dir):
    root, _ = study
    text = (root / "tune/search/best.yaml").read_text()
    best = yaml.safe_load(text)
    params = best_trial(root).params
    assert best["model"] == {"lr": params["model.lr"], "lr_schedule": "onecycle"}
    assert best["data"] == {"batch_size": 50, "val_size": 100} and best["trainer"] == {"max_epochs": 1}
    assert best["seed_everything"] == 42
    # The search's own settings are named in the comment at the top, not set.
    comments = [line for line in text.splitlines() if line.startswith("#")]
    for setting in (
        f"--data.data_dir={mnist_dir}",
        "--trainer.limit_train_batches=0.5",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ):
        assert f"#   {setting}" in comments, text


def test_best_yaml_reproduces_the_best_trial_with_fit(study, tmp_path, monkeypatch):
    root, _ = study
    folder = root / "tune/search"
    text = (folder / "best.yaml").read_text()
    search_flags = [line[4:] for line in text.splitlines() if line.startswith("#   ")]
    monkeypatch.chdir(tmp_path)
    cli("fit", f"--config={folder / 'best.yaml'}", *search_flags)
    refit = tmp_path / "lightning_logs/version_0"
    best = best_trial(root)
    assert yaml.safe_load((refit / "config.yaml").read_text())["model"]["lr"] == best.params["model.lr"]
    # Same seed, same recipe, same budget, on CPU: the same weights as the trial's, bit for bit.
    run = folder / "trials" / f"trial_{best.number:03d}"
    trial = load_checkpoint(run / "checkpoints/last.ckpt")["state_dict"]
    again = load_checkpoint(refit / "checkpoints/last.ckpt")["state_dict"]
    for key, value in trial.items():
        torch.testing.assert_close(again[key], value, rtol=0, atol=0, msg=key)
    # A trial logs what a fit logs (the same callbacks).
    tags = [
        EventAccumulator(str(run)).Reload().Tags()["scalars"] for run in (folder / "trials/trial_000", refit)
    ]
    assert set(tags[0]) == set(tags[1]) and "val/acc" in tags[0]


def test_the_printed_command_trains_the_best_recipe_on_the_studys_data_as_is(study, mnist_dir, tmp_path):
    # Copied from the last lines as it is: with the study's data folder, or fit would look for MNIST in
    # ./data and, offline, fail.
    root, output = study
    hint = next(line for line in output.splitlines() if line.startswith("Best recipe: "))
    command = shlex.split(hint.split("): ", 1)[1])
    best_yaml = str(Path("tune/search/best.yaml"))
    assert command == [
        "python",
        "-m",
        "mnist_lit",
        "fit",
        "--config",
        best_yaml,
        f"--data.data_dir={mnist_dir}",
    ]
    assert f"# {shlex.join(command)}" in (root / best_yaml).read_text().splitlines()
    (tmp_path / "tune").symlink_to(root / "tune")  # the command's relative path, from a folder of its own
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        cli(*command[3:])
    assert (tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt").is_file()


def test_rerun_of_a_finished_study_runs_nothing_more(study):
    root, _ = study
    output = tune_in(root, *tune_args("unused", root / "search.yaml", 3))
    assert "3 of 3 trials finished" in output and "trial 3" not in output
    assert len(trials_of(f"sqlite:///{root / 'tune/search/study.db'}")) == 3


@pytest.mark.parametrize(
    ("search", "expected"),
    [
        ({"params": {"model.learning_rate": [0.1]}}, "unknown parameter 'model.learning_rate'"),
        ({"params": {"lr": [0.1]}}, "unknown parameter 'lr' (did you mean model.lr?)"),
        ({"params": {"model.lr_schedul": ["onecycle"]}}, "(did you mean model.lr_schedule?)"),
        (
            {"params": {"model.lr": {"low": 0.1, "high": 0.01}}},
            "model.lr: `low <= high` must hold, but got (low=0.1, high=0.01)",
        ),
        ({"params": {"model.lr": {"low": 0, "high": 0.1, "log": True}}}, "model.lr: "),
        ({"params": {"model.lr_schedule": []}}, "model.lr_schedule: give a non-empty list of choices"),
        ({"params": {"model.label_smoothing": [0.1, 1.5]}}, "model.label_smoothing: 1.5 is refused by fit"),
        ({"params": {"model.lr": [0.1]}, "samplers": {}}, "unknown key 'samplers'"),
        ({"params": {"model.lr": [0.1]}, "pruner": "median"}, "pruner: give {class_path: optuna.pruners."),
        ({"params": {"model.lr": [0.1]}, "pruner": {"class_path": "optuna.pruners.Nope"}}, "no class"),
        (
            {"params": {"model.lr": [0.1]}, "sampler": {"class_path": "optuna.pruners.NopPruner"}},
            "sampler: optuna.pruners.NopPruner is not a BaseSampler",
        ),
        (
            {
                "params": {"model.lr": [0.1]},
                "sampler": {"class_path": "optuna.samplers.TPESampler", "init_args": {"n_startup": 3}},
            },
            "sampler: optuna.samplers.TPESampler: ",
        ),
        ({"params": {"model.lr": [0.1]}, "enqueue": [{"model.lrr": 0.1}]}, "unknown parameter 'model.lrr'"),
    ],
)
def test_bad_search_file_is_one_line_and_the_study_is_untouched(study, search, expected):
    root, _ = study
    database = root / "tune/search/study.db"
    before = database.read_bytes()
    bad = root / "bad" / "search.yaml"
    bad.parent.mkdir(exist_ok=True)
    bad.write_text(yaml.safe_dump(search))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        message = error_of(*tune_args("unused", bad, 4, "--study_name=search"))
    assert str(bad) in message and expected in message
    assert database.read_bytes() == before


def test_bad_flags_search_file_and_storage_are_one_line(workdir, mnist_dir, capsys):
    assert "--search nowhere.yaml: file does not exist" in error_of(*tune_args(mnist_dir, "nowhere.yaml", 2))
    # tune's own flags fail as fit's do: one line, exit status 2
    n_trials = parse_error_of(capsys, *tune_args(mnist_dir, "s.yaml", 0))
    assert "--n_trials: expected a positive integer, got '0'" in n_trials
    mistyped = parse_error_of(capsys, *tune_args(mnist_dir, "s.yaml", 2), "--n_trial", "3")
    assert mistyped == "mnist_lit: error: unrecognized arguments: --n_trial: did you mean --n_trials?"
    no_search = parse_error_of(capsys, "tune", f"--data.data_dir={mnist_dir}")
    assert "the following arguments are required: --search" in no_search
    (workdir / "broken.yaml").write_text("params: {model.lr: [0.1]\n")
    assert "--search broken.yaml: not valid YAML" in error_of(*tune_args(mnist_dir, "broken.yaml", 2))
    search = write_search(workdir)

    def storage_error(url: str) -> str:
        return error_of(*tune_args(mnist_dir, search, 2, f"--storage={url}"))

    assert "--storage sqlite:////no/such/folder/x.db cannot be opened:" in storage_error(
        "sqlite:////no/such/folder/x.db"
    )
    assert "--storage nosuch://host/db cannot be opened:" in storage_error("nosuch://host/db")
    assert "--storage no/such/study.log: folder no/such does not exist" in storage_error("no/such/study.log")
    # A link to a file in a folder that is not there: that folder is named, not the link's.
    os.symlink(Path("nowhere/j.log"), "j.log")
    missing = workdir.resolve() / "nowhere"
    assert storage_error("j.log") == f"mnist_lit: error: --storage j.log: folder {missing} does not exist"
    # PostgreSQL's driver is installed with the tune extra; the password is never shown.
    port = free_port()  # nothing listens there
    message = storage_error(f"postgresql://mnist:s3cret-pw@127.0.0.1:{port}/optuna")
    assert f"--storage postgresql://mnist:***@127.0.0.1:{port}/optuna cannot be opened: " in message
    assert "s3cret-pw" not in message and "No module" not in message
    message = storage_error("mysql://mnist:s3cret-pw@127.0.0.1/optuna")  # mysqlclient: not installed here
    assert "--storage mysql://mnist:***@127.0.0.1/optuna: no database driver for mysql://" in message
    assert "pip install pymysql and use mysql+pymysql://" in message and "s3cret-pw" not in message
    assert not (workdir / "tune").exists()  # no study folder is made for a storage that cannot be opened
    assert not missing.exists()


def test_only_the_urls_password_is_hidden_when_it_is_a_common_word(workdir, mnist_dir):
    # A real connection that fails (nothing listens on the port): the driver's words keep every "p".
    search = write_search(workdir)
    port = free_port()
    message = error_of(
        *tune_args(mnist_dir, search, 2, f"--storage=postgresql://mnist:p@127.0.0.1:{port}/optuna")
    )
    shown = f"--storage postgresql://mnist:***@127.0.0.1:{port}/optuna cannot be opened: "
    assert shown in message and message.count("***") == 1, message
    assert f"port {port} failed" in message.split(shown, 1)[1], message
    # A URL SQLAlchemy cannot read is shown with its password hidden too.
    message = error_of(
        *tune_args(mnist_dir, search, 2, "--storage=postgresql://mnist:s3cret-pw@127.0.0.1:x/db")
    )
    assert "--storage postgresql://mnist:***@127.0.0.1:x/db cannot be opened: " in message, message
    assert "s3cret-pw" not in message
    # A password given as a query parameter (libpq's password=) is hidden as well.
    message = error_of(
        *tune_args(
            mnist_dir, search, 2, f"--storage=postgresql+psycopg://u@127.0.0.1:{port}/db?password=s3cretQ"
        )
    )
    shown = f"--storage postgresql+psycopg://u@127.0.0.1:{port}/db?password=*** cannot be opened: "
    assert shown in message and "s3cretQ" not in message, message
    # A password whose @ and : were not percent-encoded: all of it hidden, and what to do said.
    message = error_of(*tune_args(mnist_dir, search, 2, "--storage=postgresql://u:s3c@r:3tQ@127.0.0.1/db"))
    assert message.startswith(
        "mnist_lit: error: --storage postgresql://u:***@127.0.0.1/db: the URL holds more than one @ before "
        "its path: percent-encode an @ (%40)"
    ), message
    assert "s3c" not in message and "3tQ" not in message
    message = error_of(*tune_args(mnist_dir, search, 2, "--storage=postgres://u:s3cretQ@127.0.0.1/db"))
    assert message == (
        "mnist_lit: error: --storage postgres://u:***@127.0.0.1/db: SQLAlchemy calls PostgreSQL "
        "postgresql://, not postgres://"
    )
    assert not (workdir / "tune").exists()


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://", "sqlite:///", "sqlite:///:memory:", "sqlite+pysqlite:///:memory:",
        "sqlite:///file::memory:?cache=shared&uri=true",
    ],
)  # fmt: skip
def test_an_in_memory_storage_is_refused_as_a_bad_flag(workdir, mnist_dir, capsys, url):
    line = parse_error_of(capsys, *tune_args(mnist_dir, write_search(workdir), 2, f"--storage={url}"))
    assert f"argument --storage: {url} is an in-memory database" in line
    assert "a search's storage must be kept and shared" in line
    assert sorted(p.name for p in workdir.iterdir()) == ["search.yaml"]


def sqlite_file(path: Path) -> Path:
    """A real SQLite database of another program, under a name that looks like a journal's."""
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("CREATE TABLE notes (text TEXT)")
        db.execute("INSERT INTO notes VALUES ('keep me')")
    return path


# Files that are not Optuna journals, as a user may point --storage at them: a name and its bytes.
NOT_JOURNALS = {
    "text": ("notes.log", b"remember the milk"),  # one line: Optuna would append to it before reading it
    "csv": ("runs.csv", b"trial,acc\n0,0.99\n1,0.98\n"),
    "json": ("data.log", b'{"trial": 0, "acc": 0.99}\n'),  # JSON lines, but not Optuna's
    "sqlite": ("x.log", None),  # a real SQLite database (sqlite_file)
}
# Files whose first line is a journal entry, but that Optuna cannot replay: a name, its bytes, the reason.
STUDY_ENTRY = b'{"op_code":0,"worker_id":"w","study_name":"other","directions":[1]}\n'
UNREADABLE_JOURNALS = {
    "garbage last": ("j.log", STUDY_ENTRY + b"GARBAGE LINE\n", "line 2 is not JSON"),
    "garbage within": ("j.log", STUDY_ENTRY + b"GARBAGE LINE\n" + STUDY_ENTRY, "line 2 is not JSON"),
    "no study name": ("j.log", b'{"op_code":0}\n', "Optuna: KeyError: 'study_name'"),
    "unknown op_code": ("j.log", b'{"op_code":"hello"}\n', "Optuna: AssertionError: "),
}


@pytest.mark.parametrize("kind", [*NOT_JOURNALS, *UNREADABLE_JOURNALS])
def test_a_storage_file_that_is_not_a_journal_is_refused_and_left_as_it_was(workdir, mnist_dir, kind):
    name, contents, *reason = NOT_JOURNALS.get(kind) or UNREADABLE_JOURNALS[kind]
    path = workdir / name
    if contents is None:
        sqlite_file(path)
    else:
        path.write_bytes(contents)
    before = path.read_bytes()
    message = error_of(*tune_args(mnist_dir, write_search(workdir), 2, f"--storage={path.name}"))
    if reason:
        assert message.startswith(
            f"mnist_lit: error: --storage {path.name}: not a readable Optuna journal ({reason[0]}"
        ), message
    else:
        assert message == (
            f"mnist_lit: error: --storage {path.name}: not an Optuna journal file (its first line is not a "
            "journal entry); give a new file's path, a database URL, or the journal of the study"
        )
    assert path.read_bytes() == before
    assert sorted(p.name for p in workdir.iterdir()) == sorted([path.name, "search.yaml"])


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_storage_that_is_not_a_regular_file_is_refused_without_waiting(tmp_path, mnist_dir, kind):
    # In a process of its own, guarded: a FIFO nobody writes to blocks whoever reads it.
    if kind == "fifo":
        os.mkfifo(tmp_path / "study.log")
    storage = "study.log" if kind == "fifo" else os.devnull
    search = write_search(tmp_path)
    proc = run_guarded(
        tune_command(*tune_args(mnist_dir, search, 2, f"--storage={storage}")), tmp_path, TIMEOUT
    )
    assert proc.returncode != 0 and proc.stderr.strip().splitlines() == [
        f"mnist_lit: error: --storage {storage}: not a regular file (a device, FIFO or socket): give a "
        "journal file's path"
    ], proc.stderr[-5000:]
    expected = ["search.yaml", "study.log"] if kind == "fifo" else ["search.yaml"]
    assert sorted(p.name for p in tmp_path.iterdir()) == expected  # no tune/search/ folder


def test_the_study_folder_of_a_study_in_another_storage_is_refused_before_any_trial(study):
    root, _ = study
    folder = root / "tune/search"
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        message = error_of(*tune_args("unused", root / "search.yaml", 4, "--storage=other.log"))
    db = Path("tune/search/study.db")
    assert message == (
        f"mnist_lit: error: {Path('tune/search')}/trials/ holds trial_000, trial_001, trial_002 of another "
        f"study 'search', not in other.log: give another --study_name, or --storage sqlite:///{db}"
    )
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before  # no other.log, no trial folder
    assert len(trials_of(f"sqlite:///{folder / 'study.db'}")) == 3


# ---------------------------------------------------------------------------- processes (slow)


@pytest.mark.slow
def test_bad_input_from_the_shell_is_one_line_without_traceback(tmp_path, mnist_dir):
    search = write_search(tmp_path, {"params": {"model.lr": {"low": 0, "high": 0.1, "log": True}}})
    proc = run_guarded(tune_command(*tune_args(mnist_dir, search, 2)), tmp_path)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mnist_lit: error: {search}: model.lr:"), proc.stderr


@pytest.mark.slow
def test_two_workers_on_one_machine_share_the_study(tmp_path, mnist_dir):
    """README's several workers: the same command twice, as users run it (progress bar and summary on)."""
    search = write_search(tmp_path, {"params": SEARCH["params"], "pruner": NO_PRUNING})
    args = [*tune_args(mnist_dir, search, 4), "--trainer.enable_progress_bar=true"]
    runs = wait_all([Guarded(tune_command(*args), tmp_path, TIMEOUT) for _ in range(2)])
    for run in runs:
        assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr[-5000:]
    trials = trials_of(f"sqlite:///{tmp_path / 'tune/search/study.db'}")
    done = sorted(t.number for t in finished(trials))
    assert len(done) == 4, [(t.number, t.state.name) for t in trials]
    runs_on_disk = sorted(p.name for p in (tmp_path / "tune/search/trials").glob("trial_*"))
    assert runs_on_disk == [f"trial_{n:03d}" for n in done]  # each trial ran once
    assert "Epoch 0/0" in "".join(run.stdout + run.stderr for run in runs)


def ctrl_c_when_marked(args: list[str], marker: Path, folder: Path) -> str:
    """`tune ARGS` in ``folder``, Ctrl-C once ``marker`` appears; checks the one line and that trial 0 is
    queued again, and returns the study's storage URL."""
    run = Guarded(tune_command(*args), folder, TIMEOUT)
    wait_for_file(marker, run)
    run.proc.send_signal(signal.SIGINT)
    stopped = run.wait()
    # Exit status 1, as a fit stopped by Ctrl-C exits (cli.MNISTCLI.fit, __main__.main).
    assert stopped.returncode == 1 and "Traceback" not in stopped.stderr, stopped.stderr[-5000:]
    errors = [line for line in stopped.stderr.splitlines() if line.startswith("mnist_lit: error:")]
    assert errors == [
        "mnist_lit: error: interrupted: trial 0 stopped by a signal; it is queued to run again: run the same "
        "command again to go on"
    ], stopped.stderr[-5000:]
    storage = f"sqlite:///{folder / 'tune/search/study.db'}"
    assert [t.state.name for t in trials_of(storage)] == ["FAIL", "WAITING"]
    return storage


@pytest.mark.slow
def test_ctrl_c_mid_trial_then_the_same_command_finishes_the_study(tmp_path, mnist_dir):
    search = write_search(tmp_path, {"params": SEARCH["params"], "pruner": NO_PRUNING})
    marker = tmp_path / "epoch1-under-way"
    # 10 steps an epoch, paced from epoch 1 on so that the signal lands inside it.
    args = [
        *tune_args(mnist_dir, search, 2), "--trainer.limit_train_batches=1.0", "--trainer.max_epochs=2",
        "--trainer.callbacks+=tests.pacing.Pace", f"--trainer.callbacks.marker={marker}",
        "--trainer.callbacks.ms=200",
    ]  # fmt: skip
    storage = ctrl_c_when_marked(args, marker, tmp_path)
    marker.unlink()
    rerun = run_guarded(tune_command(*args), tmp_path, TIMEOUT)
    assert rerun.returncode == 0, rerun.stderr[-5000:]
    trials = trials_of(storage)
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert retried_from(trials[1]) == 0 and trials[1].params == trials[0].params


@pytest.mark.slow
def test_ctrl_c_before_a_trial_trains_queues_it_again(tmp_path, mnist_dir):
    # Lightning ends a fit that Ctrl-C stops before training (here in the sanity check) with exit(1).
    search = write_search(tmp_path, {"params": SEARCH["params"], "pruner": NO_PRUNING})
    marker = tmp_path / "sanity-check-under-way"
    args = [
        *tune_args(mnist_dir, search, 2), "--trainer.callbacks+=tests.pacing.Moment",
        f"--trainer.callbacks.marker={marker}", "--trainer.callbacks.phase=sanity_check",
        "--trainer.callbacks.hold=120",
    ]  # fmt: skip
    ctrl_c_when_marked(args, marker, tmp_path)
    assert not (tmp_path / "tune/search/trials/trial_000").exists()  # nothing trained: nothing to keep


@pytest.mark.slow
def test_trial_of_a_killed_worker_runs_again(workdir, mnist_dir, monkeypatch):
    search = write_search(workdir, {"params": SEARCH["params"], "pruner": NO_PRUNING})
    marker = workdir / "epoch1-under-way"
    paced = [
        "--trainer.max_epochs=2",
        "--trainer.callbacks+=tests.pacing.Pace",
        f"--trainer.callbacks.marker={marker}",
    ]
    worker = Guarded(tune_command(*tune_args(mnist_dir, search, 1), *paced), workdir, TIMEOUT)
    wait_for_file(marker, worker)
    os.kill(worker.proc.pid, signal.SIGKILL)  # no handler runs: the trial is left RUNNING
    worker.wait()
    storage = f"sqlite:///{workdir / 'tune/search/study.db'}"
    assert [t.state.name for t in trials_of(storage)] == ["RUNNING"]
    # Its heartbeat (every 30 s) is now older than this worker's grace period of 2 x 1 s: it is dead.
    monkeypatch.setattr("mnist_lit.tune.HEARTBEAT_S", 1)
    time.sleep(2.5)
    output = tune_in(workdir, *tune_args(mnist_dir, search, 1))
    trials = trials_of(storage)
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"], output
    assert retried_from(trials[1]) == 0 and trials[1].params == trials[0].params


@pytest.mark.slow
def test_other_commands_do_not_import_optuna(tmp_path):
    code = (
        "import runpy, sys\nsys.argv = ['mnist_lit', 'fit', '--print_config']\n"
        "try:\n    runpy.run_module('mnist_lit', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "print('optuna' in sys.modules)"
    )
    proc = run_guarded([sys.executable, "-c", code], tmp_path)
    assert proc.stdout.strip().splitlines()[-1] == "False", proc.stdout[-2000:] + proc.stderr[-2000:]


# ------------------------------------------------------------------------------------- PostgreSQL


def postgres_bin() -> Path:
    """The folder of Debian's PostgreSQL programs (on PATH, or /usr/lib/postgresql/N/bin); else skip."""
    for name in ("initdb", "pg_ctl", "createdb"):
        if shutil.which(name):
            continue
        found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
        if not found:
            pytest.skip(f"PostgreSQL's {name} is not installed (.ci/postgres.sh installs it)")
    initdb = shutil.which("initdb") or sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))[-1]
    return Path(os.path.realpath(initdb)).parent


@pytest.fixture
def postgres_url() -> str:
    """A private PostgreSQL cluster on a free port of 127.0.0.1 with an empty database; stopped after."""
    bin_dir = postgres_bin()
    # initdb refuses to run as root: then the cluster is the postgres user's, in a folder it owns.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    folder = Path(tempfile.mkdtemp(prefix="mnist_lit_pg_"))  # not under pytest's 0700 tmp folders
    if as_user:
        shutil.chown(folder, "postgres", "postgres")
    data, port = folder / "data", free_port()

    def pg(*cmd: object) -> None:
        proc = subprocess.run([*as_user, *map(str, cmd)], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{cmd}:\n{proc.stdout}\n{proc.stderr}"

    pg(bin_dir / "initdb", "-D", data, "-U", "postgres", "--auth=trust")
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1"
    pg(bin_dir / "pg_ctl", "-D", data, "-o", options, "-l", folder / "server.log", "-w", "start")
    try:
        pg(bin_dir / "createdb", "-h", "127.0.0.1", "-p", port, "-U", "postgres", "optuna")
        # A password in the URL (trust authentication ignores it): no output may show it.
        yield f"postgresql://postgres:s3cret-pw@127.0.0.1:{port}/optuna"
    finally:
        pg(bin_dir / "pg_ctl", "-D", data, "-m", "immediate", "stop")
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_on_a_real_postgresql_server(postgres_url, tmp_path, mnist_dir):
    search = write_search(tmp_path, {"params": SEARCH["params"], "pruner": NO_PRUNING})
    args = tune_args(mnist_dir, search, 4, f"--storage={postgres_url}", "--study_name=mnist")
    for name in ("a", "b"):  # each worker in a folder of its own, as on two machines
        (tmp_path / name).mkdir()
    runs = wait_all([Guarded(tune_command(*args), tmp_path / name, TIMEOUT) for name in ("a", "b")])
    for run in runs:
        assert run.returncode == 0, run.stderr[-5000:]
        assert "s3cret-pw" not in run.stdout + run.stderr and "postgres:***@127.0.0.1" in run.stdout
    trials = trials_of(postgres_url, "mnist")
    done = sorted(t.number for t in finished(trials))
    assert len(done) == 4, [(t.number, t.state.name) for t in trials]
    # Each trial ran once, in the folder of the worker that ran it.
    runs_on_disk = sorted(
        p.name for name in ("a", "b") for p in (tmp_path / name / "tune/mnist/trials").iterdir()
    )
    assert runs_on_disk == [f"trial_{n:03d}" for n in done]


def test_a_journal_file_holds_the_study(workdir, mnist_dir):
    # Optuna's journal file: a study on a shared filesystem without a database server.
    search = write_search(workdir, {**SEARCH, "enqueue": SEARCH["enqueue"][:2]})
    output = tune_in(workdir, *tune_args(mnist_dir, search, 2, "--storage=study.log"))
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend("study.log"))
    assert [t.state.name for t in trials_of(storage)] == ["COMPLETE", "COMPLETE"], output
    assert (workdir / "tune/search/best.yaml").is_file()
    # The default storage (tune/search/study.db) does not hold those trials: refused, and no study.db made.
    message = error_of(*tune_args(mnist_dir, search, 3))
    assert message == (
        f"mnist_lit: error: {Path('tune/search')}/trials/ holds trial_000, trial_001 of another study "
        f"'search', not in sqlite:///{Path('tune/search/study.db')}: give another --study_name, or the "
        "--storage it was run with"
    )
    assert not (workdir / "tune/search/study.db").exists()
    assert len(trials_of(storage)) == 2


@pytest.mark.parametrize("search_file", sorted(p.name for p in CONFIGS.glob("*search.yaml")))
def test_each_shipped_search_file_is_a_valid_space(search_file):
    from mnist_lit.tune import distribution, load_search, optuna_object

    path = str(CONFIGS / search_file)
    search = load_search(path)
    space = {name: distribution(name, spec, path) for name, spec in search["params"].items()}
    optuna_object(search.get("sampler"), "sampler", optuna.samplers.BaseSampler, path)
    optuna_object(search.get("pruner"), "pruner", optuna.pruners.BasePruner, path)
    for trial in search.get("enqueue", []):  # each queued trial gives every searched setting a value in range
        assert set(trial) == set(space), trial
        for name, value in trial.items():
            dist = space[name]
            if isinstance(dist, optuna.distributions.CategoricalDistribution):
                assert value in dist.choices, (name, value)
            else:
                assert dist.low <= value <= dist.high, (name, value)


def test_the_sgd_search_tunes_the_lessons_optimizer_rate(tmp_path, mnist_dir):
    # configs/sgd_search.yaml as its header runs it: a LightningCLI `optimizer:` setting is searched like
    # any other fit setting, and best.yaml gives the recipe's optimizer the trial's rate.
    recipe = [
        f"--config={CONFIGS / 'mnist.yaml'}",
        f"--config={CONFIGS / 'lessons' / 'momentum_high_lr.yaml'}",
    ]
    search = ["tune", f"--search={CONFIGS / 'sgd_search.yaml'}", "--study_name=momentum", "--n_trials=1"]
    output = tune_in(tmp_path, *search, *recipe, f"--data.data_dir={mnist_dir}", *TRIAL_FLAGS)
    assert "trial 0: optimizer.init_args.lr=" in output
    trial = yaml.safe_load((tmp_path / "tune/momentum/trials/trial_000/config.yaml").read_text())
    best = yaml.safe_load((tmp_path / "tune/momentum/best.yaml").read_text())
    assert (
        trial["optimizer"]["class_path"] == "torch.optim.SGD"
        and trial["optimizer"]["init_args"]["momentum"] == 0.9
    )
    assert best["optimizer"]["init_args"]["lr"] == trial["optimizer"]["init_args"]["lr"] != 0.01
    assert 3e-3 <= best["optimizer"]["init_args"]["lr"] <= 1.0
