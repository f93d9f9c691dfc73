"""The lesson recipes (configs/lessons/): each is one change from the seed recipe and trains; a lesson run's
checkpoint brings its own network back to `test`, `export` and `serve`."""

import signal
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mnist_lit.cli import build_cli
from mnist_lit.errors import UserError
from mnist_lit.evaluate import EvaluationCLI
from mnist_lit.export import from_checkpoint
from mnist_lit.lessons import ConvNetWithoutBatchNorm, FullyConnected
from mnist_lit.model import ConvNet
from mnist_lit.runs import load_checkpoint
from tests.helpers import CONFIGS, QUICK, cli, fit_args

LESSONS = sorted((CONFIGS / "lessons").glob("*.yaml"))
SEED_RECIPE = ["--config", str(CONFIGS / "mnist.yaml")]
# What each lesson changes, as LightningCLI resolves it: the network, the optimizer, the inputs.
EXPECTED = {
    "no_normalization": (ConvNet, torch.optim.Adam, 1e-3, 0.0, (0.0, 1.0)),
    "no_batchnorm": (ConvNetWithoutBatchNorm, torch.optim.Adam, 1e-3, 0.0, None),
    "fully_connected": (FullyConnected, torch.optim.Adam, 1e-3, 0.0, None),
    "sgd": (ConvNet, torch.optim.SGD, 1e-3, 0.0, None),
    "sgd_high_lr": (ConvNet, torch.optim.SGD, 0.1, 0.0, None),
    "momentum": (ConvNet, torch.optim.SGD, 1e-3, 0.9, None),
    "momentum_high_lr": (ConvNet, torch.optim.SGD, 0.01, 0.9, None),
    "sgd_tuned": (ConvNet, torch.optim.SGD, 0.07, 0.0, None),
    "momentum_tuned": (ConvNet, torch.optim.SGD, 0.003, 0.9, None),
}


def test_every_lesson_is_listed_and_each_changes_one_thing_of_the_seed_recipe():
    assert sorted(path.stem for path in LESSONS) == sorted(EXPECTED)
    for path in LESSONS:
        settings = yaml.safe_load(path.read_text())
        assert len(settings) == 1, f"{path.name} changes {sorted(settings)}"
        assert "trainer" not in settings and "seed_everything" not in settings, path.name


@pytest.mark.parametrize("lesson", LESSONS, ids=lambda path: path.stem)
def test_each_lesson_trains_a_tiny_fit_with_what_it_names(lesson, mnist_dir, workdir):
    net_class, optimizer_class, lr, momentum, stats = EXPECTED[lesson.stem]
    args = fit_args(mnist_dir, "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1")
    fit = build_cli([args[0], *SEED_RECIPE, "--config", str(lesson), *args[1:]])
    assert type(fit.model.net) is net_class
    (optimizer,) = fit.trainer.optimizers
    assert type(optimizer) is optimizer_class and optimizer.param_groups[0]["lr"] == lr
    assert optimizer.param_groups[0].get("momentum", 0.0) == momentum
    if stats is not None:
        assert (fit.datamodule.hparams.mean, fit.datamodule.hparams.std) == stats
    # It trained two steps to a finite loss; its checkpoint loads weights-only, naming its network as data.
    checkpoint = load_checkpoint(workdir / "lightning_logs/version_0/checkpoints/last.ckpt")
    assert checkpoint["global_step"] == 2 and torch.isfinite(fit.trainer.callback_metrics["train/loss_epoch"])
    net = checkpoint["hyper_parameters"].get("net")
    if net_class is ConvNet:
        assert net is None or "net" not in checkpoint["hyper_parameters"]
    else:
        assert net["class_path"] == f"mnist_lit.lessons.{net_class.__name__}"


def test_the_seed_recipe_keeps_its_hyperparameters_and_checkpoint_keys(mnist_dir, workdir):
    cli(*fit_args(mnist_dir, "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1"))
    checkpoint = load_checkpoint(workdir / "lightning_logs/version_0/checkpoints/last.ckpt")
    assert sorted(checkpoint["hyper_parameters"]) == sorted(
        ["lr", "weight_decay", "lr_schedule", "label_smoothing", "channels_last", "compile", "_instantiator"]
    )
    assert sorted(k for k in checkpoint["state_dict"] if k.startswith("net.")) == sorted(
        f"net.{k}" for k in ConvNet().state_dict()
    )


