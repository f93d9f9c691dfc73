"""The fast recipe's precision by hardware: the decision on faked machines, and the CLI that applies it."""

from pathlib import Path

import pytest
import yaml

from mnist_lit import precision
from mnist_lit.precision import BF16, FP32, choose_precision
from tests.helpers import CONFIGS, QUICK, cli

# /proc/cpuinfo flag lines of real CPUs, shortened.
AMX_XEON = "fpu sse2 avx2 avx512f avx512bw avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8"
ZEN4 = "fpu sse2 avx2 avx512f avx512bw avx512_bf16 avx512_vnni"
AVX512_XEON = "fpu sse2 avx2 avx512f avx512bw avx512_vnni"  # Cascade Lake: AVX-512F but no bf16
AVX2_EPYC = "fpu sse2 avx avx2 fma"


@pytest.mark.parametrize(
    ("flags", "expected", "because"),
    [
        (AMX_XEON, BF16, "amx_bf16"),
        (ZEN4, BF16, "avx512_bf16"),
        (AVX512_XEON, FP32, "neither AMX nor AVX512-BF16"),
        (AVX2_EPYC, FP32, "neither AMX nor AVX512-BF16"),
        ("", FP32, "neither AMX nor AVX512-BF16"),  # flags unknown (not Linux)
        ("fpu avx512_bf16x avx512f", FP32, "neither"),  # whole flags only
    ],
    ids=["amx", "avx512-bf16", "avx512f-only", "avx2-only", "unknown", "whole-flags"],
)
def test_cpu_gets_bf16_only_with_native_bf16_instructions(flags, expected, because):
    chosen, reason = choose_precision("cpu", cpu_flags=flags, name="Some CPU")
    assert chosen == expected
    assert because in reason and reason.startswith("Some CPU: ")


@pytest.mark.parametrize(
    ("capability", "expected"),
    [((9, 0), BF16), ((8, 0), BF16), ((8, 6), BF16), ((7, 5), FP32), ((6, 0), FP32), (None, FP32)],
)
def test_cuda_gets_bf16_from_ampere_on(capability, expected):
    chosen, reason = choose_precision("cuda", cuda_capability=capability, name="GPU")
    assert chosen == expected
    assert ("natively" in reason) == (expected == BF16)


def test_other_accelerators_get_float32():
    assert choose_precision("mps", cpu_flags=AMX_XEON)[0] == FP32


def test_auto_means_cuda_only_when_cuda_is_there(monkeypatch):
    monkeypatch.setattr(precision.torch.cuda, "is_available", lambda: False)
    assert precision.device_kind("auto") == "cpu"
    assert precision.device_kind("cpu") == "cpu"
    monkeypatch.setattr(precision.torch.cuda, "is_available", lambda: True)
    assert precision.device_kind("auto") == precision.device_kind("gpu") == "cuda"
    assert precision.device_kind("cpu") == "cpu"


def fit_recipe(recipe: str, mnist_dir, *extra: str) -> dict:
    """Fit one batch of ``recipe`` on the CPU in the current folder; return the run's saved config."""
    cli(
        "fit", f"--config={CONFIGS / recipe}", f"--data.data_dir={mnist_dir}", "--data.val_size=100",
        *QUICK, "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1",
        "--trainer.accelerator=cpu", *extra,
    )  # fmt: skip
    return yaml.safe_load(Path("lightning_logs/version_0/config.yaml").read_text())


@pytest.mark.parametrize(("flags", "expected"), [(AMX_XEON, BF16), (AVX2_EPYC, FP32)], ids=["amx", "avx2"])
def test_fast_recipe_records_the_precision_it_chose(workdir, mnist_dir, capsys, monkeypatch, flags, expected):
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    saved = fit_recipe("fast.yaml", mnist_dir)
    out = capsys.readouterr().out.splitlines()
    assert [line for line in out if line.startswith("precision: ")] == [
        f"precision: {expected} ({precision.cpu_name()}: "
        + (
            "this CPU computes bf16 natively (amx_bf16, avx512_bf16))"
            if expected == BF16
            else "this CPU has neither AMX nor AVX512-BF16, where bf16 is slower)"
        )
    ]
    assert saved["trainer"]["precision"] == expected


def test_an_explicit_precision_wins_over_the_recipes_choice(workdir, mnist_dir, capsys, monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: AVX2_EPYC)
    saved = fit_recipe("fast.yaml", mnist_dir, "--trainer.precision=bf16-mixed")
    assert "precision: " not in capsys.readouterr().out
    assert saved["trainer"]["precision"] == BF16


def test_without_the_switch_precision_is_lightnings_default(workdir, mnist_dir, capsys, monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: AMX_XEON)
    saved = fit_recipe("mnist.yaml", mnist_dir)
    assert "precision: " not in capsys.readouterr().out
    assert saved["trainer"]["precision"] is None and saved["bf16_where_native"] is False
