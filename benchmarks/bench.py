"""Benchmark: the seed notebook's plain PyTorch loop against mnist_lit's recipes, back to back.

    python -m benchmarks.bench --data-dir ../shared/data [--epochs 10] [--accelerator cpu|gpu]

Each variant runs in a fresh child process (so peak memory is its own), one after another on the
same machine, and reports per-epoch times; the table compares them as ratios to the plain loop:

- ``plain``: the notebook, verbatim in spirit: its network in its layer order, torchvision MNIST with
  per-image ToTensor+Normalize, a DataLoader of batch 100, Adam 1e-3, cross-entropy, all 60k training
  images per epoch, glibc's default malloc.
- ``plain-fast``: a plain loop over mnist_lit's own data pipeline, network and process settings
  (in-memory uint8 batches, ConvNet in channels_last, the CLI's malloc settings), no Lightning: the
  yardstick for Lightning's own overhead.
- ``seed``: ``mnist_lit fit --config configs/mnist.yaml`` then ``test``.
- ``fast``: ``mnist_lit fit --config configs/fast.yaml`` then ``test`` (in the precision it picks for
  this machine: bf16-mixed where bf16 is native, 32-true elsewhere).
- ``best``: ``mnist_lit fit --config configs/best.yaml`` then ``test``: the accuracy recipe (not run by
  default).
- ``gpu``: ``mnist_lit fit --config configs/gpu.yaml`` then ``test``: large batches, the data kept on the
  training device (not run by default).
- ``seed-bf16``, ``seed-compile``, ``seed-cudnn-benchmark``, ``fast-fp32``, ``fast-bf16``: the recipes
  with one switch flipped (``--trainer.precision``, ``--model.compile``, ``--trainer.benchmark``), to
  measure what each switch buys (not run by default).
- ``seed-glibc-malloc``: the seed recipe through the CLI alone, without the process settings that
  ``python -m mnist_lit`` makes, so on glibc's default malloc: what ``mnist_lit/allocator.py`` buys on
  the machine at hand (not run by default).

"Whole fit" is a recipe's ``fit`` as a user waits for it, from the start of its process (Python, the
imports) to the end of training; for the plain loop it is the loop's time, its 10 epochs.
Epoch time is the median over epochs after the first (warm-up); loop time is all the epochs, warm-up
included (the fit without start-up, data loading and the final checkpoint); ms/train step counts only
the training batches (mnist_lit's epochs also validate on 5k images). ``--repeat N`` runs all the variants
N times, interleaved, and reports medians; ratios are paired round by round, so drift cancels out.
``--seeds 1 2 3`` runs each recipe once per seed in every round (the plain loops once, with the first
seed) and reports each seed's test accuracy and their mean.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from torch import nn

from mnist_lit.precision import CPU_BF16_FLAGS, cpu_flags, cpu_name

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# Lightning variants: (recipe, extra flags).
RECIPES = {
    "seed": ("mnist.yaml", []),
    "fast": ("fast.yaml", []),
    "best": ("best.yaml", []),
    "gpu": ("gpu.yaml", []),
    "seed-bf16": ("mnist.yaml", ["--trainer.precision=bf16-mixed"]),
    "seed-compile": ("mnist.yaml", ["--model.compile=true"]),
    "seed-cudnn-benchmark": ("mnist.yaml", ["--trainer.benchmark=true"]),
    "fast-fp32": ("fast.yaml", ["--trainer.precision=32-true"]),
    "fast-bf16": ("fast.yaml", ["--trainer.precision=bf16-mixed"]),
    "seed-glibc-malloc": ("mnist.yaml", []),
}
GLIBC_MALLOC = {"seed-glibc-malloc"}  # run without allocator.py's settings
FLAGS_SHOWN = ("avx512f", *CPU_BF16_FLAGS)  # what decides CPU speed and the fast recipe's precision
VARIANTS = ("plain", "plain-fast", *RECIPES)
DEFAULT_VARIANTS = ("plain", "plain-fast", "seed", "fast")


class EpochClock(L.Callback):
    """Wall time of each training epoch, and of its training batches alone (before validation).

    Added with ``--trainer.callbacks+=benchmarks.bench.EpochClock``; the CLI builds it, so the newest
    one is kept on the class for the benchmark to read.
    """

    latest: "EpochClock | None" = None

    def __init__(self) -> None:
        EpochClock.latest = self
        self.epochs: list[float] = []
        self.train: list[float] = []
        self.steps: list[int] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        synchronize(pl_module.device)
        self._start, self._first_step = time.perf_counter(), trainer.global_step

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.training is False and hasattr(self, "_start"):
            synchronize(pl_module.device)
            self.train.append(time.perf_counter() - self._start)
            self.steps.append(trainer.global_step - self._first_step)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        synchronize(pl_module.device)
        self.epochs.append(time.perf_counter() - self._start)


def device_name(accelerator: str) -> str:
    """The device the benchmark runs on: the GPU's name, or the CPU's with its threads and the flags
    that decide its speed and the fast recipe's precision (AVX-512, native bf16)."""
    if accelerator != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{cpu_name()} ({torch.get_num_threads()} threads; flags: {cpu_features()})"


