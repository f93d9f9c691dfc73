"""`python -m mnist_lit export`: ONNX (checked with onnxruntime) and TorchScript, normalization built in."""

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from mnist_lit.data import MNISTDataModule
from mnist_lit.export import SUFFIXES
from mnist_lit.model import MNISTClassifier
from mnist_lit.runs import load_checkpoint, newest_run
from tests.helpers import AVERAGED, REAL_DATA, cli, error_of, fit_args, parse_error_of


@pytest.fixture
def trained(trained_copy) -> Path:
    """A copy of the session's trained run (its own normalization constants, so they must be read)."""
    return trained_copy


def pytorch_logits(checkpoint: Path, images: torch.Tensor) -> torch.Tensor:
    """What the project itself computes: the LightningModule on the datamodule's normalized batch."""
    state = load_checkpoint(checkpoint)
    # LightningCLI adds "_instantiator" (how it built the object) to the saved init arguments.
    model_args, data_args = (
        {k: v for k, v in state[key].items() if not k.startswith("_")}
        for key in ("hyper_parameters", "datamodule_hyper_parameters")
    )
    model = MNISTClassifier(**model_args).eval()
    model.load_state_dict(state["state_dict"])
    data = MNISTDataModule(**data_args)
    with torch.no_grad():
        return model(data.normalize(images))


def test_images(data_dir: Path) -> torch.Tensor:
    data = MNISTDataModule(data_dir=str(data_dir), download=False)
    data.setup("test")
    return data.test_set.images[:1000]


test_images.__test__ = False  # a helper, not a test


def test_onnx_export_matches_pytorch_on_test_images(trained, mnist_dir, monkeypatch, capsys):
    monkeypatch.chdir(trained)
    cli("export", "--format=onnx", "--output=exported/model.onnx")
    best, _ = newest_run(Path("lightning_logs")).best_checkpoint()
    assert f"Exported {best} to exported/model.onnx" in capsys.readouterr().out

    session = ort.InferenceSession(str(trained / "exported" / "model.onnx"))
    assert [(i.name, i.shape) for i in session.get_inputs()] == [("pixels", ["batch", 1, 28, 28])]
    data_dirs = [mnist_dir] + ([REAL_DATA] if (REAL_DATA / "MNIST" / "raw").is_dir() else [])
    for data_dir in data_dirs:
        images = test_images(data_dir)
        pixels = (images.float() / 255).numpy()  # what an application has: pixels in [0, 1]
        expected = pytorch_logits(best, images).numpy()
        for batch in (pixels, pixels[:1]):  # any batch size
            (logits,) = session.run(["logits"], {"pixels": batch})
            np.testing.assert_allclose(logits, expected[: len(batch)], rtol=0, atol=1e-5)


def test_torchscript_export_of_a_chosen_checkpoint_matches_pytorch(trained, mnist_dir, monkeypatch, recwarn):
    monkeypatch.chdir(trained)
    last = trained / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    cli("export", "--format=torchscript", f"--ckpt_path={last}", "--output=model.pt")
    assert not [w for w in recwarn if "torch.jit" in str(w.message)]  # the user chose TorchScript
    images = test_images(mnist_dir)
    exported = torch.jit.load(trained / "model.pt")
    torch.testing.assert_close(
        exported(images.float() / 255), pytorch_logits(last, images), rtol=0, atol=1e-5
    )


def test_ckpt_path_last_exports_the_newest_runs_last_checkpoint(trained, mnist_dir, monkeypatch, capsys):
    monkeypatch.chdir(trained)
    cli("export", "--format=torchscript", "--ckpt_path=last", "--output=last.pt")
    last = Path("lightning_logs/version_0/checkpoints/last.ckpt")
    assert f"export: using {last}" in capsys.readouterr().out
    images = test_images(mnist_dir)
    exported = torch.jit.load(trained / "last.pt")
    torch.testing.assert_close(
        exported(images.float() / 255), pytorch_logits(last, images), rtol=0, atol=1e-5
    )


def test_export_never_overwrites_unless_asked(trained, monkeypatch):
    monkeypatch.chdir(trained)
    (trained / "keep.onnx").write_text("someone's file")
    with pytest.raises(SystemExit) as exit_info:
        cli("export", "--output=keep.onnx")
    message = str(exit_info.value.code)
    assert message.startswith("mnist_lit: error: keep.onnx already exists") and "--overwrite" in message
    assert (trained / "keep.onnx").read_text() == "someone's file"
    cli("export", "--output=keep.onnx", "--overwrite=true")
    assert ort.InferenceSession(str(trained / "keep.onnx")).get_outputs()[0].shape == ["batch", 10]


