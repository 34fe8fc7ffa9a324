"""A full-bandwidth matrix-vector product for CPU decoding, built on first use with the system's C compiler.

A decoding step is a few dozen one-row products, each reading a weight matrix once, so its speed is the speed
at which they read memory. On a 2-core AMD EPYC, MKL's read at 8-11 GB/s on one core and oneDNN's at 11-16 on
two; the kernel in `csrc/matvec.c` reads at 20, the machine's read bandwidth (docs/performance.md). It needs an
x86-64 Linux CPU with AVX2 and FMA, PyTorch built with OpenMP, and a C compiler (`$CC`, else `cc` or `gcc`),
which builds it in under a second into a cache (`$XDG_CACHE_HOME/bark_hf`, else `~/.cache/bark_hf`).
`BARK_HF_CPU_MATVEC` (1 or 0) turns it on or off; by default it is on where it can be built, and a failed build
is reported once, after which PyTorch's own products run.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from transformers.utils import logging

from .checks import env_flag
from .cpu_features import X86_MACHINES, cpu_flags

MATVEC_ENV_VAR = "BARK_HF_CPU_MATVEC"
# Up to this many rows of inputs (a batch of one-token steps) the kernel is faster than oneDNN and MKL;
# beyond it, reading the weights once matters less than the arithmetic, which their GEMMs do better.
MATVEC_MAX_ROWS = 16
SOURCE = Path(__file__).with_name("csrc") / "matvec.c"
COMPILER_FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
REQUIRED_CPU_FLAGS = frozenset({"avx2", "fma"})

logger = logging.get_logger(__name__)

Matvec = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


class MatvecUnavailable(RuntimeError):
    """Why the kernel cannot run here."""


def matvec_wanted() -> bool:
    """`BARK_HF_CPU_MATVEC`, on by default; an unknown value is refused, naming the variable."""
    return env_flag(MATVEC_ENV_VAR, default=True)


def cpu_matvec() -> Matvec | None:
    """The kernel's product, `matvec(inputs, weight, bias)`: `F.linear` for contiguous float32 CPU tensors, `inputs`
    of at most `MATVEC_MAX_ROWS` rows (the caller checks that). Built on the first call; None where it cannot run
    (a one-time warning says why), or an error where `BARK_HF_CPU_MATVEC=1` asked for it.
    """
    loaded = _load()
    if not isinstance(loaded, MatvecUnavailable):
        return loaded
    if os.environ.get(MATVEC_ENV_VAR, "").strip():
        raise MatvecUnavailable(f"{MATVEC_ENV_VAR} is set, but {loaded}. Unset it (or set it to 0) to use "
                                "PyTorch's own products.")
    logger.warning_once(
        f"bark-hf's CPU matrix-vector kernel is not used: {loaded}. Decoding takes PyTorch's own products, "
        f"which are slower on some CPUs; set {MATVEC_ENV_VAR}=0 to silence this."
    )
    return None


@functools.cache
def _load() -> Matvec | MatvecUnavailable:
    """The product, or why it cannot run (kept, so that a failed build is not tried again at every call)."""
    try:
        function = _compiled()
    except MatvecUnavailable as reason:
        return reason

    def matvec(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out_features, in_features = weight.shape
        output = inputs.new_empty((*inputs.shape[:-1], out_features))
        function(inputs.data_ptr(), inputs.numel() // in_features, out_features, in_features, weight.data_ptr(),
                 None if bias is None else bias.data_ptr(), output.data_ptr(), torch.get_num_threads())
        return output

    return matvec


def _compiled() -> Callable[..., None]:
    """`bark_hf_matvec` from the built library; raises `MatvecUnavailable`."""
    if sys.platform != "linux" or platform.machine().lower() not in X86_MACHINES:
        raise MatvecUnavailable(f"it needs an x86 CPU and Linux, not {platform.machine()} and {sys.platform}")
    missing = REQUIRED_CPU_FLAGS - set((cpu_flags() or "").split())
    if missing:
        raise MatvecUnavailable(f"the CPU lacks {', '.join(sorted(missing))} (read from /proc/cpuinfo)")
    if not torch.backends.openmp.is_available():
        raise MatvecUnavailable("this PyTorch was built without OpenMP, whose threads the kernel shares")
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise MatvecUnavailable("no C compiler was found to build it (install gcc, or set CC)")
    library = _build(compiler)
    try:
        function = ctypes.CDLL(str(library)).bark_hf_matvec
    except (OSError, AttributeError) as error:
        raise MatvecUnavailable(f"loading {library} failed ({error}); delete it to have it built again") from None
    function.restype = None
    function.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_void_p,
                         ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    return function


def _build(compiler: str) -> Path:
    """The shared library, compiled into the cache unless there already, or into a temporary folder if the cache
    cannot be written. Compiled under a temporary name and renamed, so that a concurrent or failed build never
    leaves a partial library under the final name."""
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join((compiler, *COMPILER_FLAGS)).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bark_hf"
    try:
        cache.mkdir(parents=True, exist_ok=True)
        library = cache / f"matvec-{key}.so"
        if library.is_file():
            return library
        handle, partial_name = tempfile.mkstemp(dir=cache, prefix=".matvec-", suffix=".so")
        os.close(handle)
        partial = Path(partial_name)
    except OSError:
        library = Path(tempfile.mkdtemp(prefix="bark_hf-")) / f"matvec-{key}.so"
        partial = library.with_suffix(".partial")
    command = [compiler, *COMPILER_FLAGS, str(SOURCE), "-o", str(partial)]
    try:
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=120)
        os.replace(partial, library)
    except (OSError, subprocess.SubprocessError) as error:
        partial.unlink(missing_ok=True)
        detail = (getattr(error, "stderr", None) or str(error)).strip()[-500:]
        raise MatvecUnavailable(f"building it failed ({' '.join(command)}): {detail}") from None
    return library