def cpu_features() -> str:
    """Which of FLAGS_SHOWN this CPU has, e.g. ``avx512f amx_bf16``, or ``none of avx512f/...``."""
    present = [flag for flag in FLAGS_SHOWN if flag in cpu_flags().split()]
    return " ".join(present) or "none of " + "/".join(FLAGS_SHOWN)


def _device(accelerator: str) -> torch.device:
    return torch.device("cuda" if accelerator != "cpu" and torch.cuda.is_available() else "cpu")


def plain_loop(net, optimizer, epochs: int, train_batches, test_batches, device: torch.device) -> dict:
    """Train the plain way (no Lightning), timing each epoch, then count correct test predictions.

    ``train_batches(epoch)`` and ``test_batches()`` yield (images, labels) ready for ``net`` on ``device``.
    """
    times, steps, start = [], [], time.perf_counter()
    for epoch in range(epochs):
        net.train()
        t0, n = time.perf_counter(), 0
        for images, labels in train_batches(epoch):
            loss = torch.nn.functional.cross_entropy(net(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            n += 1
        synchronize(device)
        times.append(time.perf_counter() - t0)
        steps.append(n)
    fit_s = time.perf_counter() - start
    net.eval()
    correct = total = 0
    with torch.no_grad():
        for images, labels in test_batches():
            correct += (net(images).argmax(1) == labels).sum().item()
            total += len(labels)
    return {"epochs": times, "train": times, "steps": steps, "fit_s": fit_s, "acc": correct / total}


class NotebookNet(nn.Module):
    """The seed notebook's network, layer for layer in its order: conv, BN, ReLU, max-pool (twice), linear.

    The plain loop's own network, and what :class:`mnist_lit.model.ConvNet` must compute exactly (it
    pools before the ReLU; tests/test_model.py compares the two). Same parameter names as ConvNet.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=5, padding=2),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, kernel_size=5, padding=2),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(32 * 7 * 7, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images).flatten(1))


def run_plain(data_dir: str, epochs: int, accelerator: str, seed: int, **_) -> dict:
    """The seed notebook's loop (its network, per-image transforms, all 60k training images)."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    from mnist_lit.data import MNIST_MEAN, MNIST_STD

    torch.manual_seed(seed)
    device = _device(accelerator)
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((MNIST_MEAN,), (MNIST_STD,))])
    train = DataLoader(
        datasets.MNIST(data_dir, train=True, transform=transform), batch_size=100, shuffle=True
    )
    test = DataLoader(datasets.MNIST(data_dir, train=False, transform=transform), batch_size=100)
    net = NotebookNet().to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)

    def on_device(loader):
        return ((images.to(device), labels.to(device)) for images, labels in loader)

    return plain_loop(
        net, optimizer, epochs, lambda _epoch: on_device(train), lambda: on_device(test), device
    )


