"""docs/lessons.md's curves and tables, drawn from the lesson runs' TensorBoard event files and results.

    python -m tools.lessons --runs lessons_runs --out docs/

reads what ``python -m benchmarks.lessons --out lessons_runs`` wrote: for each question one PNG,
``lessons_<question>.png``, val/acc and train/loss_epoch per epoch of each variant against the seed recipe
(the mean over the seeds run, each seed's curve faint behind it), ``lessons_filters.png`` and
``lessons_block{1,2}.png`` (the pictures that the seed recipe's seed-1 ``test`` logged, report.py), and
prints the Markdown table of test accuracy over the seeds and fit wall time.
"""

import argparse
import json
import statistics
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mnist_lit.report import BLOCK_TAG, FILTERS_TAG
from tools.figures import load_events, newest_test_run, per_epoch

# question -> (title, the variants compared with the seed recipe)
QUESTIONS = {
    "batchnorm": ("What BatchNorm does", ["no_batchnorm"]),
    "optimizer": (
        "Adam or SGD",
        ["sgd", "sgd_high_lr", "sgd_tuned", "momentum", "momentum_high_lr", "momentum_tuned"],
    ),
    "conv": ("Convolutions or fully connected", ["fully_connected"]),
    "normalization": (
        "Normalized inputs or not",
        ["no_normalization", "no_batchnorm", "no_batchnorm+no_normalization"],
    ),
}
LABELS = {
    "seed": "seed recipe (Adam 1e-3)",
    "no_batchnorm": "without BatchNorm",
    "sgd": "SGD lr 1e-3",
    "sgd_high_lr": "SGD lr 0.1",
    "momentum": "SGD momentum 0.9, lr 1e-3",
    "momentum_high_lr": "SGD momentum 0.9, lr 0.01",
    "sgd_tuned": "SGD lr 0.07 (tuned)",
    "momentum_tuned": "SGD momentum 0.9, lr 0.003 (tuned)",
    "fully_connected": "fully connected, 37 hidden",
    "no_normalization": "inputs not normalized",
    "no_batchnorm+no_normalization": "without BatchNorm, inputs not normalized",
}
PANELS = (("val/acc", "val/acc"), ("train/loss_epoch", "train/loss (epoch mean)"))


def curves(runs: Path, results: list[dict], variant: str, tag: str) -> list[tuple[list[int], list[float]]]:
    """(epochs, values) of ``tag`` for each seed of ``variant`` that completed (is in the results)."""
    seeds = sorted(r["seed"] for r in results if r["variant"] == variant)
    folders = [runs / variant / f"seed{seed}" / "lightning_logs" / "version_0" for seed in seeds]
    return [per_epoch(load_events(folder), tag) for folder in folders]


def question_figure(runs: Path, results: list[dict], title: str, variants: list[str]) -> Figure:
    figure = Figure(figsize=(10, 4))
    for ax, (tag, name) in zip(figure.subplots(1, 2), PANELS, strict=True):
        for index, variant in enumerate(["seed", *variants]):
            color = f"C{index}"
            per_seed = curves(runs, results, variant, tag)
            if not per_seed:
                continue
            for epochs, values in per_seed:
                ax.plot(epochs, values, color=color, alpha=0.25, linewidth=1)
            length = min(len(epochs) for epochs, _ in per_seed)
            mean = [statistics.fmean(values[i] for _, values in per_seed) for i in range(length)]
            label = f"{LABELS[variant]} ({len(per_seed)} seed{'s' * (len(per_seed) > 1)})"
            ax.plot(range(length), mean, color=color, marker="o", label=label)
        ax.set(title=name, xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if tag == "train/loss_epoch":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    figure.axes[0].legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def write_pictures(runs: Path, out: Path) -> list[Path]:
    """The filters and feature maps the seed recipe's seed-1 test logged, as the PNGs TensorBoard shows."""
    test_run = newest_test_run(runs / "seed" / "seed1" / "lightning_logs" / "version_0")
    if test_run is None:
        return []
    events = load_events(test_run)
    names = {FILTERS_TAG: "filters", BLOCK_TAG.format(block=1): "block1", BLOCK_TAG.format(block=2): "block2"}
    written = []
    for tag, name in names.items():
        path = out / f"lessons_{name}.png"
        path.write_bytes(events.Images(tag)[-1].encoded_image_string)
        written.append(path)
    return written


def table(results: list[dict]) -> str:
    """Markdown: each variant's test accuracy per seed, mean and range, and its fit times' range (on a
    shared machine the fastest is the closest to the variant's own cost)."""
    lines = ["| variant | seeds | test acc per seed | mean | min-max | fit s (min-max) |", "|---" * 6 + "|"]
    for variant in LABELS:
        rows = sorted((r for r in results if r["variant"] == variant), key=lambda r: r["seed"])
        if not rows:
            continue
        accs = [r["test_acc"] for r in rows]
        per_seed = ", ".join(f"{acc:.2%}" for acc in accs)
        fit_s = [r["fit_s"] for r in rows]
        seeds = ",".join(str(r["seed"]) for r in rows)
        lines.append(
            f"| {LABELS[variant]} | {seeds} | {per_seed} | {statistics.fmean(accs):.2%} | "
            f"{min(accs):.2%}-{max(accs):.2%} | {min(fit_s):.0f}-{max(fit_s):.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=Path("lessons_runs"))
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = json.loads((args.runs / "results.json").read_text())
    for question, (title, variants) in QUESTIONS.items():
        path = args.out / f"lessons_{question}.png"
        question_figure(args.runs, results, title, variants).savefig(path, dpi=100)
        print(f"wrote {path}")
    for path in write_pictures(args.runs, args.out):
        print(f"wrote {path}")
    print(table(results))


if __name__ == "__main__":
    main()
