"""The libraries' own words, as they are today, rewritten into one line: each test feeds a real error from the
library (jsonargparse, torch.load, c10d) to messages.py, so a change of their wording fails here first."""

import datetime
import pickle
import socket
import sys
from typing import Literal

import pytest
import torch
import torch.distributed as dist
from jsonargparse import ArgumentParser
from jsonargparse.typing import PositiveFloat

from mnist_lit import messages
from tests.helpers import Guarded, wait_all


def jsonargparse_error(*args: str) -> str:
    parser = ArgumentParser(exit_on_error=False, allow_abbrev=False)
    parser.add_argument("--epochs", type=int | None)
    parser.add_argument("--lr", type=PositiveFloat)
    parser.add_argument("--format", type=Literal["onnx", "torchscript"])
    parser.add_argument("--port", type=int)
    parser.add_argument("--precision", type=Literal[16, 32] | Literal["bf16-mixed", "32-true"] | None)
    with pytest.raises(Exception) as error:  # jsonargparse's ArgumentError
        parser.parse_args(list(args))
    return str(error.value)


def test_a_wrong_type_is_named_in_words():
    text = jsonargparse_error("--epochs=three")
    assert messages.UNION_ERROR.search(" ".join(text.split())), text  # the wording the rewrite reads
    assert messages.readable(text).startswith("--epochs: expected an integer (or null), got 'three'")


def test_a_value_outside_the_choices_lists_them():
    text = jsonargparse_error("--format=tflite")
    assert messages.LITERAL_ERROR.search(" ".join(text.split())), text
    assert messages.readable(text).startswith("--format: expected one of 'onnx', 'torchscript', got 'tflite'")


def test_a_value_of_the_wrong_type_or_out_of_range_is_said_in_words():
    text = jsonargparse_error("--port=abc")
    assert messages.TYPE_ERROR.search(" ".join(text.split())), text
    assert messages.readable(text).startswith("--port: expected an integer, got 'abc'")
    for value, got in (("0", "0"), ("-1", "-1"), ("x", "'x'")):
        text = jsonargparse_error(f"--lr={value}")
        assert messages.RESTRICTED_ERROR.search(" ".join(text.split())), text
        assert messages.readable(text).startswith(f"--lr: expected a number above 0, got {got}"), text


def test_a_union_of_choices_lists_them_once():
    text = jsonargparse_error("--precision=17")
    assert messages.UNION_ERROR.search(" ".join(text.split())), text
    said = "--precision: expected one of 16, 32, bf16-mixed, 32-true (or null), got '17'"
    assert messages.readable(text).startswith(said), messages.readable(text)


