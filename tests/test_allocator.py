"""allocator.py: a CPU training step through the real CLI reuses freed memory instead of new pages."""

import json
import platform
import resource
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest

from tests.helpers import QUICK, subprocess_env, write_mnist

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="a glibc malloc setting"
)


class PageFaults(L.Callback):
    """Counts the page faults inside each training step after the first ``warmup``, into ``out`` (JSON)."""

    def __init__(self, out: str, warmup: int = 5) -> None:
        self.out = Path(out)
        self.warmup = warmup
        self.faults: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if batch_idx >= self.warmup:
            self.faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - self._start)

    def on_train_end(self, trainer, pl_module) -> None:
        self.out.write_text(json.dumps(self.faults))


def test_cpu_training_steps_reuse_memory_instead_of_faulting_in_pages(tmp_path):
    # 1,600 images, 100 held out: 15 steps of batch 100, the seed recipe's, 5 of them warm-up. Without
    # keep_freed_memory every such step faults in ~1,500 fresh pages (the activations glibc returned
    # to the kernel at the previous step's end); with it, a handful at most.
    data = write_mnist(tmp_path / "data", n_train=1600)
    out = tmp_path / "faults.json"
    cmd = [
        sys.executable, "-m", "mnist_lit", "fit", f"--data.data_dir={data}", "--data.val_size=100",
        "--data.batch_size=100", "--trainer.accelerator=cpu", "--trainer.limit_val_batches=0", *QUICK,
        "--trainer.callbacks+=tests.test_allocator.PageFaults", f"--trainer.callbacks.out={out}",
    ]  # fmt: skip
    done = subprocess.run(
        cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]

    faults = json.loads(out.read_text())
    assert len(faults) == 10
    assert sorted(faults)[len(faults) // 2] < 50, faults  # the median step
