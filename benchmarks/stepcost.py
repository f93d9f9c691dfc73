"""Where a seed-recipe training step's time goes: each part of it timed alone, in ms per step.

    python -m benchmarks.stepcost --data-dir ../shared/data [--accelerator gpu] [--steps 300]

``benchmarks.bench`` times whole runs; this splits one step of batch 100 into what it is made of:

- ``loader``: mnist_lit's training loader alone (sampler, one gather, the copy to the device from
  pinned memory on a GPU) and the normalization;
- ``network, eager``: forward, cross-entropy, backward and Adam, on batches already on the device;
- ``network, one CUDA graph`` (GPU only): the same step captured whole and replayed, so no per-op host
  work is left: about what the device itself needs;
- the same eager step with one choice made otherwise (NCHW activations, bf16 autocast, one CPU thread
  instead of all): what each choice is worth on the machine at hand;
- ``augmentation``: the accuracy recipe's random rotation, scale and shift of one batch;
- ``Lightning loop, empty step``: ``Trainer.fit`` over batches already on the device with a training
  step that does almost nothing: Lightning's fixed price per step on this host;
- ``Lightning + network``: the eager step inside that loop; ``Lightning + MNISTClassifier``: mnist_lit's
  own module, its torchmetrics updates included.

A second table puts the eager step against the device's arithmetic: the step's floating-point operations
(torch's FLOP counter over one forward and backward pass) per second, beside what one large float32
matrix product reaches on the same device, a rate that convolutions this small are not expected to
reach. Their ratio says how much faster the seed recipe's float32 arithmetic could run here at most.

Lightning rows time the second of two epochs of ``--steps`` steps (the first is the warm-up); the
others time ``--steps`` steps after 30 of warm-up. A tool for reading, like the benchmark: the tests
only check that it runs.
"""

import argparse
import contextlib
import itertools
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
import yaml

from benchmarks.bench import CONFIGS, EpochClock, device_name, synchronize
from mnist_lit.allocator import keep_freed_memory
from mnist_lit.data import MNISTDataModule
from mnist_lit.model import MNISTClassifier

BATCH = 100  # the seed recipe's
MATMUL_SIZE = 1024  # square float32 matrices: large enough for the device's matrix-product rate


class DeviceBatches:
    """``steps`` batches cycling through a few normalized ones already on the device: a free loader."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]], steps: int) -> None:
        self.batches, self.steps = batches, steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return itertools.islice(itertools.cycle(self.batches), self.steps)

    def __len__(self) -> int:
        return self.steps


class EmptyStep(L.LightningModule):
    """One parameter and a one-multiply step: what is left is Lightning's loop and an optimizer call."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.weight * 0.0

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class BareNetwork(MNISTClassifier):
    """mnist_lit's module without its metric updates and logging: the network, the loss and Adam."""

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        return F.cross_entropy(self(images), labels)

    def on_train_epoch_end(self) -> None:
        pass  # no train metrics to log


def step_flops(device: torch.device) -> int:
    """Floating-point operations of one seed-recipe step's forward and backward pass (batch 100)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = MNISTClassifier().to(device)
    images = torch.randn(BATCH, 1, 28, 28, device=device)
    labels = torch.randint(0, 10, (BATCH,), device=device)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(images), labels).backward()
    return counter.get_total_flops()


def matmul_gflops(device: torch.device, size: int = MATMUL_SIZE, repeats: int = 30) -> float:
    """float32 GFLOP/s of a large square matrix product on ``device``: about its attainable peak."""
    a, b = (torch.randn(size, size, device=device) for _ in range(2))
    ms = per_step_ms(lambda: torch.mm(a, b), repeats, device, warmup=3)
    return 2 * size**3 / (ms * 1e-3) / 1e9


def per_step_ms(step: Callable[[], None], steps: int, device: torch.device, warmup: int = 30) -> float:
    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / steps * 1e3


def loader_ms(dm: MNISTDataModule, steps: int, device: torch.device) -> float:
    loader = dm.train_dataloader()
    loader.pin_memory = device.type == "cuda"  # as it is under a GPU trainer

    def epochs() -> Iterator[list[torch.Tensor]]:
        while True:  # a new pass over the loader each epoch, so every batch is really loaded
            yield from loader

    batches = epochs()

    def step() -> None:
        images, labels = next(batches)
        dm.normalize(images.to(device, non_blocking=True))
        labels.to(device, non_blocking=True)

    return per_step_ms(step, steps, device)


def network_ms(
    batches: Iterator,
    steps: int,
    device: torch.device,
    graph: bool,
    channels_last: bool = True,
    bf16: bool = False,
) -> float:
    """The seed step (channels_last net, cross-entropy, fused Adam), eager or as one CUDA graph; or with
    one of the choices a machine may want otherwise: NCHW, bf16 autocast."""
    model = MNISTClassifier(channels_last=channels_last).to(device)
    # capturable: Adam's step count stays on the GPU, so the graph can advance it on replay.
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True, capturable=graph)
    images, labels = (t.clone() for t in next(batches))  # fixed inputs: a CUDA graph reads these

    def next_batch() -> None:
        batch = next(batches)
        images.copy_(batch[0])
        labels.copy_(batch[1])

    def eager() -> None:
        next_batch()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    if not graph:
        return per_step_ms(eager, steps, device)
    side = torch.cuda.Stream()  # warm-up before capture happens on a side stream (torch.cuda.graphs docs)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            eager()
    torch.cuda.current_stream().wait_stream(side)
    whole_step = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)
    with torch.cuda.graph(whole_step):
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()

    def replay() -> None:
        next_batch()
        whole_step.replay()

    return per_step_ms(replay, steps, device)


@contextlib.contextmanager
def cpu_threads(threads: int) -> Iterator[None]:
    """torch's intra-op CPU threads set to ``threads`` inside the block, as they were after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def augmentation_ms(dm: MNISTDataModule, steps: int, device: torch.device) -> float:
    """configs/best.yaml's augmentation of one uint8 batch (rotation, scale, shift, with the recipe's
    values), on the device, as the data module runs it."""
    from mnist_lit.augment import augmented

    recipe = yaml.safe_load((CONFIGS / "best.yaml").read_text())["data"]
    settings = {key: recipe.get(key, 0) for key in ("max_rotation", "max_scale", "max_shift")}
    images = dm.train_set.images[:BATCH].to(device)
    seeds = itertools.count()

    def step() -> None:
        augmented(images, next(seeds), **settings)

    return per_step_ms(step, steps, device)


