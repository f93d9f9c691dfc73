"""The benchmark runs end to end on tiny data (it measures nothing here: timing belongs to bench runs)."""

import json
import subprocess
import sys

import pytest
import torch

from benchmarks.bench import cpu_features
from tests.helpers import subprocess_env


@pytest.mark.slow
def test_bench_runs_every_variant_and_prints_the_table(tmp_path, mnist_dir):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "benchmarks.bench", f"--data-dir={mnist_dir}", "--epochs=1"]
    cmd += ["--val-size=100", "--variants=plain,plain-fast,seed,seed-glibc-malloc"]
    proc = subprocess.run(
        [*cmd, "--repeat", "1", "--output", str(out)],
        cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {row["variant"]: row for row in report["rows"]}
    assert list(rows) == ["plain", "plain-fast", "seed", "seed-glibc-malloc"]
    for name, row in rows.items():  # each ratio is its own epoch time over the plain loop's
        expected = row["epoch_s"] / rows["plain"]["epoch_s"]
        assert row["epoch_s_vs_plain"] == pytest.approx(expected, rel=0.5), name
    for row in rows.values():
        assert row["epochs"] == 1 and row["rounds"] == 1 and len(row["per_run"]) == 1
        assert row["epoch_min_s"] <= row["epoch_s"] <= row["epoch_max_s"]
        assert row["epoch_s"] > 0 and row["step_ms"] > 0 and row["peak_rss_mb"] > 0
        assert row["epoch_s"] <= row["loop_s"] <= row["fit_s"] * 1.01  # one epoch <= all epochs <= fit
    lines = proc.stdout.splitlines()
    assert lines[0] == f"device: {report['device']}"
    if not torch.cuda.is_available():  # the CPU's name comes with the flags that decide its speed
        assert report["device"].endswith(f"; flags: {cpu_features()})")
    assert sum(line.startswith("| plain ") or line.startswith("| seed ") for line in lines) == 2
    assert any(line.startswith("Lightning overhead per training step") for line in lines)


def test_bench_without_mnist_is_one_clear_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench", f"--data-dir={tmp_path}"],
        env=subprocess_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"benchmarks.bench: error: --data-dir {tmp_path} has no MNIST/raw/ folder"
    ]


@pytest.mark.slow
def test_startup_reports_each_fixed_cost(tmp_path, mnist_dir):
    out = tmp_path / "startup.json"
    proc = subprocess.run(
        [
            sys.executable, "-m", "benchmarks.startup", f"--data-dir={mnist_dir}", "--val-size=100",
            "--repeat=1", "--samples=1", f"--output={out}",
        ],
        cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["rounds"] == len(report["per_round"]) == 1
    (round_,) = report["per_round"]
    assert round_["floor_s"] > 0 and round_["help_s"] > 0 and round_["fit_epochs_s"] > 0
    assert round_["help_vs_floor"] == pytest.approx(round_["help_s"] / round_["floor_s"])
    assert round_["test_over_floor_s"] == pytest.approx(round_["test_s"] - round_["floor_s"])
    assert round_["fit_over_epochs_s"] == pytest.approx(round_["fit_s"] - round_["fit_epochs_s"])
    lines = proc.stdout.splitlines()
    assert lines[0] == f"machine: {report['machine']}" and "flags: " in lines[0]
    for figure in ("--help / floor", "bare test: wall - floor", "fit: wall - epochs"):
        assert any(line.startswith(f"| {figure} |") for line in lines), figure
    assert not (tmp_path / "lightning_logs").exists()  # the runs stay in the benchmark's scratch folder


def test_summary_pairs_each_seed_with_its_rounds_plain_loop_and_shows_each_seeds_accuracy():
    from benchmarks.bench import summarize, table

    def result(round_: int, seed: int, epoch_s: float, acc: float) -> dict:
        return {"round": round_, "seed": seed, "epochs": [epoch_s, epoch_s], "train": [epoch_s] * 2,
                "steps": [10, 10], "fit_s": 2 * epoch_s, "acc": acc, "peak_rss_mb": 1.0}  # fmt: skip

    plain = [result(0, 1, 10.0, 0.99), result(1, 1, 20.0, 0.99)]  # the machine twice as slow in round 2
    recipe = [result(0, 1, 5.0, 0.991), result(0, 2, 5.0, 0.993), result(1, 1, 10.0, 0.991),
              result(1, 2, 10.0, 0.993)]  # fmt: skip
    row = summarize("best", recipe, plain)
    assert row["epoch_s_vs_plain"] == pytest.approx(0.5)  # each run against its own round's plain loop
    assert row["rounds"] == 2 and row["seeds"] == [1, 2]
    assert row["test_acc_by_seed"] == [0.991, 0.993] and row["test_acc_mean"] == pytest.approx(0.992)
    assert "seed 1: 99.10%, seed 2: 99.30%; mean 99.20%" in table([row], "a CPU")