def run_plain_fast(data_dir: str, epochs: int, accelerator: str, seed: int, val_size: int, **_) -> dict:
    """mnist_lit's data pipeline and network settings in a plain loop: what Lightning is measured against."""
    from mnist_lit.allocator import keep_freed_memory
    from mnist_lit.data import MNISTDataModule
    from mnist_lit.model import MNISTClassifier

    keep_freed_memory()  # as `python -m mnist_lit` does: the yardstick runs on the same allocator settings
    torch.manual_seed(seed)
    os.environ["PL_GLOBAL_SEED"] = str(seed)
    device = _device(accelerator)
    dm = MNISTDataModule(data_dir=data_dir, val_size=val_size, download=False)
    dm.setup("fit")
    dm.setup("test")
    model = MNISTClassifier().to(device)  # only for its channels_last network and forward()
    optimizer = model.configure_optimizers()  # the seed recipe's: Adam, lr 1e-3, constant
    train = dm.train_dataloader()

    def to_device(tensor: torch.Tensor) -> torch.Tensor:
        # As mnist_lit's loaders do for a GPU: page-locked memory, so the copy does not wait for the GPU.
        if device.type == "cuda":
            return tensor.pin_memory().to(device, non_blocking=True)
        return tensor

    def normalized(loader):
        return (dm.on_after_batch_transfer([to_device(t) for t in batch], 0) for batch in loader)

    def train_batches(epoch: int):
        train.sampler.set_epoch(epoch)
        return normalized(train)

    return plain_loop(
        model, optimizer, epochs, train_batches, lambda: normalized(dm.test_dataloader()), device
    )


def run_recipe(
    config: str,
    extra: list[str],
    data_dir: str,
    epochs: int | None,
    accelerator: str,
    seed: int,
    val_size: int,
    tuned_malloc: bool = True,
) -> dict:
    """``mnist_lit fit --config CONFIG`` then a bare ``test``, through the real CLI, in a scratch folder:
    as ``python -m mnist_lit`` runs it, or (``tuned_malloc=False``) the CLI alone, on glibc's defaults."""
    from mnist_lit.evaluate import main as evaluate

    if tuned_malloc:
        from mnist_lit.__main__ import main  # which makes allocator.py's settings for fit
    else:
        from mnist_lit.cli import main

    quiet = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    flags = [
        f"--data.data_dir={data_dir}",
        f"--data.val_size={val_size}",
        f"--trainer.accelerator={accelerator}",
        *extra,
    ]
    if epochs is not None:
        flags.append(f"--trainer.max_epochs={epochs}")
    sys.argv = sys.argv[:1]  # the CLI reads its flags from `args`, not from this process's command line
    with tempfile.TemporaryDirectory() as scratch:
        os.chdir(scratch)
        start = time.perf_counter()
        clock = "--trainer.callbacks+=benchmarks.bench.EpochClock"
        main(["fit", f"--config={CONFIGS / config}", *flags, f"--seed_everything={seed}", *quiet, clock])
        fit_s = time.perf_counter() - start
        fit_end = time.time()  # wall clock: the parent subtracts the moment it started this process
        evaluate(["test", *quiet])
        test_acc = _last_test_acc(Path(scratch) / "lightning_logs")
    # The CLI built the clock from the importable module, which under `python -m` is not `__main__`.
    from benchmarks.bench import EpochClock as ImportedClock

    clock = ImportedClock.latest
    return {
        "epochs": clock.epochs,
        "train": clock.train,
        "steps": clock.steps,
        "fit_s": fit_s,
        "fit_end": fit_end,
        "acc": test_acc,
    }


