"""The LitServe app behind ``serve``: ``POST /predict``, ``GET /health`` (LitServe's), and the page at ``/``.

A request is ``{"image": "<base64 of a PNG or JPEG file>"}``; the answer is ``{"digit": 7,
"probabilities": [10 floats], "logits": [10 floats]}``. With ``"maps": true`` in the request the answer also
holds what the network computes inside (the page's pictures): ``"maps": {"filters": [16 x 5 x 5],
"blocks": [[16 x 14 x 14], [32 x 7 x 7]]}``, integers 0-255 (filters: 128 is a zero weight; a block: 255 is
its largest value for this digit). In the HTTP process, ``Body`` reads each
request's body (within ``--body_timeout`` seconds and ``--max_body_mb``) and, for ``/predict``, decodes
the image and makes it MNIST-style (images.py, the same function ``predict --data.predict_path`` uses) in
a worker thread, so that the event loop goes on answering ``/health`` and other requests meanwhile; FastAPI
then validates the body and a bad image is refused there, alone, with a 4xx. LitServe's inference worker
only stacks the 28x28 digits of requests that arrived together and runs one forward pass per batch.
"""

import asyncio
import base64
import contextlib
import contextvars
import ctypes
import io
import json
import logging
import multiprocessing
import os
import secrets
import signal
import sys
import time
from importlib.resources import files
from pathlib import Path

import anyio
import litserve as ls
import torch
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field, PrivateAttr, model_validator
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from torchvision.transforms.v2 import functional as TF

from mnist_lit.export import from_checkpoint
from mnist_lit.images import MAX_PIXELS as DEFAULT_MAX_PIXELS
from mnist_lit.images import SIZE, TooManyPixels, mnist_digit
from mnist_lit.lessons import block_maps, first_filters

LINE_BREAKS = str.maketrans("", "", "\r\n")
EXPECTED = 'send JSON {"image": "<base64 of a PNG or JPEG file>"}'
# Seconds that in-flight requests get to finish after a stopping signal before the server stops anyway.
DRAIN_SECONDS = 5.0
# The signals that stop the server cleanly: kill's default, Ctrl-C, and the terminal closing.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# How each file the API takes begins: PNG's signature, JPEG's start of image (a phone's MPO photo too).
# images.py reads whatever PIL does (predict takes GIF, BMP, WebP, TIFF); the API promises PNG or JPEG.
PNG_OR_JPEG = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")
# Paths open without the API key: the page (it asks for the key) and the health check.
OPEN_PATHS = ("/", "/health")


class Refused(ValueError):
    """An upload that cannot be answered, with its one-sentence reason and HTTP status."""

    def __init__(self, detail: str, status: int = 422) -> None:
        super().__init__(detail)
        self.status = status


def digit_of_upload(image: str, max_pixels: int) -> bytes:
    """``"image"``'s base64 as the MNIST-style digit's 28x28 uint8 pixels, or Refused saying why not."""
    # A data: URL's scheme, like any URL's, in any case; without a comma it is invalid base64 below.
    text = image.split(",", 1)[-1] if image[:5].lower() == "data:" else image
    try:
        # Line breaks as MIME and `base64` (76 characters a line) and Python's encodebytes put them.
        data = base64.b64decode(text.translate(LINE_BREAKS), validate=True)
    except ValueError:  # binascii.Error, or characters that are not ASCII at all
        raise Refused(f'"image" is not valid base64: {EXPECTED}') from None
    if not data:
        raise Refused(f'"image" is empty: {EXPECTED}')
    if not data.startswith(PNG_OR_JPEG):
        raise Refused(f'"image" is {file_kind(data)}: send the base64 of a PNG or JPEG file')
    try:
        digit = mnist_digit(data, max_pixels=max_pixels)
    except UnidentifiedImageError:
        raise Refused('"image" is not an image file: send the base64 of a PNG or JPEG file') from None
    except TooManyPixels as err:
        raise Refused(f'"image" is too large: {err} (--max_pixels): send a smaller picture', 413) from None
    except ValueError as err:  # mnist_style: a blank canvas, a flat picture
        raise Refused(f'"image" shows no digit: {str(err).removeprefix("no digit found: ")}') from None
    # PIL's decoders fail in more ways than they document: any failure here is the upload's fault.
    except Exception as err:
        reason = (str(err).splitlines() or [""])[0] or err.__class__.__name__
        raise Refused(f'"image" could not be decoded as a PNG or JPEG: {reason}') from None
    return digit.numpy().tobytes()