def test_export_without_a_run_says_to_fit_first(workdir):
    for flags in ([], ["--ckpt_path=last"]):
        with pytest.raises(SystemExit) as exit_info:
            cli("export", *flags)
        assert "run `python -m mnist_lit fit` first" in str(exit_info.value.code)
    assert not (workdir / "model.onnx").exists()


def test_export_flags_are_checked_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli("export", "--format=pdf")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("mnist_lit: error: --format:") and err.count("\n") == 1


def test_a_checkpoint_naming_a_network_from_elsewhere_is_refused_unimported(trained, monkeypatch):
    # A checkpoint is data: the network it names is rebuilt only from mnist_lit's and torch.nn's classes.
    monkeypatch.chdir(trained)
    planted = trained / "planted_net.py"
    planted.write_text(
        "import pathlib\npathlib.Path('imported').write_text('ran')\nimport torch\nNet = torch.nn.Linear\n"
    )
    monkeypatch.syspath_prepend(str(trained))
    last = trained / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)
    state["hyper_parameters"]["net"] = {"class_path": "planted_net.Net", "init_args": {}}
    torch.save(state, trained / "planted.ckpt")
    message = error_of("export", "--ckpt_path=planted.ckpt")
    assert "planted.ckpt names the network planted_net.Net" in message
    assert "mnist_lit or torch.nn" in message
    assert not (trained / "imported").exists() and not (trained / "model.onnx").exists()


def test_a_run_with_weight_averaging_exports_the_average(workdir, mnist_dir):
    # configs/best.yaml's EMAWeightAveraging: the checkpoint's state_dict is the average, which export
    # must carry, not the weights being trained (current_model_state).
    cli(*fit_args(mnist_dir, *AVERAGED))
    last = workdir / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    cli("export", "--format=torchscript", f"--ckpt_path={last}", "--output=model.pt")
    state = load_checkpoint(last)
    trained_weights = {k: v for k, v in state["current_model_state"].items() if k.startswith("net.")}
    assert any(not torch.equal(v, state["state_dict"][k]) for k, v in trained_weights.items())
    images = test_images(mnist_dir)
    exported = torch.jit.load(workdir / "model.pt")
    torch.testing.assert_close(
        exported(images.float() / 255), pytorch_logits(last, images), rtol=0, atol=1e-5
    )


def test_an_output_that_is_a_folder_is_refused_even_with_overwrite(trained, monkeypatch):
    monkeypatch.chdir(trained)
    (trained / "my_digits").mkdir()
    (trained / "my_digits" / "notes.txt").write_text("kept")
    message = error_of("export", "--output=my_digits", "--overwrite=true")
    assert message == "mnist_lit: error: --output my_digits is a folder: give the name of a file to write"
    assert (trained / "my_digits" / "notes.txt").read_text() == "kept"
    assert not list(trained.glob(".my_digits*")), "a partial file was left behind"


def test_an_output_that_cannot_be_written_is_one_line_and_leaves_nothing(trained, monkeypatch):
    # A file where the output's folder should be: no mkdir can make it, root or not.
    monkeypatch.chdir(trained)
    (trained / "plain_file").write_text("not a folder")
    for export_format, name in (("onnx", "model.onnx"), ("torchscript", "model.pt")):
        message = error_of("export", f"--format={export_format}", f"--output=plain_file/sub/{name}")
        said = f"mnist_lit: error: --output plain_file/sub/{name}: cannot write in "
        assert message.startswith(said), message
    assert (trained / "plain_file").read_text() == "not a folder"
    assert not list(trained.rglob("*.partial")) and not list(trained.rglob("model.*"))


def test_a_missing_checkpoint_is_said_before_an_existing_output(trained, monkeypatch):
    monkeypatch.chdir(trained)
    (trained / "model.onnx").write_text("someone's file")
    assert (
        error_of("export", "--ckpt_path=nope.ckpt") == "mnist_lit: error: checkpoint nope.ckpt does not exist"
    )
    assert (trained / "model.onnx").read_text() == "someone's file"


def test_an_output_named_for_the_other_format_is_a_flag_error_before_any_work(workdir, capsys):
    # No run here: refused before looking for a checkpoint.
    for export_format, name, other in (
        ("torchscript", "model.onnx", "onnx"),
        ("onnx", "net.PTH", "torchscript"),
    ):
        line = parse_error_of(capsys, "export", f"--format={export_format}", f"--output={name}")
        assert line.startswith(f"mnist_lit: error: --output {name} names ") and line.endswith(
            f"but --format is {export_format}: name it {Path(name).stem}{SUFFIXES[export_format]}, "
            f"or pass --format {other}"
        ), line
    assert list(workdir.iterdir()) == []
