"""Benchmark: the fixed cost of each command, the part of a user's wait that is not training or testing.

    python -m benchmarks.startup --data-dir ../shared/data [--repeat 5] [--epochs 1]

Every command runs as a user runs it, in a fresh process, in a scratch folder, and is timed from start
to exit. One round runs a seed-recipe ``fit``, then ``--samples`` times (medians taken) each of the floor,
``--help`` and a bare ``test``:

- the floor: ``python -c "import lightning.pytorch, torchvision, torchmetrics"``, the imports no command
  can avoid;
- ``python -m mnist_lit --help``, reported as a ratio to the floor of the same round;
- ``python -m mnist_lit fit --config configs/mnist.yaml --trainer.max_epochs E`` (once), reported as its wall
  time minus the sum of its epoch times (``time/epoch_s``, training and validation): what ``fit`` adds
  to its epochs, with and without the floor;
- a bare ``python -m mnist_lit test`` (the best checkpoint of that fit, on the 10k test images),
  reported as its wall time minus the floor.

``--repeat N`` runs N rounds and reports medians (ratios and differences are taken round by round, so
drift of a shared machine cancels out).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench import cpu_features
from mnist_lit.precision import cpu_name, precision_for

ROOT = Path(__file__).resolve().parent.parent
FLOOR = "import lightning.pytorch, torchvision, torchmetrics"


def machine() -> str:
    """This machine in one line: CPU model, cores and the flags that matter here; the GPU if any."""
    cpu = f"{cpu_name()}, {os.cpu_count()} cores, flags: {cpu_features()}"
    gpu = f"; GPU: {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}{gpu}; fast.yaml precision: {precision_for('auto')[0]}"


def timed(command: list[str], cwd: Path, env: dict) -> float:
    """Wall seconds of ``command`` from start to exit; exits with one line if the command fails."""
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        sys.exit(f"benchmarks.startup: error: {' '.join(command[1:])} failed (exit {proc.returncode})")
    return wall


def epoch_times(run: Path) -> list[float]:
    """The ``time/epoch_s`` values a fit run logged."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run))
    events.Reload()
    return [event.value for event in events.Scalars("time/epoch_s")]


def one_round(scratch: Path, data_dir: str, epochs: int, val_size: int, samples: int, env: dict) -> dict:
    cli = [sys.executable, "-m", "mnist_lit"]
    before = set((scratch / "lightning_logs").glob("version_*"))
    fit = timed(
        [
            *cli, "fit", f"--config={ROOT / 'configs' / 'mnist.yaml'}", f"--data.data_dir={data_dir}",
            f"--data.val_size={val_size}", f"--trainer.max_epochs={epochs}",
        ],
        scratch, env,
    )  # fmt: skip
    (run,) = set((scratch / "lightning_logs").glob("version_*")) - before
    epochs_s = sum(epoch_times(run))
    # A single start-up varies by seconds on a shared machine: the quick commands run `samples` times
    # each, interleaved, and the round takes the median of each.
    floors, helps, tests = [], [], []
    for _ in range(samples):
        floors.append(timed([sys.executable, "-c", FLOOR], scratch, env))
        helps.append(timed([*cli, "--help"], scratch, env))
        tests.append(timed([*cli, "test"], scratch, env))
    floor, help_, test = (statistics.median(times) for times in (floors, helps, tests))
    return {
        "floor_s": floor,
        "help_s": help_,
        "help_vs_floor": help_ / floor,
        "test_s": test,
        "test_over_floor_s": test - floor,
        "fit_s": fit,
        "fit_epochs_s": epochs_s,
        "fit_over_epochs_s": fit - epochs_s,
        "fit_over_epochs_and_floor_s": fit - epochs_s - floor,
    }


def report(rounds: list[dict]) -> dict:
    """Medians over the rounds of each figure (each round's ratios and differences taken first)."""
    return {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}


def table(summary: dict, rounds: int, device: str) -> str:
    return "\n".join(
        [
            f"machine: {device}",
            f"median of {rounds} round(s), each command a fresh process:",
            "| figure | seconds |",
            "|---|---|",
            f'| floor: python -c "{FLOOR}" | {summary["floor_s"]:.2f} |',
            f"| python -m mnist_lit --help | {summary['help_s']:.2f} |",
            f"| --help / floor | {summary['help_vs_floor']:.2f}x |",
            f"| bare test: wall | {summary['test_s']:.2f} |",
            f"| bare test: wall - floor | {summary['test_over_floor_s']:.2f} |",
            f"| fit: wall | {summary['fit_s']:.2f} |",
            f"| fit: sum of epochs | {summary['fit_epochs_s']:.2f} |",
            f"| fit: wall - epochs | {summary['fit_over_epochs_s']:.2f} |",
            f"| fit: wall - epochs - floor | {summary['fit_over_epochs_and_floor_s']:.2f} |",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.startup", description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", required=True, help="folder holding MNIST/raw/")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the table shows medians")
    parser.add_argument("--epochs", type=int, default=1, help="epochs of the timed fit (seed recipe)")
    parser.add_argument(
        "--samples", type=int, default=3, help="runs of the floor, --help and test per round (median)"
    )
    parser.add_argument("--val-size", type=int, default=5000)
    parser.add_argument("--output", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    data_dir = str(Path(args.data_dir).resolve())  # the commands run in a scratch folder
    if not (Path(data_dir) / "MNIST" / "raw").is_dir():
        parser.exit(2, f"benchmarks.startup: error: --data-dir {data_dir} has no MNIST/raw/ folder\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))  # this checkout
    rounds = []
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(max(1, args.repeat)):
            print(f"round {round_ + 1} ...", file=sys.stderr, flush=True)
            samples = max(1, args.samples)
            rounds.append(one_round(Path(scratch), data_dir, args.epochs, args.val_size, samples, env))
            # Each round's figures as they come: a long run on a loaded machine still leaves numbers.
            print(json.dumps(rounds[-1]), file=sys.stderr, flush=True)
    summary = report(rounds)
    device = machine()
    print(table(summary, len(rounds), device))
    if args.output:
        Path(args.output).write_text(
            json.dumps({"machine": device, "rounds": len(rounds), **summary, "per_round": rounds}, indent=2)
        )


if __name__ == "__main__":
    main()
