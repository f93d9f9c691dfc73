"""Which precision a recipe with ``bf16_where_native: true`` trains in: bf16 where the device computes it.

bf16 autocast is faster only where the hardware has bfloat16 arithmetic: CUDA GPUs since Ampere
(compute capability 8.0), and CPUs with AMX or AVX512-BF16. Elsewhere oneDNN emulates it, converting
to and from float32 around every operation, and an epoch takes about twice as long as in float32.
:func:`choose_precision` decides from facts passed in (so tests can fake any machine);
:func:`precision_for` gathers those facts for this machine.
"""

import platform
from pathlib import Path

import torch

BF16 = "bf16-mixed"
FP32 = "32-true"
# /proc/cpuinfo flags of the CPU instructions that compute bfloat16 natively.
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
CUDA_BF16_CAPABILITY = (8, 0)  # Ampere


def choose_precision(
    device: str, cpu_flags: str = "", cuda_capability: tuple[int, int] | None = None, name: str = ""
) -> tuple[str, str]:
    """The precision to train in and why, in words.

    Args:
        device: ``cpu``, ``cuda``, or another accelerator's name (which gets float32).
        cpu_flags: the CPU's feature flags as /proc/cpuinfo lists them (empty when unknown).
        cuda_capability: the CUDA GPU's compute capability (major, minor).
        name: the device's name, for the reason.
    """
    where = f"{name}: " if name else ""
    if device == "cuda":
        if cuda_capability is not None and tuple(cuda_capability) >= CUDA_BF16_CAPABILITY:
            major, minor = cuda_capability
            return BF16, f"{where}CUDA compute capability {major}.{minor} computes bf16 natively"
        return FP32, f"{where}no native bf16 below CUDA compute capability 8.0, where bf16 is slower"
    if device == "cpu":
        found = [flag for flag in CPU_BF16_FLAGS if flag in cpu_flags.split()]
        if found:
            return BF16, f"{where}this CPU computes bf16 natively ({', '.join(found)})"
        return FP32, f"{where}this CPU has neither AMX nor AVX512-BF16, where bf16 is slower"
    return FP32, f"bf16 is chosen only on CUDA GPUs and on CPUs with AMX or AVX512-BF16, not on {device}"


def _cpuinfo(field: str) -> str:
    """A field of this CPU's /proc/cpuinfo entry (Linux); empty elsewhere, where nothing is assumed."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith(field)), "")


def cpu_flags() -> str:
    """This CPU's feature flags, as /proc/cpuinfo lists them."""
    return _cpuinfo("flags")


def cpu_name() -> str:
    """This CPU's model name, or what ``platform`` knows."""
    return _cpuinfo("model name") or platform.processor() or "CPU"


def device_kind(accelerator: object) -> str:
    """What ``--trainer.accelerator`` will run on: ``cuda``, ``cpu``, or the accelerator's own name."""
    if not isinstance(accelerator, str):  # an Accelerator given by class_path: bf16 is the user's call
        return "a custom accelerator"
    name = accelerator.lower()
    if name in ("auto", "gpu"):
        return "cuda" if torch.cuda.is_available() else ("cpu" if name == "auto" else "gpu")
    return name


def precision_for(accelerator: object) -> tuple[str, str]:
    """:func:`choose_precision` for this machine and ``--trainer.accelerator``."""
    device = device_kind(accelerator)
    if device == "cuda":
        capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
        return choose_precision(device, cuda_capability=capability, name=name)
    if device == "cpu":
        return choose_precision(device, cpu_flags=cpu_flags(), name=cpu_name())
    return choose_precision(device)
