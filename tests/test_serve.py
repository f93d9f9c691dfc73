"""`serve`: the real server in a subprocess, a checkpoint trained here, real PNG/JPEG files over HTTP.

The synthetic digits lose their meaning once centred (they differ by position), so answers are checked
against what `predict --data.predict_path` says for the same files; real MNIST digits, where
../shared/data exists, are checked against their labels.
"""

import base64
import contextlib
import csv
import fcntl
import inspect
import io
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image, ImageDraw

from tests.helpers import (
    QUICK,
    REAL_DATA,
    cli,
    free_port,
    parse_error_of,
    running_server,
    session_processes,
    subprocess_env,
    synthetic_digits,
)
from tests.test_images import jpeg_declaring, png_bomb

BATCH_LINE = re.compile(r"^serve: batch of (\d+) in", re.MULTILINE)
MAX_PIXELS_FLAG = 49_500_000  # the module's server's --max_pixels


def encoded(picture: Image.Image, format: str = "PNG") -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format)
    return base64.b64encode(buffer.getvalue()).decode()


def b64(data: bytes) -> dict:
    return {"image": base64.b64encode(data).decode()}


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
def run_folder(tmp_path_factory, trained_run) -> Path:
    """A copy of the session's trained run (lightning_logs/version_0) to serve, and to predict beside."""
    folder = tmp_path_factory.mktemp("serve") / "run"
    shutil.copytree(trained_run, folder)
    return folder


@pytest.fixture(scope="module")
def server(run_folder):
    # A long batch window, so that requests sent together are batched even on a crowded machine; a pixel
    # budget under the default (50 MP) but over the largest test image (49 MP), so that an upload decoded
    # with the default instead of the flag shows.
    flags = ["--batch_timeout=0.25", "--body_timeout=3", f"--max_pixels={MAX_PIXELS_FLAG}"]
    with running_server(run_folder, *flags) as server:
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


