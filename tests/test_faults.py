"""Interrupted and concurrent runs, for real: `python -m mnist_lit fit` subprocesses and signals."""

import errno
import io
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.trainer.states import TrainerFn
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mnist_lit.errors import UserError
from mnist_lit.faults import AtomicCheckpointIO, DiscardFailedRun
from mnist_lit.logger import RunLogger
from mnist_lit.runs import load_checkpoint
from tests.helpers import QUICK, Guarded, cli, error_of, last_checkpoint_of_fit, run_guarded, subprocess_env

# 500 training images in batches of 20: 25 steps an epoch, long enough to be interrupted inside one.
STEPS_PER_EPOCH = 25


def fit_flags(data_dir, epochs: int = 2) -> list[str]:
    return [
        "fit", f"--data.data_dir={data_dir}", "--data.val_size=100", "--data.batch_size=20",
        *QUICK[1:], f"--trainer.max_epochs={epochs}", "--seed_everything=3",
    ]  # fmt: skip


def start_fit(cwd, data_dir, epochs: int = 2, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mnist_lit", *fit_flags(data_dir, epochs), *extra]
    return subprocess.Popen(
        cmd, cwd=cwd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for(path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, mnist_dir) -> Path:
    """The run folder (version_0) of the same two epochs, run straight through."""
    folder = tmp_path_factory.mktemp("straight")
    last_checkpoint_of_fit(folder, *fit_flags(mnist_dir))
    return folder / "lightning_logs/version_0"


@pytest.fixture(scope="module")
def uninterrupted(straight_run) -> dict:
    """last.ckpt of the same two epochs, run straight through."""
    return load_checkpoint(straight_run / "checkpoints/last.ckpt")


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_mid_epoch_saves_a_checkpoint_that_resumes_exactly(workdir, mnist_dir, uninterrupted, signum):
    marker = workdir / "epoch1-under-way"
    pace = ["--trainer.callbacks+=tests.pacing.Pace", f"--trainer.callbacks.marker={marker}"]
    proc = start_fit(workdir, mnist_dir, 2, *pace)
    last = workdir / "lightning_logs/version_0/checkpoints/last.ckpt"
    wait_for(marker, proc)  # 4 batches into epoch 1, which goes on for 21 more paced ones: signal now
    saved_after_epoch_0 = last.stat().st_mtime_ns
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)

    assert proc.returncode != 0
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("mnist_lit: error:")]
    assert len(errors) == 1 and "training stopped by a signal at epoch 1, step " in errors[0], stderr[-3000:]
    assert f"--ckpt_path={last}" in errors[0]
    # Only our line: not Lightning's "Received SIGTERM: 2" nor its blank "SIGTERMException ... message".
    assert stderr.strip().splitlines()[-1] == errors[0] and "SIGTERM" not in stderr, stderr[-3000:]
    stopped = load_checkpoint(last)
    assert last.stat().st_mtime_ns != saved_after_epoch_0, "the stop was not saved"
    assert STEPS_PER_EPOCH < stopped["global_step"] < 2 * STEPS_PER_EPOCH, "not stopped inside epoch 1"

    cli(*fit_flags(mnist_dir), f"--ckpt_path={last}")  # goes on in version_0
    with pytest.raises(SystemExit) as finished:  # again: the checkpoint has done its max_epochs already
        cli(*fit_flags(mnist_dir), f"--ckpt_path={last}")
    assert "has already trained 2 epoch(s), and --trainer.max_epochs is 2" in str(finished.value.code)
    assert "to train further, pass a --trainer.max_epochs above 2" in str(finished.value.code)
    assert sorted(p.name for p in (workdir / "lightning_logs").iterdir()) == ["version_0"]
    resumed = load_checkpoint(last)
    assert resumed["global_step"] == uninterrupted["global_step"] == 2 * STEPS_PER_EPOCH
    for key, value in uninterrupted["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=0, atol=0, msg=key)
    # Epoch 1 ran partly in each process: neither part is logged as an epoch's time, only epoch 0 is.
    events = EventAccumulator(str(workdir / "lightning_logs/version_0"))
    events.Reload()
    assert [event.step for event in events.Scalars("time/epoch_s")] == [STEPS_PER_EPOCH - 1]


def ctrl_c(args: list[str], cwd: Path, marker: Path | None = None, delay: float = 0) -> str:
    """`python -m mnist_lit ARGS` in ``cwd``, Ctrl-C once ``marker`` appears (or after ``delay`` s): its
    one line, checked to be the only thing it ended with."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mnist_lit", *args],
        cwd=cwd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        if marker is not None:
            wait_for(marker, proc)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)  # a command that ignored Ctrl-C fails the test here
    finally:
        proc.kill()
    assert proc.returncode == 1 and "Traceback" not in stderr, stderr[-3000:]
    return stderr.strip()


@pytest.mark.slow
def test_ctrl_c_while_a_command_starts_up_ends_in_one_line(workdir, mnist_dir):
    # One second in, the process is importing Lightning (or, on a fast machine, parsing or loading data).
    assert ctrl_c(fit_flags(mnist_dir), workdir, delay=1.0) == "mnist_lit: error: interrupted"
    assert list(workdir.iterdir()) == []


@pytest.mark.slow
def test_ctrl_c_before_training_starts_ends_in_one_line_and_leaves_no_run(workdir, mnist_dir):
    # In the sanity check, before GracefulStop's handler: Lightning's own Ctrl-C path, a silent exit(1).
    marker = workdir / "sanity-check-under-way"
    moment = ["--trainer.callbacks+=tests.pacing.Moment", f"--trainer.callbacks.marker={marker}"]
    moment += ["--trainer.callbacks.phase=sanity_check", "--trainer.callbacks.hold=120"]
    said = ctrl_c([*fit_flags(mnist_dir), *moment], workdir, marker)
    stopped = "training stopped by a signal at epoch 0, step 0, before any checkpoint was saved"
    assert said == f"mnist_lit: error: {stopped}"
    assert not (workdir / "lightning_logs").exists()


@pytest.mark.slow
def test_ctrl_c_during_a_test_ends_in_one_line_and_leaves_no_test_folder(trained_copy):
    marker = trained_copy / "test-under-way"
    moment = ["--trainer.callbacks+=tests.pacing.Moment", f"--trainer.callbacks.marker={marker}"]
    moment += ["--trainer.callbacks.phase=test", "--trainer.callbacks.hold=120"]
    before = sorted((trained_copy / "lightning_logs/version_0").iterdir())
    assert ctrl_c(["test", *QUICK[1:], *moment], trained_copy, marker) == "mnist_lit: error: interrupted"
    assert sorted((trained_copy / "lightning_logs/version_0").iterdir()) == before


def test_a_failed_evaluations_folder_is_removed_after_its_event_writer_stops(tmp_path, monkeypatch):
    # Removing the folder before TensorBoard's writer thread had created its event file there ended a
    # Ctrl-C'd `test` in that thread's FileNotFoundError traceback, now and then.
    failures = []
    monkeypatch.setattr(threading, "excepthook", failures.append)
    logger = RunLogger(save_dir=str(tmp_path), name="", version="test_0")
    trainer = L.Trainer(logger=logger, enable_progress_bar=False, enable_model_summary=False)
    trainer.state.fn = TrainerFn.TESTING
    # A writer just made (as when Ctrl-C lands as a command logs its first value): its thread creates the
    # event file a moment later.
    logger.experiment.add_scalar("test/acc", 0.5, 0)
    DiscardFailedRun().on_exception(trainer, None, KeyboardInterrupt())
    assert logger.experiment.all_writers is None  # closed (its thread joined) by the time the folder went
    logger.finalize("failed")  # as Lightning does after the callbacks' on_exception
    assert not (tmp_path / "test_0").exists() and failures == []


@pytest.mark.slow
def test_ctrl_c_once_a_test_has_printed_its_results_ends_quietly_or_in_one_line(trained_copy):
    # Right after the results, the process is shutting down, where Python would end a Ctrl-C silently
    # with status 130; now it is ignored there (exit 0), or, landing just before, says "interrupted".
    proc = subprocess.Popen(
        [sys.executable, "-m", "mnist_lit", "test", *QUICK[1:]],
        cwd=trained_copy, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        for line in proc.stdout:
            if line.startswith("test/acc "):
                proc.send_signal(signal.SIGINT)
                break
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    ended = (proc.returncode, stderr)
    assert ended in ((0, ""), (1, "mnist_lit: error: interrupted\n")), ended


@pytest.mark.slow
def test_two_runs_started_together_get_their_own_folders(workdir, mnist_dir):
    procs = [start_fit(workdir, mnist_dir, epochs=1) for _ in range(2)]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    for proc, (_, stderr) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, stderr[-3000:]
    runs = sorted(p.name for p in (workdir / "lightning_logs").iterdir())
    assert runs == ["version_0", "version_1"]
    for run in runs:
        folder = workdir / "lightning_logs" / run
        assert (folder / "config.yaml").is_file() and list(folder.glob("events.out.tfevents.*"))
        assert load_checkpoint(folder / "checkpoints/last.ckpt")["global_step"] == STEPS_PER_EPOCH
    # Each run printed its own best checkpoint, in its own folder.
    printed = sorted(
        line for out, _ in outputs for line in out.splitlines() if line.startswith("Best checkpoint")
    )
    assert [f"/lightning_logs/version_{v}/" in line for v, line in enumerate(printed)] == [True, True]


@pytest.fixture
def small_disk(tmp_path):
    """A 900 KB tmpfs: room for epoch 0's two checkpoints (~368 KB each), not for a third file beside them."""
    folder = tmp_path / "small_disk"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=900k", "tmpfs", str(folder)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(
            f"cannot mount a small tmpfs here (needs root or CAP_SYS_ADMIN): {mounted.stderr.strip()}"
        )
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.mark.slow
def test_a_full_disk_ends_the_fit_in_one_line_and_keeps_every_earlier_checkpoint(
    tmp_path, mnist_dir, small_disk
):
    temp = tmp_path / "tmpdir"  # TMPDIR of the run: the checkpoint writer leaves nothing there
    temp.mkdir()
    flags = [*fit_flags(mnist_dir, epochs=3), f"--trainer.default_root_dir={small_disk}"]
    env = {**subprocess_env(), "TMPDIR": str(temp)}
    proc = run_guarded([sys.executable, "-m", "mnist_lit", *flags], tmp_path, timeout=300, env=env)

    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mnist_lit: error:")]
    folder = small_disk / "lightning_logs/version_0/checkpoints"
    assert len(errors) == 1, proc.stderr[-3000:]
    assert f"no space left in {folder} to write " in errors[0] and " MB): free some space" in errors[0]
    assert re.search(r"\(about 0\.[34] MB\)", errors[0]), errors[0]
    checkpoints = sorted(folder.iterdir())
    assert [p.suffix for p in checkpoints] == [".ckpt", ".ckpt"], checkpoints  # no partial file left
    for path in checkpoints:  # epoch 0's best and last.ckpt, whole
        assert load_checkpoint(path)["global_step"] == STEPS_PER_EPOCH, path
    assert list(temp.iterdir()) == []