def file_kind(data: bytes) -> str:
    """What an upload that is neither PNG nor JPEG is, for its refusal: "a GIF file", "not an image file"."""
    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            return f"{'an' if image.format[0] in 'AEIOU' else 'a'} {image.format} file"
    except Exception:  # UnidentifiedImageError, or a plugin failing on a header it half-recognised
        return "not an image file"


# What Body decoded for the request being validated (set in its context, read by DigitRequest).
decoded: contextvars.ContextVar[bytes | Refused] = contextvars.ContextVar("decoded")


class DigitRequest(BaseModel):
    """The body of ``POST /predict``; it holds the digit the network sees, decoded by ``Body``."""

    image: str = Field(description="base64 of a PNG or JPEG file (a data: URL is accepted too)")
    maps: bool = Field(False, description="also answer the first-layer filters and each block's feature maps")
    _digit: bytes = PrivateAttr(b"")  # the MNIST-style digit's uint8 pixels: small to pass to the worker

    @model_validator(mode="after")
    def _decode(self) -> "DigitRequest":
        # Body decoded this very request's image off the event loop; built elsewhere, decode it here.
        outcome = decoded.get(None)
        if outcome is None:
            outcome = digit_of_upload(self.image, max_pixels=DEFAULT_MAX_PIXELS)
        if isinstance(outcome, Refused):
            raise outcome
        self._digit = outcome
        return self

    def digit(self) -> torch.Tensor:
        return torch.frombuffer(bytearray(self._digit), dtype=torch.uint8).view(1, SIZE, SIZE)


def first_header(scope: Scope, name: bytes) -> bytes | None:
    """A request header's first value, as Starlette and FastAPI read it (``dict`` would keep the last)."""
    return next((value for key, value in scope["headers"] if key == name), None)


def media_type(content_type: str) -> str:
    """A Content-Type header's media type as RFC 9110 compares it: lowercase, without parameters
    ("Application/JSON; charset=utf-8" is "application/json", "application/jsonx" is not)."""
    return content_type.split(";", 1)[0].strip().lower()


async def one_sentence_error(request: Request, error: RequestValidationError) -> JSONResponse:
    """FastAPI's validation errors (a list of dicts) as one sentence, in the usual ``{"detail": ...}``.
    (Body has refused a ``/predict`` body not sent as application/json already, with 415.)"""
    first = error.errors()[0]
    kind = first["type"]
    if kind == "missing" and first["loc"] == ("body",):
        status, detail = 400, f"the body is empty: {EXPECTED}"
    elif kind == "value_error":
        refused = first["ctx"]["error"]
        status, detail = getattr(refused, "status", 422), str(refused)
    elif kind == "json_invalid":
        status, detail = 400, f"the body is not valid JSON: {EXPECTED}"
    elif kind == "missing":
        status, detail = 400, f'the JSON has no "image" field: {EXPECTED}'
    elif kind == "string_type":
        status, detail = 400, f'"image" is not a string: {EXPECTED}'
    else:
        status, detail = 400, f"the body is not what /predict takes ({first['msg']}): {EXPECTED}"
    return JSONResponse({"detail": detail}, status_code=status)


def refusal(status: int, detail: str) -> JSONResponse:
    """A 4xx that also closes the connection: what is left of the request's body is never read."""
    return JSONResponse({"detail": detail}, status_code=status, headers={"Connection": "close"})


