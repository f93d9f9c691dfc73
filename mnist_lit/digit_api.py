"""The LitServe app behind ``serve``: ``POST /predict``, ``GET /health`` (LitServe's), and the page at ``/``.

A request is ``{"image": "<base64 of a PNG or JPEG file>"}``; the answer is ``{"digit": 7,
"probabilities": [10 floats], "logits": [10 floats]}``. The image is decoded and made MNIST-style
(images.py, the same function ``predict --data.predict_path`` uses) while FastAPI validates the body, in
the HTTP process: a bad image is refused there, alone, with a 4xx. LitServe's inference worker then
only stacks the 28x28 digits of requests that arrived together and runs one forward pass per batch.
"""

import base64
import binascii
import signal
import time
from importlib.resources import files
from pathlib import Path

import litserve as ls
import torch
from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import UnidentifiedImageError
from pydantic import BaseModel, Field, PrivateAttr, model_validator
from starlette.types import ASGIApp, Receive, Scope, Send
from torchvision.transforms.v2 import functional as TF

from mnist_lit.export import from_checkpoint
from mnist_lit.images import SIZE, mnist_digit

EXPECTED = 'send JSON {"image": "<base64 of a PNG or JPEG file>"}'


class DigitRequest(BaseModel):
    """The body of ``POST /predict``; validating it decodes the image into the digit the network sees."""

    image: str = Field(description="base64 of a PNG or JPEG file (a data: URL is accepted too)")
    _digit: bytes = PrivateAttr(b"")  # the MNIST-style digit's uint8 pixels: small to pass to the worker

    @model_validator(mode="after")
    def _decode(self) -> "DigitRequest":
        text = self.image.split(",", 1)[1] if self.image.startswith("data:") else self.image
        try:
            data = base64.b64decode(text, validate=True)
        except binascii.Error:
            raise ValueError(f'"image" is not valid base64: {EXPECTED}') from None
        if not data:
            raise ValueError(f'"image" is empty: {EXPECTED}')
        try:
            digit = mnist_digit(data)
        except UnidentifiedImageError:
            raise ValueError('"image" is not an image file: send the base64 of a PNG or JPEG file') from None
        except ValueError as err:  # mnist_style: a blank canvas, a flat picture
            raise ValueError(f'"image" shows no digit: {str(err).removeprefix("no digit found: ")}') from None
        # PIL's decoders fail in more ways than they document: any failure here is the upload's fault.
        except Exception as err:
            reason = (str(err).splitlines() or [""])[0] or err.__class__.__name__
            raise ValueError(f'"image" could not be decoded as a PNG or JPEG: {reason}') from None
        self._digit = digit.numpy().tobytes()
        return self

    def digit(self) -> torch.Tensor:
        return torch.frombuffer(bytearray(self._digit), dtype=torch.uint8).view(1, SIZE, SIZE)


async def one_sentence_error(request: Request, error: RequestValidationError) -> JSONResponse:
    """FastAPI's validation errors (a list of dicts) as one sentence, in the usual ``{"detail": ...}``."""
    first = error.errors()[0]
    kind = first["type"]
    content_type = request.headers.get("content-type") or "no content type"
    if kind == "missing" and first["loc"] == ("body",):
        status, detail = 400, f"the body is empty: {EXPECTED}"
    elif not content_type.startswith("application/json"):
        status, detail = 415, f"the body is sent as {content_type}: {EXPECTED}, as application/json"
    elif kind == "value_error":
        status, detail = 422, str(first["ctx"]["error"])
    elif kind == "json_invalid":
        status, detail = 400, f"the body is not valid JSON: {EXPECTED}"
    elif kind == "missing":
        status, detail = 400, f'the JSON has no "image" field: {EXPECTED}'
    elif kind == "string_type":
        status, detail = 400, f'"image" is not a string: {EXPECTED}'
    else:
        status, detail = 400, f"the body is not what /predict takes ({first['msg']}): {EXPECTED}"
    return JSONResponse({"detail": detail}, status_code=status)


class BodyLimit:
    """Refuses a body larger than ``max_bytes`` with 413: by its Content-Length before reading any of it,
    or, sent without one (chunked), as soon as what arrived passes the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.detail = f"the body is larger than this server's limit, {max_bytes / 2**20:g} MB (--max_body_mb)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await JSONResponse({"detail": self.detail}, status_code=413)(scope, receive, send)
            return
        received = 0

        async def counted() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, self.detail)
            return message

        await self.app(scope, counted, send)


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

    def setup(self, device: str) -> None:
        # Ctrl-C reaches the whole process group; the main process stops this worker without a traceback.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.device = torch.device(device)
        if self.device.type == "cpu":
            # Batching is the parallelism here: intra-op threads on tensors this small mostly wait.
            torch.set_num_threads(1)
        self.model = from_checkpoint(self.checkpoint).to(self.device)
        print(f"serve: {self.checkpoint.name} loaded on {device}", flush=True)

    def decode_request(self, request: DigitRequest) -> torch.Tensor:
        return request.digit()

    def batch(self, digits: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(digits)

    @torch.inference_mode()
    def predict(self, digits: torch.Tensor) -> dict | list[dict]:
        single = digits.dim() == 3  # unbatched: LitServe passes each digit on its own
        batch = digits[None] if single else digits
        start = time.perf_counter()
        # The same scaling as training's (data.py's normalize); the model holds the mean and std.
        logits = self.model(TF.to_dtype(batch.to(self.device), torch.float32, scale=True))
        probabilities = logits.softmax(dim=1)
        results = [
            {"digit": int(p.argmax()), "probabilities": p.tolist(), "logits": z.tolist()}
            for p, z in zip(probabilities.cpu(), logits.cpu(), strict=True)
        ]
        # One line per batch: how requests that arrived together were served (and the tests' evidence).
        print(f"serve: batch of {len(batch)} in {(time.perf_counter() - start) * 1e3:.1f} ms", flush=True)
        return results[0] if single else results

    def unbatch(self, results: list[dict]) -> list[dict]:
        return results

    def encode_response(self, result: dict) -> dict:
        return result


def run_server(
    checkpoint: Path,
    host: str,
    port: int,
    max_batch_size: int,
    batch_timeout: float,
    accelerator: str,
    max_body_bytes: int,
) -> None:
    """Start LitServe (blocks until Ctrl-C or SIGTERM)."""
    # The forked HTTP processes decode one image per request: intra-op threads there only contend for cores.
    torch.set_num_threads(1)
    api = DigitAPI(checkpoint, max_batch_size=max_batch_size, batch_timeout=batch_timeout)
    limit = (BodyLimit, {"max_bytes": max_body_bytes})
    server = ls.LitServer(api, accelerator=accelerator, middlewares=[limit, Page])
    server.app.add_exception_handler(RequestValidationError, one_sentence_error)
    shown = "localhost" if host == "127.0.0.1" else host
    print(f"serve: the page is at http://{shown}:{port}/, the API at /predict (Ctrl-C to stop)", flush=True)
    server.run(host=host, port=port, generate_client_file=False)
