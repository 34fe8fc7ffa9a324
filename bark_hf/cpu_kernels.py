"""bark-hf's CPU kernels for decoding, built on first use with the system's C compiler.

A decoding step reads every weight once for a few rows of inputs, so its speed is the speed at which it reads
memory; PyTorch's libraries (MKL, oneDNN) read well below it on some CPUs, and a step's few hundred small
operators cost as much again (figures in docs/performance.md). The kernels are in `csrc/cpu_kernels.c`: a
matrix-vector product (`cpu_matvec`) and a whole GPT block's decoding step (`cpu_block_step`). They need an x86-64
Linux CPU with AVX2 and FMA (and F16C for a float16 KV cache), PyTorch built with GNU OpenMP (libgomp), and a C
compiler (`$CC`, else `cc` or `gcc`), which builds them in about a second into `$XDG_CACHE_HOME/bark_hf` (else
`~/.cache/bark_hf`). `BARK_HF_CPU_KERNELS` (1 or 0) turns them on or off. By default they are on; where the machine
cannot have them, PyTorch runs, with a one-time warning where a build was tried and failed.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import hashlib
import importlib.util
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
from typing import NamedTuple

import torch
from transformers.utils import logging

from .checks import env_flag
from .cpu_features import X86_MACHINES, cpu_flags

CPU_KERNELS_ENV_VAR = "BARK_HF_CPU_KERNELS"
# Up to this many rows of inputs (a batch of one-token steps) the kernel is faster than oneDNN and MKL;
# beyond it, reading the weights once matters less than the arithmetic, which their GEMMs do better. (A block-kernel
# step's head still takes this many items at a time, for each item's own values: `_head_logits`.)
MATVEC_MAX_ROWS = 16
# A decoding step runs through the block kernel for up to this many items: past MATVEC_MAX_ROWS its products are
# slower than GEMMs, but its attention over the cache and its one call per block still outweighed that in a
# bark-small coarse step on a 2-core AMD EPYC (32 items: 192 ms against PyTorch's 279; 64: 435 against 452; with
# int8 weights 616 against 996 and 1 017 against 1 779).
BLOCK_STEP_MAX_ITEMS = 64
SOURCE = Path(__file__).with_name("csrc") / "cpu_kernels.c"
# What `bark_hf_interface()` in the C source returns for the arguments declared in `_compiled`; raised with any change.
KERNELS_INTERFACE = 1
COMPILER_FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC")
LINKER_FLAGS = ("-lm",)
REQUIRED_CPU_FLAGS = frozenset({"avx2", "fma"})
# int8 models' float16 KV cache is converted with F16C, which every AVX2 CPU has but a virtual machine may hide;
# without it the kernels still run, over float32 caches only.
FLOAT16_CACHE_CPU_FLAG = "f16c"
BUILD_TIMEOUT_S = 120
# File names of OpenMP runtimes (GNU, Intel, LLVM): the kernel must share PyTorch's, not load a second one.
_OPENMP_RUNTIME = re.compile(r"lib(gomp|iomp5|omp)([-.].*)?\.so")

logger = logging.get_logger(__name__)

Matvec = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
# Tensors whose memory is their own storage (not a subclass such as torchao's quantized weights or DTensor).
PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


class CpuKernelsUnavailable(RuntimeError):
    """Why the kernel cannot run here."""


class _NotThisMachine(CpuKernelsUnavailable):
    """The platform, CPU or PyTorch build rules the kernel out: nothing to warn about."""


@functools.cache
def reads_float16_caches() -> bool:
    """Whether the block step may be given a float16 KV cache: the CPU has F16C (read from /proc/cpuinfo)."""
    return FLOAT16_CACHE_CPU_FLAG in (cpu_flags() or "").split()


def cpu_kernels_wanted() -> bool:
    """`BARK_HF_CPU_KERNELS`, on by default; an unknown value is refused, naming the variable."""
    return env_flag(CPU_KERNELS_ENV_VAR, default=True)


class BlockWeights(NamedTuple):
    """The tensors of a pre-LayerNorm GPT block (`BarkHfBlock`), as `cpu_block_step` takes them. An absent bias or
    LayerNorm weight is None."""

    layernorm_1_weight: torch.Tensor | None  # [C]
    layernorm_1_bias: torch.Tensor | None
    att_proj_weight: torch.Tensor  # [3C, C]: queries, keys, values
    att_proj_bias: torch.Tensor | None
    out_proj_weight: torch.Tensor  # [C, C]
    out_proj_bias: torch.Tensor | None
    layernorm_2_weight: torch.Tensor | None
    layernorm_2_bias: torch.Tensor | None
    in_proj_weight: torch.Tensor  # [4C, C]
    in_proj_bias: torch.Tensor | None
    mlp_out_weight: torch.Tensor  # [C, 4C]
    mlp_out_bias: torch.Tensor | None


class PreparedBlock(NamedTuple):
    """A block's tensors, checked once, for the kernel of `cpu_block_step`. Made by `prepare_block` only: the kernel
    trusts its checks of the weights' shapes and kinds."""

    weights: BlockWeights  # contiguous CPU tensors of `width`'s shapes: float32, or int8 tiles where `scales` has them
    scales: tuple[torch.Tensor | None, ...]  # per product (att_proj, out_proj, in_proj, mlp_out): float32 [out] or None
    width: int
    num_heads: int
    layernorm_eps: tuple[float, float]  # the two LayerNorms'