class Body:
    """Reads each request's body before the app sees it: refused with 413 when larger than ``max_bytes``
    (by its Content-Length before reading any of it, or as soon as what arrived passes the limit), with
    408 when it has not all arrived ``timeout`` seconds after the headers did. A POST ``/predict`` body
    not sent as application/json is refused with 415; else it is decoded in a worker thread (at most
    ``threads`` at once, which also bounds their memory) and the outcome handed to DigitRequest's
    validation through ``decoded``. FastAPI parses more types as JSON (``application/*+json``); refusing
    them here keeps every image decoded here, off the event loop and within ``--max_pixels``."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float, max_pixels: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.max_pixels = max_pixels
        self.limiter = anyio.CapacityLimiter(max(1, min(4, os.cpu_count() or 1)))
        self.too_large = (
            f"the body is larger than this server's limit, {max_bytes / 2**20:g} MB (--max_body_mb)"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = f"{scope['method']} {scope['path']}"
        declared = first_header(scope, b"content-length") or b""
        if declared.isdigit() and int(declared) > self.max_bytes:
            await refusal(413, self.too_large)(scope, receive, send)
            return
        chunks, received, deadline = [], 0, time.monotonic() + self.timeout
        more, disconnected = True, False
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:  # TimeoutError itself only from Python 3.11
                detail = (
                    f"the body of {request} did not arrive within {self.timeout:g} s (--body_timeout): "
                    "send it all at once"
                )
                await refusal(408, detail)(scope, receive, send)
                return
            if message["type"] == "http.disconnect":
                disconnected = True
                break
            chunks.append(message.get("body", b""))
            received += len(chunks[-1])
            if received > self.max_bytes:
                await refusal(413, self.too_large)(scope, receive, send)
                return
            more = message.get("more_body", False)
        if disconnected:
            return  # the client went away: nobody to answer
        body = b"".join(chunks)
        # Another method's body is the app's to refuse (405), whatever it holds; an empty one: FastAPI's
        # 400 says "empty".
        if scope["path"] == "/predict" and scope["method"] == "POST" and body:
            content_type = (first_header(scope, b"content-type") or b"").decode("latin-1")
            if media_type(content_type) != "application/json":
                sent_as = content_type or "no content type"
                detail = f"the body is sent as {sent_as}: {EXPECTED}, as application/json"
                await refusal(415, detail)(scope, receive, send)
                return
            outcome = await anyio.to_thread.run_sync(self.decode, body, limiter=self.limiter)
            if isinstance(outcome, Refused) and outcome.status == 400:  # a body FastAPI cannot parse either
                await refusal(400, str(outcome))(scope, receive, send)
                return
            if outcome is not None:
                decoded.set(outcome)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def decode(self, body: bytes) -> bytes | Refused | None:
        """The digit of a ``/predict`` body, or why not; None when it is not ``{"image": "..."}`` (FastAPI's
        validation then says what is wrong with it)."""
        try:
            image = json.loads(body).get("image")
        except RecursionError:  # e.g. [[[[...]]]]: FastAPI's own parsing would fail the same way
            return Refused(f"the body is JSON nested too deeply: {EXPECTED}", 400)
        except UnicodeDecodeError:  # FastAPI's answer: "There was an error parsing the body"
            return Refused(f"the body is not UTF-8 text, so not valid JSON: {EXPECTED}", 400)
        except json.JSONDecodeError:  # FastAPI's validation says where
            return None
        except ValueError:  # json's own limits, e.g. an integer of over 4,300 digits
            return Refused(f"the body is not JSON that can be read: {EXPECTED}", 400)
        except AttributeError:  # JSON, but not an object
            return None
        if not isinstance(image, str):
            return None
        try:
            return digit_of_upload(image, self.max_pixels)
        except Refused as refused:
            return refused


class ApiKey:
    """Every path but OPEN_PATHS needs header ``X-API-Key: <key>`` (401 otherwise): /predict, and also
    /docs, /openapi.json and /info, which FastAPI and LitServe leave open."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self.key = key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = first_header(scope, b"x-api-key")
            if given is None or not secrets.compare_digest(given, self.key):
                which = "no X-API-Key header" if given is None else "a wrong X-API-Key"
                detail = (
                    f"{scope['method']} {scope['path']} came with {which}: this server needs its API key "
                    "(serve --api_key or LIT_SERVER_API_KEY) in the X-API-Key header"
                )
                await refusal(401, detail)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class Page:
    """Answers ``GET /`` with the page (LitServe's own ``/`` only says "litserve running")."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.html = (files("mnist_lit") / "page" / "index.html").read_text()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/" and scope["method"] in ("GET", "HEAD"):
            # A response per request: the gzip middleware rewrites the headers of the one it sends.
            await HTMLResponse(self.html)(scope, receive, send)
        else:
            await self.app(scope, receive, send)


class DigitAPI(ls.LitAPI):
    """One inference worker: the checkpoint's network on its device, one forward pass per batch."""

    def __init__(self, checkpoint: Path, max_batch_size: int, batch_timeout: float) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.checkpoint = checkpoint
        self.server = os.getpid()  # the serve process, which starts the workers

    def setup(self, device: str) -> None:
        # Ctrl-C reaches the whole process group; the main process stops this worker without a traceback.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if os.getpid() != self.server:  # a worker LitServe spawned (child_of_the_server ran only in forks)
            end_with_the_server(self.server)
        self.device = torch.device(device)
        if self.device.type == "cpu":
            # Batching is the parallelism here: intra-op threads on tensors this small mostly wait.
            torch.set_num_threads(1)
        self.model = from_checkpoint(self.checkpoint).to(self.device)
        weights = first_filters(self.model.net)  # fixed once trained: scaled once, 128 = 0
        self.filters = [] if weights is None else levels(0.5 + weights[:, 0] / (2 * weights.abs().max()))
        print(f"serve: {self.checkpoint.name} loaded on {device}", flush=True)

    def authorize(self) -> None:
        """Nothing to check here: ApiKey checks the key (LitServe's own check of LIT_SERVER_API_KEY, which
        this hook replaces, would close /health too and leave /docs open)."""

    def decode_request(self, request: DigitRequest) -> tuple[torch.Tensor, bool]:
        return request.digit(), request.maps

    def batch(self, inputs: list[tuple[torch.Tensor, bool]]) -> tuple[torch.Tensor, list[bool]]:
        digits, maps = zip(*inputs, strict=True)
        return torch.stack(digits), list(maps)

    @torch.inference_mode()
    def predict(self, inputs: tuple[torch.Tensor, bool | list[bool]]) -> dict | list[dict]:
        digits, maps = inputs
        single = digits.dim() == 3  # unbatched: LitServe passes each digit on its own
        batch, maps = (digits[None], [maps]) if single else (digits, maps)
        start = time.perf_counter()
        # The same scaling as training's (data.py's normalize); the model holds the mean and std.
        pixels = TF.to_dtype(batch.to(self.device), torch.float32, scale=True)
        logits = self.model(pixels)
        probabilities = logits.softmax(dim=1)
        results = [
            {"digit": int(p.argmax()), "probabilities": p.tolist(), "logits": z.tolist()}
            for p, z in zip(probabilities.cpu(), logits.cpu(), strict=True)
        ]
        for i in (i for i, wanted in enumerate(maps) if wanted):
            results[i]["maps"] = self.maps_of(pixels[i : i + 1])
        # One line per batch: how requests that arrived together were served (and the tests' evidence).
        print(f"serve: batch of {len(batch)} in {(time.perf_counter() - start) * 1e3:.1f} ms", flush=True)
        return results[0] if single else results

    def maps_of(self, pixels: torch.Tensor) -> dict:
        """The filters and each block's feature maps for one digit's pixels (1, 1, 28, 28) in [0, 1]."""
        blocks = block_maps(self.model.net, (pixels - self.model.mean) / self.model.std)
        return {"filters": self.filters, "blocks": [levels(b[0] / b.max().clamp(min=1e-6)) for b in blocks]}

    def unbatch(self, results: list[dict]) -> list[dict]:
        return results

    def encode_response(self, result: dict) -> dict:
        return result