def test_a_checkpoint_write_cut_short_leaves_the_old_file_whole(tmp_path, monkeypatch):
    # What a SIGKILL mid-write leaves: the bytes so far in the temporary file, the name untouched.
    writer = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    writer.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 1}, target)

    def cut_short(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 the first bytes")
        raise KeyboardInterrupt  # no handler of ours runs after a SIGKILL either

    monkeypatch.setattr(torch, "save", cut_short)
    with pytest.raises(KeyboardInterrupt):
        writer.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 2}, target)
    monkeypatch.undo()
    assert load_checkpoint(target)["global_step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".last.ckpt.partial", "last.ckpt"]


def test_a_full_disk_names_the_folder_and_the_size_and_removes_the_partial_file(tmp_path, monkeypatch):
    writer = AtomicCheckpointIO()
    checkpoint = {"state_dict": {"w": torch.zeros(100_000)}}

    save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        if not isinstance(f, io.BufferedWriter):  # messages.disk_full sizes the checkpoint in memory
            return save(obj, f, *args, **kwargs)
        f.write(b"some bytes")
        try:  # as torch's zip writer reports it: its own error, raised while handling the OSError
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # noqa: B904

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(UserError) as error:
        writer.save_checkpoint(checkpoint, tmp_path / "run/epoch01.ckpt")
    monkeypatch.undo()
    assert str(error.value) == (
        f"no space left in {tmp_path / 'run'} to write epoch01.ckpt (about 0.4 MB): free some space there "
        "and run again; no checkpoint was written"
    )
    assert list((tmp_path / "run").iterdir()) == []


def test_a_full_disk_in_epoch_0_names_the_checkpoint_it_kept_and_the_run_resumes_from_it(workdir, mnist_dir):
    # Epoch 0's best checkpoint is written, then the disk is full for last.ckpt: the line must name the
    # checkpoint that exists (there is no last.ckpt), and resuming from it must work.
    save = torch.save

    def full_for_last(obj, f, *args, **kwargs):
        if str(getattr(f, "name", "")).endswith(".last.ckpt.partial"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, f, *args, **kwargs)

    checkpoints = workdir / "lightning_logs/version_0/checkpoints"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "save", full_for_last)
        message = error_of(*fit_flags(mnist_dir))
    (best,) = checkpoints.iterdir()
    assert best.name.startswith("epoch00-")
    assert message.startswith(f"mnist_lit: error: no space left in {checkpoints} to write last.ckpt (about ")
    assert message.endswith(
        f"MB): free some space there, then resume with the same command plus --ckpt_path={best}"
    )
    cli(*fit_flags(mnist_dir), f"--ckpt_path={best}")
    assert load_checkpoint(checkpoints / "last.ckpt")["global_step"] == 2 * STEPS_PER_EPOCH


