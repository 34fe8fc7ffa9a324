"""SageAttention for the long attention passes on NVIDIA GPUs, used automatically when installed.

SageAttention (`pip install sageattention`, https://github.com/thu-ml/SageAttention) computes
attention with int8 queries and keys, which speeds up the compute-bound passes: the semantic
prompt, the coarse window prefills and the fine stage's 1 024-frame windows. Its results differ
slightly from PyTorch's, so with it the tokens are no longer bit-identical to the original's; set
`BARK_HF_SAGE_ATTENTION=0` to turn it off. One-token decoding steps and padded (masked) batches
never use it: it takes no mask, and a single query gains nothing from it. SageAttention 2, built
from its repository, is the one to install; 1.0.6 (on PyPI) works too, but converts bfloat16
values to float16, and on an H100 it was slower than PyTorch's attention (docs/performance.md).
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable

import torch
from transformers.utils import logging

from .checks import env_flag

logger = logging.get_logger(__name__)

SAGE_ATTENTION_ENV_VAR = "BARK_HF_SAGE_ATTENTION"
"""Set to 0 (or false, no, off) to never use SageAttention, even where it is installed."""

SAGE_HEAD_DIMS = (64, 96, 128)  # the head sizes its kernels are built for
SAGE_MIN_CAPABILITY = (8, 0)  # Ampere and newer


_kernel_failed = False  # set when a call raised: the GPU or the build is one the kernel does not take


@functools.cache
def load_sage_kernel() -> Callable[..., torch.Tensor] | None:
    """`sageattention.sageattn`, or None where the package is missing or fails to import."""
    if importlib.util.find_spec("sageattention") is None:
        return None
    try:
        from sageattention import sageattn
    except Exception as error:  # e.g. built for another CUDA or torch version
        logger.warning(f"sageattention is installed but failed to import ({error}); using PyTorch's attention.")
        return None
    return sageattn


def device_supports_sage(query: torch.Tensor) -> bool:
    """Whether SageAttention's kernels take `query` `[B, H, T, D]`: fp16 or bf16 on an Ampere or newer GPU."""
    if not query.is_cuda or query.dtype not in (torch.float16, torch.bfloat16):
        return False
    return query.shape[-1] in SAGE_HEAD_DIMS and torch.cuda.get_device_capability(query.device) >= SAGE_MIN_CAPABILITY


def sage_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, is_causal: bool) -> torch.Tensor | None:
    """Attention `[B, H, T, D]` of an unmasked, inference-only pass through SageAttention, or None where it
    does not apply (then the caller uses SDPA).

    `key` and `value` must not be the KV cache's buffers: SageAttention 1.x subtracts the keys' mean
    from `key` in place. A call that raises (an architecture its dispatch does not list, such as
    sm100) logs a warning once and SageAttention is not tried again in this process; running out of GPU
    memory is raised, as it is from PyTorch's attention, and turns nothing off.
    """
    global _kernel_failed
    if _kernel_failed or not env_flag(SAGE_ATTENTION_ENV_VAR, default=True) or query.requires_grad:
        return None
    if torch.compiler.is_compiling() or query.shape[-2] < 2 or not device_supports_sage(query):
        return None
    kernel = load_sage_kernel()
    if kernel is None:
        return None
    try:
        return kernel(query, key, value, tensor_layout="HND", is_causal=is_causal)
    except torch.OutOfMemoryError:  # this call's batch, not the kernel: it stays on for later calls
        raise
    except (RuntimeError, ValueError, AssertionError) as error:
        _kernel_failed = True
        logger.warning(f"SageAttention failed ({error}); using PyTorch's attention from here on.")
        return None
