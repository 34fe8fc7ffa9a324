"""What the CPU can do natively, for choosing (or warning about) a precision."""

from __future__ import annotations

import functools
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
NATIVE_BFLOAT16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})  # x86 AVX-512 and AMX; Arm (Features)


@functools.cache
def cpu_has_native_bfloat16() -> bool | None:
    """Whether the CPU has bfloat16 arithmetic instructions; None where this cannot be read (not Linux).

    Without them PyTorch converts bfloat16 values to float32 and back around its arithmetic, so
    bfloat16 runs slower than float32 on such a CPU (see docs/performance.md).
    """
    try:
        text = CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            return bool(NATIVE_BFLOAT16_FLAGS & set(value.split()))
    return None
