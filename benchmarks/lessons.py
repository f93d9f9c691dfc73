"""Run the lesson experiments of docs/lessons.md: each recipe of ``configs/lessons/`` and the seed recipe,
each seed a ``fit`` then a bare ``test`` as a user runs them, one at a time.

    python -m benchmarks.lessons --data_dir ../shared/data --epochs 3 --steps 30 --val_batches 2 \
        --seeds 1 2 3 --out lessons_runs

``--steps`` and ``--val_batches`` shorten each epoch (Lightning's ``limit_train_batches`` and
``limit_val_batches``) when the whole recipe does not fit the time at hand; the test is always all 10,000
test images.

A variant is a lesson's name, or several joined by ``+`` (their recipes given in that order, e.g.
``no_batchnorm+no_normalization``). Every run lives in ``<out>/<variant>/seed<N>/lightning_logs/``;
``<out>/results.json`` collects each run's fit wall time and test accuracy, and a rerun skips the runs it
holds. Seeds go round all the variants
before the next seed, so a stopped set still has every variant. ``python -m tools.lessons`` draws them.
"""

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("seed", *sorted(path.stem for path in (REPO / "configs" / "lessons").glob("*.yaml")))
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def mnist_lit(args: list[str], cwd: Path) -> str:
    """``python -m mnist_lit ARGS`` in ``cwd``; its output, or SystemExit with it when it fails."""
    done = subprocess.run([sys.executable, "-m", "mnist_lit", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(args)} failed in {cwd}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return done.stdout


def run(variant: str, seed: int, budget: list[str], data_dir: Path, folder: Path) -> dict:
    """One fit of ``variant`` with the ``budget`` flags and its bare test; the fit's wall time and the test
    accuracy."""
    folder.mkdir(parents=True, exist_ok=True)
    recipe = ["--config", str(REPO / "configs" / "mnist.yaml")]
    if variant != "seed":
        for lesson in variant.split("+"):
            recipe += ["--config", str(REPO / "configs" / "lessons" / f"{lesson}.yaml")]
    start = time.perf_counter()
    mnist_lit(
        ["fit", *recipe, f"--seed_everything={seed}", *budget, *QUIET,
         f"--data.data_dir={data_dir.resolve()}"],
        folder,
    )  # fmt: skip
    fit_s = time.perf_counter() - start
    tested = mnist_lit(["test", *QUIET], folder)
    acc = float(re.search(r"test/acc ([\d.]+)%", tested).group(1)) / 100
    return {"variant": variant, "seed": seed, "budget": budget, "fit_s": round(fit_s, 1), "test_acc": acc}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", type=Path, required=True, help="the folder holding MNIST/raw/")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, help="training batches per epoch (default: all 550)")
    parser.add_argument("--val_batches", type=int, help="validation batches per epoch (default: all 5)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--out", type=Path, default=Path("lessons_runs"))
    args = parser.parse_args()
    for variant in args.variants:
        if not set(variant.split("+")) <= set(VARIANTS):
            parser.error(f"--variants {variant}: each part must be one of {', '.join(VARIANTS)}")
    budget = [f"--trainer.max_epochs={args.epochs}"]
    if args.steps:
        budget.append(f"--trainer.limit_train_batches={args.steps}")
    if args.val_batches:
        budget.append(f"--trainer.limit_val_batches={args.val_batches}")
    results_file = args.out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else []
    for seed in args.seeds:
        for variant in args.variants:
            if any(r["variant"] == variant and r["seed"] == seed and r["budget"] == budget for r in results):
                continue
            result = run(variant, seed, budget, args.data_dir, args.out / variant / f"seed{seed}")
            results.append(result)
            args.out.mkdir(parents=True, exist_ok=True)
            results_file.write_text(json.dumps(results, indent=1) + "\n")
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
