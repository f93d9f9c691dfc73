"""The real CLI, in-process (as Lightning's own LightningCLI tests do), on tiny IDX files."""

import csv
import os
import re
import stat
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mnist_lit.precision import precision_for
from mnist_lit.runs import load_checkpoint
from tests.helpers import AVERAGED, CONFIGS, QUICK, cli, error_of, fit_args


def checkpoints(workdir, version=0):
    return sorted(
        p.name for p in (workdir / "lightning_logs" / f"version_{version}" / "checkpoints").iterdir()
    )


def scalars(log_dir) -> dict[str, list[float]]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_fit_then_bare_test_uses_the_runs_best_checkpoint_and_data(workdir, mnist_dir, capsys):
    cli(*fit_args(mnist_dir, "--trainer.max_epochs=2"))
    out = capsys.readouterr().out
    names = checkpoints(workdir)
    assert "last.ckpt" in names and len(names) == 2
    best = next(n for n in names if n != "last.ckpt")
    assert f"Best checkpoint: {workdir}/lightning_logs/version_0/checkpoints/{best} with val/acc" in out

    # No --data.data_dir: the run's own settings are reused (./data does not exist here).
    cli("test", *QUICK[1:])
    out = capsys.readouterr().out
    assert f"test: using lightning_logs/version_0/checkpoints/{best} (val/acc" in out
    test_log = workdir / "lightning_logs" / "version_0" / "test_0"  # filed under the run it tested
    assert not (test_log / "checkpoints").exists()  # a test run never becomes "the newest run"
    logged = scalars(test_log)
    # The one-line summary prints what TensorBoard got.
    assert f"test/acc {logged['test/acc'][0]:.2%}  test/loss {logged['test/loss'][0]:.4f}" in out


@pytest.mark.parametrize("command", ["validate", "test", "predict"])
def test_a_runs_checkpoint_brings_its_data_settings(trained_copy, command):
    # The run was trained on a data folder given by flag; no --data.data_dir here (./data does not exist).
    last = "lightning_logs/version_0/checkpoints/last.ckpt"
    cli(command, f"--ckpt_path={last}", *QUICK[1:])
    assert (trained_copy / f"lightning_logs/version_0/{command}_0").is_dir()  # filed under its run


def test_a_folder_given_as_checkpoint_is_named_as_one_with_a_real_checkpoint_as_example(trained_copy):
    for folder in ("lightning_logs/version_0/checkpoints", "lightning_logs/version_0", "lightning_logs"):
        message = error_of("test", f"--ckpt_path={folder}", *QUICK[1:])
        said = f"mnist_lit: error: checkpoint {folder} is a folder: give a .ckpt file, e.g. "
        assert message.startswith(said), message
        example = Path(message.split(", e.g. ", 1)[1])
        assert example.is_file() and example.is_relative_to(f"{folder}") and example.suffix == ".ckpt"
    (trained_copy / "empty").mkdir()
    assert error_of("test", "--ckpt_path=empty", *QUICK[1:]).endswith("give a .ckpt file (it holds none)")


def test_explicit_flags_win_over_the_runs_settings(workdir, mnist_dir, capsys):
    cli(*fit_args(mnist_dir))
    capsys.readouterr()
    other = workdir / "other"
    other.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        cli("test", f"--data.data_dir={other}", "--data.download=false", *QUICK[1:])
    assert str(other / "MNIST" / "raw") in str(exit_info.value.code)


def test_bare_test_without_any_run_says_to_fit_first(workdir):
    with pytest.raises(SystemExit) as exit_info:
        cli("test")
    assert "run `python -m mnist_lit fit` first" in str(exit_info.value.code)
    assert not (workdir / "lightning_logs").exists() or not any((workdir / "lightning_logs").iterdir())


def test_tensorboard_gets_the_training_scalars_and_config(workdir, mnist_dir):
    cli(*fit_args(mnist_dir, "--trainer.max_epochs=2", "--trainer.log_every_n_steps=1"))
    log_dir = workdir / "lightning_logs" / "version_0"
    logged = scalars(log_dir)
    assert len(logged["train/loss_step"]) == 10  # 500 images / 100 per batch, 2 epochs
    for tag in ("train/loss_epoch", "train/acc", "val/loss", "val/acc", "val/acc_best"):
        assert len(logged[tag]) == 2, tag
    assert logged["val/acc_best"][1] == max(logged["val/acc"])
    config = yaml.safe_load((log_dir / "config.yaml").read_text())
    assert config["data"]["data_dir"] == str(mnist_dir) and config["model"]["lr"] == 1e-3