def test_a_bare_test_export_and_serve_of_a_lesson_run_rebuild_its_network(mnist_dir, workdir):
    lesson = ["--config", str(CONFIGS / "lessons" / "fully_connected.yaml")]
    args = fit_args(mnist_dir, "--trainer.limit_train_batches=2", "--model.net.init_args.hidden=12")
    cli(args[0], *SEED_RECIPE, *lesson, *args[1:])
    tested = build_cli(["test", *QUICK[1:]], cli_class=EvaluationCLI)
    assert type(tested.model.net) is FullyConnected and tested.model.net.features[1].out_features == 12
    assert 0 < tested.trainer.callback_metrics["test/acc"] <= 1
    # No convolution: no filter or feature-map pictures, and the report's other images are still there.
    events = EventAccumulator(str(workdir / "lightning_logs/version_0/test_0"), size_guidance={"images": 0})
    events.Reload()
    assert sorted(events.Tags()["images"]) == ["test/confusion_matrix", "test/mistakes"]
    exported = from_checkpoint(next((workdir / "lightning_logs/version_0/checkpoints").glob("epoch*.ckpt")))
    assert type(exported.net) is FullyConnected and exported(torch.rand(3, 1, 28, 28)).shape == (3, 10)


def test_a_checkpoint_naming_a_network_that_is_not_here_is_refused_in_one_line(trained_run, tmp_path):
    state = load_checkpoint(trained_run / "lightning_logs/version_0/checkpoints/last.ckpt")
    untrusted = "only networks defined in mnist_lit or torch.nn are rebuilt"
    for class_path, why in [
        ("mnist_lit.lessons.Gone", "which cannot be imported"),
        ("os.system", untrusted),
        ("nowhere.Net", untrusted),
    ]:
        state["hyper_parameters"]["net"] = {"class_path": class_path, "init_args": {}}
        path = tmp_path / "other.ckpt"
        torch.save(state, path)
        wanted = rf"^{path} (was trained with|names) the network {class_path}(,|:) .*{why}"
        with pytest.raises(UserError, match=wanted) as err:
            from_checkpoint(path)
        assert "\n" not in str(err.value)


def served(checkpoint: Path, digit: torch.Tensor, maps: bool) -> dict:
    """The serve worker's answer for one digit, computed in this process (its setup's settings undone)."""
    from mnist_lit.digit_api import DigitAPI

    api, threads = DigitAPI(checkpoint, max_batch_size=2, batch_timeout=0.0), torch.get_num_threads()
    try:
        api.setup("cpu")
        return api.predict((digit, maps))
    finally:
        torch.set_num_threads(threads)
        signal.signal(signal.SIGINT, signal.default_int_handler)


def test_the_api_answers_the_maps_only_when_asked(trained_run):
    checkpoint = trained_run / "lightning_logs/version_0/checkpoints/last.ckpt"
    digit = torch.zeros(1, 28, 28, dtype=torch.uint8)
    digit[0, 6:22, 12:16] = 255  # a one
    plain, with_maps = served(checkpoint, digit, False), served(checkpoint, digit, True)
    assert sorted(plain) == ["digit", "logits", "probabilities"]
    assert {k: v for k, v in with_maps.items() if k != "maps"} == plain
    maps = with_maps["maps"]
    shapes = [torch.tensor(maps["filters"]).shape] + [torch.tensor(block).shape for block in maps["blocks"]]
    assert shapes == [(16, 5, 5), (16, 14, 14), (32, 7, 7)]
    # The filters are the checkpoint's own weights, 128 for zero; each block's strongest value is 255.
    weights = load_checkpoint(checkpoint)["state_dict"]["net.features.0.weight"][:, 0]
    expected = ((0.5 + weights / (2 * weights.abs().max())) * 255).round()
    assert torch.tensor(maps["filters"]).float().sub(expected).abs().max() <= 1
    assert all(torch.tensor(block).max() == 255 for block in maps["blocks"])


def test_the_lessons_tool_draws_each_question_and_tables_the_results(
    trained_run, tmp_path, monkeypatch, capsys
):
    import json
    import shutil
    import sys

    from tools import lessons

    runs = tmp_path / "runs"
    shutil.copytree(trained_run / "lightning_logs", runs / "seed" / "seed1" / "lightning_logs")
    result = {"variant": "seed", "seed": 1, "budget": [], "fit_s": 12.3, "test_acc": 0.5}
    (runs / "results.json").write_text(json.dumps([result]))
    monkeypatch.setattr(sys, "argv", ["tools.lessons", "--runs", str(runs), "--out", str(tmp_path / "docs")])
    lessons.main()
    written = sorted(path.name for path in (tmp_path / "docs").glob("*.png"))
    assert written == sorted(
        [f"lessons_{q}.png" for q in lessons.QUESTIONS]
        + [f"lessons_{p}.png" for p in ("filters", "block1", "block2")]
    )
    row = "| seed recipe (Adam 1e-3) | 1 | 50.00% | 50.00% | 50.00%-50.00% | 12-12 |"
    assert row in capsys.readouterr().out
