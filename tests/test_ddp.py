"""Lightning's own DDP, for real and the way users run it: 2 CPU processes started by the CLI, and two
torchrun "nodes" on this machine. Every run is guarded: one that hangs fails with each rank's stack.
"""

import ast
import concurrent.futures
import contextlib
import csv
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mnist_lit.runs import load_checkpoint
from tests.helpers import (
    CONFIGS,
    QUICK,
    Guarded,
    cli,
    descendants,
    idx_bytes,
    run_guarded,
    session_processes,
    subprocess_env,
    synthetic_digits,
    wait_all,
    write_mnist,
)

# As README shows it: the DDP preset added to the recipe.
DDP = [f"--config={CONFIGS / 'ddp.yaml'}", "--trainer.accelerator=cpu", "--trainer.devices=2"]
GUARD = 300  # seconds a DDP run may take on a busy 2-core machine before it counts as hung
N_TEST = 201  # odd: a sampler that pads the two ranks' shares to equal length counts an image twice
N_VAL = 101
SINGLE = ["--trainer.accelerator=cpu", "--trainer.devices=1", *QUICK[1:]]


def mnist_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "mnist_lit", *args]


@pytest.fixture(scope="module")
def odd_mnist(tmp_path_factory) -> Path:
    """600 training and 201 test images; a third of the test labels are wrong, so test/acc is neither 0
    nor 1 and one image counted twice changes it."""
    root = write_mnist(tmp_path_factory.mktemp("odd_mnist"), n_test=N_TEST)
    _, labels = synthetic_digits(N_TEST, seed=1)
    labels[::3] = (labels[::3] + 1) % 10
    (root / "MNIST/raw/t10k-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    return root


def scalars(log_dir: Path) -> dict[str, float]:
    """The last value of every scalar a run logged."""
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"]}


def runs(folder: Path) -> list[Path]:
    return sorted((folder / "lightning_logs").iterdir(), key=lambda p: int(p.name.split("_")[1]))


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def assert_clean(proc, what: str) -> None:
    assert proc.returncode == 0, f"{what}: exit {proc.returncode}\n{proc.stderr[-4000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]


def test_no_log_call_syncs_lazily():
    # The rule in mnist_lit/distributed.py: sync_dist=True makes Lightning sync wherever the value is
    # first read, which under DDP is rank 0's progress bar alone: a deadlock.
    for path in (Path(__file__).parents[1] / "mnist_lit").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "sync_dist":
                pytest.fail(f"{path.name}:{node.value.lineno}: sync_dist in a log call; see distributed.py")


def test_the_ddp_preset_bounds_how_long_a_rank_waits(capsys):
    with pytest.raises(SystemExit):
        cli("fit", f"--config={CONFIGS / 'mnist.yaml'}", *DDP, "--print_config")
    strategy = yaml.safe_load(capsys.readouterr().out)["trainer"]["strategy"]
    assert strategy["class_path"] == "lightning.pytorch.strategies.DDPStrategy"
    assert strategy["init_args"]["timeout"] in ("0:05:00", timedelta(minutes=5))  # torch's is 30 minutes


@pytest.mark.slow
def test_fit_validate_test_predict_under_ddp_as_users_run_them(workdir, odd_mnist):
    tmp_path = workdir  # the in-process single-process runs below work here too
    # fit as the README says, with Lightning's default progress bar and model summary.
    fit = [
        "fit", f"--config={CONFIGS / 'mnist.yaml'}", f"--data.data_dir={odd_mnist}",
        f"--data.val_size={N_VAL}", "--trainer.max_epochs=2",
    ]  # fmt: skip
    proc = run_guarded(mnist_cli(*fit, *DDP), tmp_path, GUARD)
    assert_clean(proc, "fit")
    assert "Total params" in proc.stdout  # the model summary was on
    assert proc.stdout.count("Best checkpoint:") == 1  # printed by rank 0 only
    last = load_checkpoint(tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt")
    # 499 training images in batches of 100: one process takes 5 steps an epoch; each of two ranks
    # takes ceil(250 / 100) = 3, because each trains on its own half.
    assert last["global_step"] == 2 * math.ceil(250 / 100)
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
    assert [p.name for p in runs(tmp_path)] == ["version_0"]  # the other rank claimed no folder

    # Bare validate/test/predict under DDP: the newest run's best checkpoint, each rank a share.
    for command in ("validate", "test"):
        proc = run_guarded(mnist_cli(command, *DDP), tmp_path, GUARD)
        assert_clean(proc, command)
        assert proc.stdout.count(f"{command}: using ") == 1, proc.stdout  # said by rank 0 only
    predict = ["predict", "--predictions.output=ddp.csv", *DDP]
    proc = run_guarded(mnist_cli(*predict), tmp_path, GUARD)
    assert_clean(proc, "predict")
    assert sorted(p.name for p in tmp_path.glob("*.csv")) == ["ddp.csv"]  # one file, not one per rank
    assert proc.stdout.count(f"Predictions for {N_TEST} images written to ddp.csv") == 1
    run = tmp_path / "lightning_logs/version_0"  # each evaluation is filed under the run it evaluated
    ddp_validate, ddp_test = scalars(run / "validate_0"), scalars(run / "test_0")

    # The same checkpoint in one process gives the same numbers: every image counted exactly once.
    cli("validate", *SINGLE)
    cli("test", *SINGLE)
    cli("predict", "--predictions.output=single.csv", *SINGLE)
    single_validate, single_test = scalars(run / "validate_1"), scalars(run / "test_1")
    assert 0 < single_test["test/acc"] < 1
    assert ddp_test["test/acc"] == single_test["test/acc"]
    assert ddp_validate["val/acc"] == single_validate["val/acc"]
    assert ddp_test["test/loss"] == pytest.approx(single_test["test/loss"], rel=1e-5)
    assert ddp_validate["val/loss"] == pytest.approx(single_validate["val/loss"], rel=1e-5)
    ddp_rows, single_rows = read_csv(tmp_path / "ddp.csv"), read_csv(tmp_path / "single.csv")
    assert [int(row["index"]) for row in ddp_rows] == list(range(N_TEST))
    assert [row["digit"] for row in ddp_rows] == [row["digit"] for row in single_rows]
    for ddp_row, single_row in zip(ddp_rows, single_rows, strict=True):
        for c in range(10):
            assert float(ddp_row[f"p{c}"]) == pytest.approx(float(single_row[f"p{c}"]), abs=2e-6)


@pytest.mark.slow
def test_divergence_under_ddp_stops_every_rank_with_one_clear_line(tmp_path, mnist_dir):
    # lr x 1e15 after every epoch: epoch 0 trains normally, epoch 1 sends the loss to NaN on both ranks.
    explode = ["--optimizer=Adam", "--lr_scheduler=ExponentialLR", "--lr_scheduler.gamma=1e15"]
    fit = ["fit", f"--data.data_dir={mnist_dir}", "--data.val_size=100", *QUICK, *DDP]
    proc = run_guarded(mnist_cli(*fit, "--trainer.max_epochs=3", *explode), tmp_path, GUARD)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mnist_lit: error:")]
    assert errors and all("training diverged: the loss became nan at epoch 1" in line for line in errors)
    # Under DDP each look waits for every rank, so the loss is looked at on logging steps and epoch ends.
    assert all("(looked at every 50 steps)" in line for line in errors), errors
    kept = load_checkpoint(tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt")
    assert kept["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in kept["state_dict"].values() if v.is_floating_point())


@pytest.mark.slow
def test_a_stalled_rank_ends_the_run_with_one_line_naming_the_rank(tmp_path, mnist_dir):
    # Rank 1 stalls before the epoch's collectives; the preset's DDP timeout, shortened to 30 s here,
    # ends the run and the stalled rank with it: torch's default would wait 30 minutes.
    stall = ["--trainer.callbacks+=tests.pacing.StallRank", "--trainer.strategy.timeout=0:00:30"]
    fit = ["fit", f"--data.data_dir={mnist_dir}", "--data.val_size=100", *QUICK, *DDP, *stall]
    started = time.monotonic()
    run = Guarded(mnist_cli(*fit), tmp_path, GUARD)
    proc = run.wait()
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mnist_lit: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "rank 0 of 2 waited 30 s for the other ranks in " in errors[0]
    assert "model.py" in errors[0] and "on_train_epoch_end" in errors[0]  # what rank 0 was doing
    assert "--trainer.strategy.timeout=" in errors[0]  # how to wait longer
    assert time.monotonic() - started < GUARD
    time.sleep(1)  # the kernel's SIGKILL to the orphaned rank (__main__.end_with_launcher)
    assert not session_processes(run.proc.pid), "a rank outlived the run"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_torchrun_nodes_train_one_run(tmp_path, mnist_dir):
    # Two torchrun agents on this machine, one process each, are two nodes: c10d rendezvous, shared
    # data and log folders (as on a cluster's shared filesystem), Lightning's default progress bar.
    torchrun = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=mnist",
        "-m", "mnist_lit", "fit", f"--data.data_dir={mnist_dir}", "--data.val_size=100",
        "--trainer.max_epochs=2", "--trainer.num_nodes=2", f"--config={CONFIGS / 'ddp.yaml'}",
        "--trainer.accelerator=cpu", "--trainer.devices=1",
    ]  # fmt: skip
    nodes = [Guarded(torchrun, tmp_path, GUARD) for _ in range(2)]
    results = wait_all(nodes)
    for node, proc in enumerate(results):
        assert proc.returncode == 0, f"node {node}:\n" + "\n".join(p.stderr[-3000:] for p in results)
    assert [p.name for p in runs(tmp_path)] == ["version_0"]
    checkpoints = sorted(p.name for p in (tmp_path / "lightning_logs/version_0/checkpoints").iterdir())
    assert len(checkpoints) == 2 and "last.ckpt" in checkpoints  # one best, one last: one set
    last = load_checkpoint(tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt")
    # 500 images, batches of 100: each node trained on its own half, 3 steps an epoch instead of 5.
    assert last["global_step"] == 2 * math.ceil(250 / 100)


def stoppable_fit(data_dir: Path) -> list[str]:
    """500 training images in batches of 20 on two ranks: 13 steps an epoch. Default progress bar."""
    return [
        "fit", f"--data.data_dir={data_dir}", "--data.val_size=100", "--data.batch_size=20",
        "--trainer.max_epochs=2", "--seed_everything=3", *DDP,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted_ddp(tmp_path_factory, mnist_dir) -> dict:
    """last.ckpt of the same two DDP epochs, run straight through."""
    folder = tmp_path_factory.mktemp("straight_ddp")
    assert_clean(run_guarded(mnist_cli(*stoppable_fit(mnist_dir)), folder, GUARD), "uninterrupted fit")
    return load_checkpoint(folder / "lightning_logs/version_0/checkpoints/last.ckpt")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "whole_group"),
    [(signal.SIGTERM, False), (signal.SIGINT, True)],
    ids=["SIGTERM-to-launcher", "Ctrl-C-in-terminal"],
)
def test_stopped_mid_epoch_under_ddp_saves_a_checkpoint_that_resumes_exactly(
    tmp_path, mnist_dir, uninterrupted_ddp, signum, whole_group
):
    # A scheduler's SIGTERM goes to the launching process; a terminal's Ctrl-C to every process of the job.
    marker = tmp_path / "epoch1-under-way"
    pace = ["--trainer.callbacks+=tests.pacing.Pace", f"--trainer.callbacks.marker={marker}"]
    run = Guarded(mnist_cli(*stoppable_fit(mnist_dir), *pace), tmp_path, GUARD)
    while not marker.exists() and run.proc.poll() is None and time.monotonic() < run.deadline:
        time.sleep(0.02)
    if whole_group:
        os.killpg(run.proc.pid, signum)  # the run's own session: its processes are the terminal's job
    else:
        run.proc.send_signal(signum)
    proc = run.wait()
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mnist_lit: error:")]
    stopped = "training stopped by a signal at epoch 1, step "
    assert len(errors) == 1 and stopped in errors[0], proc.stderr[-3000:]  # said once, not once per rank
    assert f"--ckpt_path={last}" in errors[0]
    assert 13 < load_checkpoint(last)["global_step"] < 26, "not stopped inside epoch 1"

    proc = run_guarded(mnist_cli(*stoppable_fit(mnist_dir), f"--ckpt_path={last}"), tmp_path, GUARD)
    assert_clean(proc, "resumed fit")
    assert [p.name for p in runs(tmp_path)] == ["version_0"]  # the resumed run goes on in its own folder
    resumed = load_checkpoint(last)
    assert resumed["global_step"] == uninterrupted_ddp["global_step"] == 26
    for key, value in uninterrupted_ddp["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=0, atol=0, msg=key)


def rank_pid(launcher: int, rank: int) -> int:
    """The pid of DDP rank ``rank`` (>0) that Lightning's launcher ``launcher`` started."""
    for pid in descendants(launcher):
        with contextlib.suppress(OSError):
            if f"LOCAL_RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return pid
    pytest.fail(f"no rank {rank} below {launcher}")


@pytest.mark.slow
def test_a_lost_rank_ends_the_survivor_with_one_line_naming_it(tmp_path, mnist_dir):
    # kill -9 of rank 1 mid-epoch 1 (what the out-of-memory killer does): rank 0 finds its peer gone
    # in the next collective and ends at once, naming the rank and the last.ckpt of epoch 0.
    marker = tmp_path / "epoch1-under-way"
    pace = ["--trainer.callbacks+=tests.pacing.Pace", f"--trainer.callbacks.marker={marker}"]
    run = Guarded(mnist_cli(*stoppable_fit(mnist_dir), *pace), tmp_path, GUARD)
    while not marker.exists() and run.proc.poll() is None and time.monotonic() < run.deadline:
        time.sleep(0.02)
    os.kill(rank_pid(run.proc.pid, 1), signal.SIGKILL)
    killed = time.monotonic()
    proc = run.wait()
    took = time.monotonic() - killed
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mnist_lit: error:")]
    last = tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt"
    assert len(errors) == 1, f"exit status {proc.returncode}, stderr:\n{proc.stderr[-3000:]}"
    assert "rank 0 of 2 lost rank 1: it died or was killed" in errors[0], errors[0]
    assert errors[0].endswith(f"resume with the same command plus --ckpt_path={last}")
    assert load_checkpoint(last)["global_step"] == 13  # epoch 0's, kept
    assert took < 30, f"the survivor took {took:.1f} s to end"
    assert not session_processes(run.proc.pid), "a process outlived the run"


# Where Ctrl-C lands, one run each: (phase, nth time this run reaches it, rank held there, extra delay s).
# Holding one rank sends the other into its next collective (backward's all-reduce, the stop decision,
# a checkpoint's barrier, validation's metric sync), where it waits when the signal arrives.
CTRL_C_MOMENTS = [
    ("step", 2, 0, 0.0), ("step", 13, 1, 0.2), ("step_end", 0, 0, 0.0), ("step_end", 12, 1, 0.35),
    ("validation", 0, 0, 0.0), ("validation", 1, 1, 0.1), ("validation", 2, 0, 0.2),
    ("checkpoint", 0, 0, 0), ("checkpoint", 0, 1, 0.1), ("checkpoint", 1, 1, 0.35),
    ("epoch_end", 0, 1, 0.1), ("epoch_end", 1, 0, 0.35),
]  # fmt: skip


def ctrl_c_chain(folder: Path, mnist_dir: Path, moments: list[tuple], first: int) -> str:
    """One chain of short runs in ``folder``, each resuming the last one's last.ckpt and Ctrl-C'd (SIGINT
    to the whole process group, as a terminal sends it) at its own moment; the default progress bar is
    on. Returns a summary of the stops."""
    last = folder / "lightning_logs/version_0/checkpoints/last.ckpt"
    fit = [*stoppable_fit(mnist_dir), "--trainer.max_epochs=1000"]  # never ends by itself
    step, stops, reached = 0, [], []
    for i, (phase, nth, hold_rank, delay) in enumerate(moments, start=first):
        marker = folder / f"moment{i}"
        moment = [
            "--trainer.callbacks+=tests.pacing.Moment", f"--trainer.callbacks.marker={marker}",
            f"--trainer.callbacks.phase={phase}", f"--trainer.callbacks.nth={nth}",
            f"--trainer.callbacks.hold_rank={hold_rank}",
        ]  # fmt: skip
        resume = [f"--ckpt_path={last}"] if i > first else []
        launched = time.monotonic()
        run = Guarded(mnist_cli(*fit, *moment, *resume), folder, 120)
        while not marker.exists() and run.proc.poll() is None and time.monotonic() < run.deadline:
            time.sleep(0.01)
        reached.append(time.monotonic() - launched)
        time.sleep(delay)
        signalled = time.monotonic()
        os.killpg(run.proc.pid, signal.SIGINT)
        proc = run.wait()
        stops.append(time.monotonic() - signalled)
        where = f"Ctrl-C {i} at {phase} #{nth} (rank {hold_rank} held, +{delay} s)"
        assert proc.returncode != 0, f"{where}: exit 0\n{proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stderr, f"{where}:\n{proc.stderr[-3000:]}"
        assert proc.stderr.count("training stopped by a signal") == 1, f"{where}:\n{proc.stderr[-3000:]}"
        assert stops[-1] < 20, f"{where}: took {stops[-1]:.1f} s to stop"
        saved = load_checkpoint(last)["global_step"]
        assert saved >= step, f"{where}: last.ckpt went back from step {step} to {saved}"
        step = saved
        time.sleep(0.2)  # the kernel's SIGKILL to a rank whose launcher ended (__main__.end_with_launcher)
        assert not session_processes(run.proc.pid), f"{where}: a process outlived the run"
    return (
        f"moments {first}-{first + len(moments) - 1}: {len(stops)} stops, longest {max(stops):.2f} s, "
        f"mean {sum(stops) / len(stops):.2f} s; step {step}; seconds from launch to each moment: "
        + ", ".join(f"{t:.1f}" for t in reached)
    )


@pytest.mark.slow
def test_ctrl_c_at_a_dozen_moments_of_a_ddp_fit_stops_every_time(tmp_path, mnist_dir):
    # Two chains of six side by side, each in its own folder: a run spends most of its time starting its
    # two ranks one after the other (one core each), so two chains take little longer than one. Each
    # phase is hit with either rank held back.
    assert len(set(CTRL_C_MOMENTS)) == 12  # twelve different moments in all
    halves = [(tmp_path / "first", CTRL_C_MOMENTS[::2], 0), (tmp_path / "second", CTRL_C_MOMENTS[1::2], 6)]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        chains = []
        for folder, moments, first in halves:
            folder.mkdir()
            chains.append(pool.submit(ctrl_c_chain, folder, mnist_dir, moments, first))
        for chain in chains:
            print(chain.result())  # a chain's failed assertion is raised here


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs Linux, root and unshare for a process namespace of its own",
)
def test_a_rank_whose_launcher_is_pid_1_goes_on(tmp_path):
    # torchrun as a container's entrypoint is pid 1 there: its ranks' parent is 1 from the start, which
    # must not read as "the launcher died" (__main__.end_with_launcher).
    rank = "from mnist_lit.__main__ import end_with_launcher; end_with_launcher(); print('rank goes on')"
    launcher = (
        "import os, subprocess, sys\n"
        "assert os.getpid() == 1\n"
        "env = {**os.environ, 'LOCAL_RANK': '1'}\n"
        f"sys.exit(subprocess.run([sys.executable, '-c', {rank!r}], env=env).returncode)\n"
    )
    result = subprocess.run(
        ["unshare", "--fork", "--pid", "--mount-proc", sys.executable, "-c", launcher],
        env=subprocess_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0 and result.stdout.strip() == "rank goes on", result.stdout + result.stderr
