"""A matrix-vector product at the speed of memory for CPU decoding, built on first use with the system's C compiler.

A decoding step is a few dozen one-row products, each reading a weight matrix once, so its speed is the speed
at which they read memory, and PyTorch's libraries (MKL, oneDNN) read well below it on some CPUs (figures in
docs/performance.md). The kernel is `csrc/matvec.c`. It needs an x86-64 Linux CPU with AVX2 and FMA, PyTorch
built with GNU OpenMP (libgomp), and a C compiler (`$CC`, else `cc` or `gcc`), which builds it in under a second
into `$XDG_CACHE_HOME/bark_hf` (else `~/.cache/bark_hf`). `BARK_HF_CPU_MATVEC` (1 or 0) turns it on or off. By
default it is on; where the machine cannot have it, PyTorch's products run, with a one-time warning where a
build was tried and failed.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import re
import shlex
import shutil
import stat
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
BUILD_TIMEOUT_S = 120
# File names of OpenMP runtimes (GNU, Intel, LLVM): the kernel must share PyTorch's, not load a second one.
_OPENMP_RUNTIME = re.compile(r"lib(gomp|iomp5|omp)([-.].*)?\.so")

logger = logging.get_logger(__name__)

Matvec = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


class MatvecUnavailable(RuntimeError):
    """Why the kernel cannot run here."""


class _NotThisMachine(MatvecUnavailable):
    """The platform, CPU or PyTorch build rules the kernel out: nothing to warn about."""


def matvec_wanted() -> bool:
    """`BARK_HF_CPU_MATVEC`, on by default; an unknown value is refused, naming the variable."""
    return env_flag(MATVEC_ENV_VAR, default=True)


def cpu_matvec() -> Matvec | None:
    """The kernel's product, `matvec(inputs, weight, bias)`: `F.linear` for float32 CPU tensors, a contiguous
    `weight` [n, k] and `bias` [n], `inputs` [..., k]. Built on the first call. None where it cannot run (with a
    one-time warning where a build failed), or an error where `BARK_HF_CPU_MATVEC=1` asked for it.
    """
    loaded = _load()
    if not isinstance(loaded, MatvecUnavailable):
        return loaded
    if env_flag(MATVEC_ENV_VAR, default=False):
        raise MatvecUnavailable(f"{MATVEC_ENV_VAR} is 1, but {loaded}. Set it to 0, or unset it, to use PyTorch's "
                                "own products.")
    if not isinstance(loaded, _NotThisMachine):
        logger.warning_once(f"bark-hf's CPU matrix-vector kernel is not used: {loaded}. Decoding takes PyTorch's "
                            f"own products, which are slower on some CPUs; set {MATVEC_ENV_VAR}=0 to silence this.")
    return None


@functools.cache
def _load() -> Matvec | MatvecUnavailable:
    """The product, or why it cannot run (kept, so that a failed build is not tried again at every call)."""
    try:
        function = _compiled()
    except MatvecUnavailable as reason:
        return reason
    except Exception as error:  # a missing source, no home folder, ...: never an error inside generate
        return MatvecUnavailable(f"building it failed ({type(error).__name__}: {error})")

    def matvec(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out_features, in_features = weight.shape
        tensors = (inputs, weight) if bias is None else (inputs, weight, bias)
        if (inputs.shape[-1] != in_features or not weight.is_contiguous()
                or (bias is not None and (bias.shape != (out_features,) or not bias.is_contiguous()))
                or any(tensor.dtype != torch.float32 or tensor.device.type != "cpu" for tensor in tensors)):
            described = [(tuple(tensor.shape), str(tensor.dtype), tensor.device.type) for tensor in tensors]
            raise ValueError(f"matvec takes float32 CPU tensors: inputs [..., k], a contiguous weight [n, k] and "
                             f"bias [n] or None; got {described}.")
        inputs = inputs.contiguous()
        output = inputs.new_empty((*inputs.shape[:-1], out_features))
        function(inputs.data_ptr(), inputs.numel() // in_features, out_features, in_features, weight.data_ptr(),
                 None if bias is None else bias.data_ptr(), output.data_ptr(), torch.get_num_threads())
        return output

    return matvec


def _compiled() -> Callable[..., None]:
    """`bark_hf_matvec` from the built library; raises `MatvecUnavailable`."""
    if sys.platform != "linux" or platform.machine().lower() not in X86_MACHINES:
        raise _NotThisMachine(f"it needs an x86 CPU and Linux, not {platform.machine()} and {sys.platform}")
    missing = REQUIRED_CPU_FLAGS - set((cpu_flags() or "").split())
    if missing:
        raise _NotThisMachine(f"the CPU lacks {', '.join(sorted(missing))} (read from /proc/cpuinfo)")
    if not torch.backends.openmp.is_available():
        raise _NotThisMachine("this PyTorch was built without OpenMP, whose threads the kernel shares")
    compiler = shlex.split(os.environ.get("CC", "")) or [shutil.which("cc") or shutil.which("gcc") or ""]
    if not compiler[0]:
        raise MatvecUnavailable("no C compiler was found to build it (install gcc, or set CC)")
    library = _build(compiler)
    runtimes_before = _openmp_runtimes()
    try:
        function = ctypes.CDLL(str(library)).bark_hf_matvec
    except (OSError, AttributeError) as error:
        raise MatvecUnavailable(f"loading {library} failed ({error}); delete it to have it built again") from None
    added = _openmp_runtimes() - runtimes_before
    if added and runtimes_before:  # its threads would compete with PyTorch's for the cores
        raise MatvecUnavailable(f"it loads a second OpenMP runtime ({', '.join(sorted(added))}) beside PyTorch's "
                                f"({', '.join(sorted(runtimes_before))}); build it with the compiler PyTorch uses (CC)")
    function.restype = None
    function.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_void_p,
                         ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    return function


def _openmp_runtimes() -> set[str]:
    """The paths of the OpenMP runtimes loaded in this process (Linux)."""
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
        paths = {fields[5].strip() for fields in (line.split(maxsplit=5) for line in maps) if len(fields) == 6}
    return {path for path in paths if _OPENMP_RUNTIME.match(os.path.basename(path))}


def _build(compiler: list[str]) -> Path:
    """The shared library, compiled into the cache unless there already, or into a temporary folder if the cache
    cannot be written. Compiled under a temporary name and renamed, so that a concurrent or failed build never
    leaves a partial library under the final name; a library that another user could have written is not used."""
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join((*compiler, *COMPILER_FLAGS)).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bark_hf"
    try:
        cache.mkdir(parents=True, exist_ok=True)
        library = cache / f"matvec-{key}.so"
        if library.is_file():
            _check_owner(library)
            return library
        handle, partial_name = tempfile.mkstemp(dir=cache, prefix=".matvec-", suffix=".so")
        os.close(handle)
        partial = Path(partial_name)
    except OSError:
        library = Path(tempfile.mkdtemp(prefix="bark_hf-")) / f"matvec-{key}.so"
        partial = library.with_suffix(".partial")
    command = [*compiler, *COMPILER_FLAGS, str(SOURCE), "-o", str(partial)]
    try:
        subprocess.run(command, check=True, capture_output=True, timeout=BUILD_TIMEOUT_S)
        umask = os.umask(0)
        os.umask(umask)
        partial.chmod(0o755 & ~umask)  # mkstemp's 0600 would keep other users of a shared cache out
        os.replace(partial, library)
    except (OSError, subprocess.SubprocessError) as error:
        partial.unlink(missing_ok=True)
        output = getattr(error, "stderr", None) or str(error)
        detail = (output.decode(errors="replace") if isinstance(output, bytes) else output).strip(" .\n")[-500:]
        raise MatvecUnavailable(f"building it failed ({shlex.join(command)}): {detail}") from None
    return library


def _check_owner(library: Path) -> None:
    """Refuse a cached library that another user owns or that others may write: it would run in this process."""
    status = library.stat()
    if status.st_uid != os.getuid() or status.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise MatvecUnavailable(f"{library} belongs to another user or may be written by others; delete it, or set "
                                "XDG_CACHE_HOME to a folder of your own")
