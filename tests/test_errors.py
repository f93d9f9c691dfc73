"""Bad data, flags and checkpoints end in one line naming the file or flag: the real CLI, real files."""

import builtins
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from mnist_lit.errors import first_line
from mnist_lit.runs import load_checkpoint
from tests.helpers import (
    CONFIGS,
    QUICK,
    cli,
    error_of,
    fit_args,
    idx_bytes,
    parse_error_of,
    subprocess_env,
    synthetic_digits,
    write_mnist,
)

TRAIN_IMAGES = "MNIST/raw/train-images-idx3-ubyte"
TRAIN_LABELS = "MNIST/raw/train-labels-idx1-ubyte"


def truncate(path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def replace_labels(root, labels: np.ndarray) -> None:
    (root / TRAIN_LABELS).write_bytes(idx_bytes(labels))


# Each case breaks one file of a good MNIST folder; the message must name that file and the fault.
BROKEN_DATA = {
    "zero-length images": (TRAIN_IMAGES, lambda root: truncate(root / TRAIN_IMAGES, 0), "is empty"),
    "truncated images": (TRAIN_IMAGES, lambda root: truncate(root / TRAIN_IMAGES, 5000), "is truncated"),
    "truncated labels": (TRAIN_LABELS, lambda root: truncate(root / TRAIN_LABELS, 100), "is truncated"),
    "labels file as images": (
        TRAIN_IMAGES,
        lambda root: (root / TRAIN_IMAGES).write_bytes((root / TRAIN_LABELS).read_bytes()),
        "magic number 0x00000801, not 0x00000803",
    ),
    "fewer labels than images": (
        TRAIN_LABELS,
        lambda root: replace_labels(root, synthetic_digits(600, seed=0)[1][:599]),
        "has 600 images but",
    ),
    "label 12": (
        TRAIN_LABELS,
        lambda root: replace_labels(root, np.where(np.arange(600) == 7, 12, synthetic_digits(600, 0)[1])),
        "1 labels outside 0-9 (the first is 12, at index 7)",
    ),
    "32x32 images": (
        TRAIN_IMAGES,
        lambda root: (root / TRAIN_IMAGES).write_bytes(idx_bytes(np.zeros((600, 32, 32)))),
        "holds 32x32 images, not 28x28",
    ),
}


@pytest.mark.parametrize("case", BROKEN_DATA)
def test_broken_data_file_is_named_with_its_fault(workdir, case):
    broken_file, breaks, fault = BROKEN_DATA[case]
    root = write_mnist(workdir / "data", n_train=600, n_test=50)
    breaks(root)
    message = error_of(*fit_args(root, "--data.download=false"))
    assert str(root / broken_file) in message and fault in message
    assert not (workdir / "lightning_logs" / "version_0" / "checkpoints").exists()  # stopped before training


def test_broken_test_split_is_found_by_test(workdir, mnist_dir, tmp_path):
    root = write_mnist(tmp_path / "data", n_train=200, n_test=50)
    truncate(root / "MNIST/raw/t10k-labels-idx1-ubyte", 0)
    message = error_of("test", f"--data.data_dir={root}", "--data.download=false", "--ckpt_path=none.ckpt")
    assert "none.ckpt does not exist" in message  # the checkpoint is checked first, before any data
    cli(*fit_args(mnist_dir))
    message = error_of("test", f"--data.data_dir={root}", "--data.download=false", *QUICK[1:])
    assert f"{root}/MNIST/raw/t10k-labels-idx1-ubyte is empty" in message


def test_val_size_as_large_as_the_training_set(workdir, mnist_dir):
    message = error_of("fit", f"--data.data_dir={mnist_dir}", "--data.val_size=600", *QUICK)
    assert "--data.val_size=600 leaves no images to train on" in message and "holds 600" in message


@pytest.mark.parametrize(
    ("flag", "expected"),
    [
        ("--data.batch_size=-5", "--data.batch_size: expected an integer above 0, got -5 (see --help)"),
        ("--data.batch_size=ten", "--data.batch_size: expected an integer above 0, got 'ten' (see"),
        ("--data.val_size=0", "--data.val_size: expected an integer above 0, got 0 (see --help)"),
        ("--data.num_workers=-1", "--data.num_workers: expected an integer of 0 or more, got -1"),
        ("--model.lr=0", "--model.lr: expected a number above 0, got 0 (see --help)"),
        ("--model.lr=x", "--model.lr: expected a number above 0, got 'x' (see --help)"),
        ("--model.label_smoothing=1.5", "--model.label_smoothing: expected a number from 0 to 1, got 1.5"),
        ("--data.max_rotation=-1", "--data.max_rotation: expected a number of 0 or more, got -1"),
        ("--trainer.precision=17", "--trainer.precision: expected one of 64, 32, 16, transformer-engine,"),
        ("--data.batchsize=3", "unrecognized arguments: --data.batchsize=3"),
        # No abbreviations, and the closest flag named.
        ("--trainer.max_epoch=3", "--trainer.max_epoch=3: did you mean --trainer.max_epochs?"),
        ("--trainer.max_epochs=three", "--trainer.max_epochs: expected an integer (or null), got 'three'"),
        ("--config=no/such.yaml", "--config: File does not exist"),
    ],
)
def test_bad_flag_is_one_line(workdir, mnist_dir, capsys, flag, expected):
    assert expected in parse_error_of(capsys, *fit_args(mnist_dir, flag))
    assert not (workdir / "lightning_logs").exists()


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--trainer.devices=0"], "--trainer.devices: `Trainer(devices='0')` value is not a valid input"),
        (["--trainer.strategy=ddp", "--trainer.num_nodes=0"], "--trainer.num_nodes: `num_nodes` must be"),
        (["--trainer.strategy=nonsense"], "--trainer.strategy: You selected an invalid strategy name"),
    ],
)
def test_settings_the_trainer_refuses_are_one_line_naming_the_flag(workdir, mnist_dir, flags, expected):
    assert expected in error_of(*fit_args(mnist_dir, *flags))
    assert not (workdir / "lightning_logs").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without a GPU")
