"""`serve`: the real server in a subprocess, a checkpoint trained here, real PNG/JPEG files over HTTP.

The synthetic digits lose their meaning once centred (they differ by position), so answers are checked
against what `predict --data.predict_path` says for the same files; real MNIST digits, where
../shared/data exists, are checked against their labels.
"""

import base64
import csv
import io
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from tests.helpers import (
    QUICK,
    REAL_DATA,
    cli,
    fit_args,
    free_port,
    running_server,
    subprocess_env,
    synthetic_digits,
    write_mnist,
)

BATCH_LINE = re.compile(r"^serve: batch of (\d+) in", re.MULTILINE)


def encoded(picture: Image.Image, format: str = "PNG") -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format)
    return base64.b64encode(buffer.getvalue()).decode()


def pictures() -> dict[str, Image.Image]:
    """Files as users have them: PNG and JPEG, grey and colour, both polarities, MNIST's size and larger."""
    digits, _ = synthetic_digits(6, seed=5)
    grey = [Image.fromarray(d.astype(np.uint8)) for d in digits]
    return {
        "a.png": grey[0],
        "b.png": grey[1].resize((84, 84)),
        "c.png": Image.fromarray(255 - np.asarray(grey[2])).resize((56, 70)),  # dark ink on light paper
        "d.jpg": grey[3].resize((112, 112)).convert("RGB"),
        "e.png": grey[4].convert("RGBA"),
        "f.jpeg": Image.fromarray(255 - np.asarray(grey[5])).convert("RGB").resize((60, 60)),
    }


def post(server, json=None, **kwargs) -> requests.Response:
    return requests.post(f"{server.url}/predict", json=json, timeout=120, **kwargs)


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """A folder holding one fit run (lightning_logs/version_0) on tiny synthetic MNIST."""
    folder = tmp_path_factory.mktemp("serve")
    data = write_mnist(folder / "data")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        cli(*fit_args(data))
    return folder


@pytest.fixture(scope="module")
def server(run_folder):
    # A long batch window, so that requests sent together are batched even on a crowded machine.
    with running_server(run_folder, "--batch_timeout=0.25") as server:
        yield server


@pytest.fixture(scope="module")
def expected(run_folder) -> dict[str, dict]:
    """What `predict --data.predict_path` says for pictures(): file name -> digit and probabilities."""
    folder = run_folder / "digits"
    folder.mkdir()
    for name, picture in pictures().items():
        picture.save(folder / name)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(run_folder)
        cli("predict", "--data.predict_path=digits", "--predictions.output=predicted.csv", *QUICK[1:])
    with open(run_folder / "predicted.csv") as f:
        return {
            Path(row["file"]).name: {
                "digit": int(row["digit"]),
                "probabilities": [float(row[f"p{c}"]) for c in range(10)],
            }
            for row in csv.DictReader(f)
        }


def check_answer(answer: dict, want: dict) -> None:
    assert sorted(answer) == ["digit", "logits", "probabilities"]
    probabilities, logits = torch.tensor(answer["probabilities"]), torch.tensor(answer["logits"])
    assert probabilities.shape == logits.shape == (10,)
    assert torch.allclose(logits.softmax(0), probabilities, atol=1e-6)
    assert abs(float(probabilities.sum()) - 1) < 1e-5
    assert answer["digit"] == int(logits.argmax()) == want["digit"]
    assert probabilities.tolist() == pytest.approx(want["probabilities"], abs=2e-6)  # the CSV rounds


def test_served_answers_equal_predict_for_the_same_files(server, expected):
    assert sorted(expected) == sorted(pictures())
    assert len({want["digit"] for want in expected.values()}) > 1  # not one answer for everything
    for name, picture in pictures().items():
        response = post(server, {"image": encoded(picture, "JPEG" if "jp" in name else "PNG")})
        assert response.status_code == 200, response.text
        check_answer(response.json(), expected[name])
    assert requests.get(f"{server.url}/health", timeout=30).text == "ok"
    for _ in range(2):  # the second one too: a shared response object once broke it
        page = requests.get(f"{server.url}/", timeout=30)
        assert page.headers["content-type"].startswith("text/html") and "<canvas" in page.text


def blank_canvas() -> str:
    return encoded(Image.new("RGB", (280, 280), "black"))


