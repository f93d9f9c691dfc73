"""resume.py: what a resumed fit must agree with (its epochs, its one-cycle schedule, its settings)."""

import pytest

from mnist_lit.errors import UserError
from mnist_lit.resume import check_resumable
from mnist_lit.runs import load_checkpoint
from tests.helpers import AVERAGED, CONFIGS, cli, error_of, fit_args, run_state


def test_a_one_cycle_run_cannot_be_resumed_past_its_schedule(workdir, mnist_dir):
    one_cycle = [f"--config={CONFIGS / 'fast.yaml'}", "--trainer.precision=32-true"]
    cli(*fit_args(mnist_dir, *one_cycle, "--trainer.max_epochs=2"))
    run = workdir / "lightning_logs/version_0"
    last, before = run / "checkpoints/last.ckpt", run_state(run)
    # Its learning rate was annealed to ~0 over 2 epochs: going on to 4 is refused (torch's OneCycleLR
    # would raise at the first step past them), before the run's config.yaml or curves change.
    message = error_of(*fit_args(mnist_dir, *one_cycle, "--trainer.max_epochs=4", f"--ckpt_path={last}"))
    assert "was trained with a one-cycle learning rate planned over 2 epochs" in message
    assert "start a new fit with the --trainer.max_epochs you want" in message
    message = error_of(*fit_args(mnist_dir, *one_cycle, "--trainer.max_epochs=2", f"--ckpt_path={last}"))
    assert (
        "has already trained 2 epoch(s)" in message and "one-cycle learning rate ended with them" in message
    )
    assert "pass a --trainer.max_epochs above" not in message  # the hint for a constant learning rate
    assert run_state(run) == before


def test_a_one_cycle_run_stopped_in_its_first_epoch_knows_its_plan_from_its_config(workdir, mnist_dir):
    cli(*fit_args(mnist_dir, "--model.lr_schedule=onecycle", "--trainer.max_epochs=3"))
    last = workdir / "lightning_logs/version_0/checkpoints/last.ckpt"
    state = load_checkpoint(last)
    # As if it had been planned over 9 epochs: the hint for going on is the schedule's end.
    planned_longer = {**state, "lr_schedulers": [{**state["lr_schedulers"][0], "total_steps": 9 * 5}]}
    with pytest.raises(UserError, match=r"end of its one-cycle schedule, pass --trainer\.max_epochs 9"):
        check_resumable(planned_longer, last, 3)
    # As if saved by Ctrl-C 2 batches into epoch 0: no whole epoch to measure the schedule by.
    loops, counts = state["loops"]["fit_loop"], ("ready", "started", "processed", "completed")
    loops["epoch_progress"] = {"total": dict.fromkeys(counts, 0), "current": dict.fromkeys(counts, 0)}
    batches = {"total": dict.fromkeys(counts, 2), "current": dict.fromkeys(counts, 2), "is_last_batch": False}
    loops["epoch_loop.batch_progress"] = batches
    state["lr_schedulers"][0]["last_epoch"] = 2
    with pytest.raises(UserError, match="planned over 3 epochs"):
        check_resumable(state, last, 4)
    check_resumable(state, last, 3)


def test_a_run_resumed_with_other_settings_is_refused_naming_them(workdir, mnist_dir):
    recipe = ["--data.batch_size=50", "--data.max_shift=2", "--model.lr=0.002", "--seed_everything=7"]
    recipe += AVERAGED
    cli(*fit_args(mnist_dir, *recipe, "--trainer.limit_train_batches=2"))
    run = workdir / "lightning_logs/version_0"
    last, before = run / "checkpoints/last.ckpt", run_state(run)
    go_on = ["--trainer.max_epochs=2", f"--ckpt_path={last}"]
    # The recipe forgotten: Lightning would train on with the checkpoint's learning rate, the default
    # batches, no shifts, another seed and no average, and rewrite config.yaml with that mix.
    message = error_of(*fit_args(mnist_dir, *go_on))
    assert message.startswith(f"mnist_lit: error: --ckpt_path {last} was trained with other settings")
    for differs in (
        "--model.lr 0.002 there, 0.001 here", "--data.batch_size 50 there, 100 here",
        "--data.max_shift 2 there, 0 here", "--seed_everything 7 there, 42 here", "weight averaging there",
    ):  # fmt: skip
        assert differs in message, message
    assert message.endswith(f"(its settings: {run / 'config.yaml'}) plus --ckpt_path, or start a new fit")
    # One setting changed, the rest as it was trained: only that one is named.
    message = error_of(*fit_args(mnist_dir, *recipe, "--data.max_shift=3", *go_on))
    assert "trained with other settings than these: --data.max_shift 2 there, 3 here: resume" in message
    assert run_state(run) == before
    # Where the data is and how it is evaluated may change; the run goes on with the same recipe.
    cli(*fit_args(mnist_dir, *recipe, "--trainer.limit_train_batches=2", "--data.eval_batch_size=64", *go_on))
    assert load_checkpoint(last)["epoch"] == 1
