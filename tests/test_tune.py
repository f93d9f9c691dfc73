"""`tune`: real Optuna studies of real fits on tiny data: pruning, best.yaml, workers, Ctrl-C, bad input."""

import signal
import socket
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mnist_lit.runs import load_checkpoint
from tests.helpers import QUICK, cli, error_of, run_command, subprocess_env, wait_for

# 500 training images in batches of 50: 10 steps an epoch.
TRIAL_FLAGS = ["--data.val_size=100", "--data.batch_size=50", "--trainer.max_epochs=1"]
SEARCH = {
    "params": {"model.lr": {"low": 1e-7, "high": 0.05, "log": True}, "model.lr_schedule": ["onecycle"]},
    # Prune from the first epoch on, once two trials have finished.
    "pruner": {"name": "median", "n_startup_trials": 2, "n_warmup_steps": 0},
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


def trials_of(storage, name: str = "search") -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=storage).get_trials()


def finished(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return [t for t in trials if t.state in states]


def scalar_tags(run: Path) -> set[str]:
    accumulator = EventAccumulator(str(run))
    accumulator.Reload()
    return set(accumulator.Tags()["scalars"])


@pytest.fixture(scope="module")
def study(tmp_path_factory, mnist_dir) -> tuple[Path, str]:
    """Three one-epoch trials, the third hopeless, run as a user would: progress bar and model summary on."""
    root = tmp_path_factory.mktemp("study")
    search = write_search(root)
    output = run_command(root, *tune_args(mnist_dir, search, 3))
    return root, output


@pytest.mark.slow
def test_study_runs_and_prunes_the_hopeless_trial(study):
    root, output = study
    folder = root / "tune/search"
    trials = trials_of(f"sqlite:///{folder / 'study.db'}")
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "PRUNED"], output
    assert trials[2].params["model.lr"] == pytest.approx(1e-7)
    assert "trial 2: pruned at epoch 0" in output
    assert "Epoch 0/0" in output and "Trainable params" in output  # the default progress bar and summary
    # Each trial is a fit run of its own under the study's folder, in TensorBoard with an HPARAMS row.
    for t in trials:
        run = folder / "trials" / f"trial_{t.number:03d}"
        assert (run / "config.yaml").is_file() and any(run.glob("events.out.tfevents.*"))
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["model"]["lr"] == pytest.approx(t.params["model.lr"])
        accumulator = EventAccumulator(str(run))
        accumulator.Reload()
        assert "_hparams_/session_start_info" in accumulator.PluginTagToContent("hparams")
    assert len(list((folder / "trials/trial_000/checkpoints").glob("*.ckpt"))) == 2
    for plot in ("history.png", "importances.png", "intermediate.png"):
        assert (folder / plot).read_bytes()[:4] == b"\x89PNG", plot
    assert f"Best recipe: {Path('tune/search/best.yaml')}" in output


@pytest.mark.slow
def test_best_yaml_reproduces_the_best_trial_with_fit(study, tmp_path, monkeypatch):
    root, _ = study
    folder = root / "tune/search"
    best = yaml.safe_load((folder / "best.yaml").read_text())
    assert best["model"] == {"lr": 0.01, "lr_schedule": "onecycle"}
    assert best["data"]["batch_size"] == 50 and best["trainer"]["max_epochs"] == 1
    monkeypatch.chdir(tmp_path)
    cli("fit", f"--config={folder / 'best.yaml'}", *QUICK[1:])
    refit = tmp_path / "lightning_logs/version_0"
    # Same seed, same recipe, on CPU: the same weights as the trial's, bit for bit.
    trial = load_checkpoint(folder / "trials/trial_000/checkpoints/last.ckpt")["state_dict"]
    again = load_checkpoint(refit / "checkpoints/last.ckpt")["state_dict"]
    for key, value in trial.items():
        torch.testing.assert_close(again[key], value, rtol=0, atol=0, msg=key)
    # A trial logs what a fit logs (the same callbacks).
    assert scalar_tags(folder / "trials/trial_000") == scalar_tags(refit)


@pytest.mark.slow
def test_rerun_of_a_finished_study_runs_nothing_more(study):
    root, _ = study
    output = run_command(root, *tune_args(Path("unused"), root / "search.yaml", 3, *QUICK[1:]))
    assert "3 of 3 trials finished" in output and "trial 3" not in output
    assert len(trials_of(f"sqlite:///{root / 'tune/search/study.db'}")) == 3