def test_same_seed_gives_the_same_weights(workdir, mnist_dir):
    for _ in range(2):
        cli(*fit_args(mnist_dir, "--seed_everything=3"))
    first, second = (
        load_checkpoint(workdir / f"lightning_logs/version_{v}/checkpoints/last.ckpt") for v in (0, 1)
    )
    for key, value in first["state_dict"].items():
        assert torch.equal(value, second["state_dict"][key]), key


WARPED = ["--data.max_rotation=12", "--data.max_scale=0.1", "--data.max_shift=2"]


@pytest.mark.parametrize(
    "recipe",
    [[], ["--data.max_shift=2"], WARPED, [*WARPED, *AVERAGED]],
    ids=["seed", "shifted", "warped", "warped-and-averaged"],
)
def test_resume_from_last_checkpoint_matches_an_uninterrupted_run(workdir, mnist_dir, recipe, recwarn):
    cli(*fit_args(mnist_dir, *recipe, "--trainer.max_epochs=2"))  # version_0: uninterrupted
    cli(*fit_args(mnist_dir, *recipe, "--trainer.max_epochs=1"))  # version_1: stops after one epoch
    last = workdir / "lightning_logs/version_1/checkpoints/last.ckpt"
    cli(
        *fit_args(mnist_dir, *recipe, "--trainer.max_epochs=2", f"--ckpt_path={last}")
    )  # goes on in version_1
    assert sorted(p.name for p in (workdir / "lightning_logs").iterdir()) == ["version_0", "version_1"]
    # Going on in the run's own folder is the design: Lightning's note that it is not empty is noise.
    assert not [w for w in recwarn if "exists and is not empty" in str(w.message)]
    straight, resumed = (
        load_checkpoint(workdir / f"lightning_logs/version_{v}/checkpoints/last.ckpt") for v in (0, 1)
    )
    assert resumed["epoch"] == straight["epoch"] == 1
    assert resumed["global_step"] == straight["global_step"] == 10
    # With weight averaging (best.yaml), state_dict holds the average and current_model_state the
    # weights being trained: both, and the average's step count, go on exactly.
    averaged = AVERAGED[0] in recipe
    kept = ["state_dict", "current_model_state", "averaging_state"] if averaged else ["state_dict"]
    assert [key for key in kept if key in resumed] == [key for key in kept if key in straight] == kept
    for weights in kept:
        for key, value in straight[weights].items():
            torch.testing.assert_close(resumed[weights][key], value, rtol=0, atol=0, msg=f"{weights} {key}")
    # One run in TensorBoard, its curves going on where they stopped: the same points as version_0's.
    for tag in ("val/acc", "train/loss_epoch", "epoch"):
        assert curve(workdir / "lightning_logs/version_1", tag) == curve(
            workdir / "lightning_logs/version_0", tag
        )