def test_asking_for_a_gpu_that_is_not_there_says_so_and_what_to_use(workdir, mnist_dir):
    assert error_of(*fit_args(mnist_dir, "--trainer.accelerator=gpu")) == (
        "mnist_lit: error: --trainer.accelerator gpu: torch finds no GPU on this machine: use "
        "--trainer.accelerator cpu, or auto for whatever the machine has"
    )
    message = error_of(*fit_args(mnist_dir, "--trainer.accelerator=cuda"))
    assert message.startswith("mnist_lit: error: --trainer.accelerator cuda: not available on this machine")


def test_unknown_command_lists_every_command(capsys):
    message = parse_error_of(capsys, "fitt")
    assert (
        "unknown command 'fitt': did you mean 'fit'? choose from fit, validate, test, predict, export"
        in message
    )


@pytest.mark.parametrize("flag", ["--print_config", "--config"])
def test_a_flag_before_the_command_says_the_command_comes_first(capsys, flag):
    message = parse_error_of(capsys, flag, "x.yaml")
    assert message == (
        f"mnist_lit: error: unknown command {flag!r}: a command comes first, then its flags "
        f"(python -m mnist_lit fit {flag} ...): choose from fit, validate, test, predict, export, stats, "
        "serve, tune"
    )


@pytest.mark.parametrize(
    ("text", "holds"), [("", "is empty"), ("hello\n", "holds 'hello'"), ("- 1\n", "holds [1]")]
)
def test_a_config_file_without_settings_is_named(workdir, mnist_dir, capsys, text, holds):
    (workdir / "recipe.txt").write_text(text)
    message = parse_error_of(capsys, *fit_args(mnist_dir, "--config=recipe.txt"))
    assert message.startswith(f"mnist_lit: error: --config recipe.txt: {holds}"), message
    assert "a recipe is a YAML mapping of settings" in message


