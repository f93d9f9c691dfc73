"""Several processes (DDP): the rule every collective here keeps, the time a rank waits, and gathering.

The rule: a collective (a torchmetrics ``compute()``, ``strategy.reduce*``/``broadcast``/``barrier``,
a gather) runs only in a hook that every rank runs, in the same order, whatever the progress bar,
logger or callbacks are. Each rank calls it, or none does. Therefore nothing here logs with
``sync_dist=True``: Lightning runs that sync lazily, wherever the value is first read, and the first
reader is rank 0's progress bar, which the other ranks do not have (they go on to the next collective,
and the two wait for each other for ever). Values that need every rank are torchmetrics objects,
computed in the LightningModule's epoch-end hooks; what is logged is then the same on every rank.

If the ranks still stop agreeing (a rank stalls, or dies), DDP's process-group timeout ends the run:
``--trainer.strategy ddp`` gets :data:`DEFAULT_TIMEOUT` instead of torch's 30 minutes, and the rank
that gave up says in one line what it waited for (:func:`stalled_message`).
"""

import re
import signal
import traceback
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, Strategy

# Nothing in an MNIST run keeps one rank waiting for another for long: epochs take seconds, a
# download is small. Longer than this, and a rank has stalled.
DEFAULT_TIMEOUT = timedelta(minutes=5)
TIMEOUT_FLAG = "--trainer.strategy=DDPStrategy --trainer.strategy.timeout=H:MM:SS"
COLLECTIVES = (
    "all_reduce", "all_gather", "broadcast", "barrier", "reduce", "gather", "scatter", "recv", "send",
)  # fmt: skip


def _count(devices: object) -> int | None:
    """How many devices a ``--trainer.devices`` value names, if it says (``"auto"``, ``-1``: it does not)."""
    if isinstance(devices, list | tuple):
        return len(devices)
    if isinstance(devices, str) and "," in devices:
        return len([d for d in devices.split(",") if d.strip()])
    try:
        count = int(devices)
    except (TypeError, ValueError):
        return None
    return count if count >= 0 else None


def with_timeout(
    strategy: str | Strategy, accelerator: object, devices: object, num_nodes: int
) -> str | Strategy:
    """``--trainer.strategy`` as given, except that plain DDP gets :data:`DEFAULT_TIMEOUT`.

    That is ``ddp``, and ``auto`` on CPUs or GPUs where the flags name several processes (Lightning
    picks DDP then). A strategy given as a class (``--trainer.strategy=DDPStrategy ...``) is the
    user's, timeout included.
    """
    several = num_nodes > 1 or (_count(devices) or 1) > 1
    if strategy == "ddp" or (strategy == "auto" and accelerator in ("cpu", "gpu", "cuda") and several):
        return DDPStrategy(timeout=DEFAULT_TIMEOUT)
    return strategy


class EndStalledRanks(Callback):
    """When a collective times out on the launching process, it ends the ranks it started too.

    Lightning does so for Ctrl-C; for any other error the other ranks would wait on, idle, for a peer
    that is gone (or stay stuck in whatever stalled them).
    """

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        launcher = trainer.strategy.launcher
        if launcher is not None and stalled_message(exception) is not None:
            launcher.kill(signal.SIGKILL)


def gather_to_rank_zero(trainer: L.Trainer, value: object) -> list | None:
    """Every rank's ``value``, in rank order, on global rank 0 (None elsewhere). Every rank must call it."""
    if trainer.world_size == 1 or not dist.is_initialized():
        return [value]
    gathered = [None] * trainer.world_size if trainer.is_global_zero else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def stalled_message(err: BaseException) -> str | None:
    """One line for a collective that timed out, or whose peer went away; None for any other error.

    It names this rank, the collective it waited in, and the code that called it.
    """
    text = str(err)
    joined = re.search(r"after (\d+) seconds waiting for clients\. (\d+)/(\d+) clients joined", text)
    if isinstance(err, RuntimeError) and joined:  # the first process waits for the others at the start
        return (
            f"only {joined[2]} of {joined[3]} processes started within {joined[1]} s: one failed to start "
            f"or is stuck (see its output); if they are only slow, wait longer with {TIMEOUT_FLAG}"
        )
    if not isinstance(err, RuntimeError) or not re.search(
        r"[Tt]imed out|[Tt]imeout|Connection closed by peer|Connection reset by peer", text
    ):
        return None
    frames = traceback.extract_tb(err.__traceback__)
    collective = next(
        (f.name for f in reversed(frames) if f.name in COLLECTIVES and "distributed" in f.filename), None
    )
    if collective is None:
        return None
    here = Path(__file__).parent
    caller = next((f for f in reversed(frames) if Path(f.filename).parent == here), None)
    where = f" in {Path(caller.filename).stem}.py:{caller.lineno} ({caller.name})" if caller else ""
    rank = dist.get_rank() if dist.is_initialized() else "?"
    world = dist.get_world_size() if dist.is_initialized() else "?"
    waited = re.search(r"waiting (\d+)ms", text)
    after = f" {int(waited[1]) / 1000:g} s" if waited else ""
    what = f"waited{after} for the other ranks in {collective}{where} and gave up"
    if "onnection" in text:
        what = f"lost the other ranks in {collective}{where}"
    return (
        f"rank {rank} of {world} {what}: a rank stalled, died or took another path (see the other ranks' "
        f"output); if one is only slow, wait longer with {TIMEOUT_FLAG}"
    )