def lightning_ms(module: L.LightningModule, batches: list, steps: int, accelerator: str) -> float:
    clock = EpochClock()
    trainer = L.Trainer(
        accelerator=accelerator, devices=1, max_epochs=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[clock],
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=DeviceBatches(batches, steps))
    return clock.epochs[-1] / steps * 1e3  # no validation: the epoch is its steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stepcost", description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", required=True, help="folder holding MNIST/raw/")
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--steps", type=int, default=300, help="timed steps per row (after a warm-up)")
    parser.add_argument("--val-size", type=int, default=5000, help="held out, as in the recipes")
    args = parser.parse_args(argv)
    if not (Path(args.data_dir) / "MNIST" / "raw").is_dir():
        parser.exit(2, f"benchmarks.stepcost: error: --data-dir {args.data_dir} has no MNIST/raw/ folder\n")
    gpu = args.accelerator == "gpu"
    if gpu and not torch.cuda.is_available():
        parser.exit(2, "benchmarks.stepcost: error: --accelerator gpu, but torch sees no CUDA GPU\n")
    keep_freed_memory()  # as the CLI does
    device = torch.device("cuda" if gpu else "cpu")
    dm = MNISTDataModule(data_dir=args.data_dir, val_size=args.val_size, download=False)
    dm.setup("fit")
    images, labels = dm.train_set.images, dm.train_set.labels
    n = min(64, len(labels) // BATCH)
    batches = [
        (
            dm.normalize(images[i * BATCH : (i + 1) * BATCH].to(device)),
            labels[i * BATCH : (i + 1) * BATCH].to(device),
        )
        for i in range(n)
    ]

    def one_thread_ms() -> float:
        with cpu_threads(1):
            return network_ms(itertools.cycle(batches), args.steps, device, graph=False)

    rows = {
        "loader": loader_ms(dm, args.steps, device),
        "network, eager": network_ms(itertools.cycle(batches), args.steps, device, graph=False),
        "network, one CUDA graph": gpu
        and network_ms(itertools.cycle(batches), args.steps, device, graph=True),
        "network, eager, NCHW instead of channels_last": network_ms(
            itertools.cycle(batches), args.steps, device, graph=False, channels_last=False
        ),
        "network, eager, bf16 autocast": network_ms(
            itertools.cycle(batches), args.steps, device, graph=False, bf16=True
        ),
        "network, eager, NCHW, bf16 autocast": network_ms(
            itertools.cycle(batches), args.steps, device, graph=False, channels_last=False, bf16=True
        ),
        "network, eager, 1 CPU thread": not gpu and torch.get_num_threads() > 1 and one_thread_ms(),
        "augmentation (configs/best.yaml)": augmentation_ms(dm, args.steps, device),
        "Lightning loop, empty step": lightning_ms(EmptyStep(), batches, args.steps, args.accelerator),
        "Lightning + network": lightning_ms(BareNetwork(), batches, args.steps, args.accelerator),
        "Lightning + MNISTClassifier": lightning_ms(MNISTClassifier(), batches, args.steps, args.accelerator),
    }
    print(
        f"device: {device_name(args.accelerator)}; batch {BATCH}; "
        f"torch {torch.__version__}, lightning {L.__version__}"
    )
    print("| part of a step | ms/step |\n|---|---|")
    for name, ms in rows.items():
        print(f"| {name} | {f'{ms:.3f}' if ms else '-'} |")  # no CUDA graph row off the GPU
    flops, peak = step_flops(device), matmul_gflops(device)
    step_rate = flops / (rows["network, eager"] * 1e-3) / 1e9
    print("\n| arithmetic (float32) | figure |\n|---|---|")
    print(f"| one step's forward and backward, MFLOP | {flops / 1e6:.1f} |")
    print(f"| network, eager: GFLOP/s | {step_rate:.1f} |")
    print(f"| {MATMUL_SIZE}x{MATMUL_SIZE} matrix product: GFLOP/s | {peak:.1f} |")
    print(f"| network, eager, share of the matrix product's rate | {step_rate / peak:.0%} |")


if __name__ == "__main__":
    main()