def test_a_config_files_unknown_key_is_named_with_print_config_too(workdir, mnist_dir, capsys):
    (workdir / "bad.yaml").write_text("model: {lrr: 0.1}\n")
    message = parse_error_of(capsys, "fit", "--config=bad.yaml", "--print_config")
    assert message == "mnist_lit: error: --config bad.yaml: unknown setting model.lrr: did you mean model.lr?"


@pytest.mark.parametrize("print_config", [[], ["--print_config"]])
def test_a_search_file_given_as_the_recipe_says_where_it_goes(workdir, mnist_dir, capsys, print_config):
    search = CONFIGS / "search.yaml"
    message = parse_error_of(capsys, *fit_args(mnist_dir, f"--config={search}"), *print_config)
    assert message.startswith(f"mnist_lit: error: --config {search} is a search space for tune, not a recipe")
    hint = f"--config RECIPE --search {search} (its comments may say which recipe it searches)"
    assert message.endswith(hint)


def test_unknown_key_in_a_config_file_is_one_line_naming_the_file(workdir, mnist_dir, capsys):
    good, config = workdir / "good.yaml", workdir / "recipe.yaml"
    good.write_text(yaml.safe_dump({"model": {"lr": 0.01}}))
    config.write_text(yaml.safe_dump({"model": {"lr": 0.01}, "trainer": {"max_epochz": 2}}))
    message = parse_error_of(capsys, *fit_args(mnist_dir, f"--config={good}", "--config", str(config)))
    said = f"--config {config}: unknown setting trainer.max_epochz: did you mean trainer.max_epochs?"
    assert message == f"mnist_lit: error: {said}"
    config.write_text(yaml.safe_dump({"model": {"learning_rate": 0.01}}))  # nothing close enough: no guess
    message = parse_error_of(capsys, *fit_args(mnist_dir, f"--config={config}"))
    assert message == f"mnist_lit: error: --config {config}: unknown setting model.learning_rate (see --help)"


def test_a_config_file_that_is_not_yaml_is_named_with_where(workdir, mnist_dir, capsys):
    config = workdir / "recipe.yaml"
    config.write_text("model:\n  lr: [0.1\n")
    message = parse_error_of(capsys, *fit_args(mnist_dir, f"--config={config}"))
    assert message.startswith(f"mnist_lit: error: --config {config}: not valid YAML at line 3, column 1: ")


def test_a_log_folder_that_cannot_be_made_is_one_line_naming_it(workdir, mnist_dir):
    (workdir / "plain_file").write_text("not a folder")  # where the logs' folder should be: root or not
    message = error_of(*fit_args(mnist_dir, "--trainer.logger.save_dir=plain_file/logs"))
    assert message.startswith(f"mnist_lit: error: {workdir}/plain_file/logs"), message
    assert (workdir / "plain_file").read_text() == "not a folder"


@pytest.mark.slow
def test_parse_error_from_the_shell_is_one_line_without_traceback(tmp_path, mnist_dir):
    cmd = [sys.executable, "-m", "mnist_lit", "fit", f"--data.data_dir={mnist_dir}", "--model.lr=-1"]
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "mnist_lit: error: --model.lr: expected a number above 0, got -1 (see --help)"
    ]


@pytest.fixture
def trained(trained_run) -> dict:
    """A real checkpoint: the session's trained run's last.ckpt."""
    return load_checkpoint(trained_run / "lightning_logs/version_0/checkpoints/last.ckpt")


@pytest.mark.parametrize("command", ["fit", "validate", "test", "predict"])
def test_missing_checkpoint(workdir, mnist_dir, command):
    message = error_of(command, f"--data.data_dir={mnist_dir}", "--ckpt_path=gone.ckpt", *QUICK[1:])
    assert "checkpoint gone.ckpt does not exist" in message