def _last_test_acc(log_root: Path) -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mnist_lit.logger import run_folders

    newest = run_folders(run_folders(log_root)[0], "test")[0]  # the fit run's newest test run
    events = EventAccumulator(str(newest))
    events.Reload()
    return events.Scalars("test/acc")[-1].value


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read afterwards includes it."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_child(variant: str, args: argparse.Namespace) -> dict:
    common = {
        "data_dir": args.data_dir,
        "accelerator": args.accelerator,
        "seed": args.seed,
        "val_size": args.val_size,
    }
    if variant == "plain":
        result = run_plain(epochs=args.epochs or 10, **common)
    elif variant == "plain-fast":
        result = run_plain_fast(epochs=args.epochs or 10, **common)
    else:
        config, flags = RECIPES[variant]
        result = run_recipe(
            config, flags, epochs=args.epochs, tuned_malloc=variant not in GLIBC_MALLOC, **common
        )
    # ru_maxrss is in KiB on Linux.
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available() and args.accelerator != "cpu":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def run_figures(result: dict) -> dict:
    """One child run's figures: median warm epoch, ms per warm training step, loop and fit time."""
    warm = result["epochs"][1:] or result["epochs"]  # epoch 0 pays for warm-up
    warm_train = result["train"][1:] or result["train"]
    warm_steps = result["steps"][1:] or result["steps"]
    return {
        "epoch_s": statistics.median(warm),
        "step_ms": 1000 * sum(warm_train) / sum(warm_steps),
        "fit_s": result["fit_s"],
        "loop_s": sum(result["epochs"]),
        "whole_fit_s": result.get("whole_fit_s", result["fit_s"]),  # the plain loop: its fit_s
        "round": result["round"],
    }


def summarize(name: str, runs: list[dict], plain_runs: list[dict] | None) -> dict:
    """One table row from a variant's runs (one per --repeat round): medians over the rounds.

    Ratios to the plain loop are taken round by round (each variant against the plain run of the same
    round, minutes apart) before the median, so that slow drift of the machine cancels out.
    """
    per_run = [run_figures(result) for result in runs]
    row = {
        "variant": name,
        "epochs": len(runs[0]["epochs"]),
        "rounds": len({r["round"] for r in runs}),
        **{
            key: statistics.median(r[key] for r in per_run)
            for key in ("epoch_s", "step_ms", "loop_s", "fit_s", "whole_fit_s")
        },
        "epoch_min_s": min(r["epoch_s"] for r in per_run),
        "epoch_max_s": max(r["epoch_s"] for r in per_run),
        "test_acc": statistics.median(r["acc"] for r in runs),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "per_run": per_run,
    }
    seeds = sorted({r["seed"] for r in runs})
    row["seeds"] = seeds
    row["test_acc_by_seed"] = [statistics.median(r["acc"] for r in runs if r["seed"] == s) for s in seeds]
    row["test_acc_mean"] = statistics.mean(row["test_acc_by_seed"])
    if plain_runs:
        plain = {figures["round"]: figures for figures in map(run_figures, plain_runs)}
        for key in ("epoch_s", "fit_s", "step_ms", "whole_fit_s"):
            ratios = [mine[key] / plain[mine["round"]][key] for mine in per_run]
            row[f"{key}_vs_plain"] = statistics.median(ratios)
    return row