def start_tune(cwd: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mnist_lit", *args],
        cwd=cwd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def finish(proc: subprocess.Popen) -> str:
    try:
        output, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        pytest.fail(f"tune did not finish in {TIMEOUT} s:\n{output[-5000:]}")
    return output


@pytest.mark.slow
def test_two_workers_share_one_journal_study(tmp_path, mnist_dir):
    search = write_search(tmp_path, {"params": SEARCH["params"], "pruner": {"name": "none"}})
    journal = tmp_path / "shared" / "study.log"
    journal.parent.mkdir()
    args = tune_args(mnist_dir, search, 4, f"--storage={journal}", *QUICK[1:])
    workers = []
    for name in ("a", "b"):  # each worker in a folder of its own, as on two machines
        (tmp_path / name).mkdir()
        workers.append(start_tune(tmp_path / name, *args))
    outputs = [finish(worker) for worker in workers]
    for worker, output in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, output[-5000:]
    trials = finished(trials_of(JournalStorage(JournalFileBackend(str(journal)))))
    assert sorted(t.number for t in trials) == [0, 1, 2, 3], outputs
    # Each trial ran once, in the folder of the worker that ran it.
    runs = [p.name for name in ("a", "b") for p in (tmp_path / name / "tune/search/trials").glob("trial_*")]
    assert sorted(runs) == ["trial_000", "trial_001", "trial_002", "trial_003"]


@pytest.mark.slow
def test_n_jobs_workers_share_the_default_sqlite_study(tmp_path, mnist_dir):
    search = write_search(tmp_path, {"params": SEARCH["params"], "pruner": {"name": "none"}})
    output = run_command(tmp_path, *tune_args(mnist_dir, search, 4, "--n_jobs=2", *QUICK[1:]))
    trials = trials_of(f"sqlite:///{tmp_path / 'tune/search/study.db'}")
    assert sorted(t.number for t in finished(trials)) == [0, 1, 2, 3], output[-5000:]
    # The second worker ran the same study (whether it got a trial depends on how fast it started).
    log = (tmp_path / "tune/search/worker_1.log").read_text()
    assert "worker 1: pid" in output and "study 'search' in tune/search/" in log, log[-3000:]
    assert "study 'search': 4 finished trials" in output


@pytest.mark.slow
def test_ctrl_c_mid_trial_then_the_same_command_finishes_the_study(tmp_path, mnist_dir):
    search = write_search(tmp_path, {"params": SEARCH["params"], "pruner": {"name": "none"}})
    marker = tmp_path / "epoch1-under-way"
    # 25 steps an epoch, paced from epoch 1 on so that the signal lands inside it.
    args = [
        *tune_args(mnist_dir, search, 2, *QUICK[1:]), "--data.batch_size=20", "--trainer.max_epochs=2",
        "--trainer.callbacks+=tests.pacing.Pace", f"--trainer.callbacks.marker={marker}",
    ]  # fmt: skip
    proc = start_tune(tmp_path, *args)
    wait_for(marker, proc, TIMEOUT)
    proc.send_signal(signal.SIGINT)
    output = finish(proc)
    assert proc.returncode != 0 and "Traceback" not in output, output[-5000:]
    errors = [line for line in output.splitlines() if line.startswith("mnist_lit: error:")]
    assert errors == [
        "mnist_lit: error: interrupted: trial 0 stopped by a signal; it is queued to run again: run the same "
        "command again to go on"
    ], output[-5000:]
    storage = f"sqlite:///{tmp_path / 'tune/search/study.db'}"
    stopped = trials_of(storage)
    assert [t.state.name for t in stopped] == ["FAIL", "WAITING"]

    marker.unlink()
    rerun = start_tune(tmp_path, *args)
    output = finish(rerun)
    assert rerun.returncode == 0, output[-5000:]
    trials = trials_of(storage)
    done = finished(trials)
    assert len(done) == 2 and len(trials) == 3, [(t.number, t.state.name) for t in trials]
    retry = trials[1]
    assert retry.user_attrs["retry_of"] == 0 and retry.params == trials[0].params and retry in done


@pytest.mark.slow
def test_trial_of_a_worker_that_died_runs_again(workdir, mnist_dir):
    journal = workdir / "study.log"
    study = optuna.create_study(
        study_name="search", storage=JournalStorage(JournalFileBackend(str(journal))), direction="maximize"
    )
    orphan = study.ask()  # a trial that a killed worker left RUNNING
    orphan.suggest_float("model.lr", 1e-7, 0.05, log=True)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # reaped: its process id names no process now
    orphan.set_user_attr("worker", f"{socket.gethostname()}:{gone.pid}")
    search = write_search(workdir, {"params": SEARCH["params"], "pruner": {"name": "none"}})
    cli(*tune_args(mnist_dir, search, 1, f"--storage={journal}", *QUICK[1:]))
    trials = trials_of(JournalStorage(JournalFileBackend(str(journal))))
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    retry = trials[1]
    assert retry.user_attrs["retry_of"] == 0 and retry.params["model.lr"] == trials[0].params["model.lr"]


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"model.learning_rate": [0.1]}, "unknown parameter 'model.learning_rate'"),
        ({"lr": [0.1]}, "unknown parameter 'lr' (did you mean model.lr?)"),
        ({"model.lr": {"low": 0.1, "high": 0.01}}, "model.lr: the range is empty (low 0.1 > high 0.01)"),
        ({"model.lr_schedule": []}, "model.lr_schedule: the list of choices is empty"),
        ({"model.label_smoothing": [0.1, 1.5]}, "model.label_smoothing: 1.5 is refused by fit"),
    ],
)
def test_bad_search_space_is_one_line_and_the_study_is_untouched(study, monkeypatch, params, expected):
    root, _ = study
    database = root / "tune/search/study.db"
    before = database.read_bytes()
    bad = root / "bad" / "search.yaml"
    bad.parent.mkdir(exist_ok=True)
    bad.write_text(yaml.safe_dump({"params": params}))
    monkeypatch.chdir(root)
    message = error_of(*tune_args("unused", bad, 4, "--study_name=search"))
    assert str(bad) in message and expected in message
    assert database.read_bytes() == before