def test_a_torchscript_file_as_checkpoint_is_refused_without_torchs_warnings(workdir, mnist_dir, recwarn):
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(workdir / "model.pt"))
    message = error_of("test", f"--data.data_dir={mnist_dir}", "--ckpt_path=model.pt", *QUICK[1:])
    assert "model.pt is not a Lightning checkpoint" in message
    assert not [w for w in recwarn if "TorchScript" in str(w.message)], [str(w.message) for w in recwarn]


def test_file_that_is_not_a_checkpoint(workdir, mnist_dir):
    (workdir / "notes.ckpt").write_text("these are my notes, not a checkpoint\n")
    message = error_of("test", f"--data.data_dir={mnist_dir}", "--ckpt_path=notes.ckpt", *QUICK[1:])
    assert "notes.ckpt is not a Lightning checkpoint" in message


def test_truncated_checkpoint(workdir, mnist_dir, trained):
    torch.save(trained, workdir / "whole.ckpt")
    truncate(workdir / "whole.ckpt", (workdir / "whole.ckpt").stat().st_size // 2)
    message = error_of("fit", f"--data.data_dir={mnist_dir}", "--ckpt_path=whole.ckpt", *QUICK)
    assert "whole.ckpt is not a Lightning checkpoint (a .ckpt file that fit writes): it is" in message


def test_checkpoint_of_a_different_model(workdir, mnist_dir, trained):
    other = {**trained, "state_dict": dict(trained["state_dict"])}
    other["state_dict"]["net.classifier.weight"] = torch.zeros(10, 100)  # a smaller feature map
    torch.save(other, workdir / "other.ckpt")
    message = error_of("test", f"--data.data_dir={mnist_dir}", "--ckpt_path=other.ckpt", *QUICK[1:])
    assert "other.ckpt is a checkpoint of a different model" in message
    assert "net.classifier.weight has shape [10, 100] there but [10, 1568] here" in message


class CreatesMarker:
    """Unpickling this would call ``open(marker, "w")``: code from the checkpoint, run on load."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


@pytest.mark.parametrize("command", ["fit", "validate", "test", "predict"])
def test_checkpoint_that_would_run_code_is_refused_unrun(workdir, mnist_dir, trained, command):
    marker = workdir / "marker"
    torch.save({**trained, "payload": CreatesMarker(marker)}, workdir / "evil.ckpt")
    message = error_of(command, f"--data.data_dir={mnist_dir}", "--ckpt_path=evil.ckpt", *QUICK[1:])
    assert "evil.ckpt was refused" in message and "could run code" in message
    assert not marker.exists()


@pytest.mark.parametrize("command", ["fit", "validate", "test", "predict"])
def test_lightning_itself_loads_checkpoints_weights_only(capsys, command):
    with pytest.raises(SystemExit):
        cli(command, "--print_config")
    assert yaml.safe_load(capsys.readouterr().out)["weights_only"] is True


def test_divergence_stops_with_epoch_and_step_and_keeps_the_last_good_checkpoint(workdir, mnist_dir):
    # lr x 1e15 after every epoch: epoch 0 trains normally, epoch 1 sends the loss to NaN.
    explode = ["--optimizer=Adam", "--lr_scheduler=ExponentialLR", "--lr_scheduler.gamma=1e15"]
    message = error_of(*fit_args(mnist_dir, "--trainer.max_epochs=3", *explode))
    last = workdir / "lightning_logs/version_0/checkpoints/last.ckpt"
    assert "training diverged: the loss became nan at epoch 1, step " in message
    assert f"kept the last good checkpoint {last}" in message
    kept = load_checkpoint(last)
    assert kept["epoch"] == 0 and kept["global_step"] == 5
    assert all(torch.isfinite(v).all() for v in kept["state_dict"].values() if v.is_floating_point())


def test_first_line_of_an_error_without_a_message_is_its_type():
    assert first_line(ValueError("bad header\nmore detail")) == "bad header"
    assert first_line(OSError()) == "OSError"
