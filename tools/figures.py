"""README pictures, drawn from a real run's TensorBoard event files (never by hand).

    python -m tools.figures --run lightning_logs/version_0 --out docs/

writes ``training_curves.png`` (loss and accuracy per epoch, train and val) from the ``fit`` run, and
``confusion_matrix.png`` and ``mistakes.png``, the images that ``test`` logged (see report.py), from the
newest test run of it, ``<run>/test_N`` (``--test-run`` to choose).
"""

import argparse
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mnist_lit.logger import run_folders
from mnist_lit.report import CONFUSION_MATRIX_TAG, MISTAKES_TAG

# (panel title, [(scalar tag, curve label), ...]): the per-epoch values the model logs.
CURVES = (
    ("Loss", [("train/loss_epoch", "train"), ("val/loss", "val")]),
    ("Accuracy", [("train/acc", "train"), ("val/acc", "val")]),
)
TEST_IMAGES = {CONFUSION_MATRIX_TAG: "confusion_matrix.png", MISTAKES_TAG: "mistakes.png"}


def load_events(log_dir: Path) -> EventAccumulator:
    """All scalars and images of one run folder (size_guidance 0 = keep every event)."""
    if not any(log_dir.glob("events.out.tfevents.*")):
        raise SystemExit(f"tools.figures: error: no TensorBoard event files in {log_dir}/")
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def per_epoch(events: EventAccumulator, tag: str) -> tuple[list[int], list[float]]:
    """(epochs, values) of a scalar logged once per epoch; epochs numbered from 0, as Lightning numbers
    them everywhere a user sees one (the progress bar, checkpoint names, the ``epoch`` scalar).

    Lightning logs the ``epoch`` scalar at every step it logs anything, so it maps steps to epochs.
    """
    epoch_at = {e.step: int(e.value) for e in events.Scalars("epoch")}
    points = sorted({epoch_at[e.step]: e.value for e in events.Scalars(tag) if e.step in epoch_at}.items())
    return [epoch for epoch, _ in points], [value for _, value in points]


def training_curves(events: EventAccumulator, title: str) -> Figure:
    figure = Figure(figsize=(10, 4))
    for ax, (name, curves) in zip(figure.subplots(1, 2), CURVES, strict=True):
        for tag, label in curves:
            if tag in events.Tags()["scalars"]:
                ax.plot(*per_epoch(events, tag), marker="o", label=label)
        ax.set(title=name, xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole: no 0.5 ticks
        ax.grid(alpha=0.3)
        ax.legend()
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def newest_test_run(run: Path) -> Path | None:
    """The highest ``test_N`` of ``run`` whose events hold the test report's confusion matrix."""
    for candidate in run_folders(run, "test"):
        has_events = any(candidate.glob("events.out.tfevents.*"))
        if has_events and CONFUSION_MATRIX_TAG in load_events(candidate).Tags()["images"]:
            return candidate
    return None


def write_figures(run: Path, out: Path, test_run: Path | None = None) -> list[Path]:
    """Write the README's PNGs for a fit ``run`` (and its ``test_run``) into ``out``; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    events = load_events(run)
    _, best = per_epoch(events, "val/acc_best")
    epochs, _ = per_epoch(events, "val/acc")
    title = f"{run.name}: {len(epochs)} epochs" + (f", best val/acc {best[-1]:.2%}" if best else "")
    curves = out / "training_curves.png"
    training_curves(events, title).savefig(curves, dpi=100)
    written = [curves]

    test_run = test_run or newest_test_run(run)
    if test_run is None:
        print(f"no test run with a confusion matrix in {run}: run `python -m mnist_lit test` first")
        return written
    test_events = load_events(test_run)
    for tag, name in TEST_IMAGES.items():
        if tag in test_events.Tags()["images"]:
            # The PNG exactly as TensorBoard shows it (the last one, if the run logged several).
            (out / name).write_bytes(test_events.Images(tag)[-1].encoded_image_string)
            written.append(out / name)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.figures", description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a fit run: lightning_logs/version_N")
    parser.add_argument("--test-run", type=Path, help="its test run (default: its newest, <run>/test_N)")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="folder for the PNGs (default: docs)")
    args = parser.parse_args(argv)
    for path in write_figures(args.run, args.out, args.test_run):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
