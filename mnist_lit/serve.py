"""``python -m mnist_lit serve``: the trained model behind an HTTP API, and a page to draw digits on.

This is the part the CLI imports: it checks the flags, the checkpoint and the port, and only then
imports LitServe (``digit_api.py``), so that no other command pays for FastAPI and uvicorn at start-up.
"""

import contextlib
import errno
import importlib.util
import os
import socket
import sys
from collections.abc import Iterator
from typing import Literal

import torch
from jsonargparse.typing import NonNegativeFloat, PositiveFloat, PositiveInt

from mnist_lit.errors import UserError
from mnist_lit.export import checkpoint_to_use, from_checkpoint
from mnist_lit.images import MAX_PIXELS
from mnist_lit.messages import flag_error


def port_in_use(host: str, port: int) -> UserError:
    return UserError(
        f"--port {port} is already in use on {host if ':' not in host else f'[{host}]'}: stop what listens "
        "there, or choose another --port"
    )


@contextlib.contextmanager
def port_lock(host: str, port: int) -> Iterator[None]:
    """Claim ``port`` for this server while the block runs (the server's life), or raise port_in_use.

    check_port_free alone is a race: LitServe binds a while later, and on Linux two sockets bound with
    SO_REUSEADDR (as uvicorn binds, without SO_REUSEPORT) do not collide until one of them listens, so two
    servers started at once both pass the check and both bind; only one can listen, and the other one
    went on running, serving nothing. The claim is a Unix socket bound to an abstract name (Linux): only
    one can hold a name, the kernel frees it however its holders end, it leaves no file behind, and it
    is seen by every user and temporary folder of the machine, as the port itself is. LitServe's forked
    processes inherit it. Per port, not host:port: 0.0.0.0 and 127.0.0.1 collide on one port too.
    Elsewhere check_port_free alone.
    """
    if not sys.platform.startswith("linux"):
        yield
        return
    claim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        claim.bind(f"\0mnist_lit-serve-port-{port}")
    except OSError:  # the name is taken: another serve holds this port, or is about to bind it
        claim.close()
        raise port_in_use(host, port) from None
    try:
        yield
    finally:
        claim.close()


def check_port_free(host: str, port: int) -> None:
    """Raise UserError, in one line, unless a server could listen on ``host``:``port`` now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds, so the same rules
        try:
            probe.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise port_in_use(host, port) from None
            raise UserError(f"cannot listen on {host} port {port}: {err.strerror}") from None


def serve(
    ckpt_path: str | None = None,
    host: Literal["127.0.0.1", "localhost", "0.0.0.0", "::"] = "127.0.0.1",
    port: int = 8000,
    max_batch_size: PositiveInt = 64,
    batch_timeout: NonNegativeFloat = 0.005,
    accelerator: Literal["auto", "cpu", "cuda"] = "auto",
    max_body_mb: PositiveFloat = 10.0,
    body_timeout: PositiveFloat = 10.0,
    max_pixels: PositiveInt = MAX_PIXELS,
    api_key: str | None = None,
) -> None:
    """Serve a trained model over HTTP: POST /predict, GET /health, and a page at / to draw digits on.

    Args:
        ckpt_path: checkpoint to serve, or ``last`` (the newest run's last.ckpt); default the best
            checkpoint of the newest run in ./lightning_logs.
        host: address to listen on: 127.0.0.1 or localhost (this machine only), or 0.0.0.0 / :: (every network
            interface: anyone who can reach this machine can use the server; see README).
        port: TCP port, 1024 to 65535 (LitServe serves on no other, root or not: forward port 80 to one of
            these).
        max_batch_size: most requests that one forward pass predicts together.
        batch_timeout: seconds the first request of a batch waits for others to join it.
        accelerator: where the model runs: ``auto`` (a GPU when there is one), ``cpu`` or ``cuda``.
        max_body_mb: largest request body accepted, in megabytes; a larger one gets 413, unread.
        body_timeout: seconds a request's body may take to arrive after its headers; a slower one gets 408.
        max_pixels: largest image accepted, in pixels (width x height, read from the file's header before
            decoding); a larger one gets 413. The default, 50 million, holds a phone camera's photo.
        api_key: the key that every request but ``/`` and ``/health`` must send in the ``X-API-Key``
            header (401 otherwise); default the ``LIT_SERVER_API_KEY`` environment variable, LitServe's
            own, which keeps the key out of the process list.
    """
    if not 1024 <= port <= 65535:  # LitServe's own range, root or not: a bad flag, before any work
        flag_error(
            f"--port {port} is not between 1024 and 65535, the ports LitServe serves on: choose one (to be "
            "reached on port 80, forward port 80 to it: a reverse proxy, or docker run -p 80:8000)"
        )
    if importlib.util.find_spec("litserve") is None:
        raise UserError("serve needs LitServe: pip install 'mnist_lit[serve]'")
    if accelerator == "cuda" and not torch.cuda.is_available():
        raise UserError("--accelerator cuda, but no CUDA GPU is available: use --accelerator cpu or auto")
    checkpoint = checkpoint_to_use(ckpt_path, "serve")
    from_checkpoint(checkpoint)  # a bad file ends here in one line, not in a worker process's traceback
    if host == "localhost":  # the loopback by name, as in the page's URL: listen on its IPv4 address
        host = "127.0.0.1"
    with port_lock(host, port):  # for as long as this server runs
        check_port_free(host, port)  # something else (not a serve) listening there
        api_key = api_key or os.environ.get("LIT_SERVER_API_KEY") or None
        if host != "127.0.0.1" and api_key is None:
            print(
                f"serve: warning: --host {host} without --api_key: anyone who can reach this machine on port "
                f"{port} can use the model (see README, Serve)",
                file=sys.stderr,
                flush=True,
            )

        from mnist_lit.digit_api import run_server  # LitServe, FastAPI and uvicorn: only for this command

        run_server(
            checkpoint.resolve(),
            host=host,
            port=port,
            max_batch_size=max_batch_size,
            batch_timeout=batch_timeout,
            accelerator=accelerator,
            max_body_bytes=int(max_body_mb * 2**20),
            body_timeout=body_timeout,
            max_pixels=max_pixels,
            api_key=api_key,
        )


def main(argv: list[str]) -> None:
    """``python -m mnist_lit serve ARGS`` (routed here by __main__.py)."""
    from mnist_lit.cli import run_function

    run_function(serve, argv)
