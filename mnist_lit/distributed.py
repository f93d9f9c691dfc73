"""Several processes (DDP): the rule every collective here keeps, and gathering what each rank computed.

The rule: a collective (a torchmetrics ``compute()``, ``strategy.reduce*``/``broadcast``/``barrier``,
a gather) runs only in a hook that every rank runs, in the same order, whatever the progress bar,
logger or callbacks are. Each rank calls it, or none does. Therefore nothing here logs with
``sync_dist=True``: Lightning runs that sync lazily, wherever the value is first read, and the first
reader is rank 0's progress bar, which the other ranks do not have (they go on to the next collective,
and the two wait for each other for ever). Values that need every rank are torchmetrics objects,
computed in the LightningModule's epoch-end hooks; what is logged is then the same on every rank.

If the ranks still stop agreeing (a rank stalls, or dies), DDP's process-group timeout ends the run:
``configs/ddp.yaml`` sets it to minutes instead of torch's 30, the rank that gave up says in one line
what it waited for (messages.py), and the ranks it started die with it (``__main__.end_with_launcher``).
"""

import lightning as L
import torch.distributed as dist


def gather_to_rank_zero(trainer: L.Trainer, value: object) -> list | None:
    """Every rank's ``value``, in rank order, on global rank 0 (None elsewhere). Every rank must call it."""
    if trainer.world_size == 1 or not dist.is_initialized():
        return [value]
    gathered = [None] * trainer.world_size if trainer.is_global_zero else None
    dist.gather_object(value, gathered, dst=0)
    return gathered