@pytest.mark.parametrize(
    ("settings", "said"),
    [
        ({"devices": 0}, "--trainer.devices: `Trainer(devices=0)` value is not a valid input"),
        ({"strategy": "ddp", "num_nodes": 0}, "--trainer.num_nodes: `num_nodes` must be a positive integer"),
        ({"strategy": "nonsense"}, "--trainer.strategy: You selected an invalid strategy name"),
        ({"accelerator": "tpu"}, "the --trainer settings need a package that is not installed: "),
    ],
)
def test_the_trainer_refusing_its_settings_names_the_flag(settings, said):
    from lightning.pytorch import Trainer

    with pytest.raises(Exception) as error:
        Trainer(**settings, logger=False)
    assert messages.trainer_refused(error.value).startswith(said), messages.trainer_refused(error.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without a GPU")
def test_the_trainer_asked_for_a_missing_gpu_says_what_to_use():
    from lightning.pytorch import Trainer

    for accelerator in ("gpu", "cuda"):
        with pytest.raises(Exception) as error:
            Trainer(accelerator=accelerator, logger=False)
        said = messages.trainer_refused(error.value)
        assert said.startswith(f"--trainer.accelerator {accelerator}: "), said
        assert "cpu" in said and "auto" in said


def test_an_oserror_about_a_path_is_said_as_the_shell_says_it(tmp_path):
    (tmp_path / "plain_file").write_text("not a folder")
    with pytest.raises(OSError) as error:
        (tmp_path / "plain_file" / "logs").mkdir(parents=True)
    assert messages.explained(error.value) == f"{tmp_path}/plain_file/logs: Not a directory"
    assert messages.explained(OSError(28, "No space left on device")) is None  # no path: not explained
    assert messages.explained(ValueError("x")) is None


def test_an_unknown_flag_gets_the_closest_known_one():
    text = jsonargparse_error("--epoch=3")
    assert messages.UNKNOWN_KEY.search(text), text
    assert messages.readable(text, ["--epochs", "--lr"]).endswith("did you mean --epochs?")
    assert messages.readable(text, ["--lr"]).endswith("(see --help)")  # nothing close: no guess


def test_a_checkpoint_that_would_run_code_is_named_with_what_it_holds(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": print}, path)  # pickles a GLOBAL: a function to call
    with pytest.raises(pickle.UnpicklingError) as error:
        torch.load(path, weights_only=True)
    line = messages.checkpoint_refused(path, error.value, "is not a checkpoint")
    assert line.startswith(f"{path} was refused: it holds objects other than tensors and plain data")
    assert "GLOBAL" in line and "\n" not in line


def test_garbage_is_not_a_checkpoint_in_one_line(tmp_path):
    path = tmp_path / "garbage.ckpt"
    path.write_bytes(b"\x80\x02garbage that is no pickle")
    with pytest.raises(Exception) as error:
        torch.load(path, weights_only=True)
    line = messages.checkpoint_refused(path, error.value, "is not a checkpoint")
    assert line.startswith(f"{path} is not a checkpoint (") and "\n" not in line


@pytest.mark.parametrize(
    "contents, says",
    [
        (b"some notes\nsecond line", "is not a checkpoint (it is text: 'some notes')"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 12\n",
         "is a Git LFS pointer, not the checkpoint itself: fetch it with `git lfs pull`"),
    ],
    ids=["text", "git-lfs-pointer"],
)  # fmt: skip
def test_a_text_file_is_named_for_what_it_is(tmp_path, contents, says):
    path = tmp_path / "last.ckpt"
    path.write_bytes(contents)
    with pytest.raises(Exception) as error:
        torch.load(path, weights_only=True)
    assert messages.checkpoint_refused(path, error.value, "is not a checkpoint") == f"{path} {says}"


def test_ranks_that_never_joined_are_counted():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(RuntimeError) as error:  # rank 0 of 2 waits for a rank 1 that never starts
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=2,
            timeout=datetime.timedelta(seconds=1),
        )  # fmt: skip
    line = messages.stalled_message(error.value)
    assert line is not None, str(error.value)
    assert line.startswith("only 1 of 2 processes started within ") and "--trainer.strategy.timeout" in line


def test_other_errors_are_not_taken_for_a_stalled_rank():
    assert messages.stalled_message(RuntimeError("CUDA out of memory")) is None
    assert messages.stalled_message(ValueError("Timed out")) is None


RANK = """
import datetime, os, sys, time
import torch, torch.distributed as dist
from mnist_lit import messages
rank, port = int(sys.argv[1]), sys.argv[2]
dist.init_process_group(
    "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
    timeout=datetime.timedelta(seconds=30),
)
dist.barrier()
if rank == 1:
    os._exit(0)  # gone, as after kill -9
time.sleep(1)
try:
    dist.all_reduce(torch.ones(1))
except RuntimeError as err:
    err.__notes__ = [messages.KEPT_NOTE + "runs/version_0/checkpoints/last.ckpt"]  # as faults.py adds it
    print(type(err).__name__)
    print(messages.stalled_message(err))
    print(err)
"""


@pytest.mark.slow
def test_a_rank_that_died_mid_collective_is_named_lost(tmp_path):
    # Two processes, as DDP's ranks (a process group of their own, apart from this one's state): rank 1
    # leaves after a barrier, rank 0 meets gloo's own error in its next all_reduce and rewrites it.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ranks = [Guarded([sys.executable, "-c", RANK, rank, port], tmp_path, timeout=120) for rank in (0, 1)]
    out = wait_all(ranks)[0].stdout
    kind, line, *gloo = out.splitlines() or ["", ""]
    assert kind == "RuntimeError" and "Connection" in "".join(gloo), out
    assert line.startswith("rank 0 of 2 lost rank 1: it died or was killed"), out
    assert line.endswith("resume with the same command plus --ckpt_path=runs/version_0/checkpoints/last.ckpt")