@pytest.mark.slow
def test_served_answers_equal_predict_for_the_same_files(server, expected):
    assert sorted(expected) == sorted(pictures())
    assert len({want["digit"] for want in expected.values()}) > 1  # not one answer for everything
    for name, picture in pictures().items():
        response = post(server, {"image": encoded(picture, "JPEG" if "jp" in name else "PNG")})
        assert response.status_code == 200, response.text
        check_answer(response.json(), expected[name])
    # Wrapped at 76 characters a line, as `base64` and Python's base64.encodebytes write it.
    wrapped = base64.encodebytes(base64.b64decode(encoded(pictures()["a.png"]))).decode()
    assert "\n" in wrapped
    response = post(server, {"image": wrapped.replace("\n", "\r\n")})
    assert response.status_code == 200, response.text
    check_answer(response.json(), expected["a.png"])
    for scheme in ("data:", "DATA:"):  # a data: URL, as a browser's canvas gives it; schemes in any case
        response = post(server, {"image": f"{scheme}image/png;base64,{encoded(pictures()['a.png'])}"})
        assert response.status_code == 200, response.text
        check_answer(response.json(), expected["a.png"])
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
    good = json.dumps({"image": encoded(pictures()["a.png"])}).encode()
    over = json.dumps(b64(png_bomb(7100, 7000))).encode()  # 49.7 MP: over the flag, under the default
    over_words = "7100x7000 pixels (49.7 megapixels), more than the 49.5 megapixels allowed (--max_pixels)"
    return {
        "not an image": ({"json": {"image": base64.b64encode(b"hello").decode()}}, 422, "not an image"),
        "truncated PNG": ({"json": {"image": base64.b64encode(png[:-40]).decode()}}, 422, "decoded"),
        "1x1 image": ({"json": {"image": encoded(Image.new("L", (1, 1), 255))}}, 422, "no digit"),
        "blank canvas": ({"json": {"image": blank_canvas()}}, 422, "no digit"),
        "invalid base64": ({"json": {"image": "not base64!"}}, 422, "base64"),
        "empty image": ({"json": {"image": ""}}, 422, "empty"),
        "data URL without a comma": ({"json": {"image": "data:"}}, 422, "base64"),
        "base64 not ASCII": ({"json": {"image": "ü" * 8}}, 422, "base64"),
        "a lone surrogate": ({"data": b'{"image": "\\ud800"}', "headers": as_json}, 422, "base64"),
        "JSON nested deep": ({"data": b"[" * 10**5 + b"]" * 10**5, "headers": as_json}, 400, "nested"),
        "no image field": ({"json": {"picture": "abc"}}, 400, 'no "image"'),
        "image not a string": ({"json": {"image": [1, 2]}}, 400, "not a string"),
        "JSON list": ({"json": [1, 2]}, 400, "not what /predict takes"),
        "not JSON": ({"data": b"{'image': ", "headers": as_json}, 400, "not valid JSON"),
        "empty body": ({"data": b""}, 400, "empty"),
        "PNG as the body": ({"data": png, "headers": {"Content-Type": "image/png"}}, 415, "image/png"),
        "JSON as text/plain": ({"data": b'{"image": "x"}', "headers": as_text}, 415, "text/plain"),
        "50 MB body": ({"data": big, "headers": as_json}, 413, "limit"),
        "50 MB chunked": ({"data": iter([big[:2**20]] * 50)}, 413, "limit"),
        "over --max_pixels": ({"data": over, "headers": as_json}, 413, over_words),
        # Media types are case-insensitive (RFC 9110): this one was decoded with the default budget.
        "Application/JSON over --max_pixels": (
            {"data": over, "headers": {"Content-Type": "Application/JSON; charset=UTF-8"}}, 413, over_words,
        ),
        "JSON as application/jsonx": (
            {"data": good, "headers": {"Content-Type": "application/jsonx"}}, 415, "as application/jsonx:",
        ),
        "JSON as application/problem+json": (
            {"data": good, "headers": {"Content-Type": "application/problem+json"}}, 415, "problem+json",
        ),
        "JSON without a content type": ({"data": good}, 415, "sent as no content type"),
        "invalid UTF-8": ({"data": b'{"image": "\xff"}', "headers": as_json}, 400, "not UTF-8 text"),
        "an integer of 5,000 digits": (
            {"data": b'{"image": "x", "n": ' + b"1" * 5000 + b"}", "headers": as_json}, 400,
            "not JSON that can be read",
        ),
        "a GIF": ({"json": {"image": encoded(pictures()["a.png"], "GIF")}}, 422, '"image" is a GIF file'),
    }  # fmt: skip


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_predict_answers_another_method_with_405_with_or_without_a_body(server, method):
    good = json.dumps({"image": encoded(pictures()["a.png"])}).encode()
    as_json, as_text = {"Content-Type": "application/json"}, {"Content-Type": "text/plain"}
    # A body not sent as JSON once made it 415, as if the method were right.
    for body, headers in ((None, {}), (good, as_json), (good, as_text), (good, {})):
        response = requests.request(method, f"{server.url}/predict", data=body, headers=headers, timeout=30)
        assert response.status_code == 405, response.text
        assert "POST" in response.headers["allow"]
    assert post(server, {"image": encoded(pictures()["a.png"])}).status_code == 200