def levels(values: torch.Tensor) -> list:
    """Values in [0, 1] as nested lists of integers 0-255: a tenth of the JSON that floats would take."""
    return (values.clamp(0, 1) * 255).round().to(torch.uint8).tolist()


def run_server(
    checkpoint: Path,
    host: str,
    port: int,
    max_batch_size: int,
    batch_timeout: float,
    accelerator: str,
    max_body_bytes: int,
    body_timeout: float,
    max_pixels: int,
    api_key: str | None,
) -> None:
    """Start LitServe; blocks until Ctrl-C or one of STOP_SIGNALS, then drains and stops every process."""
    # The forked HTTP processes decode one image per request: intra-op threads there only contend for cores.
    torch.set_num_threads(1)
    api = DigitAPI(checkpoint, max_batch_size=max_batch_size, batch_timeout=batch_timeout)
    body = (Body, {"max_bytes": max_body_bytes, "timeout": body_timeout, "max_pixels": max_pixels})
    # LitServer adds these innermost first: Page answers / before anything else, ApiKey looks at the
    # headers before any of the body is read.
    middlewares = [body, *([(ApiKey, {"key": api_key})] if api_key else []), Page]
    server = ls.LitServer(api, accelerator=accelerator, middlewares=middlewares)
    server.app.add_exception_handler(RequestValidationError, one_sentence_error)
    # How long LitServe lets uvicorn finish in-flight requests once stopping (LitServe's own default: 30 s).
    server.uvicorn_graceful_timeout = DRAIN_SECONDS
    shown = "localhost" if host == "127.0.0.1" else f"[{host}]" if ":" in host else host  # an IPv6 URL
    print(f"serve: the page is at http://{shown}:{port}/, the API at /predict (Ctrl-C to stop)", flush=True)
    stop_on_signals()
    try:
        server.run(host=host, port=port, generate_client_file=False)
    except KeyboardInterrupt:  # a signal before LitServe's run got to waiting (while the model loads)
        pass
    finally:
        stop_children()
    say("serve: stopped")


