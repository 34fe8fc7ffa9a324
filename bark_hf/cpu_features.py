"""What the CPU can do natively, for choosing (or warning about) a precision or a matrix library."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from .checks import env_flag

CPUINFO = Path("/proc/cpuinfo")
ONEDNN_LINEAR_ENV_VAR = "BARK_HF_ONEDNN_LINEAR"
NATIVE_BFLOAT16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})  # x86 AVX-512 and AMX; Arm (Features)


@functools.cache
def cpu_has_native_bfloat16() -> bool | None:
    """Whether the CPU has bfloat16 arithmetic instructions; None where this cannot be read (not Linux).

    Without them PyTorch converts bfloat16 values to float32 and back around its arithmetic, so
    bfloat16 runs slower than float32 on such a CPU (see docs/performance.md).
    """
    flags = _cpuinfo_field(("flags", "Features"))
    return None if flags is None else bool(NATIVE_BFLOAT16_FLAGS & set(flags.split()))


@functools.cache
def cpu_vendor() -> str | None:
    """The x86 vendor (`GenuineIntel`, `AuthenticAMD`, ...); None where this cannot be read (not Linux, not x86)."""
    return _cpuinfo_field(("vendor_id",))


def use_onednn_linear() -> bool:
    """Whether float32 linear layers without autograd run through oneDNN rather than PyTorch's default, MKL.

    MKL picks its kernels by CPU vendor and gives other vendors' CPUs slow ones: on a 2-core AMD EPYC its
    one-row products (a decoding step) read weights at 8-10 GB/s where oneDNN, which PyTorch bundles and
    which picks by instruction set, reads at 11-13; over a window prefill's rows MKL takes 17 % longer
    (docs/performance.md). So oneDNN is the default on x86 CPUs not made by Intel; `BARK_HF_ONEDNN_LINEAR`
    (1 or 0) overrides that where PyTorch has oneDNN. The two libraries round differently, in the last bits.
    """
    return _onednn_available() and env_flag(ONEDNN_LINEAR_ENV_VAR, default=cpu_vendor() not in (None, "GenuineIntel"))


@functools.cache
def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _cpuinfo_field(names: tuple[str, ...]) -> str | None:
    """The first processor's value of the first of `names` in /proc/cpuinfo; None if absent or unreadable."""
    try:
        text = CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in names:
            return value.strip()
    return None
