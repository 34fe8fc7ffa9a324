"""What the CPU can do natively, for choosing (or warning about) a precision or a matrix library."""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch

from .checks import env_flag

CPUINFO = Path("/proc/cpuinfo")
ONEDNN_LINEAR_ENV_VAR = "BARK_HF_ONEDNN_LINEAR"
X86_MACHINES = frozenset({"x86_64", "amd64", "i386", "i686"})  # platform.machine(), lower-cased
NATIVE_BFLOAT16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})  # x86 AVX-512 and AMX; Arm (Features)


@functools.cache
def cpu_has_native_bfloat16() -> bool | None:
    """Whether the CPU has bfloat16 arithmetic instructions; None where this cannot be read (not Linux).

    Without them PyTorch converts bfloat16 values to float32 and back around its arithmetic, so
    bfloat16 runs slower than float32 on such a CPU (see docs/performance.md).
    """
    flags = cpu_flags()
    return None if flags is None else bool(NATIVE_BFLOAT16_FLAGS & set(flags.split()))


@functools.cache
def cpu_flags() -> str | None:
    """The CPU's feature flags as /proc/cpuinfo lists them (`flags` on x86, `Features` on Arm); None where this
    cannot be read (not Linux)."""
    return _cpuinfo_field(("flags", "Features"))


@functools.cache
def cpu_vendor() -> str | None:
    """The x86 vendor (`GenuineIntel`, `AuthenticAMD`, ...); None where this cannot be read (not Linux, not x86)."""
    return _cpuinfo_field(("vendor_id",))


def use_onednn_linear() -> bool:
    """Whether generation's float32 linear layers run through oneDNN rather than PyTorch's default, MKL.

    MKL picks its kernels by CPU vendor and gives other vendors' CPUs slow ones: on a 2-core AMD EPYC its
    one-row products (a decoding step) read weights at 8-11 GB/s on one core, the second idle, where oneDNN,
    which PyTorch bundles and which picks by instruction set, reads at 11-13 on both; over a window prefill's
    rows MKL takes 17 % longer (docs/performance.md). So oneDNN is the default on x86 CPUs not made by Intel
    (read from /proc/cpuinfo: Linux only); `BARK_HF_ONEDNN_LINEAR` (1 or 0) overrides that, where PyTorch has
    oneDNN and `torch.backends.mkldnn` is enabled. The two libraries round differently, in the last bits.
    """
    vendor = cpu_vendor() if platform.machine().lower() in X86_MACHINES else None
    wanted = env_flag(ONEDNN_LINEAR_ENV_VAR, default=vendor not in (None, "GenuineIntel"))
    return wanted and _onednn_built() and torch.backends.mkldnn.enabled


@functools.cache
def _onednn_built() -> bool:
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
