"""Bark's four stages as transformers models.

Reads top-down: attention -> MLP -> block -> shared base -> causal GPT (semantic, coarse) ->
non-causal fine GPT -> composite with the EnCodec decoder. Parameter names equal those of
transformers' Bark port, so weights move between the two without renaming.

Each stage's `generate` is its own short loop that follows the original bark/generation.py
step for step: exact parity includes the order in which random numbers are drawn.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import numbers
import os
import pickle
import shutil
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoModel, PreTrainedModel
from transformers.dynamic_module_utils import get_relative_import_files
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast, MaskedLMOutput
from transformers.utils import (
    ADAPTER_CONFIG_NAME,
    CONFIG_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    ModelOutput,
    cached_file,
    logging,
)

from .atomic import check_save_directory, default_mode
from .checks import checked_dtype, checked_flag, env_flag, is_number
from .configuration_bark_hf import (
    BarkHfCoarseConfig,
    BarkHfConfig,
    BarkHfFineConfig,
    BarkHfSemanticConfig,
)
from .cpu_features import cpu_has_native_bfloat16, use_onednn_linear
from .cpu_kernels import (
    BLOCK_STEP_MAX_ITEMS,
    INT8_TILE,
    MATVEC_MAX_ROWS,
    PLAIN_TENSORS,
    BlockStepKernel,
    BlockWeights,
    PreparedBlock,
    cpu_block_step,
    cpu_kernels_wanted,
    cpu_matvec,
    int8_tiles,
    prepare_block,
    reads_float16_caches,
)
from .generation_configuration_bark_hf import (
    GENERATION_CONFIG_NAME,
    TOKENIZER_PAD_ID,
    BarkHfCoarseGenerationConfig,
    BarkHfFineGenerationConfig,
    BarkHfGenerationConfig,
    BarkHfSemanticGenerationConfig,
    generation_config_json,
    load_generation_config,
    save_generation_config,
)
from .hub import MODEL_WEIGHTS, push_folder_to_hub
from .model_card import bark_model_card, save_model_card
from .processing_bark_hf import PRESET_KEYS, check_not_output_pair, looks_like_local_path, validate_voice_preset
from .sage_attention import sage_attention

logger = logging.get_logger(__name__)

# A voice preset as the processor returns it: arrays under "semantic_prompt" ([n]),
# "coarse_prompt" ([2, m]) and "fine_prompt" ([8, m]); a list gives one per batch item.
HistoryPrompt = Mapping[str, Any] | Sequence[Mapping[str, Any] | None] | None


def execution_device(module: nn.Module) -> torch.device:
    """The device `module` computes on. Under a device map or offload, accelerate's hooks hold it
    (the weights themselves may wait on "meta", the CPU or disk); otherwise its first parameter's.
    """
    for submodule in module.modules():
        hook = getattr(submodule, "_hf_hook", None)
        for single_hook in getattr(hook, "hooks", (hook,)):  # a SequentialHook holds several
            device = getattr(single_hook, "execution_device", None)
            if device is not None:
                return torch.device(device)
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _mapped_device(device_map: Mapping[str, Any], name: str) -> Any:
    """The device a device map gives parameter `name`: the entry of its longest matching prefix."""
    prefixes = [key for key in device_map if key == "" or name == key or name.startswith(key + ".")]
    return device_map[max(prefixes, key=len)] if prefixes else None


class BarkHfKVCache:
    """Keys and values of every causal layer, written in place into buffers `[B, H, max_length, D]`.

    Generation sizes the cache for a whole run (semantic) or the longest window (coarse, emptied with
    `reset` between windows, unless a window goes on from the last) up front, so a decoding step copies one
    position per layer instead of regrowing every layer's tensors with `torch.cat`.
    A layer's buffer is allocated at its first write, on that layer's device and dtype (device maps
    work unchanged). A write past `max_length` grows the buffer to fit, which is what a plain
    `forward(use_cache=True)` relies on. `cache[layer]` is that layer's filled part as a `(key, value)`
    pair of views, as in a tuple cache. Forward passes extend the cache in place and return it.

    For compiled decoding (`BarkHfCausalModel._decode_step`) the shapes must not change from step
    to step: after `start_static_steps`, `update` writes one position at `write_position` (a
    one-element tensor that the caller advances) and returns the whole buffers, and the caller
    masks the positions not written yet. `allocations` counts buffer (re)allocations, so that a
    CUDA graph captured over the buffers can tell whether they are still the ones it holds.

    `storage_dtype` (None: the keys' own dtype) stores keys and values in another, narrower dtype; `update` still
    returns them in the keys' dtype. int8 models keep float16 (`BarkHfCausalModel._new_cache`): a decoding step
    reads the whole cache, and half its bytes is up to a fifth of an int8 step's. Values beyond float16's range are
    stored as its largest (+-65504), not as infinities that would turn attention into NaN.
    """

    def __init__(self, num_layers: int, max_length: int = 0, storage_dtype: torch.dtype | None = None):
        self.max_length = max_length
        self.storage_dtype = storage_dtype
        self.static_steps = False
        self.write_position: torch.Tensor | None = None  # [1], kept from window to window
        self.allocations = 0
        self._keys: list[torch.Tensor | None] = [None] * num_layers
        self._values: list[torch.Tensor | None] = [None] * num_layers
        self._lengths = [0] * num_layers

    def start_static_steps(self) -> None:
        """Decode from here on in static shapes, one position at a time from the current length."""
        if self.storage_dtype is not None:
            raise ValueError("Static (compiled) decoding reads the cache's buffers as they are, so it needs a cache "
                             "without storage_dtype.")
        device = self._keys[0].device
        position, inference = self.write_position, torch.is_inference_mode_enabled()
        if position is None or position.device != device or position.is_inference() != inference:
            self.write_position = torch.zeros(1, dtype=torch.long, device=device)
        self.write_position.fill_(self.length)
        self.static_steps = True

    def reset(self) -> None:
        """Empty the cache but keep its buffers, for the next window or run of the same batch size."""
        self.static_steps = False
        self._lengths = [0] * len(self._lengths)

    def zero_(self) -> None:
        """Zero the buffers in place (their addresses stay): a cache kept from an earlier call may hold
        NaN or infinite values, which masked attention would still multiply by zero into NaN."""
        for buffer in (*self._keys, *self._values):
            if buffer is not None:
                buffer.zero_()

    @property
    def length(self) -> int:
        """Positions held (the same in every layer between forward passes)."""
        return self._lengths[-1]

    def __len__(self) -> int:
        return len(self._lengths)

    def __getitem__(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._keys[layer] is None:
            raise IndexError(f"Layer {layer} of the KV cache holds nothing yet.")
        end = self._lengths[layer]
        return self._keys[layer][:, :, :end], self._values[layer][:, :, :end]  # [B, H, length, D] each

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return (self[layer] for layer in range(len(self)))

    def step_buffers(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """`layer`'s whole key and value buffers `[B, H, capacity, D]` and the positions they hold, for a kernel that
        writes the next position into them itself and then calls `advance`; None where that write would not be
        `update`'s (no buffer yet, no room left, static steps, or a buffer made in another inference mode)."""
        keys = self._keys[layer]
        if (self.static_steps or keys is None or keys.shape[-2] <= self._lengths[layer]
                or keys.is_inference() != torch.is_inference_mode_enabled()):
            return None
        return keys, self._values[layer], self._lengths[layer]

    def advance(self, layer: int) -> None:
        """Count the position that a kernel wrote into `step_buffers(layer)`."""
        self._lengths[layer] += 1

    def keep(self, rows: list[int], start: int) -> None:
        """Keep batch `rows` of every layer alone, from position `start` on (a left padding that no row kept needs):
        for a batch that goes on after some of its items have left. New buffers of the same capacity."""
        if start == 0 and all(keys is None or rows == list(range(keys.shape[0])) for keys in self._keys):
            return
        written = int(self.write_position) if self.static_steps else None  # static steps leave the lengths as they were
        for layer, keys in enumerate(self._keys):
            if keys is None:
                continue
            index = torch.tensor(rows, device=keys.device)
            end = self._lengths[layer] if written is None else written
            for buffers in (self._keys, self._values):
                kept = buffers[layer].new_zeros(len(rows), *buffers[layer].shape[1:])  # [rows, H, capacity, D]
                kept[:, :, : end - start] = buffers[layer][index, :, start:end]
                buffers[layer] = kept
            self._lengths[layer] = end - start
        self.allocations += 1
        if self.static_steps:
            self.write_position -= start

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append `key` and `value` `[B, H, T, D]` to `layer`; return all of its keys and values so far."""
        if self.static_steps:  # static shapes: the whole buffers, [B, H, max_length, D]
            self._keys[layer].index_copy_(2, self.write_position, key)
            self._values[layer].index_copy_(2, self.write_position, value)
            return self._keys[layer], self._values[layer]
        start = self._lengths[layer]
        end = start + key.shape[-2]
        buffer = self._keys[layer]
        storage = self.storage_dtype or key.dtype
        # Buffers made inside torch.inference_mode cannot be written outside it, and the other way round.
        fits = buffer is not None and (buffer.shape[0], buffer.dtype, buffer.device, buffer.is_inference()) == (
            key.shape[0], storage, key.device, torch.is_inference_mode_enabled())
        if start > 0 and not fits:
            raise ValueError(f"Layer {layer} of the KV cache holds a batch of {buffer.shape[0]} ({buffer.dtype}, "
                             f"{buffer.device}); call reset() before writing {tuple(key.shape)} {key.dtype} keys "
                             f"on {key.device}.")
        if not fits or end > buffer.shape[-2]:
            capacity = max(end, self.max_length)
            # Finite values, not garbage: the static path reads (masked) positions not written yet.
            # (After `reset` those hold an earlier window's keys, finite too; see `zero_` across calls.)
            grown_keys = key.new_zeros(*key.shape[:2], capacity, key.shape[-1], dtype=storage)  # [B, H, capacity, D]
            grown_values = value.new_zeros(*value.shape[:2], capacity, value.shape[-1], dtype=storage)
            if start > 0:
                grown_keys[:, :, :start] = self._keys[layer][:, :, :start]
                grown_values[:, :, :start] = self._values[layer][:, :, :start]
            self._keys[layer], self._values[layer] = grown_keys, grown_values
            self.allocations += 1
        self._keys[layer][:, :, start:end] = _in_range_of(key, storage)
        self._values[layer][:, :, start:end] = _in_range_of(value, storage)
        self._lengths[layer] = end
        keys, values = self[layer]
        return keys.to(key.dtype), values.to(value.dtype)  # the same tensors where the dtypes agree


def _in_range_of(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` clamped to the finite range of a narrower floating `dtype` that it is about to be stored in (NaN
    stays NaN); unchanged otherwise."""
    largest = torch.finfo(dtype).max
    return tensor if largest >= torch.finfo(tensor.dtype).max else tensor.clamp(-largest, largest)


# cuDNN's attention builds a new plan for every new key length, so one-token decoding on CUDA spent
# about 95 % of its time there (profiled on an H200). The other fused kernels have no such cost.
_CUDA_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class _CpuProducts(NamedTuple):
    """The CPU's kernels for a stage's `generate` (see `linear` and `BarkHfCausalModel._cpu_block_step`)."""

    cpu_kernels: bool  # `cpu_kernels_wanted`: bark-hf's kernels (built on first use) for at most MATVEC_MAX_ROWS rows
    onednn: bool  # `use_onednn_linear`: oneDNN rather than MKL for the other products
    blocks: dict[nn.Module, PreparedBlock | None]  # each block's checked tensors, kept for this `generate` call


# Set inside a stage's `generate` (`generation_kernels`); None elsewhere.
_CPU_PRODUCTS_IN_GENERATION: contextvars.ContextVar[_CpuProducts | None] = contextvars.ContextVar(
    "bark_hf_cpu_products", default=None)


@contextlib.contextmanager
def generation_kernels() -> Iterator[None]:
    """Inside, plain float32 linear layers on a CPU take the products chosen for generation (`linear`). The choice
    (`cpu_kernels_wanted`, `use_onednn_linear`: the CPU, their switches, torch's oneDNN switch) is made once, on
    entering: not on every layer call of every step, and a bad switch value is reported at the call. The kernel is
    built at its first use, so that generation on a GPU never builds it."""
    token = _CPU_PRODUCTS_IN_GENERATION.set(_CpuProducts(cpu_kernels_wanted(), use_onednn_linear(), {}))
    try:
        yield
    finally:
        _CPU_PRODUCTS_IN_GENERATION.reset(token)


def _generation_products() -> _CpuProducts | None:
    """The CPU's choices for the stage `generate` running now (`generation_kernels`), or None outside one and while
    torch.compile traces (is_compiling first: it cannot trace a ContextVar)."""
    return None if torch.compiler.is_compiling() else _CPU_PRODUCTS_IN_GENERATION.get()


def _generation_method(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def generate(*args: Any, **kwargs: Any) -> Any:
        with generation_kernels():
            return method(*args, **kwargs)

    return generate


def linear(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear`; inside `generation_kernels`, a decoding step's few rows go through bark-hf's own kernel
    (`cpu_matvec`), and larger products through oneDNN on CPUs where MKL is slow (`use_onednn_linear`).

    Only there, and only for plain float32 tensors on a CPU with autograd, autocast and torch.compile out of
    the way: neither has a backward or follows autocast, and a tensor subclass (torchao's quantized weights,
    DTensor) expects its own kernels. Evaluation, scoring and training keep PyTorch's own choice.
    """
    products = _generation_products()
    if products is None or not (products.cpu_kernels or products.onednn):
        return F.linear(inputs, weight, bias)
    tensors = (inputs, weight) if bias is None else (inputs, weight, bias)
    if (all(type(t) in PLAIN_TENSORS and t.device.type == "cpu" and t.dtype == torch.float32
                and t.layout == torch.strided for t in tensors)
            and weight.dim() == 2 and weight.shape[1] == inputs.shape[-1] > 0
            and (bias is None or bias.is_contiguous())  # oneDNN reads a strided bias as if contiguous: wrong values
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
            and not torch.is_autocast_enabled("cpu")):
        matvec = (products.cpu_kernels and inputs.numel() <= MATVEC_MAX_ROWS * inputs.shape[-1]
                  and weight.is_contiguous() and (bias is None or bias.shape == weight.shape[:1]) and cpu_matvec())
        if matvec:
            return matvec(inputs, weight, bias)  # it makes `inputs` contiguous
        if products.onednn:
            return torch.ops.mkldnn._linear_pointwise(inputs, weight, bias, "none", [], "")
    return F.linear(inputs, weight, bias)


def project(layer: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """`layer(inputs)`; a plain `nn.Linear` whose call nothing changes (no hooks, peft's, accelerate's or a user's,
    and no replaced `forward`) goes through `linear`."""
    if type(layer) is not nn.Linear or _changes_its_call(layer):
        return layer(inputs)
    return linear(inputs, layer.weight, layer.bias)


def _changes_its_call(layer: nn.Module) -> bool:
    return bool(layer._forward_hooks or layer._forward_pre_hooks or hasattr(layer, "_hf_hook")
                or "forward" in vars(layer)
                or nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)


class BarkHfAttention(nn.Module):
    """Multi-head self-attention through `scaled_dot_product_attention`, causal or not."""

    def __init__(
        self, config: BarkHfSemanticConfig | BarkHfCoarseConfig | BarkHfFineConfig, is_causal: bool, layer_idx: int = 0
    ):
        super().__init__()
        self.num_heads = config.num_heads
        self.hidden_size = config.hidden_size
        self.dropout = config.dropout
        self.is_causal = is_causal
        self.layer_idx = layer_idx
        self.att_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.bias)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: BarkHfKVCache | None = None,
        queries: int = 0,
    ) -> torch.Tensor:
        """Attention of every position, or of the last `queries` alone (> 0: the keys and values of every position
        still go to the cache), `[B, T or queries, C]`."""
        batch, length, width = hidden_states.shape
        head_dim = width // self.num_heads
        query, key, value = project(self.att_proj, hidden_states).split(width, dim=2)
        query = query.view(batch, length, self.num_heads, head_dim).transpose(1, 2)  # [B, H, T, D]
        key = key.view(batch, length, self.num_heads, head_dim).transpose(1, 2)  # [B, H, T, D]
        value = value.view(batch, length, self.num_heads, head_dim).transpose(1, 2)  # [B, H, T, D]
        new_key, new_value = key, value  # not views of the cache: SageAttention 1.x shifts its keys in place
        if cache is not None:
            key, value = cache.update(self.layer_idx, key, value)  # [B, H, past + T, D] each
        if 0 < queries < length:
            query = query[:, :, -queries:]  # [B, H, queries, D]
            if attention_mask is not None:
                attention_mask = attention_mask[..., -queries:, :]
            length = queries  # the positions attending from here on
        has_past = key.shape[-2] > length

        # The original calls SDPA with is_causal=True without a cache and is_causal=False for a
        # one-token step with one; keeping those exact calls keeps the floating point identical.
        # (Reading keys from a view of the preallocated buffer does not change the result.)
        is_causal = self.is_causal and attention_mask is None and not has_past
        if self.is_causal and attention_mask is None and has_past and length > 1:
            total = key.shape[-2]
            attention_mask = torch.ones(length, total, dtype=torch.bool, device=key.device).tril(total - length)
        dropout = self.dropout if self.training else 0.0
        if cache is not None and cache.static_steps:
            attended = _one_query_attention(query, key, value, attention_mask, dropout)  # [B, H, 1, D]
            return self._merge_heads(attended)
        if attention_mask is None and not has_past and not self.training:
            attended = sage_attention(query, new_key, new_value, is_causal)  # [B, H, T, D]; None: not here
            if attended is not None:
                return self._merge_heads(attended)
        with sdpa_kernel(_CUDA_SDPA_BACKENDS) if query.is_cuda else contextlib.nullcontext():
            attended = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=dropout, is_causal=is_causal
            )  # [B, H, T, D]
        return self._merge_heads(attended)

    def _merge_heads(self, attended: torch.Tensor) -> torch.Tensor:
        batch, _, length, head_dim = attended.shape
        attended = attended.transpose(1, 2).contiguous().view(batch, length, self.num_heads * head_dim)  # [B, T, C]
        return self.resid_dropout(project(self.out_proj, attended))


def _one_query_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                         dropout: float) -> torch.Tensor:
    """Attention of one query `[B, H, 1, D]` over a static cache's keys and values `[B, H, S, D]`, where
    `mask` `[B, 1, 1, S]` is True at the positions to attend, as plain products rather than SDPA.

    The fused kernels give each (item, head) pair one block that walks all S keys in turn: with one
    query that idles most of a GPU (bark, H200: 61 us per layer, two thirds of a decoding step).
    With coordinate-descent tuning (`_compiled_decode_step`) torch.compile turns these one-row
    products into reductions spread over the whole device (0.9 ms per step instead of 2.3). Scores
    and sums are float32, as in the fused kernels; in that form the casts fuse into the reductions.
    """
    scores = (query.float() * query.shape[-1] ** -0.5) @ key.float().transpose(-1, -2)  # [B, H, 1, S]
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    weights = F.dropout(weights, p=dropout, training=dropout > 0)
    return (weights @ value.float()).to(value.dtype)  # [B, H, 1, D]


class BarkHfMLP(nn.Module):
    def __init__(self, config: BarkHfSemanticConfig | BarkHfCoarseConfig | BarkHfFineConfig):
        super().__init__()
        self.in_proj = nn.Linear(config.hidden_size, 4 * config.hidden_size, bias=config.bias)
        self.out_proj = nn.Linear(4 * config.hidden_size, config.hidden_size, bias=config.bias)
        self.gelu = nn.GELU()
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        items = _mlp_items_at_once(hidden_states, self.training)
        if items is not None:
            return torch.cat([self._rows(part) for part in hidden_states.split(items)])
        return self._rows(hidden_states)

    def _rows(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(project(self.out_proj, self.gelu(project(self.in_proj, hidden_states))))


# In generation on a CPU, an MLP whose input has more rows than this runs a few items at a time, so that the
# [rows, 4C] activations stay in the CPU's caches between its two products: a coarse prefill of 8 items of bark-small
# (8 x 890 rows) ran its MLPs about 20 % faster item by item. An item's rows are multiplied as in its own run.
MLP_ROWS_AT_ONCE = 1024


def _mlp_items_at_once(hidden_states: torch.Tensor, training: bool) -> int | None:
    """How many items of `hidden_states` `[B, T, C]` an MLP takes at once in generation on a CPU (a batch's
    prefill, or the fine stage's windows), or None for all."""
    if training or hidden_states.dim() != 3 or hidden_states.device.type != "cpu" or _generation_products() is None:
        return None
    batch, length = hidden_states.shape[:2]
    items = max(1, MLP_ROWS_AT_ONCE // max(length, 1))
    return items if items < batch else None


class BarkHfBlock(GradientCheckpointingLayer):
    """Pre-LayerNorm transformer block. The fine GPT's LayerNorms always have a bias (as in the original)."""

    def __init__(
        self, config: BarkHfSemanticConfig | BarkHfCoarseConfig | BarkHfFineConfig, is_causal: bool, layer_idx: int = 0
    ):
        super().__init__()
        norm_bias = config.bias if is_causal else True
        self.layernorm_1 = nn.LayerNorm(config.hidden_size, bias=norm_bias)
        self.attn = BarkHfAttention(config, is_causal=is_causal, layer_idx=layer_idx)
        self.layernorm_2 = nn.LayerNorm(config.hidden_size, bias=norm_bias)
        self.mlp = BarkHfMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: BarkHfKVCache | None = None,
        queries: int = 0,
    ) -> torch.Tensor:
        """The block's output `[B, T, C]`, or that of the last `queries` positions alone (> 0; the cache still gets
        every position's keys and values): the last block of a pass whose earlier positions nobody reads."""
        # `cache` goes by keyword: under gradient checkpointing the base class drops it, so that
        # the backward replay does not write the cache a second time.
        attended = self.attn(self.layernorm_1(hidden_states), attention_mask, cache, queries)
        hidden_states = hidden_states[:, -attended.shape[1]:] + attended
        return hidden_states + self.mlp(self.layernorm_2(hidden_states))

    def cpu_step(self, kernel: BlockStepKernel, hidden_states: torch.Tensor, cache: BarkHfKVCache,
                 key_mask: torch.Tensor | None, prepared: dict[nn.Module, PreparedBlock | None] | None = None) -> bool:
        """This block's decoding step through bark-hf's CPU kernel (`cpu_block_step`): `hidden_states` [B, 1, C]
        changed in place and the new keys and values written into `cache`, as `forward` would. False, with nothing
        done, where the block is not the plain one the kernel computes (hooks, peft layers, a replaced module,
        training mode; `quantize_int8`'s layers are computed, from their int8 values) or its tensors are not the
        kernel's kind; the caller then calls the block.
        `prepared` keeps each block's checked tensors for the rest of a `generate` call (`_CpuProducts.blocks`)."""
        block = self.prepared_for_cpu_steps({} if prepared is None else prepared)
        layer = self.attn.layer_idx
        buffers = None if block is None else cache.step_buffers(layer)
        if buffers is None or not kernel(hidden_states, block, *buffers, key_mask):
            return False
        cache.advance(layer)
        return True

    def prepared_for_cpu_steps(self, prepared: dict[nn.Module, PreparedBlock | None]) -> PreparedBlock | None:
        """This block's tensors for the kernel (None: not its kind), checked once and kept in `prepared`."""
        if self not in prepared:
            prepared[self] = self._prepared_for_cpu_steps()
        return prepared[self]

    def _prepared_for_cpu_steps(self) -> PreparedBlock | None:
        attn, mlp, norms = self.attn, self.mlp, (self.layernorm_1, self.layernorm_2)
        others = (self, attn, mlp, *norms, mlp.gelu, attn.resid_dropout, mlp.dropout)
        if (any(type(module) is not kind for module, kind in zip(others, _PLAIN_BLOCK_MODULES, strict=True))
                or any(module.training or _changes_its_call(module) for module in (*others, *attn.children(),
                                                                                   *mlp.children()))
                or not attn.is_causal or mlp.gelu.approximate != "none"
                or any(norm.normalized_shape != (attn.hidden_size,) for norm in norms)):
            return None
        linears = [_kernel_linear(layer) for layer in (attn.att_proj, attn.out_proj, mlp.in_proj, mlp.out_proj)]
        if None in linears:
            return None
        (att, att_bias, _), (out, out_bias, _), (fc, fc_bias, _), (fc2, fc2_bias, _) = linears
        weights = BlockWeights(norms[0].weight, norms[0].bias, att, att_bias, out, out_bias, norms[1].weight,
                               norms[1].bias, fc, fc_bias, fc2, fc2_bias)
        scales = tuple(scale for _, _, scale in linears)
        return prepare_block(weights, attn.num_heads, (norms[0].eps, norms[1].eps), scales)


# The other modules' types that `BarkHfBlock.cpu_step` computes, in the order `_prepared_for_cpu_steps` lists them.
_PLAIN_BLOCK_MODULES = (BarkHfBlock, BarkHfAttention, BarkHfMLP, nn.LayerNorm, nn.LayerNorm, nn.GELU, nn.Dropout,
                        nn.Dropout)


def _kernel_linear(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None:
    """A linear layer's weight, bias and, for an int8 layer (`quantize_int8`), its scales (one per output row), as
    `cpu_block_step` reads them; None for any other kind of layer. An int8 layer's values are copied out of its
    packed form into the kernel's tiles (`int8_tiles`: a quarter of its float32 bytes) once, and kept beside the
    layer (`_INT8_KERNEL_WEIGHTS`) for as long as it holds the same packed weights: unpacking took about 0.6 s
    per bark-small stage, at every `generate` call."""
    if type(layer) is nn.Linear:
        return layer.weight, layer.bias, None
    if type(layer) is not torch.ao.nn.quantized.dynamic.Linear:
        return None
    packed = layer._packed_params._packed_params  # replaced, never changed, when the layer's weights are set
    kept = _INT8_KERNEL_WEIGHTS.get(layer)
    if kept is not None and kept[0]() is packed:
        return kept[1:]
    weight, bias = layer._weight_bias()  # unpacked once: its weight() and bias() would each unpack the layer
    scheme = weight.qscheme()
    if scheme in (torch.per_tensor_affine, torch.per_tensor_symmetric) and weight.q_zero_point() == 0:
        scales = torch.full(weight.shape[:1], weight.q_scale(), dtype=torch.float32)
    elif (scheme in (torch.per_channel_affine, torch.per_channel_symmetric) and weight.q_per_channel_axis() == 0
          and not weight.q_per_channel_zero_points().any()):
        scales = weight.q_per_channel_scales().to(torch.float32)
    else:  # zero points would need their own sums
        return None
    values = weight.int_repr()  # [n, k]
    if values.dim() != 2 or values.shape[0] % INT8_TILE or values.shape[1] % INT8_TILE:
        return values, bias, scales  # not the kernel's kind (`prepare_block` says so); nothing worth keeping
    _INT8_KERNEL_WEIGHTS[layer] = (weakref.ref(packed), int8_tiles(values), bias, scales)
    return _INT8_KERNEL_WEIGHTS[layer][1:]


# Each int8 layer's packed weights (a weak reference: weights set anew free the old ones) and, made from them, its
# weights as the block kernel reads them (`_kernel_linear`).
_INT8_KERNEL_WEIGHTS: weakref.WeakKeyDictionary[
    nn.Module, tuple[weakref.ref, torch.Tensor, torch.Tensor | None, torch.Tensor]] = weakref.WeakKeyDictionary()


def holds_int8_layers(module: nn.Module) -> bool:
    """Whether `module` holds linear layers that `BarkHfModel.quantize_int8` made int8."""
    return any(isinstance(child, torch.ao.nn.quantized.dynamic.Linear) for child in module.modules())


def refuse_unmerged_adapters(module: nn.Module, problem: str, fix: str) -> None:
    """Raise, naming `problem` and `fix`, where peft wrapped layers of `module` with adapters (LoRA and the like)
    that were not merged: their weights are stored as `<layer>.base_layer.weight` beside the adapters'."""
    adapted = [name for name, child in module.named_modules() if type(child).__module__.startswith("peft.")
               and isinstance(getattr(child, "base_layer", None), nn.Module)]
    if adapted:
        raise ValueError(f"This model holds peft adapters that are not merged (in {adapted[0]} and {len(adapted) - 1} "
                         f"other layers), {problem}. Call merge_and_unload() on the PeftModel first {fix}.")


_INT8_IS_FINAL = ("This model's linear layers are int8 (quantize_int8()): they run on the CPU only, beside float32 "
                  "activations, have no gradients and cannot be saved. {action} the float32 model before quantising, "
                  "then quantise again.")


def refuse_int8(module: nn.Module, action: str) -> None:
    """Raise the error that names the fix, for `action` ("Save", "Train", ...) on a model with int8 layers."""
    if holds_int8_layers(module):
        raise ValueError(_INT8_IS_FINAL.format(action=action))


def refuse_int8_loss_gradients(module: nn.Module, labels: torch.Tensor | None) -> None:
    """A loss with autograd on, on an int8 model (`train()` is refused, but a model left in eval mode is not): its
    backward pass left the int8 layers, and what lies before them, without gradients, with no error."""
    # Not in training mode, which an int8 model refuses: a training step does not walk the modules.
    if labels is not None and torch.is_grad_enabled() and not module.training and holds_int8_layers(module):
        raise ValueError(_INT8_IS_FINAL.format(action="Train") + " To score with the int8 model, compute the loss "
                         "under torch.no_grad().")


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _checked_generation_config(value: Any, config_class: type, fix: str) -> Any:
    """`value` if it is a `config_class`; another class (a dict, transformers' GenerationConfig, another stage's)
    failed later with an AttributeError on the first field read. `fix` says what to pass instead."""
    if not isinstance(value, config_class):
        raise TypeError(f"generation_config must be a {config_class.__name__}, got {type(value).__name__}; {fix}.")
    return value


def _drop_attention_implementation(kwargs: dict[str, Any]) -> None:
    """Take an `attn_implementation` request (an argument, or set on the `config` by the Auto classes) out of a
    `from_pretrained` call: SDPA, which every stage always uses, is dropped; anything else is refused. transformers
    passed it on to the codec too, which refused "sdpa" (EnCodec has no SDPA path), and "flash_attention_2" got
    transformers' generic "not supported yet"."""
    config = kwargs.get("config")
    requested = kwargs.pop("attn_implementation", None) or getattr(config, "_attn_implementation_internal", None)
    if requested not in (None, "sdpa"):
        raise ValueError(f"attn_implementation={requested!r}: bark-hf's stages always attend through PyTorch's "
                         "scaled_dot_product_attention, which picks FlashAttention or memory-efficient kernels on a "
                         "GPU by itself (and SageAttention is used where installed); leave attn_implementation out.")
    codec_config = getattr(config, "codec_config", None)
    if codec_config is not None and codec_config._attn_implementation_internal == "sdpa":
        codec_config._attn_implementation_internal = None  # EnCodec's own default (eager)


# True while an outer bar (long-form's chunk bar) stands above the stage bars. tqdm's leave=None (keep a bar only at
# position 0) did this in a terminal, but a notebook's bar reads None as "do not leave" and hid a lone stage's bar too.
_UNDER_AN_OUTER_BAR: contextvars.ContextVar[bool] = contextvars.ContextVar("bark_hf_under_an_outer_bar", default=False)


@contextlib.contextmanager
def stage_bars_under_an_outer_bar() -> Iterator[None]:
    """Inside, each stage's progress bar goes when done: under an outer bar, one finished line per stage and
    `generate` call would pile up beneath it. Outside, a stage's bar stays, as a lone bar should."""
    token = _UNDER_AN_OUTER_BAR.set(True)
    try:
        yield
    finally:
        _UNDER_AN_OUTER_BAR.reset(token)


def _leave_stage_bar() -> bool:
    return not _UNDER_AN_OUTER_BAR.get()


def _device_names(device_map: Any) -> Any:
    """`device_map` with its `torch.device` values written as names ("cpu", "cuda:1"), which transformers also
    takes: accelerate reads disk-offloaded weights with safetensors' `safe_open`, which failed on a torch.device
    ("device device(type='cpu') is invalid")."""
    if not isinstance(device_map, Mapping):
        return device_map
    return {name: str(device) if isinstance(device, torch.device) else device for name, device in device_map.items()}


def _budget_device_names(max_memory: Any) -> Any:
    """`max_memory` with its device keys written as accelerate names devices: a GPU's index
    (torch.device("cuda", 0) or "cuda:0" -> 0), else the type ("cpu", "mps"). accelerate took neither a
    torch.device key ("Device cpu is not recognized") nor "cuda:0", though transformers takes both as the values
    of a `device_map`."""
    if not isinstance(max_memory, Mapping):
        return max_memory
    budgets: dict[Any, Any] = {}
    for device, budget in max_memory.items():
        if isinstance(device, str) and ":" in device:
            with contextlib.suppress(RuntimeError):  # not a device name: accelerate names the keys it takes
                device = torch.device(device)
        if isinstance(device, torch.device):
            # An accelerator without an index stays a name, which accelerate refuses naming the keys it takes.
            device = device.type if device.type in ("cpu", "mps", "meta") or device.index is None else device.index
        if device in budgets:
            raise ValueError(f"max_memory gives {device!r} two budgets ({budgets[device]!r} and {budget!r}) under two "
                             "names of one device; give each device one.")
        budgets[device] = budget
    return budgets


def _check_no_offload_inside_a_mapped_module(device_map: Mapping[str, Any]) -> None:
    """Refuse a map that sends part of a module to disk while mapping the module elsewhere, or the reverse
    ({"": "cpu", "semantic": "disk"}): accelerate then hooked the outer module without the offloaded weights and
    failed with "weight is on the meta device, we need a `value` to put in on cpu". Only disk is refused: that
    failure was seen with it, and nested maps of devices alone (a GPU part on "cpu") were never tried."""
    for outer in device_map:
        for inner in device_map:
            devices = {str(device_map[inner]), str(device_map[outer])}
            if inner != outer and (outer == "" or inner.startswith(outer + ".")) and len(devices) == 2 and \
                    "disk" in devices:
                whole = repr(outer) if outer else "'' (the whole model)"
                raise ValueError(f"The device map puts {inner!r} on {device_map[inner]!r} inside {whole} on "
                                 f"{device_map[outer]!r}, which accelerate cannot offload; map the other parts of "
                                 f"{whole} one by one instead (see docs/devices.md for module names).")


def _check_device_map_arguments(kwargs: Mapping[str, Any]) -> None:
    """Refuse, before loading, `from_pretrained` arguments transformers would ignore or fail on deep inside.

    Without `device_map`, transformers ignored `max_memory` and `offload_folder` silently (the model loaded
    whole, into RAM); a map or budget naming a device this torch cannot use failed in its loader with torch's
    "Cannot access accelerator device when none is available".
    """
    device_map, max_memory = kwargs.get("device_map"), kwargs.get("max_memory")
    if device_map is None:
        ignored = [name for name in ("max_memory", "offload_folder") if kwargs.get(name) is not None]
        if ignored:
            raise ValueError(f"{' and '.join(ignored)} {'apply' if len(ignored) > 1 else 'applies'} only with a "
                             "device_map; add device_map='auto' (or "
                             "'sequential', 'balanced', or a dict of modules to devices).")
        return
    offload_folder = kwargs.get("offload_folder")
    # Only a map that may put weights on disk uses the folder: with any other (device_map="cpu", a dict without
    # "disk") transformers ignores it, and a file there loaded fine.
    may_use_disk = (device_map in DEVICE_MAP_STRATEGIES if isinstance(device_map, str)
                    else isinstance(device_map, Mapping) and "disk" in map(str, device_map.values()))
    if may_use_disk and offload_folder is not None and os.path.exists(offload_folder) and \
            not os.path.isdir(offload_folder):
        # transformers failed with "[Errno 17] File exists" once it came to offload a stage
        raise NotADirectoryError(f"offload_folder={os.fspath(offload_folder)!r} is a file; pass a folder for the "
                                 "weights the device map puts on disk (it is made if missing).")
    named = {"max_memory": set(max_memory or ())}
    if isinstance(device_map, Mapping):
        _check_no_offload_inside_a_mapped_module(device_map)
        named["device_map"] = set(device_map.values())
    elif not (isinstance(device_map, str) and device_map in DEVICE_MAP_STRATEGIES):
        named["device_map"] = {device_map}
    for argument, devices in named.items():
        for device in devices - {"disk"}:
            try:
                torch.empty(0, device=torch.device(device))
            except (RuntimeError, AssertionError) as error:  # torch without CUDA asserts
                raise ValueError(f"{argument} names the device {device!r}, which this torch cannot use ({error}); "
                                 "name an available device, 'cpu' or 'disk' instead.") from None


def _remove_stale_weights(folder: Path) -> None:
    """Remove the weights of an earlier save that this one did not replace. transformers removes only old shards:
    a sharded save over a single `model.safetensors` left that file, which `from_pretrained` then loaded instead
    of the new shards; a single-file save over shards left their index behind."""
    if any(folder.glob("model-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9].safetensors")):
        (folder / SAFE_WEIGHTS_NAME).unlink(missing_ok=True)  # this save was sharded: the shards are its own
    else:
        (folder / SAFE_WEIGHTS_INDEX_NAME).unlink(missing_ok=True)


class BarkHfPreTrainedModel(PreTrainedModel):
    """Shared loading and saving: weights through transformers, generation configs alongside."""

    supports_gradient_checkpointing = True
    _supports_sdpa = True
    # The Trainer then passes `num_items_in_batch` to `forward`, for exact losses under gradient accumulation.
    accepts_loss_kwargs = True
    _no_split_modules = ["BarkHfBlock"]
    # transformers' Bark checkpoints carry the causal-mask buffers; SDPA needs none.
    _keys_to_ignore_on_load_unexpected = [r"\.attn\.bias$"]
    generation_config_class: type = BarkHfSemanticGenerationConfig
    # The transformers Auto classes that load this model: registration.py registers them, and
    # `save_pretrained(save_code=True)` writes them into the config's `auto_map`.
    auto_classes: tuple[str, ...] = ("AutoModel",)

    @property
    def device(self) -> torch.device:
        """Where this model computes, and so where `generate` builds its tensors: see `execution_device`."""
        return execution_device(self)

    @property
    def generation_config(self) -> Any:
        """This stage's sampling settings and token layout, read by its `generate`."""
        return self.__dict__.get("_generation_config")

    @generation_config.setter
    def generation_config(self, value: Any) -> None:
        """Refuse a config of another kind: a dict, transformers' GenerationConfig or another stage's was taken, and
        the next `generate` failed with an AttributeError ("no attribute 'for_call'") or a misleading error."""
        self.__dict__["_generation_config"] = _checked_generation_config(
            value, self.generation_config_class, "set its fields instead (stage.generation_config.temperature = 0.6), "
            "or assign an edited copy.deepcopy(stage.generation_config)")

    @classmethod
    def can_generate(cls) -> bool:
        """False: each stage's `generate` is its own, not transformers' `GenerationMixin` one. transformers adds
        that mixin to classes loaded as remote code, and would then save and load a `GenerationConfig`."""
        return False

    def _apply(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> BarkHfPreTrainedModel:
        """Refuse to move or cast int8 layers: torch would move them half-way and fail at the next step. Refuse
        to move weights a device map offloaded: torch failed deep ("Cannot copy out of meta tensor"), maybe after
        moving some layers away from where accelerate's hooks run them."""
        if holds_int8_layers(self):
            probe = fn(torch.zeros(()))  # what the move or cast does to a float32 CPU tensor
            if probe.dtype != torch.float32 or probe.device.type != "cpu":
                raise ValueError(_INT8_IS_FINAL.format(action="Move or cast"))
        if any(parameter.is_meta for parameter in self.parameters()) and any(
                hasattr(module, "_hf_hook") for module in self.modules()):
            try:  # a cast keeps both probes where they are
                moved = fn(torch.zeros(())).device.type != "cpu" or not fn(torch.empty((), device="meta")).is_meta
            except (RuntimeError, NotImplementedError, AssertionError):  # torch cannot copy out of meta
                moved = True
            if moved:
                what = f"model.{self.base_model_prefix}" if self.base_model_prefix else "The model"
                raise ValueError(f"{what} holds weights a device map offloaded (they wait on the CPU or disk for "
                                 "accelerate's hooks), so it cannot be moved; load the model again with the "
                                 "device_map you want (e.g. the whole stage on one device).")
        return super()._apply(fn, *args, **kwargs)

    def prepare_inputs_for_generation(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Not used: `generate` lays out each stage's inputs itself. It exists because peft's
        `PeftModelForCausalLM` (`LoraConfig(task_type="CAUSAL_LM")`) reads it when it wraps a model
        (the fine stage's wrapping failed with an AttributeError).
        """
        raise NotImplementedError(f"The {self.base_model_prefix or 'Bark'} stage's generate builds its own inputs; "
                                  "call generate instead.")

    def _call_generation_config(self, generation_config: Any, settings: dict[str, Any]) -> Any:
        """The generation config of one `generate` call: `generation_config` (default: the stage's own) with
        `settings` applied. Another class failed with an AttributeError on the first field this stage reads."""
        if generation_config is None:
            generation_config = self.generation_config
        _checked_generation_config(generation_config, self.generation_config_class, "pass this stage's own kind "
                                   "(e.g. an edited copy.deepcopy(stage.generation_config)), or settings such as "
                                   "temperature=0.6")
        return generation_config.for_call(**settings)

    def _check_positions(self, needed: int, settings: str) -> None:
        """Refuse, before any work, settings whose sequences outgrow the position embeddings."""
        if needed > self.config.block_size:
            raise ValueError(f"{settings} needs {needed} positions, but the {self.base_model_prefix} stage has "
                             f"{self.config.block_size} (block_size); lower the setting.")

    def check_call_positions(self, config: Any) -> None:
        """Refuse a call's generation `config` whose sequences outgrow this stage's position embeddings. The
        composite's `split_stage_settings` runs it for every stage, so a later stage's refusal comes before the
        earlier stages' work."""

    def train(self, mode: bool = True) -> BarkHfPreTrainedModel:
        """Refuse training mode with int8 layers: they get no gradients, so only the float32 rest would learn."""
        if mode:
            refuse_int8(self, "Train")
        return super().train(mode)

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, save_code: bool = False,
                        **kwargs: Any) -> None:
        """Weights, config and generation config; with `save_code=True` also the bark-hf source files, so
        that `from_pretrained(..., trust_remote_code=True)` and `pipeline(...)` work without the package.
        """
        check_save_directory(save_directory)
        refuse_int8(self, "Save")
        # Else the folder loads with those layers newly initialised, under a mere load report.
        refuse_unmerged_adapters(self, "and from_pretrained could not load the layers they wrap",
                                 "to fold them into the weights, or save only the adapters with the PeftModel's "
                                 "save_pretrained")
        generation_config_json(self.generation_config)  # refuse a config that cannot be saved, before writing
        if kwargs.pop("push_to_hub", False):
            raise ValueError("save_pretrained(push_to_hub=True) would upload before the generation config, model "
                             "card and code are written; call model.push_to_hub(repo_id) instead.")
        previous_auto_map = vars(self.config).get("auto_map")
        if save_code:
            self.config.auto_map = {
                "AutoConfig": f"configuration_bark_hf.{type(self.config).__name__}",
                **{auto_class: f"modeling_bark_hf.{type(self).__name__}" for auto_class in self.auto_classes},
            }
        try:
            super().save_pretrained(save_directory, *args, **kwargs)
        finally:  # the config in memory stays as it was
            vars(self.config).pop("auto_map", None)
            if previous_auto_map is not None:
                self.config.auto_map = previous_auto_map
        if not kwargs.get("is_main_process", True):  # another process writes the files beside the weights
            return
        if kwargs.get("variant") is None:
            _remove_stale_weights(Path(save_directory))
        # safetensors 0.8 writes through a private temporary file: the weights came out owner-only (0600) beside
        # world-readable configs, so other users of a shared model folder could not load it.
        for weights in Path(save_directory).glob("model*.safetensors"):
            weights.chmod(default_mode())
        save_generation_config(self.generation_config, save_directory)
        # The composite's folder gets a README.md for the Hub. By model type, not class: loaded as remote code,
        # the config comes from another copy of configuration_bark_hf than the one this module imports.
        if self.config.model_type == BarkHfConfig.model_type:
            save_model_card(bark_model_card(self.config, model_id=Path(save_directory).resolve().name), save_directory)
        if save_code:
            # The pipeline module imports (relatively) every module a remote-code user needs. It is imported here,
            # as it imports this module; the line also makes transformers copy it along with this module's remote
            # code, so that a model loaded as remote code can save its code again.
            from .pipeline_bark_hf import __file__ as pipeline_module
            for source in (Path(pipeline_module), *map(Path, get_relative_import_files(pipeline_module))):
                shutil.copyfile(source, Path(save_directory) / source.name)

    def push_to_hub(self, repo_id: str, *, tags: str | Sequence[str] | None = (), save_code: bool = False,
                    max_shard_size: int | str | None = None, **hub_options: Any) -> Any:
        """Upload what `save_pretrained(save_code=..., max_shard_size=...)` writes to the Hub repo `repo_id`, with
        bark-hf's model card (naming the repo and `tags`) where transformers' own `push_to_hub` would write a
        generic one. `hub_options`: `commit_message`, `commit_description`, `private`, `token`, `revision`,
        `create_pr` (see `bark_hf.hub.push_folder_to_hub`). Returns the Hub's commit info.
        """
        refuse_int8(self, "Push")  # before the repo is created on the Hub

        def write(folder: Path, full_repo_id: str) -> None:
            shards = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
            self.save_pretrained(folder, save_code=save_code, **shards)
            if self.config.model_type == BarkHfConfig.model_type:
                save_model_card(bark_model_card(self.config, model_id=full_repo_id, tags=tags), folder, overwrite=True)

        return push_folder_to_hub(repo_id, write, type(self).__name__, replaces=MODEL_WEIGHTS, **hub_options)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any,
                        **kwargs: Any) -> BarkHfPreTrainedModel | tuple[BarkHfPreTrainedModel, dict[str, Any]]:
        # transformers would take a "~/..." folder for a Hub id.
        pretrained_model_name_or_path = os.path.expanduser(os.fspath(pretrained_model_name_or_path))
        # Else transformers' error was about the syntax of Hub repo ids.
        if os.path.isfile(pretrained_model_name_or_path):  # a file of the folder, say its config.json
            raise NotADirectoryError(f"{pretrained_model_name_or_path!r} is a file; pass the model folder that holds "
                                     "it.")
        if looks_like_local_path(pretrained_model_name_or_path) and not os.path.isdir(pretrained_model_name_or_path):
            raise FileNotFoundError(f"No model folder at {pretrained_model_name_or_path!r}; pass a folder saved with "
                                    "`save_pretrained` or `bark-hf convert`, or a Hub id.")
        subfolder = kwargs.get("subfolder")
        folder = os.path.join(pretrained_model_name_or_path, subfolder) if subfolder else pretrained_model_name_or_path
        # A peft adapter folder names its base model instead, which transformers loads (with the adapters).
        if os.path.isdir(folder) and kwargs.get("config") is None and not any(
                os.path.isfile(os.path.join(folder, name)) for name in (CONFIG_NAME, ADAPTER_CONFIG_NAME)):
            # transformers then built a default-sized model around the weights
            raise FileNotFoundError(f"{folder!r} holds no {CONFIG_NAME}; pass the whole folder written by "
                                    "`save_pretrained` or `bark-hf convert` (or the config, as config=...).")
        for name in ("dtype", "torch_dtype"):  # transformers loaded an integer dtype ("int8") as float32, silently
            checked_dtype(kwargs.get(name))
        _drop_attention_implementation(kwargs)
        if "device_map" in kwargs:
            kwargs["device_map"] = _device_names(kwargs["device_map"])
        if "max_memory" in kwargs:
            kwargs["max_memory"] = _budget_device_names(kwargs["max_memory"])
        _check_device_map_arguments(kwargs)
        try:
            loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except pickle.UnpicklingError:  # torch's weights_only refusal of a .bin, with advice to turn it off
            raise ValueError(f"The weights of {os.fspath(pretrained_model_name_or_path)!r} hold pickled Python "
                             "objects besides tensors, which bark-hf never loads (unpickling can run code); use "
                             "a folder with model.safetensors, or one saved with `save_pretrained`.") from None
        except SafetensorError as error:
            raise ValueError(f"The weights of {os.fspath(pretrained_model_name_or_path)!r} cannot be read ({error}): "
                             "the .safetensors file is truncated, corrupt or not safetensors at all; download or "
                             "save the model again.") from None
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True
        # device_map={"": "meta"} leaves no map; offloaded weights sit on "meta" too, but with a map and hooks.
        if getattr(model, "hf_device_map", None) is None and any(parameter.is_meta for parameter in model.parameters()):
            raise ValueError("The weights were loaded onto 'meta', which holds no data, so the model could not "
                             "generate; map them to a device, 'cpu' or 'disk' instead.")
        config_file = cached_file(
            pretrained_model_name_or_path,
            GENERATION_CONFIG_NAME,
            subfolder=kwargs.get("subfolder", ""),
            revision=kwargs.get("revision"),
            cache_dir=kwargs.get("cache_dir"),
            local_files_only=kwargs.get("local_files_only", False),
            token=kwargs.get("token"),
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
        if config_file is not None:
            model.generation_config = load_generation_config(cls.generation_config_class, os.path.dirname(config_file))
        return loaded


@dataclass
class BarkHfStageOutput(ModelOutput):
    """Tokens of one stage for a batch, padded past each item's length.

    sequences: `[B, T]` (semantic) or `[B, K, T]` (coarse, fine), int64.
    lengths: `[B]` int64, the valid length of each item along the last axis.
    """

    sequences: torch.Tensor | None = None
    lengths: torch.Tensor | None = None


@dataclass
class BarkHfGenerationOutput(ModelOutput):
    """Everything one generation produced. Token tensors are padded past each item's length:
    semantic with the semantic pad token, coarse and fine with `codebook_size`, audio with 0.
    """

    audio: torch.Tensor | None = None  # [B, samples] float32, 24 kHz
    audio_lengths: torch.Tensor | None = None  # [B]
    semantic_tokens: torch.Tensor | None = None  # [B, S]
    semantic_lengths: torch.Tensor | None = None  # [B]
    coarse_tokens: torch.Tensor | None = None  # [B, 2, T]
    coarse_lengths: torch.Tensor | None = None  # [B]
    fine_tokens: torch.Tensor | None = None  # [B, 8, T]
    fine_lengths: torch.Tensor | None = None  # [B]


def sampling_probabilities(
    logits: torch.Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Softmax of `logits` ([B, V]) after the original's top-p, then top-k filtering.

    Follows bark/generation.py: top-p is judged on the untempered distribution, top-k keeps
    ties with the k-th value, and the temperature divides the surviving logits. One exception:
    `top_k=1` keeps only the first largest logit, so that greedy decoding stays deterministic where
    logits tie exactly (common in half precision); the original would draw among the tied tokens.
    """
    logits = logits.float()
    if top_p is not None:
        sorted_logits, sorted_indices = torch.sort(logits, dim=-1, descending=True)  # [B, V]
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)  # [B, V]
        remove_sorted = cumulative > top_p
        remove_sorted[..., 1:] = remove_sorted[..., :-1].clone()
        remove_sorted[..., 0] = False
        remove = remove_sorted.scatter(-1, sorted_indices, remove_sorted)  # back to vocabulary order
        logits = logits.masked_fill(remove, -float("inf"))
    if top_k == 1:
        best = logits.argmax(dim=-1, keepdim=True)  # [B, 1]: the first of any tied maxima
        logits = torch.full_like(logits, -float("inf")).scatter(-1, best, logits.gather(-1, best))
    elif top_k is not None:
        kth_value = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth_value, -float("inf"))
    return torch.softmax(logits / temperature, dim=-1)


def sample_tokens(probs: torch.Tensor, saw_nan: torch.Tensor) -> torch.Tensor:
    """One draw per row of `probs` `[B, V]`, as int64 `[B, 1]`.

    The very draw of `torch.multinomial(probs, 1)`, from the same random numbers: PyTorch draws one
    sample as argmax(probs / Exp(1) noise). multinomial also checks its input, which makes the host
    wait for the device at every decoding step; here the NaN check is or-ed into the device flag
    `saw_nan` (a bool scalar) instead, for `raise_if_nan` to read when the host waits anyway.
    """
    saw_nan |= probs.isnan().any().to(saw_nan.device)
    return (probs / torch.empty_like(probs).exponential_(1)).argmax(dim=-1, keepdim=True)


# Below this temperature, logits / temperature can overflow float32 (3.4e38) for logits of a few thousand.
_TINY_TEMPERATURE = 1e-30


def raise_if_nan(saw_nan: torch.Tensor, stage: str, temperature: float | None = None) -> None:
    """The clear error for NaN probabilities that `sample_tokens` saw during a stage: a tiny `temperature` is named
    as the cause (the logits divided by it overflow), else the float16 overflow that usually causes them."""
    if bool(saw_nan) and temperature is not None and temperature < _TINY_TEMPERATURE:
        greedy = "temperature=None" if stage == "fine" else "top_k=1"
        raise FloatingPointError(
            f"The {stage} stage produced NaN probabilities: temperature={temperature} is so small that the logits "
            f"divided by it overflow float32. For greedy decoding use {greedy}; otherwise use a temperature of at "
            f"least {_TINY_TEMPERATURE}."
        )
    if bool(saw_nan):
        raise FloatingPointError(
            f"The {stage} stage produced NaN probabilities: its activations overflowed. This happens with "
            "float16 weights; load the model with dtype=torch.bfloat16 or torch.float32 instead."
        )


def _per_item(history_prompt: HistoryPrompt, batch_size: int) -> list[dict[str, np.ndarray] | None]:
    """One preset (or None) per batch item, from a single preset or a list of them, each checked as the processor
    checks presets (`validate_voice_preset`: keys, shapes, integer codes in range, the semantic/coarse ratio that
    the original asserts): one passed straight to `generate` otherwise failed deep in torch or gave wrong output."""
    check_not_output_pair(history_prompt)
    single = history_prompt is None or isinstance(history_prompt, (Mapping, str, bytes, os.PathLike))
    if not single and not isinstance(history_prompt, (list, tuple)):  # an int failed in list(), a tensor was rows
        raise TypeError(f"history_prompt must be a voice preset (a dict of {', '.join(PRESET_KEYS)}), a list with "
                        f"one preset (or None) per item, or None; got {type(history_prompt).__name__}.")
    prompts = [history_prompt] * batch_size if single else list(history_prompt)
    for index, prompt in enumerate(prompts):
        if isinstance(prompt, (str, bytes, os.PathLike)):  # a string was taken for a list of one preset per letter
            raise TypeError(
                f"history_prompt takes a voice preset's arrays (a dict of semantic_prompt, coarse_prompt and "
                f"fine_prompt), not the preset name or path {prompt!r}. Load it with the processor: "
                "model.generate(**processor(text, voice_preset=...)), or processor.load_voice_preset(...)."
            )
        if prompt is not None and not isinstance(prompt, Mapping):  # the three arrays as a tuple read as 3 items
            raise TypeError(f"history_prompt[{index}] is a {type(prompt).__name__}; each item's preset is a dict of "
                            f"{', '.join(PRESET_KEYS)} (or None for no preset).")
    if len(prompts) != batch_size:
        raise ValueError(
            f"history_prompt has {len(prompts)} presets for a batch of {batch_size}; "
            "pass one preset for all items or exactly one per item."
        )
    checked: dict[int, dict[str, np.ndarray]] = {}  # a preset shared by several items is checked once
    for prompt in prompts:
        if prompt is not None and id(prompt) not in checked:
            checked[id(prompt)] = validate_voice_preset(prompt)
    return [None if prompt is None else checked[id(prompt)] for prompt in prompts]


def _prompt_tensor(prompt: Mapping[str, np.ndarray] | None, key: str, device: torch.device) -> torch.Tensor | None:
    """The `_per_item` preset's `key` array as int64 on `device`."""
    return None if prompt is None else torch.from_numpy(prompt[key]).to(device)


def _empty_tokens(device: torch.device) -> torch.Tensor:
    return torch.empty(0, dtype=torch.long, device=device)


COMPILE_ENV_VAR = "BARK_HF_COMPILE"
"""Set to 1 (or true, yes, on) to make `compile=True` the default of the causal stages' `generate`; 0 (or
false, no, off) or unset: eager. Other values are refused (`env_flag`)."""


@functools.cache
def _compiled_decode_step(device_type: str) -> Callable[..., torch.Tensor]:
    """`BarkHfCausalModel._decode_step` through `torch.compile`, built once per process and device type.
    Dynamic shapes on the CPU; elsewhere shapes start static (on CUDA the step is then captured in
    CUDA graphs, `_CUDAGraphStep`) and torch.compile makes them dynamic if they change.
    On CUDA, inductor's coordinate-descent tuning of its kernels' launch settings made a step 7 %
    faster (bark, H200) for about 30 s more compiling per stage.
    """
    if device_type == "cpu":
        return torch.compile(BarkHfCausalModel._decode_step, fullgraph=True, dynamic=True)
    return torch.compile(BarkHfCausalModel._decode_step, fullgraph=True,
                         options={"coordinate_descent_tuning": device_type == "cuda"})


# One `_decode_step` serves every stage, model size, batch of one or more and grad mode, each with a graph of its own,
# and dynamo counts them all against one limit per function (8 by default): two model sizes in one process reached
# it, and under fullgraph=True that was an error from deep inside torch.
DECODE_STEP_GRAPHS = 64


def _run_compiled_step(model: BarkHfCausalModel, input_ids: torch.Tensor, pads: torch.Tensor,
                       cache: BarkHfKVCache) -> torch.Tensor:
    """`model._decode_step` compiled, with room for DECODE_STEP_GRAPHS graphs of it; past them, eagerly."""
    limit = max(torch._dynamo.config.recompile_limit, DECODE_STEP_GRAPHS)
    try:
        with torch._dynamo.config.patch(recompile_limit=limit):
            return _compiled_decode_step(input_ids.device.type)(model, input_ids, pads, cache)
    except torch._dynamo.exc.FailOnRecompileLimitHit:
        logger.warning_once(f"torch.compile has made {limit} graphs of the decoding step in this process (one per "
                            "stage, model size, batch of one or more, and grad mode); steps of new kinds decode "
                            "eagerly, which gives the same tokens more slowly. To compile more, raise "
                            "torch._dynamo.config.recompile_limit.")
        return model._decode_step(input_ids, pads, cache)


class _CUDAGraphStep:
    """A stage's compiled `_decode_step` captured as a CUDA graph: one replay launches the whole step.

    A one-token step is hundreds of small kernels; launching them one by one from Python costs more
    than running them. The graph holds the addresses of the stage's weights, of the cache's buffers
    and write position, and of its own copies of the step's inputs, so it is captured again when
    the cache reallocates its buffers (`matches`) and dropped when the weights move (`_new_cache`).
    """

    def __init__(self, model: BarkHfCausalModel, input_ids: torch.Tensor, pads: torch.Tensor, cache: BarkHfKVCache):
        self.input_ids, self.pads = input_ids.clone(), pads.clone()  # [B, 1] each: the graph reads these
        self.cache, self.cache_allocations, self.write_position = cache, cache.allocations, cache.write_position
        side_stream = torch.cuda.Stream()
        side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side_stream):  # compile and warm up outside the capture
            _run_compiled_step(model, self.input_ids, self.pads, cache)  # writes the position the replay writes again
        torch.cuda.current_stream().wait_stream(side_stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = _run_compiled_step(model, self.input_ids, self.pads, cache)  # [B, V], rewritten by replays

    def matches(self, input_ids: torch.Tensor, cache: BarkHfKVCache) -> bool:
        same_buffers = cache is self.cache and cache.allocations == self.cache_allocations
        return same_buffers and cache.write_position is self.write_position and input_ids.shape == self.input_ids.shape

    def __call__(self, input_ids: torch.Tensor, pads: torch.Tensor) -> torch.Tensor:
        self.input_ids.copy_(input_ids)
        self.pads.copy_(pads)
        self.graph.replay()
        return self.logits


@dataclass
class _CUDAGraphDecoding:
    """What a stage keeps between calls for CUDA graph decoding (see `BarkHfCausalModel._new_cache`)."""

    cache: BarkHfKVCache
    weight_addresses: tuple[int, ...]
    step: _CUDAGraphStep | None = None
    failed: bool = False  # the capture failed once: decode with the compiled step alone

    def __reduce__(self) -> tuple[type, tuple]:
        """Copies and pickles of the stage get None: a graph cannot be copied, and a copy's weights are elsewhere."""
        return type(None), ()


def _int_column(values: list[int], device: torch.device) -> torch.Tensor:
    """`values` as int64 `[B, 1]` on `device`, sent without making the host wait for the device.

    A plain copy from pageable host memory to a GPU waits for all the work queued before it. Once
    per coarse window that left the GPU idle while the host launched the window's prefill; from
    pinned memory the copy simply joins the queue.
    """
    column = torch.tensor(values, dtype=torch.long)[:, None]
    if device.type != "cuda":
        return column.to(device)
    return column.pin_memory().to(device, non_blocking=True)


def _checked_tokens(tokens: Any, name: str, layout: str, allow_empty_batch: bool = False) -> torch.Tensor:
    """`tokens` as int64, refused with a message where they would fail deep in torch: not an integer tensor, of
    another rank than `layout`'s (`[B, L]` or `[B, K, T]`), or without items (unless `allow_empty_batch`)."""
    ndim = layout.count(",") + 1
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"{name} must be a torch tensor {layout}; got {type(tokens).__name__}.")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer ids (torch.long); got {tokens.dtype}.")
    if tokens.dim() != ndim:
        hint = " (a single item: add the batch dimension, tokens[None])" if tokens.dim() == ndim - 1 else ""
        raise ValueError(f"{name} must be {layout}; got shape {tuple(tokens.shape)}{hint}.")
    if tokens.shape[0] == 0 and not allow_empty_batch:
        raise ValueError(f"{name} holds a batch of 0 items; pass at least one.")
    return tokens.long()


def _checked_lengths(lengths: Any, tokens: torch.Tensor, name: str, tokens_name: str) -> torch.Tensor | None:
    """`lengths` (None, a tensor or a list) as int64 `[B]` within `[0, T]` for `tokens` `[B, ..., T]`: a length past
    the tensor was cut to it, a negative one sliced from the end, a float one rounded down, all silently."""
    if lengths is None:
        return None
    lengths = torch.as_tensor(lengths)
    if lengths.numel() == 0:  # torch reads an empty list as float32: the lengths of a batch of 0
        lengths = lengths.long()
    batch, longest = tokens.shape[0], tokens.shape[-1]
    if lengths.shape != (batch,) or lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
        raise ValueError(f"{name} must hold {batch} whole numbers, one per item of {tokens_name}; got {lengths.dtype} "
                         f"of shape {tuple(lengths.shape)}.")
    if bool(((lengths < 0) | (lengths > longest)).any()):
        raise ValueError(f"{name} must be within [0, {longest}] (the last dimension of {tokens_name}); "
                         f"got {lengths.tolist()}.")
    return lengths.long()


def _check_token_values(tokens: torch.Tensor, valid: torch.Tensor | None, high: int, name: str, what: str) -> None:
    """Refuse values of `tokens` outside `[0, high)` where `valid` (broadcast to `tokens`; None: everywhere) is
    True, naming them: an embedding lookup would fail with an IndexError (a device assert on CUDA), or a value that
    is another stage's token would be read as that one, silently."""
    wrong = (tokens < 0) | (tokens >= high)
    if valid is not None:
        wrong &= valid.to(wrong.device)
    if bool(wrong.any()):
        examples = tokens[wrong].unique()[:5].tolist()
        raise ValueError(f"{name} hold values outside [0, {high}), e.g. {examples}; they must be {what}.")


def _length_mask(lengths: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor | None:
    """True at the positions of `tokens` `[B, ..., T]` within each item's length `[B]`, broadcastable to `tokens`."""
    if lengths is None:
        return None
    valid = torch.arange(tokens.shape[-1], device=lengths.device) < lengths[:, None]  # [B, T]
    return valid.view(tokens.shape[0], *[1] * (tokens.dim() - 2), tokens.shape[-1])


def _valid_items(tokens: torch.Tensor, lengths: torch.Tensor | None, device: torch.device) -> list[torch.Tensor]:
    """Each batch item's valid tokens, `tokens[i, ..., :lengths[i]]`, on `device`."""
    if lengths is None:
        return [item.to(device) for item in tokens]
    return [item[..., : int(length)].to(device) for item, length in zip(tokens, lengths, strict=True)]


def _pad_stack(items: list[torch.Tensor], pad_value: int) -> torch.Tensor:
    """Stack tensors that differ only in their last dimension, right-padding with `pad_value`."""
    longest = max((item.shape[-1] for item in items), default=0)
    return torch.stack([F.pad(item, (0, longest - item.shape[-1]), value=pad_value) for item in items])


IGNORE_INDEX = -100
"""Label of a position that adds nothing to the loss (PyTorch's and transformers' convention)."""


def _checked_labels(labels: torch.Tensor, low: int, high: int, what: str) -> torch.Tensor:
    """`labels` as int64, refused with a message (not a device assert) outside `[low, high)` (ignored positions
    aside) or when not integers. torch's cross-entropy took only int64 (and uint8) targets: int32 labels, which numpy
    arrays can give, failed deep in torch ("expected target dtype to be Long")."""
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integers ({what}, {IGNORE_INDEX} where there is no target), got a "
                         f"{labels.dtype} tensor; build them with the collators in bark_hf.training.")
    labels = labels.long()
    kept = labels[labels != IGNORE_INDEX]
    wrong = kept[(kept < low) | (kept >= high)]
    if wrong.numel():
        raise ValueError(
            f"labels hold values that are not {what}, e.g. {sorted(set(wrong.tolist()))[:5]}. Mark positions "
            f"without a target with {IGNORE_INDEX}; build inputs and labels with the collators in bark_hf.training."
        )
    return labels


def _refuse_attention_outputs(output_attentions: bool | None, output_hidden_states: bool | None) -> None:
    """Accept the None or False that peft's task wrappers (`LoraConfig(task_type=...)`) pass to every forward."""
    if output_attentions or output_hidden_states:
        raise ValueError("Bark's stages return neither attentions nor hidden states; leave output_attentions "
                         "and output_hidden_states unset.")


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor, num_items_in_batch: int | torch.Tensor | None
                   ) -> torch.Tensor:
    """Mean cross-entropy of `logits` `[N, C]` over `targets` `[N]` (-100: none), in float32. With
    `num_items_in_batch`, the Trainer's count of targets in all micro-batches of one optimizer step, the sum
    over it instead, so that gradient accumulation over labels of uneven lengths equals one large batch."""
    if num_items_in_batch is None:
        return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX)
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum") / num_items_in_batch


def semantic_loss(logits: torch.Tensor, labels: torch.Tensor, config: BarkHfSemanticGenerationConfig,
                  num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy over what the semantic stage samples: the semantic vocabulary plus
    end of speech (`semantic_pad_token` as a label). `logits` `[B, T, V]`, `labels` `[B, T]` aligned with the inputs;
    `num_items_in_batch` as for `_cross_entropy`.
    """
    logits, labels = logits[:, :-1], labels[:, 1:]  # position t predicts the token at t + 1
    vocab = config.semantic_vocab_size
    eos = logits[..., config.semantic_pad_token : config.semantic_pad_token + 1]
    sampled = torch.cat([logits[..., :vocab], eos], dim=-1)  # [B, T - 1, vocab + 1]: the last category is EOS
    targets = torch.where(labels == config.semantic_pad_token, vocab, labels)
    targets = _checked_labels(targets, 0, vocab + 1, f"semantic tokens (0..{vocab - 1}) or end of speech ({vocab})")
    return _cross_entropy(sampled.flatten(0, 1), targets.flatten(), num_items_in_batch)


def coarse_loss(logits: torch.Tensor, labels: torch.Tensor, config: BarkHfCoarseGenerationConfig,
                num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy over what the coarse stage samples: each label's own codebook (1 024 codes).

    `labels` `[B, T]` hold coarse tokens (`semantic_vocab_size + codebook * codebook_size + code`),
    aligned with the inputs; the codebook of each target is read from its value.
    """
    logits, labels = logits[:, :-1], labels[:, 1:]  # position t predicts the token at t + 1
    start, size, n_codebooks = config.semantic_vocab_size, config.codebook_size, config.n_coarse_codebooks
    end = start + n_codebooks * size
    labels = _checked_labels(labels, start, end, f"coarse tokens ({start}..{end - 1})")
    kept = labels != IGNORE_INDEX
    offset_labels = torch.where(kept, labels - start, IGNORE_INDEX)
    per_codebook = logits[..., start:end].unflatten(-1, (n_codebooks, size))  # [B, T - 1, K, N]
    codebook = torch.where(kept, offset_labels // size, 0)[..., None, None].expand(*labels.shape, 1, size)
    sampled = per_codebook.gather(-2, codebook).squeeze(-2)  # [B, T - 1, N]: the target's codebook
    targets = torch.where(kept, offset_labels % size, IGNORE_INDEX)
    return _cross_entropy(sampled.flatten(0, 1), targets.flatten(), num_items_in_batch)


class BarkHfCausalModel(BarkHfPreTrainedModel):
    """A GPT-2 style decoder (nanoGPT layout) shared by the semantic and coarse stages."""

    def __init__(self, config: BarkHfSemanticConfig | BarkHfCoarseConfig):
        super().__init__(config)
        self.input_embeds_layer = nn.Embedding(config.input_vocab_size, config.hidden_size)
        self.position_embeds_layer = nn.Embedding(config.block_size, config.hidden_size)
        self.drop = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(
            [BarkHfBlock(config, is_causal=True, layer_idx=index) for index in range(config.num_layers)]
        )
        self.layernorm_final = nn.LayerNorm(config.hidden_size, bias=config.bias)
        self.lm_head = nn.Linear(config.hidden_size, config.output_vocab_size, bias=False)
        self.generation_config = self.generation_config_class()
        self._cuda_graphs: _CUDAGraphDecoding | None = None  # see `_new_cache`
        # Next-token losses, as transformers' causal LMs: the Trainer then counts the targets of
        # `num_items_in_batch` from the second position on, as `semantic_loss` and `coarse_loss` use them.
        self.loss_type = "ForCausalLM"
        self.post_init()

    def _apply(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> BarkHfCausalModel:
        """Moving or casting the weights (`.to`, CPU offload) also frees the CUDA graph and its cache."""
        self.clear_cuda_graphs()
        return super()._apply(fn, *args, **kwargs)

    def clear_cuda_graphs(self) -> None:
        """Free the CUDA graph and KV cache that compiled decoding on CUDA keeps between calls.

        They hold GPU memory (the cache: 2 x batch x layers x positions x width values) until the stage
        moves or this is called. Call it too after changing the stage in place without moving it
        (e.g. switching LoRA adapters): a graph replays what it captured.
        """
        self._cuda_graphs = None

    def _warn_if_bfloat16_is_emulated(self) -> None:
        if self.device.type == "cpu" and self.dtype == torch.bfloat16 and cpu_has_native_bfloat16() is False:
            logger.warning_once(
                "This CPU has no bfloat16 instructions (avx512_bf16, AMX or Arm bf16), so bfloat16 runs slower "
                "than float32 here. On this CPU use float32, or int8 for speed (`quantize_int8()`, CLI `--dtype int8`)."
            )

    @staticmethod
    def _generation_uses_cache(use_cache: bool | None) -> bool:
        """Whether `generate` decodes with the KV cache: unless `use_cache=False` (None, transformers' usual
        "default", means on). Not `config.use_cache`, which is `forward`'s default: transformers' Trainer sets it
        to False, and a stage trained and saved would otherwise decode several times slower."""
        return checked_flag(use_cache, "use_cache", none_means="on") in (None, True)

    def _use_compiled_step(self, compile: bool | None, use_cache: bool) -> bool:
        """Whether to decode with the compiled step: `compile`, or when None the environment variable.

        torch.compile traces the whole step (`fullgraph=True`), so stages it cannot trace decode eagerly:
        with `compile=True` that is an error, with the environment variable a one-time warning.
        """
        compile = checked_flag(compile, "compile", none_means=f"the {COMPILE_ENV_VAR} environment variable decides")
        if compile is None:
            requested = env_flag(COMPILE_ENV_VAR, default=False) and use_cache
        elif compile and not use_cache:
            raise ValueError("compile=True compiles the cached one-token step; it needs use_cache=True.")
        else:
            requested = compile
        if not requested:
            return False
        if holds_int8_layers(self):
            reason = "its linear layers are int8 (quantize_int8()), which torch.compile cannot trace"
        elif any(hasattr(module, "_hf_hook") for module in self.modules()):
            reason = ("accelerate's hooks (a device map) move its weights during the step, which torch.compile "
                      "cannot trace")
        else:
            return True
        if compile:
            raise ValueError(f"compile=True cannot decode the {self.base_model_prefix} stage: {reason}. "
                             "Leave compile unset to decode eagerly.")
        logger.warning_once(f"{COMPILE_ENV_VAR}=1 is ignored for the {self.base_model_prefix} stage: {reason}; "
                            "decoding eagerly.")
        return False

    def get_input_embeddings(self) -> nn.Embedding:
        return self.input_embeds_layer

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.input_embeds_layer = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        cache: BarkHfKVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        history_input_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        vocab_rows: slice | None = None,  # last: the arguments before it keep their positions
    ) -> CausalLMOutputWithPast | tuple:
        """Logits `[B, T, V]` (the last `logits_to_keep` positions when > 0) for `input_ids` `[B, T]`
        or `inputs_embeds` `[B, T, C]`, after the positions held in `cache` (a `BarkHfKVCache`, extended
        in place and returned when `use_cache`). `attention_mask` `[B, past + T]` marks real tokens with 1.
        `vocab_rows` keeps only those logits, `[B, T, rows]` (see `_head_logits`).

        `history_input_ids` `[B, W]` are embedded and added to the first W positions: the semantic
        stage's history window, which shares its positions with the text window. `labels` `[B, T]`,
        aligned with the inputs (-100 where there is no target), add the stage's loss (`semantic_loss`
        or `coarse_loss`); `bark_hf.training` builds both from token sequences. `output_attentions` and
        `output_hidden_states` are accepted as peft's `PeftModelForCausalLM` passes them, but only as None or False.
        `num_items_in_batch` comes from the Trainer (see `_cross_entropy`).
        """
        _refuse_attention_outputs(output_attentions, output_hidden_states)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds.")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.training and self.is_activation_checkpointing:
            use_cache = False
        if input_ids is not None and input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T]; got shape {tuple(input_ids.shape)}.")
        # Ids past the embedding failed with a bare IndexError (a device assert on CUDA). Generation passes
        # embeddings, so only direct calls (training) pay for the check; a labels check waits for the device anyway.
        vocab_size = self.config.input_vocab_size
        for name, ids in (("input_ids", input_ids), ("history_input_ids", history_input_ids)):
            if ids is not None:
                _check_token_values(ids, None, vocab_size, name, f"ids of this stage's {vocab_size}-entry input "
                                    "vocabulary (bark_hf.training's collators lay them out)")
        if inputs_embeds is None:
            inputs_embeds = self.input_embeds_layer(input_ids)  # [B, T, C]
        batch, length = inputs_embeds.shape[:2]
        past_length = 0 if cache is None else cache.length
        # A mask of the new positions alone ([B, 1] after a cache) would broadcast over the cached ones, unchecked.
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, past_length + length):
            raise ValueError(f"attention_mask must be [B, past + T] = {(batch, past_length + length)}: the "
                             f"{past_length} positions in the cache, then the {length} new ones; got "
                             f"{tuple(attention_mask.shape)}.")
        if history_input_ids is not None:
            if cache is not None or history_input_ids.shape[1] > length:
                raise ValueError("history_input_ids covers the first positions of a sequence: pass it without a "
                                 "cache and no longer than the inputs.")
            history = F.pad(self.input_embeds_layer(history_input_ids), (0, 0, 0, length - history_input_ids.shape[1]))
            inputs_embeds = inputs_embeds + history  # [B, T, C]; positions past the window add zeros
        if labels is not None and (logits_to_keep > 0 or vocab_rows is not None or labels.shape != (batch, length)):
            raise ValueError(f"labels must have the inputs' shape {(batch, length)} (got {tuple(labels.shape)}), "
                             "logits_to_keep must be 0 and vocab_rows None.")
        refuse_int8_loss_gradients(self, labels)
        if past_length + length > self.config.block_size:
            raise ValueError(
                f"Sequence of {past_length + length} positions exceeds this model's block_size "
                f"({self.config.block_size})."
            )
        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + length, device=inputs_embeds.device)[None]  # [1, T]
        elif input_ids is not None:
            _check_token_values(position_ids, None, self.config.block_size, "position_ids",
                                f"positions within the {self.config.block_size}-position block")
        hidden_states = self.drop(inputs_embeds + self.position_embeds_layer(position_ids))  # [B, T, C]

        mask = None
        if attention_mask is not None:
            keys = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, past + T]
            causal = torch.ones(length, past_length + length, dtype=torch.bool, device=keys.device)
            mask = keys & causal.tril(past_length)  # [B, 1, T, past + T]
            # A fully padded query row would make SDPA return NaN; let it see itself instead.
            mask = mask | F.pad(torch.eye(length, dtype=torch.bool, device=keys.device), (past_length, 0))

        if use_cache and cache is None:
            cache = BarkHfKVCache(len(self.layers))
        block_step, prepared = self._cpu_block_step(hidden_states, cache)
        key_mask = None
        if block_step is not None:
            hidden_states = hidden_states.clone(memory_format=torch.contiguous_format)  # the kernel writes into it
            if attention_mask is not None:  # each item's keys, and its new position (as `mask` has it)
                key_mask = attention_mask.to(torch.bool, copy=True)
                key_mask[:, -1] = True
        # The last block computes only the positions whose logits are kept (a prefill's last), since no later block
        # reads the others: in a coarse window's prefill of about 900 positions that is 6 % of the work.
        last_block = self.layers[-1] if self.layers else None
        for block in self.layers:
            if block_step is not None and block.cpu_step(block_step, hidden_states, cache, key_mask, prepared):
                continue
            if block is last_block and type(block) is BarkHfBlock and 0 < logits_to_keep < length:
                hidden_states = block(hidden_states, mask, cache=cache, queries=logits_to_keep)
            else:
                hidden_states = block(hidden_states, mask, cache=cache)
        hidden_states = self.layernorm_final(hidden_states)
        if logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]  # [B, keep, C]
        logits = self._head_logits(hidden_states, vocab_rows)  # [B, T or keep, V or rows]
        cache = cache if use_cache else None
        loss = None
        if labels is not None:
            config = self.generation_config
            stage_loss = coarse_loss if isinstance(config, BarkHfCoarseGenerationConfig) else semantic_loss
            loss = stage_loss(logits, labels.to(logits.device), config, num_items_in_batch)
        if return_dict is False:
            return (logits, cache) if loss is None else (loss, logits, cache)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)

    def _cpu_block_step(self, hidden_states: torch.Tensor, cache: BarkHfKVCache | None
                        ) -> tuple[BlockStepKernel | None, dict[nn.Module, PreparedBlock | None] | None]:
        """bark-hf's block kernel (`BarkHfBlock.cpu_step`) for this pass, and the blocks it has prepared in this
        `generate` call: a decoding step (one new position for each of at most BLOCK_STEP_MAX_ITEMS items, after a
        cache) on a CPU in float32, inside a stage's `generate` with the CPU kernels on, in evaluation, without
        autograd or autocast; (None, None) otherwise. It rounds in its own order, like the kernel's products
        (`linear`); each item's values stay those it gets alone."""
        products = _generation_products()
        if (products is None or not products.cpu_kernels or cache is None or cache.static_steps or self.training
                or hidden_states.shape[1] != 1 or hidden_states.shape[0] > BLOCK_STEP_MAX_ITEMS
                or hidden_states.device.type != "cpu" or hidden_states.dtype != torch.float32
                or torch.is_grad_enabled() or torch.is_autocast_enabled("cpu")):
            return None, None
        kernel = cpu_block_step()
        return (None, None) if kernel is None else (kernel, products.blocks)

    def _head_logits(self, hidden_states: torch.Tensor, vocab_rows: slice | None) -> torch.Tensor:
        """The head's logits `[..., V]`, or only `vocab_rows` of them.

        A coarse step samples from one codebook's 1 024 logits of 12 096: on a CPU, where decoding is
        bound by memory bandwidth, reading only those rows of the head saves a tenth of a step's weight
        bytes, and at one position per item the CPU's kernels give bit for bit the whole head's values
        (tested). Elsewhere (GPU libraries pick kernels by shape, so the last bits could change), and
        for a head that is not a plain `nn.Linear` (int8, peft) or that has hooks (accelerate's offload, a
        user's), the whole head runs and is sliced.
        """
        products = _generation_products()
        if (products is not None and products.cpu_kernels and hidden_states.device.type == "cpu"
                and hidden_states.shape[1] == 1 and MATVEC_MAX_ROWS < hidden_states.shape[0] <= BLOCK_STEP_MAX_ITEMS):
            # A decoding step whose blocks the block kernel computed item by item: its head, too, MATVEC_MAX_ROWS items
            # at a time through the matrix-vector kernel, which gives each item the values it gets alone (a GEMM's
            # differ in the last bits). Reading the head two to four times costs milliseconds of a step of hundreds.
            return torch.cat([self._head_logits(part, vocab_rows) for part in hidden_states.split(MATVEC_MAX_ROWS)])
        head = self.lm_head
        if vocab_rows is None:
            return project(head, hidden_states)
        if type(head) is not nn.Linear or _changes_its_call(head) or hidden_states.device.type != "cpu":
            return head(hidden_states)[..., vocab_rows]
        bias = None if head.bias is None else head.bias[vocab_rows]
        return linear(hidden_states, head.weight[vocab_rows], bias)

    def _next_logits(
        self,
        inputs_embeds: torch.Tensor,
        cache: BarkHfKVCache | None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        vocab_rows: slice | None = None,
    ) -> torch.Tensor:
        """Logits `[B, V]` (or `[B, rows]` for `vocab_rows`) of the last position of `inputs_embeds`
        `[B, T, C]`. `cache` (None: no cache, the inputs are the whole sequence) is extended in place.

        In a stage's `generate` on a CPU, a batch's whole-input pass (a prefill, or any pass without a cache) runs
        item by item, each on its own positions without padding, exactly as the item's own run does: as one batch,
        the padding mask and the products' shapes change the last bits of every value, enough to flip a greedy
        token where two logits are that close. Item by item costs about nothing there: a prefill's time goes to
        arithmetic, not to reading the weights once per pass.
        """
        if self._passes_item_by_item(inputs_embeds, cache, attention_mask):
            return self._next_logits_item_by_item(inputs_embeds, cache, attention_mask, position_ids, vocab_rows)
        output = self(inputs_embeds=inputs_embeds, cache=cache, attention_mask=attention_mask,
                      position_ids=position_ids, use_cache=cache is not None, logits_to_keep=1, vocab_rows=vocab_rows)
        return output.logits[:, -1]

    @staticmethod
    def _passes_item_by_item(inputs_embeds: torch.Tensor, cache: BarkHfKVCache | None,
                             attention_mask: torch.Tensor | None) -> bool:
        batch, length = inputs_embeds.shape[:2]
        if (batch < 2 or length < 2 or (cache is not None and cache.length > 0) or inputs_embeds.device.type != "cpu"
                or _generation_products() is None):
            return False
        # Left padding alone (each row's zeros, then its ones) is what an item's own run leaves out.
        return attention_mask is None or bool((attention_mask[:, 1:] >= attention_mask[:, :-1]).all())

    def _next_logits_item_by_item(self, inputs_embeds: torch.Tensor, cache: BarkHfKVCache | None,
                                  attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
                                  vocab_rows: slice | None) -> torch.Tensor:
        """`_next_logits` of each item alone, its keys and values written into `cache` behind its left padding."""
        batch, length = inputs_embeds.shape[:2]
        pads = [0] * batch if attention_mask is None else (length - attention_mask.sum(dim=1)).tolist()
        logits, item_caches = [], []
        for item, pad in enumerate(pads):
            item_cache = None if cache is None else BarkHfKVCache(len(self.layers), storage_dtype=cache.storage_dtype)
            positions = None if position_ids is None else position_ids[item : item + 1, pad:]
            logits.append(self._next_logits(inputs_embeds[item : item + 1, pad:], item_cache, None, positions,
                                            vocab_rows))  # [1, V]
            item_caches.append(item_cache)
        if cache is not None:
            for layer in range(len(self.layers)):
                padded = [[F.pad(tensor, (0, 0, pad, 0)) for tensor in item_cache[layer]]  # key, value [1, H, T, D]
                          for item_cache, pad in zip(item_caches, pads, strict=True)]
                keys, values = (torch.cat(tensors) for tensors in zip(*padded, strict=True))  # [B, H, T, D] each
                cache.update(layer, keys, values)
        return torch.cat(logits)

    def _new_cache(self, max_length: int, compile: bool, batch: int) -> BarkHfKVCache:
        """An empty cache for `max_length` positions of `batch` items.

        Compiled decoding on CUDA replays CUDA graphs that hold the addresses of the cache's buffers
        and of the weights, so there the stage keeps one cache and its graph from call to call, as
        long as `max_length` and the weights' addresses stay the same (moving the stage, as CPU
        offload does, frees them: `clear_cuda_graphs`). Not in training mode or under autocast (a graph
        would replay a capture made in another autocast state). Stages with accelerate hooks never
        get here compiled (`_use_compiled_step`).
        """
        graphs_apply = compile and self.device.type == "cuda" and not self.training
        graphs_apply &= not torch.is_autocast_enabled("cuda")
        if not graphs_apply:
            return BarkHfKVCache(len(self.layers), max_length, self._cache_storage_dtype(batch))
        weight_addresses = tuple(parameter.data_ptr() for parameter in self.parameters())
        kept = self._cuda_graphs
        if kept is None or kept.cache.max_length != max_length or kept.weight_addresses != weight_addresses:
            self._cuda_graphs = kept = _CUDAGraphDecoding(BarkHfKVCache(len(self.layers), max_length), weight_addresses)
        kept.cache.reset()
        kept.cache.zero_()
        return kept.cache

    def _cache_storage_dtype(self, batch: int) -> torch.dtype | None:
        """float16 for the cache of an int8 model whose decoding steps run in bark-hf's CPU kernel, which reads it
        as it is: a coarse step of bark-small reads up to 70 MB of float32 keys and values beside 85 MB of int8
        weights, and float16 rounds far less than int8 weights do. None (the model's dtype) elsewhere: a float32 model
        stays the original's, and PyTorch's attention, which steps a block that the kernel does not compute (hooks,
        peft layers, ...), would convert a float16 cache at every step."""
        products = _CPU_PRODUCTS_IN_GENERATION.get()
        if (products is None or not products.cpu_kernels or batch > BLOCK_STEP_MAX_ITEMS
                or not holds_int8_layers(self) or cpu_block_step() is None or not reads_float16_caches()):
            return None
        kernel_steps_all = all(block.prepared_for_cpu_steps(products.blocks) is not None for block in self.layers)
        return torch.float16 if kernel_steps_all else None

    def _decode(
        self,
        input_ids: torch.Tensor,
        cache: BarkHfKVCache,
        pads: torch.Tensor,
        compile: bool,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        vocab_rows: slice | None = None,
    ) -> torch.Tensor:
        """Logits `[B, V]` (or `[B, rows]` for `vocab_rows`) for one new token per item, `input_ids`
        `[B, 1]`, after the positions in `cache`.

        Eager: a forward pass over the cache's filled part (`attention_mask` `[B, past + 1]` and
        `position_ids` `[B, 1]` as for `forward`; None without padding). Compiled: `_decode_step`
        on the cache's whole buffers, with each item's left padding given as `pads` `[B, 1]`.
        """
        if not compile:
            return self._next_logits(self.input_embeds_layer(input_ids), cache, attention_mask, position_ids,
                                     vocab_rows)
        if not cache.static_steps:  # the first step after the prefill
            cache.start_static_steps()
        # A fresh dense copy: a column sliced out of a wider tensor has strides that change per window.
        input_ids = input_ids.clone(memory_format=torch.contiguous_format)
        graph_step = self._cuda_graph_step(input_ids, pads, cache)
        if graph_step is not None:
            logits = graph_step(input_ids, pads)  # [B, V], valid until the next step
        else:
            logits = _run_compiled_step(self, input_ids, pads, cache)
        cache.write_position += 1
        return logits if vocab_rows is None else logits[:, vocab_rows]

    def _cuda_graph_step(self, input_ids: torch.Tensor, pads: torch.Tensor,
                         cache: BarkHfKVCache) -> _CUDAGraphStep | None:
        """The captured step for `cache` (captured now if it has none that fits), or None without CUDA graphs."""
        graphs = self._cuda_graphs
        if graphs is None or cache is not graphs.cache or graphs.failed:
            return None
        if graphs.step is None or not graphs.step.matches(input_ids, cache):
            graphs.step = None
            try:
                graphs.step = _CUDAGraphStep(self, input_ids, pads, cache)
            except RuntimeError as error:
                graphs.failed = True
                logger.warning(f"Capturing the {self.base_model_prefix} stage's decoding step in a CUDA graph failed "
                               f"({error}); decoding with the compiled step alone, which is slower.")
        return graphs.step

    def _decode_step(self, input_ids: torch.Tensor, pads: torch.Tensor, cache: BarkHfKVCache) -> torch.Tensor:
        """Logits `[B, V]` for `input_ids` `[B, 1]` written at `cache.write_position`, in static shapes.

        Attention reads all `cache.max_length` positions, masked to those written so far and past each
        item's `pads` `[B, 1]` left padding, so one compiled graph serves every step of a run.
        """
        columns = torch.arange(cache.max_length, device=input_ids.device)[None]  # [1, S]
        mask = (columns >= pads) & (columns <= cache.write_position)  # [B, S]
        position_ids = cache.write_position - pads  # [B, 1]: positions count from each item's first token
        hidden_states = self.drop(self.input_embeds_layer(input_ids) + self.position_embeds_layer(position_ids))
        for block in self.layers:
            hidden_states = block(hidden_states, mask[:, None, None, :], cache=cache)  # mask [B, 1, 1, S]
        return self.lm_head(self.layernorm_final(hidden_states))[:, -1]


# --- token layouts: what each stage's GPT reads, shared by generation and the training collators ------


def semantic_prompt_windows(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    semantic_histories: Sequence[torch.Tensor | None],
    config: BarkHfSemanticGenerationConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The semantic stage's two windows, `[B, 256]` each, which the model sums position-wise.

    Text: tokenizer ids `[B, L]` shifted by `text_encoding_offset`, `text_pad_token` where
    `attention_mask` is 0 and up to 256. History: the last 256 tokens of each item's semantic
    history (or none), right-padded with `semantic_pad_token`.
    Each item's real tokens come first, in order: a left-padded batch (transformers' usual padding for
    generation) gets the windows each item gets alone, not padding before its text.
    """
    window = config.max_input_semantic_length
    attention_mask = attention_mask.bool()
    order = torch.argsort((~attention_mask).long(), dim=1, stable=True)  # [B, L]: real tokens first, in order
    input_ids, attention_mask = input_ids.gather(1, order)[:, :window], attention_mask.gather(1, order)[:, :window]
    text = torch.where(attention_mask, input_ids + config.text_encoding_offset, config.text_pad_token)
    text = F.pad(text, (0, window - text.shape[1]), value=config.text_pad_token)  # [B, 256]
    histories = []
    for history in semantic_histories:
        history = input_ids.new_zeros(0) if history is None else history[-window:].to(input_ids.device)
        histories.append(F.pad(history, (0, window - history.shape[0]), value=config.semantic_pad_token))
    return text, torch.stack(histories)  # [B, 256], [B, 256]


def coarse_codebook_offsets(config: BarkHfCoarseGenerationConfig, device: torch.device | None = None) -> torch.Tensor:
    """Token id of code 0 in each coarse codebook, `[2]`: the coarse GPT's tokens follow the semantic ones."""
    return config.semantic_vocab_size + config.codebook_size * torch.arange(config.n_coarse_codebooks, device=device)


def coarse_flat_tokens(coarse_codes: torch.Tensor, config: BarkHfCoarseGenerationConfig) -> torch.Tensor:
    """Codes `[2, T]` as the coarse GPT's tokens `[2T]`: interleaved frame by frame, each codebook offset."""
    offsets = coarse_codebook_offsets(config, coarse_codes.device)
    return (coarse_codes + offsets[:, None]).T.reshape(-1)  # [T, 2] -> [2T]


def coarse_window_prompt(semantic: torch.Tensor, semantic_index: int,
                         config: BarkHfCoarseGenerationConfig) -> torch.Tensor:
    """A coarse window's prompt `[257]`: the semantic window whose start is aligned with the coarse history
    before `semantic[semantic_index]` (padded with `coarse_semantic_pad_token` to 256), then the infer token.
    """
    max_semantic_history = int(math.floor(config.max_coarse_history / config.semantic_to_coarse_ratio))
    window = semantic[max(0, semantic_index - max_semantic_history) :][: config.max_coarse_input_length]
    window = F.pad(window, (0, config.max_coarse_input_length - window.shape[0]),
                   value=config.coarse_semantic_pad_token)  # [256]
    return torch.cat([window, window.new_full((1,), config.coarse_infer_token)])


def fine_window_count(n_frames: int, config: BarkHfFineGenerationConfig, n_history: int = 0) -> int:
    """How many windows the fine stage runs over `n_frames` new frames after `n_history` frames of preset history."""
    if n_frames <= 0:
        return 0
    return max(0, math.ceil((n_frames - (config.max_fine_input_length - n_history)) / config.fine_window_hop)) + 1


class BarkHfSemanticModel(BarkHfCausalModel):
    """Text -> semantic tokens."""

    config_class = BarkHfSemanticConfig
    auto_classes = ("AutoModel", "AutoModelForCausalLM")
    base_model_prefix = "semantic"
    generation_config_class = BarkHfSemanticGenerationConfig

    @staticmethod
    def _most_tokens(config: BarkHfSemanticGenerationConfig) -> int:
        """The most tokens a call with `config` can generate: `max_new_tokens`, or fewer by `max_gen_duration_s`."""
        if config.max_gen_duration_s is None:
            return config.max_new_tokens
        # The loop stops once the tokens last longer (+1: float sums). inf past 3.6e306 s: no floor.
        duration_tokens = config.max_gen_duration_s * config.semantic_rate_hz
        return min(config.max_new_tokens, math.floor(min(duration_tokens, config.max_new_tokens)) + 2)

    @staticmethod
    def _token_cap(config: BarkHfSemanticGenerationConfig, most_tokens: int) -> int:
        """The tokens a call makes when no item stops: `max_new_tokens`, or the first count whose duration, summed
        token by token in floats as bark does, passes `max_gen_duration_s`. `_most_tokens` only bounds that count
        (float sums), and as the bar's total it left a run that hit the cap one short (150/151). Call it after
        `check_call_positions`: that keeps `most_tokens`, the loop's length here, within the positions."""
        if config.max_gen_duration_s is None:
            return most_tokens
        duration_s = 0.0
        for count in range(1, most_tokens + 1):
            duration_s += 1 / config.semantic_rate_hz
            if duration_s > config.max_gen_duration_s:
                return count
        return most_tokens

    def check_call_positions(self, config: BarkHfSemanticGenerationConfig) -> None:
        limit = f"max_new_tokens={config.max_new_tokens}"
        if config.max_gen_duration_s is not None:
            limit += f" with max_gen_duration_s={config.max_gen_duration_s}"
        # The prompt (window + infer token), then every generated token but the last is fed back.
        window = config.max_input_semantic_length
        self._check_positions(window + self._most_tokens(config), f"{limit} after the {window + 1}-token prompt")

    @torch.no_grad()
    @_generation_method
    def generate(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        history_prompt: HistoryPrompt = None,
        generation_config: BarkHfSemanticGenerationConfig | None = None,
        use_cache: bool | None = None,
        show_progress: bool = True,
        compile: bool | None = None,
        **settings: Any,
    ) -> BarkHfStageOutput:
        """Semantic tokens for tokenised text.

        `input_ids` `[B, L]` are the tokenizer's ids (no offset), `attention_mask` `[B, L]` marks
        real tokens (default: every id but the tokenizer's `[PAD]`, 0); `history_prompt` a voice preset (or
        one per item); `settings` override fields of the generation config (`temperature`, `top_k`,
        `min_eos_p`, ...). Returns int64 tokens
        `[B, S]` padded with `semantic_pad_token`, and their lengths. `compile=True` (default: the
        `BARK_HF_COMPILE` environment variable) decodes with `torch.compile`d steps. The KV cache is on
        unless `use_cache=False` (see `_generation_uses_cache`). Follows bark/generation.py `generate_text_semantic`.
        """
        config = self._call_generation_config(generation_config, settings)
        use_cache = self._generation_uses_cache(use_cache)
        compile = self._use_compiled_step(compile, use_cache)
        show_progress = checked_flag(show_progress, "show_progress")  # "no" would show the bar
        self._warn_if_bfloat16_is_emulated()
        device = self.device
        input_ids = _checked_tokens(input_ids, "input_ids", "[B, L]").to(device)
        batch = input_ids.shape[0]
        window = config.max_input_semantic_length

        self.check_call_positions(config)
        most_tokens = self._most_tokens(config)
        if attention_mask is None:  # the processor pads with [PAD]: generate(processor(text)["input_ids"]) then
            attention_mask = input_ids != TOKENIZER_PAD_ID  # reads the padding as the text pad, as with the mask
        elif not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
            shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
            raise ValueError(f"attention_mask must be a tensor of input_ids' shape {tuple(input_ids.shape)} (1 at "
                             f"real tokens, 0 at padding); got {shape}.")
        attention_mask = attention_mask.to(device).bool()
        n_tokens = attention_mask.sum(dim=1)  # [B]
        if bool((n_tokens == 0).any()):
            raise ValueError(f"Items {(n_tokens == 0).nonzero()[:, 0].tolist()} of input_ids hold no text "
                             "(attention_mask is 0 throughout, or without one, every id is [PAD], 0); pass text with "
                             "at least one token per item.")
        # Past the text's ids come the text pad and the infer token; a negative id would land on semantic tokens.
        _check_token_values(input_ids, attention_mask, config.text_pad_token - config.text_encoding_offset,
                            "input_ids", "the tokenizer's ids, without an offset, as BarkHfProcessor gives them")
        longest = int(n_tokens.max())
        if longest > window:
            logger.warning(f"Text of {longest} tokens is longer than {window}; keeping the first {window}.")
        histories = [_prompt_tensor(prompt, "semantic_prompt", device) for prompt in _per_item(history_prompt, batch)]
        text, history = semantic_prompt_windows(input_ids, attention_mask, histories, config)  # [B, 256] each

        embed = self.input_embeds_layer
        prompt_embeds = embed(text) + embed(history)  # [B, 256, C]: the two windows share positions
        infer = torch.full((batch, 1), config.semantic_infer_token, dtype=torch.long, device=device)
        generated = torch.empty((batch, 0), dtype=torch.long, device=device)
        lengths = torch.full((batch,), -1, dtype=torch.long, device=device)  # -1 while running
        cache = self._new_cache(window + most_tokens, compile, batch) if use_cache else None
        no_padding = torch.zeros((batch, 1), dtype=torch.long, device=device)
        saw_nan = torch.zeros((), dtype=torch.bool, device=device)
        # Whether every item had stopped (or NaN came up) after the last token appended. The host reads it
        # only once the next step is queued, so the GPU does not idle while the host catches up; that token
        # and the queued step are then dropped, and no random numbers were drawn for the step. In training
        # mode a forward pass may draw random numbers (dropout), so there the host reads it before the step.
        all_stopped = None
        read_before_step = self.training
        # A bar left open by an error or Ctrl-C pushed every later call's bars a line down.
        token_cap = self._token_cap(config, most_tokens)
        with logging.tqdm(total=token_cap, disable=not show_progress, desc="semantic",
                          leave=_leave_stage_bar()) as progress:
            for _ in range(token_cap):
                if read_before_step and all_stopped is not None and bool(all_stopped):
                    break
                if cache is not None and cache.length > 0:
                    logits = self._decode(generated[:, -1:], cache, no_padding, compile)  # [B, V]
                else:
                    step_embeds = torch.cat([prompt_embeds, embed(torch.cat([infer, generated], dim=1))], dim=1)
                    logits = self._next_logits(step_embeds, cache)  # [B, V]
                if not read_before_step and all_stopped is not None and bool(all_stopped):
                    break
                relevant = logits[:, : config.semantic_vocab_size]  # [B, 10000]
                if config.allow_early_stop:
                    eos_logit = logits[:, config.semantic_pad_token : config.semantic_pad_token + 1]
                    relevant = torch.cat([relevant, eos_logit], dim=1)  # [B, 10001]: the last entry is EOS
                probs = sampling_probabilities(relevant, config.temperature, config.top_k, config.top_p)
                next_token = sample_tokens(probs, saw_nan)  # [B, 1]
                if config.allow_early_stop:
                    stopped = next_token[:, 0] == config.semantic_vocab_size
                    if config.min_eos_p is not None:
                        stopped |= probs[:, -1] >= config.min_eos_p
                    lengths = torch.where(stopped & (lengths < 0), generated.shape[1], lengths)
                    all_stopped = (lengths >= 0).all() | saw_nan  # stop early on NaN too
                generated = torch.cat([generated, next_token], dim=1)
                progress.update(1)
            if all_stopped is not None and bool(all_stopped):
                generated = generated[:, :-1]  # the token drawn when the last item stopped is no item's
                # The bar counted that token; and it ends full, as the coarse and fine bars do (a notebook's bar
                # left short of its total turns red, as for an error).
                progress.n = progress.total = generated.shape[1]
        raise_if_nan(saw_nan, "semantic", config.temperature)
        lengths = torch.where(lengths < 0, generated.shape[1], lengths)
        positions = torch.arange(generated.shape[1], device=device)[None]  # [1, S]
        generated = generated.masked_fill(positions >= lengths[:, None], config.semantic_pad_token)
        return BarkHfStageOutput(sequences=generated, lengths=lengths)


@dataclass
class _CoarseItem:
    """One batch item on its way through the coarse windows."""

    semantic: torch.Tensor  # [S_hist + S]: the trimmed preset history, then the item's semantic tokens
    coarse: torch.Tensor  # [n]: the trimmed preset history, then every token generated so far (flat, offset ids)
    n_semantic_history: int
    n_coarse_history: int
    n_steps: int  # coarse tokens to generate


@dataclass
class _CoarseWindow:
    """A coarse window's tokens, left-padded: `ids` `[B, pads + context + new tokens]`, row by row for `items`."""

    items: list[_CoarseItem]
    ids: torch.Tensor
    pads: list[int]

    def rows_continued_by(self, items: list[_CoarseItem], contexts: list[torch.Tensor]) -> list[int | None]:
        """The row of this window that each of `items` goes on from, or None for an item that starts afresh. An
        item goes on from its row where its next window's input, `context`, is that row, generated tokens and all
        (the semantic window has not moved and the coarse history is not yet cut): the cache then holds all of it
        but the last token, and the next window's prefill would recompute it."""
        rows = []
        for item, context in zip(items, contexts, strict=True):
            row = next((row for row, known in enumerate(self.items) if known is item), None)
            if row is not None and (context.shape[0] != self.ids.shape[1] - self.pads[row] or not torch.equal(
                    context, self.ids[row, self.pads[row] :])):
                row = None
            rows.append(row)
        return rows


class BarkHfCoarseModel(BarkHfCausalModel):
    """Semantic tokens -> the first two EnCodec codebooks, interleaved frame by frame."""

    config_class = BarkHfCoarseConfig
    auto_classes = ("AutoModel", "AutoModelForCausalLM")
    base_model_prefix = "coarse_acoustics"
    generation_config_class = BarkHfCoarseGenerationConfig

    @torch.no_grad()
    @_generation_method
    def generate(
        self,
        semantic_tokens: torch.LongTensor,
        semantic_lengths: torch.Tensor | None = None,
        history_prompt: HistoryPrompt = None,
        generation_config: BarkHfCoarseGenerationConfig | None = None,
        use_cache: bool | None = None,
        show_progress: bool = True,
        compile: bool | None = None,
        **settings: Any,
    ) -> BarkHfStageOutput:
        """Coarse codes `[B, 2, T]` (padded with `codebook_size`) and lengths for semantic tokens
        `[B, S]` (each item valid up to `semantic_lengths`). `compile=True` (default: the
        `BARK_HF_COMPILE` environment variable) decodes with `torch.compile`d steps; `use_cache` as for the
        semantic stage's `generate`. Follows bark/generation.py `generate_coarse`.

        The items go through their sliding windows together: window `w` of every item that has one
        is a single left-padded batch (`_generate_window`); an item leaves after its last window. A window
        whose input is the last window's sequence goes on from its cache (`_CoarseWindow.rows_continued_by`).
        """
        config = self._call_generation_config(generation_config, settings)
        use_cache = self._generation_uses_cache(use_cache)
        compile = self._use_compiled_step(compile, use_cache)
        show_progress = checked_flag(show_progress, "show_progress")  # "no" would show the bar
        self._warn_if_bfloat16_is_emulated()
        self.check_call_positions(config)
        longest_window = self._longest_window(config)
        semantic_tokens = _checked_tokens(semantic_tokens, "semantic_tokens", "[B, S]")
        semantic_lengths = _checked_lengths(semantic_lengths, semantic_tokens, "semantic_lengths", "semantic_tokens")
        valid = _length_mask(semantic_lengths, semantic_tokens)
        _check_token_values(semantic_tokens, valid, config.semantic_vocab_size, "semantic_tokens",
                            "semantic tokens (pass semantic_lengths to leave out the padding after each item's end)")
        semantic = _valid_items(semantic_tokens, semantic_lengths, self.device)
        prompts = _per_item(history_prompt, len(semantic))
        items = [self._start_item(tokens, prompt, config) for tokens, prompt in zip(semantic, prompts, strict=True)]
        n_windows = max((math.ceil(item.n_steps / config.sliding_window_len) for item in items), default=0)
        # One cache for every window, emptied between them. It has the size of the longest window, so a
        # compiled step fits them all.
        cache = self._new_cache(longest_window - 1, compile, len(semantic)) if use_cache else None
        saw_nan = torch.zeros((), dtype=torch.bool, device=self.device)
        window = None
        for index in logging.tqdm(range(n_windows), disable=not show_progress, desc="coarse",
                                  leave=_leave_stage_bar()):
            first_step = index * config.sliding_window_len  # every item still here has made this many steps
            active = [item for item in items if item.n_steps > first_step]
            contexts = [self._window_context(item, first_step, config) for item in active]
            counts = [min(config.sliding_window_len, item.n_steps - first_step) for item in active]
            rows = None if window is None or cache is None else window.rows_continued_by(active, contexts)
            # Static (compiled) steps read the cache as one batch: there a window that some items go on is prefilled.
            if rows is not None and (all(row is None for row in rows) or (compile and None in rows)):
                rows = None
            n_new = max(counts)
            ids, pads = self._generate_window(contexts, config, first_step, n_new, cache, compile, saw_nan,
                                              None if rows is None else (window, rows))
            window = _CoarseWindow(active, ids, pads)
            for item, tokens, count in zip(active, ids[:, -n_new:], counts, strict=True):
                item.coarse = torch.cat([item.coarse, tokens[:count]])
        raise_if_nan(saw_nan, "coarse", config.temperature)

        n_codebooks = config.n_coarse_codebooks
        offsets = coarse_codebook_offsets(config, self.device)
        codes = [(item.coarse[item.n_coarse_history :].view(-1, n_codebooks).T - offsets[:, None]) for item in items]
        lengths = torch.tensor([code.shape[-1] for code in codes], dtype=torch.long, device=self.device)
        return BarkHfStageOutput(sequences=_pad_stack(codes, config.codebook_size), lengths=lengths)

    @staticmethod
    def _longest_window(config: BarkHfCoarseGenerationConfig) -> int:
        """The longest window: semantic prompt, infer token, history, then new tokens (the last not fed back)."""
        return config.max_coarse_input_length + 1 + config.max_coarse_history + config.sliding_window_len

    def check_call_positions(self, config: BarkHfCoarseGenerationConfig) -> None:
        self._check_positions(self._longest_window(config) - 1, f"max_coarse_history={config.max_coarse_history} "
                                                                f"with sliding_window_len={config.sliding_window_len}")

    def _start_item(
        self, semantic: torch.Tensor, prompt: Mapping[str, Any] | None, config: BarkHfCoarseGenerationConfig
    ) -> _CoarseItem:
        """An item's aligned semantic and coarse histories and its step count, as bark/generation.py sets them up."""
        device = semantic.device
        ratio = config.semantic_to_coarse_ratio
        if semantic.numel() == 0:
            logger.warning("An item has no semantic tokens (end of speech came first); its audio is empty.")
        semantic_history = _prompt_tensor(prompt, "semantic_prompt", device)
        coarse_history = _prompt_tensor(prompt, "coarse_prompt", device)
        if semantic_history is None:
            semantic_history = _empty_tokens(device)
            coarse_flat = _empty_tokens(device)
        else:
            coarse_flat = coarse_flat_tokens(coarse_history, config)  # [2m]: frame by frame
            # Keep histories aligned in time: equal spans of semantic and coarse tokens.
            n_semantic = min(
                int(math.floor(config.max_coarse_history / ratio)),
                semantic_history.shape[0] - semantic_history.shape[0] % 2,
                int(math.floor(coarse_flat.shape[0] / ratio)),
            )
            n_coarse = int(round(n_semantic * ratio))
            semantic_history = semantic_history[-n_semantic:]
            coarse_flat = coarse_flat[-n_coarse:][:-2]  # the original drops two tokens: "sounds better"
        n_codebooks = config.n_coarse_codebooks
        n_steps = int(round(math.floor(semantic.shape[0] * ratio / n_codebooks) * n_codebooks))
        return _CoarseItem(
            semantic=torch.cat([semantic_history, semantic]),
            coarse=coarse_flat,
            n_semantic_history=semantic_history.shape[0],
            n_coarse_history=coarse_flat.shape[0],
            n_steps=n_steps,
        )

    @staticmethod
    def _window_context(item: _CoarseItem, step: int, config: BarkHfCoarseGenerationConfig) -> torch.Tensor:
        """The input of the window that starts at `step`: `[semantic window (256), infer, coarse history]`."""
        semantic_index = item.n_semantic_history + int(round(step / config.semantic_to_coarse_ratio))
        prompt = coarse_window_prompt(item.semantic, semantic_index, config)  # [257]
        return torch.cat([prompt, item.coarse[-config.max_coarse_history :]])  # [257 + history]

    def _generate_window(
        self,
        contexts: list[torch.Tensor],
        config: BarkHfCoarseGenerationConfig,
        first_step: int,
        n_steps: int,
        cache: BarkHfKVCache | None,
        compile: bool,
        saw_nan: torch.Tensor,
        previous: tuple[_CoarseWindow, list[int | None]] | None = None,
    ) -> tuple[torch.Tensor, list[int]]:
        """`n_steps` new tokens after each of `contexts` (1-D, any lengths), from step `first_step`: the window's
        tokens `[B, pads + context + n_steps]` and each row's left padding.

        The contexts are left-padded to the longest, with an attention mask and positions that start
        at 0 at each item's first real token, as each item's own input would. One prefill into the
        emptied `cache` (None: no cache), then one token per step. Without padding (a batch of one, or
        equal lengths) there is no mask, and the SDPA calls are the original's.
        `previous`, a window and the row of it that each context is, or None for one that is not
        (`_CoarseWindow.rows_continued_by`), replaces the prefill with one step on from the cache that window left:
        the same values, rounded in another order. Where only some items go on, those take that step and the
        others a prefill, each part as the item's own run would (`_start_window_in_parts`).
        """
        n_codebooks, codebook_size = config.n_coarse_codebooks, config.codebook_size
        pad_token = config.coarse_semantic_pad_token
        all_go_on = previous is not None and None not in previous[1]
        if all_go_on:
            window, rows = previous
            pads = [window.pads[row] for row in rows]
            unused = min(pads)  # columns of padding alone, once the longest items have left
            pads = [pad - unused for pad in pads]
            cache.keep(rows, unused)
            known = window.ids[rows, unused:]
            ids = torch.cat([known, known.new_full((len(rows), n_steps), pad_token)], dim=1)
            longest = known.shape[1]
        else:
            longest = max(context.shape[0] for context in contexts)
            ids = contexts[0].new_full((len(contexts), longest + n_steps), pad_token)
            for row, context in enumerate(contexts):
                ids[row, longest - context.shape[0] : longest] = context  # [B, longest + n_steps]: left-padded
            pads = [longest - context.shape[0] for context in contexts]
            if cache is not None and previous is None:
                cache.reset()
        pad_column = _int_column(pads, ids.device)  # [B, 1]
        mask, positions = _left_padding(pads, ids.shape[1], ids.device)  # [B, longest + n_steps] each, or None

        for offset in range(n_steps):
            end = longest + offset  # the tokens known so far
            first_code = config.semantic_vocab_size + (first_step + offset) % n_codebooks * codebook_size
            codebook = slice(first_code, first_code + codebook_size)  # this step's codebook: its logits alone
            if offset == 0 and previous is not None and not all_go_on:
                logits = self._start_window_in_parts(*previous, ids[:, :end], pads, cache, codebook)  # [B, 1024]
            elif cache is None or (offset == 0 and previous is None):  # the whole input: a prefill, or no cache
                logits = self._next_logits(self.input_embeds_layer(ids[:, :end]), cache,
                                           None if mask is None else mask[:, :end],
                                           None if positions is None else positions[:, :end], codebook)  # [B, 1024]
            else:
                logits = self._decode(ids[:, end - 1 : end], cache, pad_column, compile,
                                      None if mask is None else mask[:, :end],
                                      None if positions is None else positions[:, end - 1 : end], codebook)
            probs = sampling_probabilities(logits, config.temperature, config.top_k, config.top_p)
            ids[:, end] = sample_tokens(probs, saw_nan)[:, 0] + first_code
        return ids, pads

    def _start_window_in_parts(self, window: _CoarseWindow, rows: list[int | None], known: torch.Tensor,
                               pads: list[int], cache: BarkHfKVCache, codebook: slice) -> torch.Tensor:
        """The first logits `[B, 1024]` of a window where the items with a row go on from `window`'s cache and the
        others start afresh (both parts non-empty), `known` `[B, T]` being their inputs left-padded by `pads`. Each
        part runs as the items' own runs do (one step on from the cache; a prefill), not as a prefill of all: the
        items that go on skip a prefill, and on a CPU each item keeps its own values bit for bit. Then `cache` holds
        every item, left-padded as `known`."""
        going_on = [item for item, row in enumerate(rows) if row is not None]
        starting = [item for item, row in enumerate(rows) if row is None]
        assert going_on and starting, "a window that all or none of the items go on is not one of parts"
        old_pads = [window.pads[rows[item]] for item in going_on]
        unused = min(old_pads)  # columns of padding alone for the items that go on
        cache.keep([rows[item] for item in going_on], unused)
        step_pads = [pad - unused for pad in old_pads]
        step_mask, step_positions = _left_padding(step_pads, cache.length + 1, known.device)
        logits_going_on = self._decode(known[going_on, -1:], cache, _int_column(step_pads, known.device),
                                       compile=False, attention_mask=step_mask,
                                       position_ids=None if step_positions is None else step_positions[:, -1:],
                                       vocab_rows=codebook)
        parts = [(going_on, list(cache))]  # each layer's (keys, values) [rows, H, length, D]

        first_column = min(pads[item] for item in starting)  # columns of padding alone for the items that start
        start_pads = [pads[item] - first_column for item in starting]
        start_mask, start_positions = _left_padding(start_pads, known.shape[1] - first_column, known.device)
        start_cache = BarkHfKVCache(len(self.layers), storage_dtype=cache.storage_dtype)
        logits_starting = self._next_logits(self.input_embeds_layer(known[starting, first_column:]), start_cache,
                                            start_mask, start_positions, codebook)
        parts.append((starting, list(start_cache)))

        cache.reset()
        for layer in range(len(self.layers)):  # each item's positions end at the window's last known one
            keys_and_values = []
            for kind in (0, 1):  # keys, then values
                first_part = parts[0][1][layer][kind]  # [rows, H, length, D]
                batch, heads, head_dim = known.shape[0], first_part.shape[1], first_part.shape[3]
                merged = first_part.new_zeros(batch, heads, known.shape[1], head_dim)
                for items, layers in parts:
                    for row, item in enumerate(items):
                        filled = known.shape[1] - pads[item]
                        merged[item, :, pads[item] :] = layers[layer][kind][row, :, -filled:]
                keys_and_values.append(merged)
            cache.update(layer, *keys_and_values)
        logits = logits_going_on.new_empty(known.shape[0], logits_going_on.shape[1])
        logits[going_on], logits[starting] = logits_going_on, logits_starting
        return logits


def _left_padding(pads: list[int], length: int,
                  device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The attention mask `[B, length]` of rows left-padded by `pads`, and positions that start at 0 at each row's
    first real token, as the row's own input has them; (None, None) without padding."""
    if not any(pads):
        return None, None
    mask = torch.arange(length, device=device)[None] >= _int_column(pads, device)  # [B, length]
    return mask, (mask.cumsum(dim=-1) - 1).clamp(min=0)


def fine_loss(logits: torch.Tensor, labels: torch.Tensor, config: BarkHfFineGenerationConfig,
              num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy over the codes the fine stage reads (the first `codebook_size` logits), every frame
    on its own: `logits` `[B, T, V]`, `labels` `[B, T]` (the model is non-causal, so nothing is shifted).
    """
    size = config.codebook_size
    labels = _checked_labels(labels, 0, size, f"codes (0..{size - 1})")
    return _cross_entropy(logits[..., :size].flatten(0, 1), labels.flatten(), num_items_in_batch)


def _one_codebook(codebook_idx: Any) -> int:
    """The codebook a fine pass predicts, as an int: a whole number, or a tensor of one repeated value (a collator
    passes a 0-d tensor, which the Trainer can count). int() truncated 4.7 to 4, training another head unasked,
    and a tensor of one index per row failed as "only one element tensors can be converted to Python scalars".
    """
    if isinstance(codebook_idx, torch.Tensor):
        values = codebook_idx.unique()
        if codebook_idx.is_floating_point() or codebook_idx.is_complex() or codebook_idx.dtype == torch.bool or \
                values.numel() != 1:
            raise ValueError(f"codebook_idx must be one whole number for the whole batch (the model predicts one "
                             f"codebook per pass), got a {codebook_idx.dtype} tensor holding {values.tolist()[:8]}. "
                             "Batch rows of the same codebook together, as bark_hf.training.BarkHfFineCollator does.")
        return int(values[0])
    if not is_number(codebook_idx, numbers.Integral):
        raise ValueError(f"codebook_idx must be a whole number (the codebook this pass predicts), got "
                         f"{codebook_idx!r}.")
    return int(codebook_idx)


@dataclass
class _FineItem:
    """One batch item in the fine stage's layout."""

    codes: torch.Tensor  # [L, 8]: preset history, the item's frames, padding; codebook_size = not predicted yet
    n_history: int
    length: int  # frames of the item itself
    n_windows: int


class BarkHfFineModel(BarkHfPreTrainedModel):
    """Non-causal GPT that fills in codebooks 3-8 from the coarse two, one codebook per pass."""

    config_class = BarkHfFineConfig
    base_model_prefix = "fine_acoustics"
    main_input_name = "codebook_idx"
    generation_config_class = BarkHfFineGenerationConfig

    def __init__(self, config: BarkHfFineConfig):
        super().__init__(config)
        self.input_embeds_layers = nn.ModuleList(
            [nn.Embedding(config.input_vocab_size, config.hidden_size) for _ in range(config.n_codes_total)]
        )
        self.position_embeds_layer = nn.Embedding(config.block_size, config.hidden_size)
        self.drop = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList([BarkHfBlock(config, is_causal=False) for _ in range(config.num_layers)])
        self.layernorm_final = nn.LayerNorm(config.hidden_size)
        n_heads = config.n_codes_total - config.n_codes_given
        self.lm_heads = nn.ModuleList(
            [nn.Linear(config.hidden_size, config.output_vocab_size, bias=False) for _ in range(n_heads)]
        )
        # Head i predicts codebook n_codes_given + i but shares its matrix with embedding i + 1, as the original
        # FineGPT and transformers' Bark tie them: the same codebook's only when n_codes_given is 1 (Bark's).
        self._tied_weights_keys = {
            f"lm_heads.{i}.weight": f"input_embeds_layers.{i + 1}.weight" for i in range(n_heads)
        }
        self.generation_config = self.generation_config_class()
        self.post_init()

    def get_input_embeddings(self) -> nn.ModuleList:
        return self.input_embeds_layers

    def enable_input_require_grads(self) -> None:
        """Make every codebook's embedding output require gradients, as transformers does for one embedding
        (peft and reentrant gradient checkpointing call this). transformers hooks `get_input_embeddings()`, here a
        ModuleList that is never called, so with frozen weights no gradient reached the adapters."""
        def make_output_require_grad(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            output.requires_grad_(True)

        self.disable_input_require_grads()
        self._require_grads_hooks = [layer.register_forward_hook(make_output_require_grad)
                                     for layer in self.input_embeds_layers]

    def set_input_embeddings(self, value: nn.ModuleList) -> None:
        self.input_embeds_layers = value

    def activation_checkpointing_enable(self, *args: Any, **kwargs: Any) -> None:
        """Also make the embeddings' outputs require gradients, as transformers does only for models whose main input
        is `input_ids` (this one's is `codebook_idx`). Otherwise adapters wrapped by peft before checkpointing was
        enabled (as the Trainer does) got no gradient under reentrant checkpointing: backward raised that no tensor
        required grad."""
        super().activation_checkpointing_enable(*args, **kwargs)
        self.enable_input_require_grads()

    def forward(
        self,
        codebook_idx: int | torch.Tensor,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        return_dict: bool | None = None,
        labels: torch.LongTensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> MaskedLMOutput | tuple:
        """Logits `[B, T, V]` for codebook `codebook_idx`, given codes `[B, T, 8]`: codebooks
        `0..codebook_idx - 1` are known, and codebook `codebook_idx` holds `codebook_size` ("not
        predicted yet") in the frames to predict. `attention_mask` `[B, T]` marks real frames.

        `labels` `[B, T]` (codes of codebook `codebook_idx`, -100 where there is no target) add
        `fine_loss`; `bark_hf.training.BarkHfFineCollator` builds inputs, labels and `codebook_idx`.
        `num_items_in_batch` comes from the Trainer (see `_cross_entropy`). `inputs_embeds`, `output_attentions` and
        `output_hidden_states` are accepted as peft's task wrappers pass them, but only as None (or False).
        """
        _refuse_attention_outputs(output_attentions, output_hidden_states)
        if inputs_embeds is not None:
            raise ValueError("The fine stage embeds each codebook of input_ids [B, T, 8] with its own table; pass "
                             "input_ids, not inputs_embeds.")
        codebook_idx = _one_codebook(codebook_idx)
        if not self.config.n_codes_given <= codebook_idx < self.config.n_codes_total:
            raise ValueError(
                f"codebook_idx must be in [{self.config.n_codes_given}, {self.config.n_codes_total}), "
                f"got {codebook_idx}."
            )
        n_codebooks = self.config.n_codes_total
        if input_ids.dim() != 3 or input_ids.shape[-1] != n_codebooks:
            raise ValueError(f"input_ids must be [B, T, {n_codebooks}] (every codebook of each frame); got shape "
                             f"{tuple(input_ids.shape)}.")
        if attention_mask is not None and attention_mask.shape != input_ids.shape[:2]:
            raise ValueError(f"attention_mask must be [B, T] = {tuple(input_ids.shape[:2])}; got "
                             f"{tuple(attention_mask.shape)}.")
        length = input_ids.shape[1]
        if length > self.config.block_size:
            raise ValueError(f"Sequence of {length} frames exceeds block_size ({self.config.block_size}).")
        refuse_int8_loss_gradients(self, labels)
        # Codes past the embeddings failed with a bare IndexError (a device assert on CUDA). The check waits for
        # the device, so on one it runs with labels (whose check waits anyway), not in generate's passes.
        if labels is not None or input_ids.device.type == "cpu":
            vocab_size = self.config.input_vocab_size
            _check_token_values(input_ids, None, vocab_size, "input_ids", f"codes of the {vocab_size}-entry input "
                                f"vocabulary, {self.generation_config.codebook_size} where a code is not predicted "
                                "yet")
        embeds = torch.cat(
            [layer(input_ids[:, :, i]).unsqueeze(-1) for i, layer in enumerate(self.input_embeds_layers)], dim=-1
        )  # [B, T, C, 8]
        hidden_states = embeds[:, :, :, : codebook_idx + 1].sum(dim=-1)  # [B, T, C]: the known codebooks
        positions = torch.arange(length, device=input_ids.device)[None]  # [1, T]
        hidden_states = self.drop(hidden_states + self.position_embeds_layer(positions))
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]  # [B, 1, 1, T]
        for block in self.layers:
            hidden_states = block(hidden_states, mask)
        hidden_states = self.layernorm_final(hidden_states)
        logits = project(self.lm_heads[codebook_idx - self.config.n_codes_given], hidden_states)  # [B, T, V]
        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape[:2]:
                raise ValueError(f"labels must be [B, T] = {tuple(input_ids.shape[:2])}, got {tuple(labels.shape)}.")
            loss = fine_loss(logits, labels.to(logits.device), self.generation_config, num_items_in_batch)
        if return_dict is False:
            return (logits,) if loss is None else (loss, logits)
        return MaskedLMOutput(loss=loss, logits=logits)

    @torch.no_grad()
    @_generation_method
    def generate(
        self,
        coarse_tokens: torch.LongTensor,
        coarse_lengths: torch.Tensor | None = None,
        history_prompt: HistoryPrompt = None,
        generation_config: BarkHfFineGenerationConfig | None = None,
        show_progress: bool = False,
        **settings: Any,
    ) -> BarkHfStageOutput:
        """All eight codebooks `[B, 8, T]` (padded with `codebook_size`) from coarse codes
        `[B, K, T]` (K < 8, each item valid up to `coarse_lengths`). `temperature=None` takes the argmax.
        Follows bark/generation.py `generate_fine`.

        Window `i` of every item that has one runs as one batch. Each is a whole window of
        `max_fine_input_length` frames (the original pads every item to one), so no mask is needed.
        """
        config = self._call_generation_config(generation_config, settings)
        self.check_call_positions(config)
        show_progress = checked_flag(show_progress, "show_progress")
        window, hop = config.max_fine_input_length, config.fine_window_hop
        coarse_tokens = _checked_tokens(coarse_tokens, "coarse_tokens", "[B, K, T]")
        n_given = coarse_tokens.shape[1]
        if not self.config.n_codes_given <= n_given <= config.n_fine_codebooks:
            raise ValueError(f"coarse_tokens must hold {self.config.n_codes_given} to {config.n_fine_codebooks} "
                             f"codebooks ([B, K, T]); got K = {n_given} (shape {tuple(coarse_tokens.shape)}).")
        coarse_lengths = _checked_lengths(coarse_lengths, coarse_tokens, "coarse_lengths", "coarse_tokens")
        _check_token_values(coarse_tokens, _length_mask(coarse_lengths, coarse_tokens), config.codebook_size,
                            "coarse_tokens", f"codes of {config.codebook_size}-entry codebooks (pass coarse_lengths "
                            "to leave out the padding after each item's end)")
        coarse = _valid_items(coarse_tokens, coarse_lengths, self.device)
        prompts = _per_item(history_prompt, len(coarse))
        items = [self._start_item(codes, prompt, config) for codes, prompt in zip(coarse, prompts, strict=True)]
        n_windows = max((item.n_windows for item in items), default=0)
        saw_nan = torch.zeros((), dtype=torch.bool, device=self.device)
        for index in logging.tqdm(range(n_windows), disable=not show_progress, desc="fine",
                                  leave=_leave_stage_bar()):
            active = [item for item in items if item.n_windows > index]
            starts = [min(index * hop, item.codes.shape[0] - window) for item in active]
            fill_starts = [min(item.n_history + index * hop, item.codes.shape[0] - hop) for item in active]
            windows = [item.codes[start : start + window] for item, start in zip(active, starts, strict=True)]
            buffer = torch.stack(windows)  # [B_i, 1024, 8]
            relative_fills = [fill - start for fill, start in zip(fill_starts, starts, strict=True)]
            self._fill_window(buffer, config, n_given, relative_fills, saw_nan)
            for item, row, start, fill in zip(active, buffer, starts, fill_starts, strict=True):
                # Rows the next window covers again are predicted again there; the last write wins.
                item.codes[fill : start + window, n_given:] = row[fill - start :, n_given:]
        raise_if_nan(saw_nan, "fine", config.temperature)
        codes = [item.codes.T[:, item.n_history : item.n_history + item.length] for item in items]  # [8, T] each
        lengths = torch.tensor([item.length for item in items], dtype=torch.long, device=self.device)
        return BarkHfStageOutput(sequences=_pad_stack(codes, config.codebook_size), lengths=lengths)

    def check_call_positions(self, config: BarkHfFineGenerationConfig) -> None:
        # Every window is a whole one: a longer one than the position embeddings failed in forward, after the
        # semantic and coarse stages had run, without naming the setting.
        self._check_positions(config.max_fine_input_length, f"max_fine_input_length={config.max_fine_input_length}")

    @staticmethod
    def _start_item(
        coarse: torch.Tensor, prompt: Mapping[str, Any] | None, config: BarkHfFineGenerationConfig
    ) -> _FineItem:
        """One item's codes `[L, 8]`: preset history, its coarse frames, padding up to one whole window."""
        device = coarse.device
        n_given, length = coarse.shape
        n_total, window = config.n_fine_codebooks, config.max_fine_input_length
        codes = torch.cat([coarse, torch.full((n_total - n_given, length), config.codebook_size, device=device)])
        history = _prompt_tensor(prompt, "fine_prompt", device)
        n_history = 0
        if history is not None:
            history = history[:, -config.max_fine_history_length :]
            n_history = history.shape[1]
            codes = torch.cat([history, codes], dim=1)  # [8, history + T]
        n_padding = max(0, window - codes.shape[1])  # the model is non-causal: fill one whole window
        codes = F.pad(codes, (0, n_padding), value=config.codebook_size).T.contiguous()  # [L, 8]
        return _FineItem(codes=codes, n_history=n_history, length=length,
                         n_windows=fine_window_count(length, config, n_history))

    def _fill_window(
        self, buffer: torch.Tensor, config: BarkHfFineGenerationConfig, n_given: int, fill_starts: list[int],
        saw_nan: torch.Tensor,
    ) -> None:
        """Predict codebooks `n_given..7` of `buffer` `[B, window, 8]` in place, in item `b` from row
        `fill_starts[b]` on: one forward pass per codebook for the whole batch. A NaN logit (greedy) or
        probability (sampled) is or-ed into `saw_nan`, which `generate` reads once at the end (reading it
        here made the host wait for the GPU before every codebook).
        """
        window = buffer.shape[1]
        for codebook in range(n_given, config.n_fine_codebooks):
            logits = self(codebook, buffer).logits[..., : config.codebook_size]  # [B, window, 1024]
            rows = torch.cat([item[fill:] for item, fill in zip(logits, fill_starts, strict=True)])  # [rows, 1024]
            if config.temperature is None:
                saw_nan |= rows.isnan().any().to(saw_nan.device)  # argmax would take a NaN as the largest logit
                predicted = rows.argmax(dim=-1)
            else:
                probs = torch.softmax(rows / config.temperature, dim=-1)
                predicted = sample_tokens(probs, saw_nan)[:, 0]  # row by row, as the original
            per_item = predicted.split([window - fill for fill in fill_starts])
            for row, (item_predicted, fill) in enumerate(zip(per_item, fill_starts, strict=True)):
                buffer[row, fill:, codebook] = item_predicted


class BarkHfModel(BarkHfPreTrainedModel):
    """The whole text-to-audio model: semantic -> coarse -> fine GPTs, then EnCodec's decoder."""

    config_class = BarkHfConfig
    auto_classes = ("AutoModel", "AutoModelForTextToWaveform")
    main_input_name = "input_ids"
    generation_config_class = BarkHfGenerationConfig
    STAGE_PREFIXES = ("semantic", "coarse", "fine")
    STAGE_MODULES = ("semantic", "coarse_acoustics", "fine_acoustics", "codec_model")
    """The four stages in the order `generate` runs them, by attribute name."""
    # Device maps keep these whole. EnCodec is small (about 60 MB) and decoded through its submodules,
    # outside `forward`, where accelerate's offload hooks never run (see `_ready_for_device_map`). The fine
    # stage's heads are tied to its embeddings, and transformers' device-map planner fails
    # ("list index out of range") when a budget boundary falls inside that tied group.
    _no_split_modules = ["BarkHfBlock", "BarkHfFineModel", "EncodecModel"]

    def __init__(self, config: BarkHfConfig):
        super().__init__(config)
        self.semantic = BarkHfSemanticModel(config.semantic_config)
        self.coarse_acoustics = BarkHfCoarseModel(config.coarse_acoustics_config)
        self.fine_acoustics = BarkHfFineModel(config.fine_acoustics_config)
        self.codec_model = AutoModel.from_config(config.codec_config, dtype=torch.float32)
        self.offload_device: torch.device | None = None  # set by enable_cpu_offload
        self.offload_stages: tuple[str, ...] = ()
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any,
                        **kwargs: Any) -> BarkHfModel | tuple[BarkHfModel, dict[str, Any]]:
        """transformers' `from_pretrained`, ready to generate under any `device_map` (with `max_memory`,
        `offload_folder`) and with `dtype=torch.float16` or `torch.bfloat16` (the codec stays float32).
        """
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True
        if getattr(model, "hf_device_map", None):
            model._ready_for_device_map()
        return loaded

    def _ready_for_device_map(self) -> None:
        """Fix up what accelerate's dispatch leaves unfit for generation.

        - A fine head and the embedding it shares a weight with must sit on one device: offloaded
          apart, the head's hook finds no weight to load. Refuse such a map.
        - The codec's weights may wait on disk or the CPU for hooks that never run (decoding does not
          call its `forward`): load them onto its execution device and drop its hooks.
        - A stage split over several devices returns its logits from the last one while its loop keeps
          tokens on the first: bring forward outputs back to the input's device (the KV cache stays put).
        """
        from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module
        from accelerate.utils import has_offloaded_params, named_module_tensors, set_module_tensor_to_device

        for tied, source in self.all_tied_weights_keys.items():
            devices = [_mapped_device(self.hf_device_map, name) for name in (tied, source)]
            if devices[0] != devices[1]:
                raise ValueError(
                    f"The device map puts {tied} ({devices[0]}) and {source} ({devices[1]}) on different devices, "
                    "but they share one weight; map them together, e.g. all of 'fine_acoustics' to one device."
                )
        codec_device = execution_device(self.codec_model)
        for module in self.codec_model.modules():
            if has_offloaded_params(module):
                hook = module._hf_hook
                for name, _ in named_module_tensors(module, include_buffers=hook.offload_buffers,
                                                    recurse=hook.place_submodules, remove_non_persistent=True):
                    set_module_tensor_to_device(module, name, codec_device, value=hook.weights_map[name])
        remove_hook_from_module(self.codec_model, recurse=True)
        self.codec_model.to(codec_device)

        for stage in (self.semantic, self.coarse_acoustics, self.fine_acoustics):
            devices = {execution_device(module) for module in stage.modules() if hasattr(module, "_hf_hook")}
            if len(devices) > 1:
                add_hook_to_module(stage, AlignDevicesHook(io_same_device=True, skip_keys=["cache"]), append=True)

    def quantize_int8(self) -> BarkHfModel:
        """Store the GPT stages' linear layers as int8 (dynamic quantisation), in place, for CPU inference.

        One-token decoding reads every weight once per step, so a quarter of the bytes makes it faster on a
        CPU, and the KV cache is kept in float16 for the kernel's steps (`_cache_storage_dtype`); the codec stays
        float32. Prefills quantise
        their activations per pass (PyTorch's dynamic quantisation); decoding steps through bark-hf's CPU
        kernels (`BarkHfBlock.cpu_step`) multiply float32 activations with the int8 weights instead, which is
        faster and nearer float32. The coarse head stays float32 too: a step reads only one
        codebook's 1 024 of its rows (`_head_logits`), fewer bytes than the whole head in int8. Greedy
        tokens may differ from float32 ones (see docs/performance.md). The semantic and coarse stages' int8 weights
        are also kept in the kernel's tiles (a second copy of their int8 bytes, made here rather than at every
        `generate`) where the CPU kernels run. A prefill's one activation scale per
        layer input also makes an item's tokens depend on the other items of a batch, and a run with the KV
        cache differ from one without it (a prompt and a one-token step are computed apart). A quantised
        model is for eager generation only (it is left in eval mode): training, a loss with autograd on, moving,
        casting or saving it raises an error, and it cannot be compiled.
        """
        if getattr(self, "hf_device_map", None):
            raise ValueError("quantize_int8() is for models wholly on the CPU without a device map; load the model "
                             "without device_map.")
        # Every parameter, not only the first: a stage elsewhere failed deep in torch, after earlier stages were
        # quantised.
        if any(parameter.device.type != "cpu" for parameter in self.parameters()):
            raise ValueError("quantize_int8() is for models wholly on the CPU; move the model there first "
                             "(model.to('cpu')).")
        if not all(parameter.dtype == torch.float32 for parameter in self.parameters()):
            raise ValueError("quantize_int8() needs a float32 model; load it without dtype=.")
        # peft reads its layers' `weight.dtype`, which an int8 layer has not: generate failed deep inside.
        refuse_unmerged_adapters(self, "which cannot run int8", "and quantise the merged model")
        if self.offload_device is not None:  # generate would move the int8 stages to the accelerator
            raise ValueError(f"quantize_int8(): enable_cpu_offload() moves this model's stages to "
                             f"{self.offload_device}, but int8 layers run on the CPU only; load the model again and "
                             "quantise it without enable_cpu_offload().")
        with warnings.catch_warnings():  # torch marks torch.ao deprecated; 2.13 still ships it, fast
            warnings.simplefilter("ignore", (DeprecationWarning, UserWarning))
            for stage in (self.semantic, self.coarse_acoustics, self.fine_acoustics):
                int8_layers = {name: torch.ao.quantization.default_dynamic_qconfig
                               for name, module in stage.named_modules() if type(module) is nn.Linear
                               and not (stage is self.coarse_acoustics and name == "lm_head")}
                torch.ao.quantization.quantize_dynamic(stage, int8_layers, dtype=torch.qint8, inplace=True)
        self.eval()  # int8 layers get no gradients, so training mode (see `train`) would train the rest only
        # The decoding stages' weights as the block kernel reads them, once (`_kernel_linear`), where it runs.
        if cpu_kernels_wanted() and cpu_block_step() is not None:
            for block in (*self.semantic.layers, *self.coarse_acoustics.layers):
                block._prepared_for_cpu_steps()
        return self

    def enable_cpu_offload(self, accelerator_device: str | torch.device | int | None = None,
                           stages: Sequence[str] = STAGE_MODULES, *, accelerator_id: int | None = None) -> None:
        """Keep every stage on the CPU and move each of `stages` to `accelerator_device` only while it runs.

        `generate` then holds one stage at a time on the accelerator (semantic, coarse, fine, then the
        codec), as the original's `SUNO_OFFLOAD_CPU`: peak accelerator memory is the largest stage plus
        its activations, at the price of a host-to-device copy per stage and call. The default device is
        the current CUDA device. Stages left out of `stages` (names from `STAGE_MODULES`, or one name) run
        on the CPU, as the original's stages with `use_gpu=False` do. Outputs stay where the last stage ran.
        `accelerator_id` is transformers' Bark's way to name the device: an index on the current accelerator.
        """
        if accelerator_id is not None:
            if accelerator_device is not None:
                raise ValueError("enable_cpu_offload: pass accelerator_device or accelerator_id, not both.")
            if not is_number(accelerator_id, numbers.Integral) or accelerator_id < 0:
                raise ValueError(f"enable_cpu_offload: accelerator_id must be a device index >= 0; got "
                                 f"{accelerator_id!r}.")
            kind = torch.accelerator.current_accelerator() or torch.device("cuda")
            accelerator_device = torch.device(kind.type, int(accelerator_id))
        if isinstance(stages, str):  # one stage, not its letters
            stages = (stages,)
        unknown = sorted(set(stages) - set(self.STAGE_MODULES))
        if unknown:
            raise ValueError(f"enable_cpu_offload: unknown stages {unknown}; choose from {list(self.STAGE_MODULES)}.")
        if getattr(self, "hf_device_map", None):
            raise ValueError("This model was loaded with a device_map, which already places (and offloads) its "
                             "weights; load it without device_map to use enable_cpu_offload().")
        if holds_int8_layers(self):
            raise ValueError("enable_cpu_offload(): this model's linear layers are int8 (quantize_int8()), which run "
                             "on the CPU only; use the float32 model (or half precision) with offload instead.")
        if accelerator_device is None:
            if not torch.cuda.is_available():
                raise ValueError("enable_cpu_offload() found no CUDA device; pass accelerator_device, e.g. 'mps'.")
            accelerator_device = torch.device("cuda", torch.cuda.current_device())
        try:
            device = torch.device(accelerator_device)
            torch.empty(0, device=device)  # here, not at the first generate: is the device there?
        except (RuntimeError, AssertionError) as error:  # torch without CUDA asserts
            raise ValueError(f"enable_cpu_offload({accelerator_device!r}): this torch cannot use that device "
                             f"({error}).") from None
        if device.type == "meta":
            raise ValueError("enable_cpu_offload('meta'): the meta device holds no weights; pass one that computes.")
        self.offload_device, self.offload_stages = device, tuple(stages)
        self.to("cpu")

    @contextlib.contextmanager
    def offload_scope(self) -> Iterator[None]:
        """Inside, move stages with `offload_all_but`; on leaving, even by an error or Ctrl-C, every stage
        is back on the CPU (a no-op unless `enable_cpu_offload` is on)."""
        try:
            yield
        finally:
            self.offload_all_but(None)

    def offload_all_but(self, running: nn.Module | None) -> None:
        """Under `enable_cpu_offload`, move `running` to the accelerator and every other stage to the CPU."""
        if self.offload_device is None:
            return
        for name in self.STAGE_MODULES:
            if getattr(self, name) is not running:
                getattr(self, name).to("cpu")  # first, so the accelerator never holds two stages
        if any(running is getattr(self, name) for name in self.offload_stages):
            running.to(self.offload_device)

    @property
    def generation_config(self) -> BarkHfGenerationConfig:
        """The stages' own generation configs, viewed together (no copy): see `BarkHfGenerationConfig.view_of`."""
        return BarkHfGenerationConfig.view_of(self)

    @generation_config.setter
    def generation_config(self, value: BarkHfGenerationConfig) -> None:
        if "semantic" not in self._modules:  # set by PreTrainedModel before the stages exist
            return
        _checked_generation_config(value, BarkHfGenerationConfig, "a stage's own config is set on the stage (e.g. "
                                   "model.semantic.generation_config)")
        if value.sample_rate != self.sampling_rate:
            raise ValueError(f"generation_config.sample_rate is {value.sample_rate}, but this model's codec makes "
                             f"{self.sampling_rate} Hz audio; the rate is the codec's.")
        self.semantic.generation_config = value.semantic_config
        self.coarse_acoustics.generation_config = value.coarse_acoustics_config
        self.fine_acoustics.generation_config = value.fine_acoustics_config

    @property
    def sampling_rate(self) -> int:
        return self.config.codec_config.sampling_rate

    @torch.no_grad()
    def codec_decode(
        self, fine_tokens: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Audio `[B, samples]` float32 (zero past each item's end) and per-item sample counts from
        codes `[B, 8, T]`, each item valid up to `lengths`.

        Each item is decoded on its own frames, as bark/generation.py `codec_decode` does: a batched
        convolution rounds differently (about 1e-7), and an item of a batch must sound exactly as it
        does alone. The decoder is a small share of the time, so the loop costs little.

        Fewer than 8 codebooks (the coarse two, say) decode at a lower bandwidth. The codes are checked first: a
        code outside the codebooks failed with an IndexError inside EnCodec, codes `[B, T, 8]` decoded T codebooks,
        and `lengths` of another count, past `T` or negative gave fewer items or a bare RuntimeError.
        """
        fine_tokens = _checked_tokens(fine_tokens, "fine_tokens", "[B, 8, T]", allow_empty_batch=True)
        n_codebooks = self.fine_acoustics.generation_config.n_fine_codebooks
        if not 1 <= fine_tokens.shape[1] <= n_codebooks:
            raise ValueError(f"fine_tokens must hold 1 to {n_codebooks} codebooks ([B, {n_codebooks}, T], as the fine "
                             f"stage gives them); got shape {tuple(fine_tokens.shape)}.")
        lengths = _checked_lengths(lengths, fine_tokens, "lengths", "fine_tokens")
        codebook_size = self.config.codec_config.codebook_size
        _check_token_values(fine_tokens, _length_mask(lengths, fine_tokens), codebook_size, "fine_tokens",
                            f"codes of {codebook_size}-entry codebooks (pass lengths to leave out the padding after "
                            "each item's end)")
        batch = fine_tokens.shape[0]
        if lengths is None:
            lengths = torch.full((batch,), fine_tokens.shape[-1])
        device = self.codec_model.device
        audio_lengths = lengths.to("cpu", torch.long) * self.config.codec_config.hop_length
        audio = torch.zeros((batch, int(audio_lengths.max()) if batch > 0 else 0), dtype=torch.float32, device=device)
        for item, length in enumerate(lengths.tolist()):
            if length == 0:
                continue
            codes = fine_tokens[item, :, :length].to(device)[:, None]  # [8, 1, T]
            embeddings = self.codec_model.quantizer.decode(codes)  # [1, D, T]
            audio[item, : audio_lengths[item]] = self.codec_model.decoder(embeddings)[0, 0].float()  # [T * hop]
        return audio, audio_lengths

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        history_prompt: HistoryPrompt = None,
        return_dict_in_generate: bool = False,
        use_cache: bool | None = None,
        show_progress: bool = True,
        compile: bool | None = None,
        generation_config: BarkHfGenerationConfig | None = None,
        return_output_lengths: bool | None = None,
        **kwargs: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | BarkHfGenerationOutput:
        """Audio for tokenised text: `generate(**processor(text, voice_preset=...))`.

        Keyword arguments prefixed `semantic_`, `coarse_` or `fine_` reach that stage's generation
        config (`semantic_top_k=1`, `coarse_temperature=0.5`, `fine_temperature=None`, ...);
        `use_cache=False` turns the KV cache off everywhere; `compile=True` (default: the
        `BARK_HF_COMPILE` environment variable) decodes the semantic and coarse stages with
        `torch.compile`d one-token steps. `generation_config` (a `BarkHfGenerationConfig`) replaces the model's
        for this call; the prefixed settings apply on top of it. Returns audio `[B, samples]` float32,
        with `return_output_lengths=True` (transformers' Bark) a tuple of it and the samples of each item `[B]`,
        or with `return_dict_in_generate=True` (which wins over it) a `BarkHfGenerationOutput` with every stage's
        tokens and lengths.
        """
        # Before any work: a string such as "no" read as true. (The stages check show_progress.)
        return_dict_in_generate = checked_flag(return_dict_in_generate, "return_dict_in_generate")
        return_output_lengths = checked_flag(return_output_lengths, "return_output_lengths", "audio only")
        configs = self._stage_generation_configs(generation_config)
        stage_settings = self.split_stage_settings(kwargs, generation_config)
        with self.offload_scope():
            self.offload_all_but(self.semantic)
            semantic = self.semantic.generate(input_ids, attention_mask, history_prompt, use_cache=use_cache,
                                              show_progress=show_progress, compile=compile,
                                              generation_config=configs["semantic"], **stage_settings["semantic"])
            self.offload_all_but(self.coarse_acoustics)
            coarse = self.coarse_acoustics.generate(semantic.sequences, semantic.lengths, history_prompt,
                                                    use_cache=use_cache, show_progress=show_progress,
                                                    compile=compile, generation_config=configs["coarse"],
                                                    **stage_settings["coarse"])
            self.offload_all_but(self.fine_acoustics)
            fine = self.fine_acoustics.generate(coarse.sequences, coarse.lengths, history_prompt,
                                                show_progress=show_progress, generation_config=configs["fine"],
                                                **stage_settings["fine"])
            self.offload_all_but(self.codec_model)
            audio, audio_lengths = self.codec_decode(fine.sequences, fine.lengths)
        if not return_dict_in_generate:
            return (audio, audio_lengths) if return_output_lengths else audio
        return BarkHfGenerationOutput(
            audio=audio,
            audio_lengths=audio_lengths,
            semantic_tokens=semantic.sequences,
            semantic_lengths=semantic.lengths,
            coarse_tokens=coarse.sequences,
            coarse_lengths=coarse.lengths,
            fine_tokens=fine.sequences,
            fine_lengths=fine.lengths,
        )

    def _stage_generation_configs(self, generation_config: BarkHfGenerationConfig | None = None) -> dict[str, Any]:
        """The stage generation configs of `generation_config` (default: the model's), by stage prefix."""
        if generation_config is None:
            generation_config = self.generation_config
        _checked_generation_config(generation_config, BarkHfGenerationConfig, "copy the model's (copy.deepcopy("
                                   "model.generation_config)) and change its stage configs, or pass prefixed "
                                   "settings such as semantic_temperature=0.6")
        return {
            "semantic": generation_config.semantic_config,
            "coarse": generation_config.coarse_acoustics_config,
            "fine": generation_config.fine_acoustics_config,
        }

    def split_stage_settings(self, kwargs: dict[str, Any],
                             generation_config: BarkHfGenerationConfig | None = None) -> dict[str, dict[str, Any]]:
        """Route `semantic_x=...` to the semantic stage as `x=...` (or as `semantic_x` where that is the stage's
        field and `x` is not), and so on; refuse anything else, values the stage's generation config (from
        `generation_config`, default the model's) refuses, and windows longer than the stage's positions
        (`check_call_positions`). `generate` calls it; callers may, to check settings early.

        `do_sample` (every stage) and `semantic_do_sample`-style switches are transformers' Bark's: True keeps the
        stage configs' sampling, which is Bark's default; False decodes greedily (`_GREEDY_SETTINGS`) where the
        call sets nothing else for those fields.
        """
        settings: dict[str, dict[str, Any]] = {prefix: {} for prefix in self.STAGE_PREFIXES}
        configs = self._stage_generation_configs(generation_config)
        greedy: set[str] = set()
        for name, value in kwargs.items():
            prefix, _, setting = name.partition("_")
            if name == "do_sample" or (prefix in settings and setting == "do_sample"):
                if not checked_flag(value, name):
                    greedy |= set(settings) if name == "do_sample" else {prefix}
                continue
            if prefix not in settings or not setting:
                raise ValueError(f"Unknown generate argument {name!r}. {_unprefixed_fix(name, configs)}")
            if setting in _WHOLE_CALL_ARGUMENTS:  # not in the stage configs: the error listed their fields only
                raise ValueError(f"{name}: {setting} is an argument of the whole call, not a {prefix} stage setting; "
                                 f"pass {setting}=... without the prefix (or call the stage's own generate).")
            names = {item.name for item in fields(configs[prefix])}
            if setting not in names and name in names:  # named with its stage: semantic_rate_hz, fine_window_hop
                setting = name
            settings[prefix][setting] = value
        for prefix in greedy:
            for setting, value in _GREEDY_SETTINGS[prefix].items():
                settings[prefix].setdefault(setting, value)
        stages = dict(zip(self.STAGE_PREFIXES, self.STAGE_MODULES, strict=False))  # the codec has no settings
        for prefix, values in settings.items():
            try:
                call_config = configs[prefix].for_call(**values)
            except ValueError as error:
                raise ValueError(f"Unknown or invalid {prefix} setting: {error}") from None
            getattr(self, stages[prefix]).check_call_positions(call_config)
        return settings


_WHOLE_CALL_ARGUMENTS = ("use_cache", "compile", "show_progress", "history_prompt", "return_dict_in_generate",
                         "generation_config", "return_output_lengths")
_GREEDY_SETTINGS = {"semantic": {"top_k": 1}, "coarse": {"top_k": 1}, "fine": {"temperature": None}}
"""Each stage's greedy decoding, the deterministic settings under which tokens equal the original's."""


def _unprefixed_fix(name: str, configs: Mapping[str, Any]) -> str:
    """How to pass a generate argument given without a stage prefix (transformers' Bark takes `temperature=` or
    `max_new_tokens=` for every stage at once): the prefixed names of the stages that have it."""
    stages = [f"{prefix}_{name}" for prefix, config in configs.items() if name in config.call_settings()]
    if stages:
        return f"Bark's settings are per stage and take a stage prefix: pass {', '.join(stages)} instead."
    listed = [setting if setting.startswith(f"{prefix}_") else f"{prefix}_{setting}"  # fine_window_hop as it is
              for prefix, config in configs.items() for setting in config.call_settings()]
    return f"Stage settings take a stage prefix; they are: {', '.join(listed)}."


__all__ = [
    "BarkHfCoarseModel",
    "BarkHfFineModel",
    "BarkHfGenerationOutput",
    "BarkHfModel",
    "BarkHfPreTrainedModel",
    "BarkHfSemanticModel",
    "BarkHfStageOutput",
]