_PRODUCT_WEIGHTS = ("att_proj_weight", "out_proj_weight", "in_proj_weight", "mlp_out_weight")
# The kernel reads int8 weights [n, k] in tiles of this many rows by this many columns (`weights_t` in the C source):
# its block of rows is then one stream of memory.
INT8_TILE = 8


def prepare_block(weights: BlockWeights, num_heads: int, layernorm_eps: tuple[float, float],
                  scales: tuple[torch.Tensor | None, ...] = (None,) * 4) -> PreparedBlock | None:
    """`weights` ready for `cpu_block_step`'s kernel, or None where they are not its kind: each a plain contiguous
    CPU tensor of the block's shape, float32, or int8 for a product whose `scales` (float32, one per output row:
    weight = int8 value * scale) are given, with a width that is a multiple of `INT8_TILE`. The kernel reads raw
    memory, so a wrong shape would read out of bounds. int8 weights [n, k] are copied into the kernel's tiles;
    a 4-D int8 weight is taken to be in tiles already (`int8_tiles`' layout, as `quantize_int8` keeps them).
    Checking once per `generate`, rather than at every step, keeps the checks out of the steps' time."""
    products = [getattr(weights, name) for name in _PRODUCT_WEIGHTS]
    if len(scales) != len(products) or any(weight is None for weight in products) or products[0].dim() not in (2, 4):
        return None
    width = products[0].shape[1] * (INT8_TILE if products[0].dim() == 4 else 1)
    if num_heads < 1 or width < 1 or width % num_heads:
        return None
    int8_weights = {name for name, scale in zip(_PRODUCT_WEIGHTS, scales, strict=True) if scale is not None}
    if int8_weights and width % INT8_TILE:
        return None
    shapes = dict(zip(BlockWeights._fields, _block_shapes(width), strict=True))
    for name, tensor in weights._asdict().items():
        dtype, shape = (torch.int8 if name in int8_weights else torch.float32), shapes[name]
        if name in int8_weights and tensor is not None and tensor.dim() == 4:
            shape = (shape[0] // INT8_TILE, shape[1] // INT8_TILE, INT8_TILE, INT8_TILE)
        if tensor is not None and not (_is_on_cpu(tensor, dtype) and tuple(tensor.shape) == shape):
            return None
    if not all(scale is None or (_is_on_cpu(scale, torch.float32) and scale.shape == shapes[name][:1])
               for scale, name in zip(scales, _PRODUCT_WEIGHTS, strict=True)):
        return None
    tiled = weights._replace(**{name: int8_tiles(getattr(weights, name)) for name in int8_weights
                                if getattr(weights, name).dim() == 2})
    return PreparedBlock(tiled, tuple(scales), width, num_heads, layernorm_eps)


def int8_tiles(weight: torch.Tensor) -> torch.Tensor:
    """int8 `weight` [n, k] (n and k multiples of INT8_TILE) as the kernel reads it,
    [n / INT8_TILE, k / INT8_TILE, INT8_TILE, INT8_TILE]: tiles of rows by columns."""
    rows, columns = weight.shape
    return weight.view(rows // INT8_TILE, INT8_TILE, columns // INT8_TILE, INT8_TILE).transpose(1, 2).contiguous()


def _is_on_cpu(tensor: torch.Tensor, dtype: torch.dtype = torch.float32) -> bool:
    """A plain contiguous CPU tensor of `dtype`."""
    return (type(tensor) in PLAIN_TENSORS and tensor.device.type == "cpu" and tensor.dtype == dtype
            and tensor.is_contiguous())


def _block_shapes(width: int) -> tuple[tuple[int, ...], ...]:
    """`BlockWeights`' shapes for a block of `width` channels."""
    return ((width,), (width,), (3 * width, width), (3 * width,), (width, width), (width,), (width,), (width,),
            (4 * width, width), (4 * width,), (width, 4 * width), (width,))


# block_step(hidden_states, block, keys, values, past, key_mask) -> whether it ran
BlockStepKernel = Callable[[torch.Tensor, PreparedBlock, torch.Tensor, torch.Tensor, int, "torch.Tensor | None"], bool]


class _Kernels(NamedTuple):
    matvec: Matvec
    block_step: BlockStepKernel


def cpu_matvec() -> Matvec | None:
    """The kernel's product, `matvec(inputs, weight, bias)`: `F.linear` for float32 CPU tensors, a contiguous
    `weight` [n, k] and `bias` [n], `inputs` [..., k]. Built on the first call. None where it cannot run (with a
    one-time warning where a build failed), or an error where `BARK_HF_CPU_KERNELS=1` asked for it.
    """
    kernels = _available()
    return None if kernels is None else kernels.matvec


def cpu_block_step() -> BlockStepKernel | None:
    """The kernel's block step, `block_step(hidden_states, block, keys, values, past, key_mask) -> bool`: one decoding
    step of a GPT block (`BarkHfBlock` in evaluation; `block` from `prepare_block`) for `hidden_states` [B, 1, C],
    one new position per item, changed in place. `keys` and `values` are the layer's cache buffers
    [B, H, capacity, D] holding `past` positions; the step writes position `past` and attends to positions 0 to
    `past` where `key_mask` (bool [B, past + 1], True at each item's new position; None: everywhere) allows.
    The cache may be float16 (`BarkHfKVCache`'s `storage_dtype`, where `reads_float16_caches`), written as it
    writes it.
    It returns False, doing nothing, where these tensors are not its kind (contiguous CPU tensors of those shapes:
    float32, or a float16 cache; a mask that hides an item's new position); the caller then runs the block. Built,
    refused or warned about as `cpu_matvec`.
    """
    kernels = _available()
    return None if kernels is None else kernels.block_step


def _available() -> _Kernels | None:
    loaded = _load()
    if not isinstance(loaded, CpuKernelsUnavailable):
        return loaded
    if env_flag(CPU_KERNELS_ENV_VAR, default=False):
        raise CpuKernelsUnavailable(f"{CPU_KERNELS_ENV_VAR} is 1, but {loaded}. Set it to 0, or unset it, to use "
                                    "PyTorch's own operators.")
    if not isinstance(loaded, _NotThisMachine):
        logger.warning_once(f"bark-hf's CPU decoding kernels are not used: {loaded}. Decoding takes PyTorch's own "
                            f"operators, which are slower on some CPUs; set {CPU_KERNELS_ENV_VAR}=0 to silence this.")
    return None


@functools.cache
def _load() -> _Kernels | CpuKernelsUnavailable:
    """The kernels, or why they cannot run (kept, so that a failed build is not tried again at every call)."""
    try:
        library = _compiled()
    except CpuKernelsUnavailable as reason:
        return reason
    except Exception as error:  # a missing source, no home folder, ...: never an error inside generate
        return CpuKernelsUnavailable(f"building it failed ({type(error).__name__}: {error})")

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
        library.bark_hf_matvec(inputs.data_ptr(), inputs.numel() // in_features, out_features, in_features,
                               weight.data_ptr(), None if bias is None else bias.data_ptr(), output.data_ptr(),
                               torch.get_num_threads())
        return output

    def block_step(hidden_states: torch.Tensor, block: PreparedBlock, keys: torch.Tensor, values: torch.Tensor,
                   past: int, key_mask: torch.Tensor | None) -> bool:
        if not _fits_step(hidden_states, block, keys, values, past, key_mask):
            return False
        status = library.bark_hf_block_step(
            hidden_states.data_ptr(), hidden_states.shape[0], block.width, block.num_heads, *block.layernorm_eps,
            *(None if tensor is None else tensor.data_ptr() for tensor in (*block.weights, *block.scales)),
            keys.data_ptr(), values.data_ptr(), keys.dtype == torch.float16, keys.stride(0), keys.stride(1), past,
            None if key_mask is None else key_mask.data_ptr(), torch.get_num_threads())
        if status != 0:
            raise MemoryError("bark-hf's block step could not allocate its scratch memory.")
        return True

    return _Kernels(matvec, block_step)


def _fits_step(hidden_states: torch.Tensor, block: PreparedBlock, keys: torch.Tensor, values: torch.Tensor,
               past: int, key_mask: torch.Tensor | None) -> bool:
    """Whether a step's tensors are what the kernel reads: it reads and writes raw memory."""
    if hidden_states.dim() != 3 or keys.dim() != 4 or past < 0 or keys.shape[2] <= past:
        return False
    batch = hidden_states.shape[0]
    cache_shape = (batch, block.num_heads, keys.shape[2], block.width // block.num_heads)
    if (tuple(hidden_states.shape) != (batch, 1, block.width) or tuple(keys.shape) != cache_shape
            or tuple(values.shape) != cache_shape or not _is_on_cpu(hidden_states)
            or not all(_is_on_cpu(tensor, keys.dtype) for tensor in (keys, values))
            or keys.dtype not in (torch.float32, torch.float16)
            or (keys.dtype == torch.float16 and not reads_float16_caches())):
        return False
    return key_mask is None or (type(key_mask) is torch.Tensor and key_mask.dtype == torch.bool
                                and key_mask.device.type == "cpu" and tuple(key_mask.shape) == (batch, past + 1)
                                and key_mask.is_contiguous() and bool(key_mask[:, -1].all()))


def _compiled() -> ctypes.CDLL:
    """The built library, its functions' arguments declared; raises `CpuKernelsUnavailable`."""
    if sys.platform != "linux" or platform.machine().lower() not in X86_MACHINES:
        raise _NotThisMachine(f"it needs an x86 CPU and Linux, not {platform.machine()} and {sys.platform}")
    missing = REQUIRED_CPU_FLAGS - set((cpu_flags() or "").split())
    if missing:
        raise _NotThisMachine(f"the CPU lacks {', '.join(sorted(missing))} (read from /proc/cpuinfo)")
    if not torch.backends.openmp.is_available():
        raise _NotThisMachine("this PyTorch was built without OpenMP, whose threads the kernel shares")
    source = _source()
    compiler = shlex.split(os.environ.get("CC", "")) or [shutil.which("cc") or shutil.which("gcc") or ""]
    if not compiler[0]:
        raise CpuKernelsUnavailable("no C compiler was found to build it (install gcc, or set CC)")
    library = _build(compiler, source)
    runtimes_before = _openmp_runtimes()
    try:
        loaded = ctypes.CDLL(str(library))
        matvec, block_step = loaded.bark_hf_matvec, loaded.bark_hf_block_step
    except (OSError, AttributeError) as error:
        raise CpuKernelsUnavailable(f"loading {library} failed ({error}); delete it to have it built again") from None
    interface = getattr(loaded, "bark_hf_interface", None)
    if interface is None or interface() != KERNELS_INTERFACE:  # an installed bark-hf of another version (remote code)
        raise _NotThisMachine(f"the C source at {source} is another version's than this copy of bark-hf")
    added = _openmp_runtimes() - runtimes_before
    if added and runtimes_before:  # its threads would compete with PyTorch's for the cores
        raise CpuKernelsUnavailable(f"it loads a second OpenMP runtime ({', '.join(sorted(added))}) beside PyTorch's "
                                f"({', '.join(sorted(runtimes_before))}); build it with the compiler PyTorch uses (CC)")
    pointer, size = ctypes.c_void_p, ctypes.c_long
    matvec.restype = None
    matvec.argtypes = [pointer, size, size, size, pointer, pointer, pointer, ctypes.c_int]
    block_step.restype = ctypes.c_int
    block_step.argtypes = [pointer, size, size, size, ctypes.c_float, ctypes.c_float,
                           *[pointer] * (len(BlockWeights._fields) + len(_PRODUCT_WEIGHTS)), pointer, pointer,
                           ctypes.c_int, size, size, size, pointer, ctypes.c_int]
    return loaded


def _openmp_runtimes() -> set[str]:
    """The paths of the OpenMP runtimes loaded in this process (Linux)."""
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
        paths = {fields[5].strip() for fields in (line.split(maxsplit=5) for line in maps) if len(fields) == 6}
    return {path for path in paths if _OPENMP_RUNTIME.match(os.path.basename(path))}


def _source() -> Path:
    """The C source: beside this module or, for a copy of it loaded as a model folder's remote code (transformers
    copies the Python files alone), in an installed bark-hf; else the kernels quietly stay out."""
    spec = importlib.util.find_spec("bark_hf")
    installed = spec and spec.origin and Path(spec.origin).with_name("csrc") / SOURCE.name
    for source in (SOURCE, installed):
        if source and source.is_file():
            return source
    logger.info("bark-hf's CPU decoding kernels are not used: this copy of bark-hf (a model's remote code) has "
                "no C source. `pip install bark-hf` to have them.")
    raise _NotThisMachine("its C source is not beside this copy of bark-hf (remote code), nor in an installed one")


def _build(compiler: list[str], source: Path) -> Path:
    """The shared library, compiled into the cache unless there already, or into a temporary folder if the cache
    cannot be written. Compiled under a temporary name and renamed, so that a concurrent or failed build never
    leaves a partial library under the final name; a library that another user could have written is not used."""
    flags = " ".join((*compiler, *COMPILER_FLAGS, *LINKER_FLAGS))
    key = hashlib.sha256(source.read_bytes() + flags.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bark_hf"
    try:
        cache.mkdir(parents=True, exist_ok=True)
        library = cache / f"cpu_kernels-{key}.so"
        if library.is_file():
            _check_owner(library)
            return library
        handle, partial_name = tempfile.mkstemp(dir=cache, prefix=".cpu_kernels-", suffix=".so")
        os.close(handle)
        partial = Path(partial_name)
    except OSError:  # a folder of this process's own, removed when it exits (the loaded library stays mapped)
        folder = tempfile.mkdtemp(prefix="bark_hf-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        library = Path(folder) / f"cpu_kernels-{key}.so"
        partial = library.with_suffix(".partial")
    command = [*compiler, *COMPILER_FLAGS, str(source), *LINKER_FLAGS, "-o", str(partial)]
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
        raise CpuKernelsUnavailable(f"building it failed ({shlex.join(command)}): {detail}") from None
    return library


def _check_owner(library: Path) -> None:
    """Refuse a cached library that another user owns or that others may write: it would run in this process."""
    status = library.stat()
    if status.st_uid != os.getuid() or status.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise CpuKernelsUnavailable(f"{library} belongs to another user or may be written by others; delete it, or set "
                                "XDG_CACHE_HOME to a folder of your own")