def val_acc_points(run: Path) -> list[tuple[int, float]]:
    """Every (step, value) that a run logged for val/acc, over all of its event files."""
    events = EventAccumulator(str(run))
    events.Reload()
    return [(point.step, point.value) for point in events.Scalars("val/acc")]


def best_of(checkpoint: dict) -> tuple[str, float]:
    """The best checkpoint's file name and score, as the val/acc ModelCheckpoint recorded them."""
    state = next(v for k, v in checkpoint["callbacks"].items() if "val/acc" in k and "ModelCheckpoint" in k)
    return Path(state["best_model_path"]).name, float(state["best_model_score"])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("phase", "nth"),
    [("validation", 0), ("step_end", STEPS_PER_EPOCH - 1)],
    ids=["inside-validation", "after-the-last-batch"],
)
def test_a_stop_around_an_epochs_validation_resumes_with_the_same_history_and_best(
    workdir, mnist_dir, straight_run, uninterrupted, phase, nth
):
    # Epoch 0 is held inside its validation (after its one batch) or right after its last training
    # batch; the signal lands there. The resumed run must still have validated epoch 0 and chosen the
    # best checkpoint from the same scores.
    marker = workdir / "held"
    moment = [
        "--trainer.callbacks+=tests.pacing.Moment", f"--trainer.callbacks.marker={marker}",
        f"--trainer.callbacks.phase={phase}", f"--trainer.callbacks.nth={nth}",
        "--trainer.callbacks.hold=1.5", "--trainer.callbacks.ms=0",
    ]  # fmt: skip
    run = Guarded([sys.executable, "-m", "mnist_lit", *fit_flags(mnist_dir), *moment], workdir, 300)
    while not marker.exists() and run.proc.poll() is None and time.monotonic() < run.deadline:
        time.sleep(0.01)
    run.proc.send_signal(signal.SIGINT)
    proc = run.wait()
    assert proc.returncode != 0 and "training stopped by a signal at epoch 1" in proc.stderr, proc.stderr[
        -3000:
    ]
    last = workdir / "lightning_logs/version_0/checkpoints/last.ckpt"
    assert STEPS_PER_EPOCH < load_checkpoint(last)["global_step"] < 2 * STEPS_PER_EPOCH

    cli(*fit_flags(mnist_dir), f"--ckpt_path={last}")
    run_folder = workdir / "lightning_logs/version_0"
    assert val_acc_points(run_folder) == val_acc_points(straight_run)
    assert best_of(load_checkpoint(last)) == best_of(uninterrupted)
    best_name = best_of(uninterrupted)[0]
    assert sorted(p.name for p in (run_folder / "checkpoints").iterdir()) == sorted([best_name, "last.ckpt"])