def curve(run: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of every point a run's event files hold for ``tag``, in step order."""
    events = EventAccumulator(str(run))
    events.Reload()
    return sorted((event.step, event.value) for event in events.Scalars(tag))


def test_validate_and_predict_use_the_newest_run(workdir, mnist_dir, capsys):
    cli(*fit_args(mnist_dir))
    cli("validate", *QUICK[1:])
    assert "validate: using lightning_logs/version_0/checkpoints/" in capsys.readouterr().out
    cli("predict", *QUICK[1:], "--predictions.output=preds.csv")
    with open(workdir / "preds.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 200
    assert sorted(int(row["index"]) for row in rows) == list(range(200))
    probs = torch.tensor([[float(row[f"p{c}"]) for c in range(10)] for row in rows])
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(200), atol=1e-4, rtol=0)
    assert [int(row["digit"]) for row in rows] == probs.argmax(dim=1).tolist()

    # Predicting again into the same file refuses before any work, and keeps the file as it was.
    before = (workdir / "preds.csv").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        cli("predict", *QUICK[1:], "--predictions.output=preds.csv")
    assert "preds.csv already exists" in str(exit_info.value.code)
    assert (workdir / "preds.csv").read_bytes() == before
    # So does an output that cannot be written (a file where its folder should be): no predict_N is made.
    (workdir / "plain_file").write_text("not a folder")
    predict_runs = sorted((workdir / "lightning_logs/version_0").glob("predict_*"))
    message = error_of("predict", *QUICK[1:], "--predictions.output=plain_file/preds.csv")
    assert message.startswith("mnist_lit: error: --predictions.output plain_file/preds.csv: cannot write in")
    assert sorted((workdir / "lightning_logs/version_0").glob("predict_*")) == predict_runs


def test_predictions_follow_the_umask(trained_copy):
    # The CSV is written to a private temporary file and renamed: it must still end up as open() would
    # make it, not 0600 (027: a umask other than the usual 022, so the mode is not a fixed 0644).
    mask = os.umask(0o027)
    try:
        cli("predict", *QUICK[1:], "--predictions.output=preds.csv")
        cli("predict", *QUICK[1:])  # the run folder's predictions.csv
    finally:
        os.umask(mask)
    default = next((trained_copy / "lightning_logs").rglob("predictions.csv"))
    for path in (trained_copy / "preds.csv", default):
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path


def test_an_output_folder_for_predictions_is_called_a_folder(trained_copy):
    (trained_copy / "my_digits").mkdir()
    message = error_of("predict", *QUICK[1:], "--predictions.output=my_digits")
    assert message == (
        "mnist_lit: error: --predictions.output my_digits is a folder: give the name of a CSV file to write"
    )
    assert list((trained_copy / "my_digits").iterdir()) == []


def test_the_seed_recipe_file_and_the_defaults_agree(capsys):
    configs = []
    for recipe in ([], ["--config=configs/mnist.yaml"]):
        with pytest.raises(SystemExit):
            cli("fit", *recipe, "--print_config")
        configs.append(yaml.safe_load(capsys.readouterr().out))
    assert configs[0] == configs[1]


def test_evaluation_takes_the_model_settings_from_the_checkpoint(workdir, mnist_dir):
    cli(*fit_args(mnist_dir, "--model.label_smoothing=0.2"))
    cli("test", *QUICK[1:], "--model.label_smoothing=0.7")  # Lightning restores the checkpoint's
    saved = yaml.safe_load((workdir / "lightning_logs/version_0/test_0/config.yaml").read_text())
    assert saved["model"]["label_smoothing"] == 0.2


def test_help_lists_every_command_with_its_summary(capsys):
    for args in (["--help"], ["-h"]):
        with pytest.raises(SystemExit) as exit_info:
            cli(*args)
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        usage = "usage: python -m mnist_lit {fit,validate,test,predict,export,stats,serve,tune}"
        assert text.startswith(usage)
        for command in ("fit", "validate", "test", "predict", "export", "stats", "serve", "tune"):
            assert re.search(rf"^ +{command} +\w", text, re.MULTILINE), command  # listed, with its summary


def test_a_commands_help_says_what_it_does_in_whole_sentences(capsys):
    with pytest.raises(SystemExit):
        cli("test", "--help")
    text = " ".join(capsys.readouterr().out.split())
    assert "It's separated from fit to make sure you never run on your" in text
    assert "set until you want to." in text  # not cut after LightningCLI's first line


def test_a_run_that_trains_nothing_is_refused_and_leaves_nothing(workdir, mnist_dir):
    message = error_of(*fit_args(mnist_dir, "--trainer.max_epochs=0"))
    assert "--trainer.max_epochs 0 trains nothing" in message
    for none in ("0", "0.0"):  # Lightning would train no batch, save no checkpoint and exit 0
        message = error_of(*fit_args(mnist_dir, f"--trainer.limit_train_batches={none}"))
        assert "--trainer.limit_train_batches 0 trains nothing: give a number of batches" in message
    assert not (workdir / "lightning_logs").exists()


@pytest.mark.parametrize("command, stage", [("validate", "val"), ("test", "test"), ("predict", "predict")])
def test_an_evaluation_of_no_batch_is_refused_and_leaves_no_folder(trained_copy, command, stage):
    run = trained_copy / "lightning_logs/version_0"
    before = sorted(run.iterdir())
    message = error_of(command, f"--trainer.limit_{stage}_batches=0", *QUICK[1:])
    assert message.startswith(f"mnist_lit: error: --trainer.limit_{stage}_batches 0: {command} would see no")
    assert sorted(run.iterdir()) == before  # no {command}_N folder


def test_a_fit_without_logger_is_refused_before_it_writes_anything(workdir, mnist_dir):
    # Without a logger, LightningCLI would save config.yaml in the working folder (and refuse to
    # overwrite it at the next fit, in a traceback), and Lightning's LearningRateMonitor would then fail.
    for _ in range(2):
        message = error_of(*fit_args(mnist_dir, "--trainer.logger=false"))
        assert message.startswith("mnist_lit: error: --trainer.logger false: a run lives in the folder")
    assert list(workdir.iterdir()) == []


def test_ckpt_path_last_means_the_newest_runs_last_checkpoint(workdir, mnist_dir, capsys):
    # With no run yet, fit says so and starts one (Lightning's "last" would start one silently).
    cli(*fit_args(mnist_dir, "--ckpt_path=last", "--trainer.max_epochs=3"))
    said = capsys.readouterr().out
    assert "--ckpt_path last: no run under lightning_logs/ has a last.ckpt to resume" in said
    last = workdir / "lightning_logs/version_0/checkpoints/last.ckpt"

    def summary(out: str) -> str:
        return next(line for line in out.splitlines() if line.startswith("val/acc "))

    cli("validate", *QUICK[1:], "--ckpt_path=last")
    out = capsys.readouterr().out
    assert "validate: using lightning_logs/version_0/checkpoints/last.ckpt" in out
    cli("validate", *QUICK[1:], f"--ckpt_path={last}")
    assert summary(capsys.readouterr().out) == summary(out)
    # fit goes on in that run, from its last.ckpt: two more epochs, in version_0.
    cli(*fit_args(mnist_dir, "--ckpt_path=last", "--trainer.max_epochs=5"))
    assert sorted(p.name for p in (workdir / "lightning_logs").iterdir()) == ["version_0"]
    assert load_checkpoint(last)["epoch"] == 4


def test_ckpt_path_last_without_a_run_is_refused_for_an_evaluation(workdir):
    message = error_of("test", *QUICK[1:], "--ckpt_path=last")
    assert "--ckpt_path last: no run under lightning_logs/ has a last.ckpt" in message
    assert not (workdir / "lightning_logs").exists()


def test_last_checkpoint_is_written_every_epoch_when_validation_skips_epochs(workdir, mnist_dir):
    cli(*fit_args(mnist_dir, "--trainer.check_val_every_n_epoch=2", "--trainer.max_epochs=3"))
    saved = load_checkpoint(workdir / "lightning_logs/version_0/checkpoints/last.ckpt")
    assert saved["global_step"] == 3 * 5  # every epoch's training, the third (not validated) included
    # One epoch and no validation at all: last.ckpt still, which a bare test then finds.
    cli(*fit_args(mnist_dir, "--trainer.check_val_every_n_epoch=2", "--trainer.max_epochs=1"))
    assert checkpoints(workdir, version=1) == ["last.ckpt"]


def test_fast_dev_run_says_that_it_saved_nothing(workdir, mnist_dir, capsys):
    cli(*fit_args(mnist_dir, "--trainer.fast_dev_run=true"))
    assert "fast_dev_run: a trial of a few batches; nothing was saved" in capsys.readouterr().out
    assert list(workdir.iterdir()) == []


def test_print_config_shows_the_recipe(capsys):
    with pytest.raises(SystemExit):
        cli("fit", "--config=configs/mnist.yaml", "--print_config")
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["lr"] == 1e-3 and config["data"]["batch_size"] == 100
    assert config["trainer"]["max_epochs"] == 10


@pytest.mark.parametrize("recipe", ["mnist.yaml", "fast.yaml", "gpu.yaml", "best.yaml"])
def test_each_recipe_trains_with_its_own_settings(workdir, mnist_dir, recipe):
    config_file = CONFIGS / recipe
    config = yaml.safe_load(config_file.read_text())
    cli(
        "fit", f"--config={config_file}", f"--data.data_dir={mnist_dir}", "--data.val_size=100",
        *QUICK, "--trainer.limit_train_batches=2",
    )  # fmt: skip
    saved = yaml.safe_load((workdir / "lightning_logs/version_0/config.yaml").read_text())
    assert saved["model"]["lr"] == config["model"]["lr"]
    assert saved["model"]["lr_schedule"] == config["model"]["lr_schedule"]
    assert saved["data"]["batch_size"] == config["data"]["batch_size"]
    assert saved["data"]["on_device"] == config["data"].get("on_device", False)
    for augmentation in ("max_shift", "max_rotation", "max_scale"):
        assert saved["data"][augmentation] == config["data"].get(augmentation, 0), augmentation
    # fast.yaml leaves the precision to the hardware (precision.py); the run records what it chose.
    chosen = precision_for(saved["trainer"]["accelerator"])[0] if config.get("bf16_where_native") else None
    assert saved["trainer"]["precision"] == config["trainer"].get("precision", chosen)
    # Callbacks a recipe adds (`callbacks+`, best.yaml's weight averaging) come after the defaults'.
    saved_callbacks = [callback["class_path"] for callback in saved["trainer"]["callbacks"]]
    added = [callback["class_path"] for callback in config["trainer"].get("callbacks+", [])]
    assert saved_callbacks[0] == "lightning.pytorch.callbacks.ModelCheckpoint"
    assert saved_callbacks[len(saved_callbacks) - len(added) :] == added
    last = load_checkpoint(workdir / "lightning_logs/version_0/checkpoints/last.ckpt")
    assert ("averaging_state" in last) == ("lightning.pytorch.callbacks.EMAWeightAveraging" in added)
    assert last["global_step"] == min(2, -(-500 // config["data"]["batch_size"]))  # 500 training images
    assert last["hyper_parameters"]["label_smoothing"] == config["model"]["label_smoothing"]