def test_missing_search_file_and_bad_storage(workdir, mnist_dir):
    message = error_of(*tune_args(mnist_dir, "nowhere.yaml", 2))
    assert "--search nowhere.yaml: file does not exist" in message
    search = write_search(workdir)
    message = error_of(*tune_args(mnist_dir, search, 2, "--storage=sqlite:////no/such/folder/x.db"))
    assert "--storage sqlite:////no/such/folder/x.db cannot be opened:" in message
    message = error_of(*tune_args(mnist_dir, search, 2, "--storage=nosuch://host/db"))
    assert "--storage nosuch://host/db cannot be opened:" in message
    message = error_of(*tune_args(mnist_dir, search, 2, "--storage=/no/such/folder/study.log"))
    assert "--storage /no/such/folder/study.log: folder /no/such/folder does not exist" in message


def run_process(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run ``cmd`` to its end; past TIMEOUT the test fails with what it had printed."""
    try:
        env = subprocess_env()
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as err:
        streams = (err.stdout, err.stderr)
        out, errors = (x.decode(errors="replace") if isinstance(x, bytes) else x or "" for x in streams)
        pytest.fail(f"{cmd} ran past {TIMEOUT} s:\n{out[-3000:]}\n{errors[-3000:]}")


@pytest.mark.slow
def test_bad_input_from_the_shell_is_one_line_without_traceback(tmp_path, mnist_dir):
    search = write_search(tmp_path, {"params": {"model.lr": {"low": 0, "high": 0.1, "log": True}}})
    proc = run_process([sys.executable, "-m", "mnist_lit", *tune_args(mnist_dir, search, 2)], tmp_path)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mnist_lit: error: {search}: model.lr:"), proc.stderr


@pytest.mark.slow
def test_other_commands_do_not_import_optuna(tmp_path):
    code = (
        "import sys\nfrom mnist_lit.cli import main\n"
        "try:\n    main(['fit', '--print_config'])\nexcept SystemExit:\n    pass\n"
        "print('optuna' in sys.modules)"
    )
    proc = run_process([sys.executable, "-c", code], tmp_path)
    assert proc.stdout.strip().splitlines()[-1] == "False", proc.stdout[-2000:] + proc.stderr[-2000:]