def table(rows: list[dict], device: str) -> str:
    lines = [
        f"device: {device}",
        "| variant | epochs | s/epoch (median) | ms/train step | loop s | fit s | test acc | peak RSS MB "
        "| s/epoch vs plain | fit vs plain | whole fit s | whole fit vs plain | test acc by seed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r['epoch_s_vs_plain']:.2f}x" if "epoch_s_vs_plain" in r else "-"
        fit_ratio = f"{r['fit_s_vs_plain']:.2f}x" if "fit_s_vs_plain" in r else "-"
        whole_ratio = f"{r['whole_fit_s_vs_plain']:.2f}x" if "whole_fit_s_vs_plain" in r else "-"
        spread = f" ({r['epoch_min_s']:.2f}..{r['epoch_max_s']:.2f})" if len(r["per_run"]) > 1 else ""
        lines.append(
            f"| {r['variant']} | {r['epochs']} | {r['epoch_s']:.2f}{spread} "
            f"| {r['step_ms']:.1f} | {r['loop_s']:.1f} | {r['fit_s']:.1f} | {r['test_acc']:.2%} "
            f"| {r['peak_rss_mb']:.0f} "
            f"| {ratio} | {fit_ratio} | {r['whole_fit_s']:.1f} | {whole_ratio} | {by_seed(r)} |"
        )
    by_name = {r["variant"]: r for r in rows}
    if "plain-fast" in by_name and "seed" in by_name:
        plain_fast = {run["round"]: run for run in by_name["plain-fast"]["per_run"]}  # one run a round
        overhead = statistics.median(
            seed["step_ms"] / plain_fast[seed["round"]]["step_ms"] - 1 for seed in by_name["seed"]["per_run"]
        )
        rounds = by_name["seed"]["rounds"]
        lines.append(
            f"Lightning overhead per training step (seed vs plain-fast, median of {rounds} round(s)): "
            f"{overhead:+.1%}"
        )
    return "\n".join(lines)


def by_seed(row: dict) -> str:
    """``seed 1: 99.10%, seed 2: 99.05%; mean 99.08%``, or the one seed's accuracy."""
    accs = ", ".join(f"seed {s}: {a:.2%}" for s, a in zip(row["seeds"], row["test_acc_by_seed"], strict=True))
    return f"{accs}; mean {row['test_acc_mean']:.2%}" if len(row["seeds"]) > 1 else accs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", required=True, help="folder holding MNIST/raw/")
    parser.add_argument(
        "--epochs", type=int, help="override every variant's epochs (default: each recipe's own)"
    )
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument(
        "--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated, from {VARIANTS}"
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[1], help="each recipe runs once per seed in every round"
    )
    parser.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)  # a child's one seed
    parser.add_argument("--val-size", type=int, default=5000)
    parser.add_argument(
        "--repeat", type=int, default=1, help="rounds of all variants, interleaved; the table shows medians"
    )
    parser.add_argument("--output", help="also write the results as JSON here")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.data_dir = str(Path(args.data_dir).resolve())  # the recipes run in scratch folders
    if not (Path(args.data_dir) / "MNIST" / "raw").is_dir():
        parser.exit(2, f"benchmarks.bench: error: --data-dir {args.data_dir} has no MNIST/raw/ folder\n")

    unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.child:
        print(json.dumps(run_child(args.child, args)))
        return

    child_flags = [f"--data-dir={args.data_dir}", f"--accelerator={args.accelerator}"]
    child_flags += [f"--val-size={args.val_size}", *([f"--epochs={args.epochs}"] if args.epochs else [])]
    variants = args.variants.split(",")
    runs: dict[str, list[dict]] = {variant: [] for variant in variants}
    for round_ in range(max(1, args.repeat)):
        for variant in variants:
            for seed in args.seeds[:1] if variant.startswith("plain") else args.seeds:
                print(f"round {round_ + 1}: running {variant}, seed {seed} ...", file=sys.stderr, flush=True)
                started = time.time()
                child = [*child_flags, f"--seed={seed}", "--child", variant]
                proc = subprocess.run(
                    [sys.executable, "-m", "benchmarks.bench", *child],
                    capture_output=True, text=True, check=False,
                )  # fmt: skip
                if proc.returncode != 0:
                    sys.stderr.write(proc.stderr[-4000:])
                    failed = f"variant {variant}, seed {seed} failed (exit {proc.returncode})"
                    parser.exit(1, f"benchmarks.bench: error: {failed}\n")
                result = json.loads(proc.stdout.strip().splitlines()[-1])
                if "fit_end" in result:  # a recipe's fit as the user waits for it: from the process's start
                    result["whole_fit_s"] = result["fit_end"] - started
                runs[variant].append({**result, "round": round_, "seed": seed})
    rows = [summarize(variant, runs[variant], runs.get("plain")) for variant in variants]
    report = table(rows, device_name(args.accelerator))
    print(report)
    if args.output:
        Path(args.output).write_text(
            json.dumps({"device": device_name(args.accelerator), "rows": rows}, indent=2)
        )


if __name__ == "__main__":
    main()