@pytest.mark.slow
def test_ckpt_path_last_serves_the_newest_runs_last_checkpoint(run_folder):
    with running_server(run_folder, "--ckpt_path=last") as server:
        assert "serve: using lightning_logs/version_0/checkpoints/last.ckpt" in server.output()
        answer = post(server, {"image": encoded(pictures()["a.png"])})
        assert answer.status_code == 200 and 0 <= answer.json()["digit"] <= 9, answer.text


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_start_up_errors_are_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for args, words in (
        ([], "no trained run found"),
        (["--ckpt_path=missing.ckpt"], "checkpoint missing.ckpt does not exist"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            cli("serve", *args)
        message = str(exit_info.value.code)
        assert message.startswith("mnist_lit: error: ") and words in message and "\n" not in message


def test_a_port_litserve_does_not_serve_on_is_a_flag_error(workdir, capsys):
    # LitServe refuses ports below 1024 even to root: exit status 2 as for any bad flag, before looking
    # for a run (there is none here), not a start-up error.
    for port in ("80", "0", "65536"):
        line = parse_error_of(capsys, "serve", f"--port={port}")
        assert line.startswith(
            f"mnist_lit: error: --port {port} is not between 1024 and 65535, the ports "
        ), line
        assert "to be reached on port 80, forward port 80 to it" in line


def test_litserve_still_refuses_ports_below_1024():
    # Why serve refuses them: when LitServe serves on port 80, serve should accept it.
    import litserve as ls

    server = ls.LitServer(ls.test_examples.SimpleLitAPI())
    with pytest.raises(ValueError, match="port must be a value from 1024 to 65535"):
        server.run(port=80, generate_client_file=False)


def test_an_ipv6_address_is_written_in_brackets(run_folder):
    checkpoint = next((run_folder / "lightning_logs").rglob("last.ckpt"))
    with socket.socket(socket.AF_INET6) as taken:
        try:
            taken.bind(("::", port := free_port()))
        except OSError:
            pytest.skip("no IPv6 on this machine")
        taken.listen()
        with pytest.raises(SystemExit) as exit_info:
            cli("serve", f"--ckpt_path={checkpoint}", "--host=::", f"--port={port}")
    assert f"--port {port} is already in use on [::]: stop" in str(exit_info.value.code)


@pytest.mark.slow
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


@pytest.mark.slow
def test_other_commands_do_not_import_litserve():
    code = (
        "import sys\nfrom mnist_lit.__main__ import main\n"
        "for command in ('fit', 'export', 'serve'):\n"
        "    try:\n        main([command, '--help'])\n    except SystemExit:\n        pass\n"
        "print(sorted(m for m in ('litserve', 'fastapi', 'uvicorn') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


# --- Stopping: SIGTERM, SIGINT or SIGHUP to the main process only -------------------------------------------


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn and check_port_free bind
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def serve_process(folder: Path, *args: str, env: dict | None = None, timeout: float = 300) -> Iterator:
    """`serve ARGS` in a session of its own, until /health says ok; yields (Popen, url, log). Whatever is
    left of the session afterwards is killed, so that a failing test leaves no server behind."""
    port = free_port()
    process, log = start_serve(folder, port, *args, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError):
                if requests.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            assert process.poll() is None, f"serve exited before /health said ok:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"/health not ok within {timeout} s:\n{log.read_text()}"
            time.sleep(0.5)
        yield process, url, log
    finally:
        kill_session(process)


def assert_session_ends(process: subprocess.Popen, seconds: float) -> None:
    """Within ``seconds``, no process of ``process``'s session is left (each one's command line if not)."""
    deadline = time.monotonic() + seconds
    while session_processes(process.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = session_processes(process.pid)
    assert left == [], [Path(f"/proc/{pid}/cmdline").read_text() for pid in left]


def start_serve(folder: Path, port: int, *args: str, env: dict | None = None, name: str = "serve"):
    """`serve --port=PORT ARGS` in a session of its own; (Popen, the log of its stdout and stderr)."""
    log = folder / f"{name}_{port}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "mnist_lit", "serve", f"--port={port}", *args], cwd=folder,
            env=env or subprocess_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    return process, log


def kill_session(process: subprocess.Popen) -> None:
    """SIGKILL to what is left of ``process``'s session, so that a failing test leaves no server behind."""
    for pid in session_processes(process.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_a_signal_to_the_main_process_answers_requests_in_flight_then_stops_everything(run_folder, signum):
    # A 2 s batch window: requests sent now are still waiting for their batch when the signal arrives.
    with serve_process(run_folder, "--batch_timeout=2") as (process, url, log):
        port = int(url.rsplit(":", 1)[1])
        assert len(session_processes(process.pid)) >= 4  # main, HTTP server, inference worker, helpers
        body = {"image": encoded(pictures()["a.png"])}
        with ThreadPoolExecutor(max_workers=3) as pool:
            in_flight = [
                pool.submit(requests.post, f"{url}/predict", json=body, timeout=60) for _ in range(3)
            ]
            time.sleep(0.8)
            assert not any(future.done() for future in in_flight)
            signalled = time.monotonic()
            os.kill(process.pid, signum)  # the main process only, as `kill PID` or a container runtime does
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pytest.fail(f"serve still running 30 s after {signum.name}:\n{log.read_text()}")
            stopped = time.monotonic() - signalled
            answers = [future.result() for future in in_flight]
        assert [answer.status_code for answer in answers] == [200] * 3, [a.text for a in answers]
        assert stopped < 15, f"{stopped:.1f} s to stop"
        assert_session_ends(process, seconds=5)
        assert port_is_free(port)
        output = log.read_text()
        assert "Traceback" not in output and output.rstrip().endswith("serve: stopped"), output
        assert f"serve: {signum.name}: finishing requests in flight, then stopping\n" in output, output
        assert process.returncode == 0, output  # a clean stop, whichever signal asked for it
        print(f"{signum.name}: 3 requests in flight answered, every process gone {stopped:.1f} s after it")


def take_terminal() -> None:
    """In the child, after setsid: the terminal on its stdin becomes the session's controlling terminal."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


@pytest.mark.slow
def test_closing_the_terminal_stops_every_process_and_frees_the_port(run_folder):
    # A real hangup: serve on a pseudo-terminal of its own, then the terminal's side closed, as a terminal
    # window closing does (the kernel sends SIGHUP to every process of the foreground group).
    port = free_port()
    terminal, side = os.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "mnist_lit", "serve", f"--port={port}"], cwd=run_folder, env=subprocess_env(),
        stdin=side, stdout=side, stderr=side, start_new_session=True, preexec_fn=take_terminal,
    )  # fmt: skip
    os.close(side)
    output = b""
    try:
        deadline = time.monotonic() + 300
        while True:
            # Read what it prints meanwhile, so that a full terminal buffer cannot block it.
            with contextlib.suppress(OSError):  # EIO: no process has the terminal open any more
                while select.select([terminal], [], [], 0)[0]:
                    output += os.read(terminal, 65536)
            with contextlib.suppress(OSError):
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=5).text == "ok":
                    break
            assert process.poll() is None, f"serve exited before /health said ok:\n{output.decode()}"
            assert time.monotonic() < deadline, f"/health not ok within 300 s:\n{output.decode()}"
            time.sleep(0.5)
        assert len(session_processes(process.pid)) >= 4
        os.close(terminal)
        terminal = None
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("serve still running 30 s after its terminal closed")
        assert_session_ends(process, seconds=10)
        assert port_is_free(port)
    finally:
        if terminal is not None:
            os.close(terminal)
        kill_session(process)


@pytest.mark.slow
def test_a_serve_killed_outright_leaves_no_process_serving(run_folder):
    # SIGKILL (or the OOM killer): the serve process cannot stop what it started; the kernel does.
    with serve_process(run_folder) as (process, url, _):
        started = session_processes(process.pid)
        assert len(started) >= 4, started  # serve, LitServe's HTTP server, its manager, the worker
        process.kill()
        process.wait(timeout=30)
        assert_session_ends(process, seconds=20)
        assert port_is_free(int(url.rsplit(":", 1)[1]))


@pytest.mark.slow
def test_a_signal_while_the_model_loads_stops_everything_too(run_folder):
    log = run_folder / "serve_starting.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "mnist_lit", "serve", f"--port={free_port()}"], cwd=run_folder,
            env=subprocess_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while "the page is at" not in log.read_text():  # LitServe is starting its processes now
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        time.sleep(0.5)
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"serve still running 30 s after SIGTERM during start-up:\n{log.read_text()}")
        deadline = time.monotonic() + 5
        while session_processes(process.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert session_processes(process.pid) == [], log.read_text()
        assert "Traceback" not in log.read_text(), log.read_text()
    finally:
        for pid in session_processes(process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_two_serves_started_at_once_on_one_port_one_serves_and_the_other_says_the_port_is_taken(run_folder):
    port = free_port()
    # Back to back: both pass the check for a listening socket long before either one's server listens.
    # Each with a temporary folder of its own (systemd's PrivateTmp, pam_tmpdir): the claim is not a file.
    runs = []
    for i in range(2):
        tmp = run_folder / f"tmp_twin{i}_{port}"
        tmp.mkdir()
        env = {**subprocess_env(), "TMPDIR": str(tmp)}
        runs.append(start_serve(run_folder, port, env=env, name=f"twin{i}"))
    url = f"http://127.0.0.1:{port}"

    def logs() -> str:
        return "\n".join(f"--- {log.name}:\n{log.read_text()}" for _, log in runs)

    def serving() -> bool:
        with contextlib.suppress(OSError):  # refused while it starts
            return requests.get(f"{url}/health", timeout=5).text == "ok"
        return False

    try:
        deadline = time.monotonic() + 300
        while True:
            ended = [(process, log) for process, log in runs if process.poll() is not None]
            if len(ended) == 1 and serving():
                break
            assert len(ended) < 2, f"both serves exited:\n{logs()}"
            assert time.monotonic() < deadline, f"not one serving and one exited within 300 s:\n{logs()}"
            time.sleep(0.5)
        [(loser, log)] = ended
        assert loser.returncode != 0
        lines = log.read_text().strip().splitlines()
        errors = [line for line in lines if "error" in line]
        assert errors == [lines[-1]] and "Traceback" not in log.read_text(), log.read_text()
        assert lines[-1] == (
            f"mnist_lit: error: --port {port} is already in use on 127.0.0.1: stop what listens there, or "
            "choose another --port"
        )
        [(winner, _)] = [run for run in runs if run[0] is not loser]
        assert winner.poll() is None and serving(), logs()
    finally:
        for process, _ in runs:
            kill_session(process)


def test_litserve_still_logs_the_monitor_message_that_serve_filters_while_stopping():
    import litserve.server

    from mnist_lit.digit_api import MonitorAfterStop

    assert f'"{MonitorAfterStop.MESSAGE}"' in inspect.getsource(litserve.server)


# --- Hostile and large images over HTTP -----------------------------------------------------------------


@pytest.mark.slow
def test_image_bombs_are_refused_fast_and_a_large_photo_is_still_predicted(server):
    for name, data, status, words in (
        ("1-bit PNG 13000x13000", png_bomb(), 413, "13000x13000 pixels"),
        ("JPEG declaring 13000x13000", jpeg_declaring(13000, 13000), 413, "13000x13000 pixels"),
        ("JPEG declaring 6000x4000", jpeg_declaring(6000, 4000), 422, "truncated"),
    ):
        began = time.perf_counter()
        response = post(server, b64(data))
        seconds = time.perf_counter() - began
        assert response.status_code == status, (name, response.text)
        assert words in response.json()["detail"], (name, response.text)
        assert seconds < 1, f"{name}: {seconds:.2f} s"  # decoding them took 1-8 s and 1.3-2.4 GB
    photo = Image.new("RGB", (4000, 3000), (235, 230, 220))
    ImageDraw.Draw(photo).rectangle((1800, 600, 2200, 2400), fill=(20, 20, 30))
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", quality=90)
    response = post(server, b64(buffer.getvalue()))
    assert response.status_code == 200, response.text
    assert "Traceback" not in server.output()


@pytest.mark.slow
def test_health_stays_fast_while_large_uploads_decode(server):
    picture = Image.new("RGBA", (7000, 7000), "white")  # 49 MP, under the budget: about 1 s to decode
    ImageDraw.Draw(picture).rectangle((3000, 1400, 4000, 5600), fill="black")
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    body = b64(buffer.getvalue())
    with ThreadPoolExecutor(max_workers=2) as pool:
        began = time.perf_counter()
        uploads = [pool.submit(post, server, body) for _ in range(2)]
        waits = []
        while not all(upload.done() for upload in uploads):
            start = time.perf_counter()
            assert requests.get(f"{server.url}/health", timeout=30).text == "ok"
            waits.append(time.perf_counter() - start)
            time.sleep(0.05)
        decoding = time.perf_counter() - began
    assert [upload.result().status_code for upload in uploads] == [200, 200]
    assert decoding > 0.5, f"the uploads took only {decoding:.2f} s: too little to show anything"
    assert max(waits) < 0.5, (
        f"/health took up to {max(waits):.2f} s while {decoding:.1f} s of uploads decoded"
    )
    print(f"/health at most {max(waits) * 1e3:.0f} ms over {len(waits)} tries; uploads took {decoding:.1f} s")


# --- A body that does not arrive -------------------------------------------------------------------------


def slow_request(port: int, declared: int = 1000, sent: bytes = b'{"image": "') -> socket.socket:
    """A raw connection that sends headers and the start of a body, then nothing more."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (
        f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {declared}\r\n\r\n"
    )
    conn.sendall(head.encode() + sent)
    return conn


@pytest.mark.slow
def test_a_body_that_does_not_arrive_gets_408_and_the_server_keeps_serving_others(server, expected):
    port = int(server.url.rsplit(":", 1)[1])
    began = time.monotonic()
    stalled = [slow_request(port) for _ in range(20)]
    try:
        # Meanwhile the others are served.
        good = post(server, {"image": encoded(pictures()["a.png"])})
        assert good.status_code == 200, good.text
        for conn in stalled:
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                chunk = conn.recv(4096)  # the 30 s socket timeout fails the test if nothing comes
                if not chunk:
                    break
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 408 "), answer
            assert b"did not arrive within 3 s (--body_timeout)" in answer, answer
            assert conn.recv(4096) == b""  # and the connection is closed
        waited = time.monotonic() - began
        assert 2.5 < waited < 10, f"{waited:.1f} s"
    finally:
        for conn in stalled:
            conn.close()
    check_answer(post(server, {"image": encoded(pictures()["a.png"])}).json(), expected["a.png"])


# --- The API key ---------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("how", ["--api_key", "LIT_SERVER_API_KEY"])
def test_with_an_api_key_only_the_page_and_health_are_open(run_folder, expected, how):
    key = "s3cret-key"
    args, env = ([f"--api_key={key}"], None) if how == "--api_key" else ([], {**subprocess_env(), how: key})
    with serve_process(run_folder, *args, "--max_pixels=5000", env=env) as (_, url, log):
        body = {"image": encoded(pictures()["a.png"])}
        for headers in ({}, {"X-API-Key": "wrong"}):
            response = requests.post(f"{url}/predict", json=body, headers=headers, timeout=60)
            assert response.status_code == 401, response.text
            detail = response.json()["detail"]
            assert detail.startswith("POST /predict came with ") and "X-API-Key" in detail, detail
        answer = requests.post(f"{url}/predict", json=body, headers={"X-API-Key": key}, timeout=60)
        assert answer.status_code == 200, answer.text
        check_answer(answer.json(), expected["a.png"])
        for path in ("/docs", "/openapi.json", "/info", "/redoc"):
            assert requests.get(f"{url}{path}", timeout=30).status_code == 401, path
        assert requests.get(f"{url}/openapi.json", headers={"X-API-Key": key}, timeout=30).status_code == 200
        assert requests.get(f"{url}/health", timeout=30).text == "ok"
        assert "<canvas" in requests.get(f"{url}/", timeout=30).text
        assert key not in log.read_text()
        # --max_pixels reaches the decoding: 84x84 is over 5000 pixels, 28x28 is not.
        larger = requests.post(
            f"{url}/predict",
            json={"image": encoded(pictures()["b.png"])},
            headers={"X-API-Key": key},
            timeout=60,
        )
        assert larger.status_code == 413, larger.text
        words = "84x84 pixels (7056 pixels), more than the 5000 pixels allowed (--max_pixels)"
        assert words in larger.json()["detail"], larger.text


def test_listening_on_every_interface_without_a_key_says_so_once(run_folder, monkeypatch, capsys):
    import mnist_lit.digit_api

    started = []
    monkeypatch.setattr(mnist_lit.digit_api, "run_server", lambda *args, **kwargs: started.append(kwargs))
    monkeypatch.delenv("LIT_SERVER_API_KEY", raising=False)
    checkpoint = next((run_folder / "lightning_logs").rglob("last.ckpt"))
    port = str(free_port())
    cli("serve", f"--ckpt_path={checkpoint}", "--host=0.0.0.0", f"--port={port}")
    warning = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warning == [
        f"serve: warning: --host 0.0.0.0 without --api_key: anyone who can reach this machine on port {port} "
        "can use the model (see README, Serve)"
    ]
    cli("serve", f"--ckpt_path={checkpoint}", "--host=0.0.0.0", f"--port={port}", "--api_key=k")
    monkeypatch.setenv("LIT_SERVER_API_KEY", "k2")
    cli("serve", f"--ckpt_path={checkpoint}", f"--port={port}")
    assert "warning" not in capsys.readouterr().err
    assert [kwargs["api_key"] for kwargs in started] == [None, "k", "k2"]


def test_localhost_is_the_loopback_and_needs_no_key(run_folder, monkeypatch, capsys):
    import mnist_lit.digit_api

    started = []
    monkeypatch.setattr(mnist_lit.digit_api, "run_server", lambda *args, **kwargs: started.append(kwargs))
    monkeypatch.delenv("LIT_SERVER_API_KEY", raising=False)
    checkpoint = next((run_folder / "lightning_logs").rglob("last.ckpt"))
    cli("serve", f"--ckpt_path={checkpoint}", "--host=localhost", f"--port={free_port()}")
    assert "warning" not in capsys.readouterr().err
    assert [kwargs["host"] for kwargs in started] == ["127.0.0.1"]