def bad_requests() -> dict[str, tuple[dict, int, str]]:
    """name -> (requests.post arguments, status, words the one-sentence answer must hold)."""
    png = base64.b64decode(encoded(pictures()["a.png"]))
    big = b"x" * (50 * 2**20)
    as_json, as_text = {"Content-Type": "application/json"}, {"Content-Type": "text/plain"}
    return {
        "not an image": ({"json": {"image": base64.b64encode(b"hello").decode()}}, 422, "not an image"),
        "truncated PNG": ({"json": {"image": base64.b64encode(png[:-40]).decode()}}, 422, "decoded"),
        "1x1 image": ({"json": {"image": encoded(Image.new("L", (1, 1), 255))}}, 422, "no digit"),
        "blank canvas": ({"json": {"image": blank_canvas()}}, 422, "no digit"),
        "invalid base64": ({"json": {"image": "not base64!"}}, 422, "base64"),
        "empty image": ({"json": {"image": ""}}, 422, "empty"),
        "no image field": ({"json": {"picture": "abc"}}, 400, 'no "image"'),
        "image not a string": ({"json": {"image": [1, 2]}}, 400, "not a string"),
        "JSON list": ({"json": [1, 2]}, 400, "not what /predict takes"),
        "not JSON": ({"data": b"{'image': ", "headers": as_json}, 400, "not valid JSON"),
        "empty body": ({"data": b""}, 400, "empty"),
        "PNG as the body": ({"data": png, "headers": {"Content-Type": "image/png"}}, 415, "image/png"),
        "JSON as text/plain": ({"data": b'{"image": "x"}', "headers": as_text}, 415, "text/plain"),
        "50 MB body": ({"data": big, "headers": as_json}, 413, "limit"),
        "50 MB chunked": ({"data": iter([big[:2**20]] * 50)}, 413, "limit"),
    }  # fmt: skip


@pytest.mark.parametrize("case", list(bad_requests()))
def test_bad_input_gets_a_4xx_sentence_and_the_next_request_is_served(server, expected, case):
    arguments, status, words = bad_requests()[case]
    response = requests.post(f"{server.url}/predict", timeout=120, **arguments)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and words in detail, detail
    good = post(server, {"image": encoded(pictures()["a.png"])})
    assert good.status_code == 200, good.text
    check_answer(good.json(), expected["a.png"])
    assert "Traceback" not in server.output()


def test_200_concurrent_requests_are_all_answered_and_batched(server, expected):
    names = list(pictures())
    bodies = {name: {"image": encoded(pictures()[name], "JPEG" if "jp" in name else "PNG")} for name in names}
    jobs = [names[i % len(names)] for i in range(200)]
    log_before = len(server.output())
    start = threading.Barrier(len(jobs))

    def ask(name: str) -> tuple[str, requests.Response]:
        start.wait(timeout=120)  # all threads send at once
        return name, post(server, bodies[name])

    began = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        answers = list(pool.map(ask, jobs))
    seconds = time.perf_counter() - began
    for name, response in answers:
        assert response.status_code == 200, response.text
        check_answer(response.json(), expected[name])
    sizes = [int(n) for n in BATCH_LINE.findall(server.output()[log_before:])]
    assert sum(sizes) == len(jobs)  # every request went through exactly one batch
    assert max(sizes) > 1, sizes
    print(f"200 concurrent requests in {seconds:.1f} s, batch sizes {sorted(sizes, reverse=True)}")


@pytest.mark.skipif(
    not (REAL_DATA / "MNIST" / "raw" / "t10k-images-idx3-ubyte").is_file(), reason="no ../shared/data"
)
def test_real_mnist_test_digits_served_as_png_are_mostly_right(tmp_path, monkeypatch):
    from mnist_lit.data import MNISTDataModule

    monkeypatch.chdir(tmp_path)
    cli(
        "fit", f"--data.data_dir={REAL_DATA}", "--data.download=false", *QUICK,
        "--trainer.limit_train_batches=60", "--trainer.limit_val_batches=1",
    )  # fmt: skip
    data = MNISTDataModule(data_dir=str(REAL_DATA), download=False)
    data.setup("test")
    images, labels = data.test_set[:100]
    with running_server(tmp_path) as server:
        right = 0
        for image, label in zip(images, labels, strict=True):
            picture = Image.fromarray(image[0].numpy())
            response = post(server, {"image": encoded(picture)})
            assert response.status_code == 200, response.text
            right += response.json()["digit"] == int(label)
    assert right >= 85, f"{right} of 100 real test digits served right"


def test_start_up_errors_are_one_line(run_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    checkpoint = next((run_folder / "lightning_logs").rglob("last.ckpt"))
    for args, words in (
        ([], "no trained run found"),
        (["--ckpt_path=missing.ckpt"], "checkpoint missing.ckpt does not exist"),
        ([f"--ckpt_path={checkpoint}", "--port=80"], "--port 80 is not between 1024 and 65535"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            cli("serve", *args)
        message = str(exit_info.value.code)
        assert message.startswith("mnist_lit: error: ") and words in message and "\n" not in message


def test_port_in_use_and_bad_flags_end_in_one_line_without_traceback(run_folder):
    with socket.socket() as taken:
        port = free_port()
        taken.bind(("127.0.0.1", port))
        taken.listen()
        in_use = f"--port {port} is already in use on 127.0.0.1"
        for flags, words in (([f"--port={port}"], in_use), (["--host=1.2.3.4"], "--host")):
            result = subprocess.run(
                [sys.executable, "-m", "mnist_lit", "serve", *flags], cwd=run_folder, env=subprocess_env(),
                capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            assert result.returncode != 0
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("mnist_lit: error: "), result.stderr
            assert words in lines[0]


def test_other_commands_do_not_import_litserve():
    code = (
        "import sys\nfrom mnist_lit.cli import main\n"
        "for command in ('fit', 'export', 'serve'):\n"
        "    try:\n        main([command, '--help'])\n    except SystemExit:\n        pass\n"
        "print(sorted(m for m in ('litserve', 'fastapi', 'uvicorn') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