def say(line: str) -> None:
    """Print ``line``; after SIGHUP the terminal may be gone (EIO), and stopping must go on without it."""
    with contextlib.suppress(OSError):
        print(line, flush=True)


def stop_on_signals() -> None:
    """SIGTERM (``kill``, ``timeout``, a container runtime) and SIGHUP (the terminal closing, ``kill -HUP``)
    stop the server as Ctrl-C does: LitServe's run takes a KeyboardInterrupt as the cue to drain and stop
    its processes. (SIGHUP's default would end this process alone and leave LitServe's serving the port.)
    Only the first signal counts, so that a second one cannot cut the draining short and leave processes
    behind."""

    def stop(signum: int, frame: object) -> None:
        logging.getLogger("litserve.server").addFilter(MonitorAfterStop())
        for each in STOP_SIGNALS:
            signal.signal(each, signal.SIG_IGN)
        say(f"serve: {signal.Signals(signum).name}: finishing requests in flight, then stopping")
        raise KeyboardInterrupt

    for each in STOP_SIGNALS:
        signal.signal(each, stop)
    # Processes forked from here (LitServe's HTTP server and its manager) get the defaults back, and end
    # with this process.
    os.register_at_fork(after_in_child=child_of_the_server)


class MonitorAfterStop(logging.Filter):
    """Drops LitServe's "Monitoring worker crashed" traceback while serve stops.

    LitServe's worker-monitor thread polls its manager's shutdown Event every 2 s and is not told about a
    KeyboardInterrupt; waking after the manager has stopped, it logs a BrokenPipeError traceback that says
    nothing. (tests/test_serve.py checks that LitServe still logs this message.)
    """

    MESSAGE = "Monitoring worker crashed"

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != self.MESSAGE


def child_of_the_server() -> None:
    parent = os.getppid()  # first: the process that forked this one, unless it is already gone
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    end_with_the_server(parent)


def end_with_the_server(server: int) -> None:
    """The kernel kills this process (one LitServe started) when the serve process, pid ``server``, dies
    (Linux only).

    A serve process that is killed outright (SIGKILL, the OOM killer) cannot stop the processes it
    started, and they would go on serving the port with nobody to stop them; a stopping signal is
    still drained by the serve process, which outlives them. LitServe starts them all from the main
    thread, whose end is what the kernel watches.
    """
    if not sys.platform.startswith("linux"):
        return
    PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    # Compared with its pid, not with 1: in a container the serve process may itself be pid 1.
    if os.getppid() != server:  # it died before the line above took effect
        os._exit(1)


def stop_children(seconds: float = 5.0) -> None:
    """Whatever child process is still running (LitServe stops its own; this covers a signal during start-up)
    gets SIGTERM, then SIGKILL after ``seconds``."""
    children = multiprocessing.active_children()
    for child in children:
        child.terminate()
    deadline = time.monotonic() + seconds
    for child in children:
        child.join(max(0.0, deadline - time.monotonic()))
        if child.is_alive():
            child.kill()
            child.join()
