"""Bark's four stages as transformers models.

Reads top-down: attention -> MLP -> block -> shared base -> causal GPT (semantic, coarse) ->
non-causal fine GPT -> composite with the EnCodec decoder. Parameter names equal those of
transformers' Bark port, so weights move between the two without renaming.

Each stage's `generate` is its own short loop that follows the original bark/generation.py
step for step: exact parity includes the order in which random numbers are drawn.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast, MaskedLMOutput
from transformers.utils import ModelOutput, cached_file, logging

from .configuration_bark_hf import (
    BarkHfCoarseConfig,
    BarkHfConfig,
    BarkHfFineConfig,
    BarkHfSemanticConfig,
)
from .generation_configuration_bark_hf import (
    GENERATION_CONFIG_NAME,
    BarkHfCoarseGenerationConfig,
    BarkHfFineGenerationConfig,
    BarkHfGenerationConfig,
    BarkHfSemanticGenerationConfig,
    load_generation_config,
    save_generation_config,
)

logger = logging.get_logger(__name__)

# A voice preset as the processor returns it: arrays under "semantic_prompt" ([n]),
# "coarse_prompt" ([2, m]) and "fine_prompt" ([8, m]); a list gives one per batch item.
HistoryPrompt = Mapping[str, Any] | Sequence[Mapping[str, Any] | None] | None
PastKeyValues = tuple[tuple[torch.Tensor, torch.Tensor], ...]


class BarkHfAttention(nn.Module):
    """Multi-head self-attention through `scaled_dot_product_attention`, causal or not."""

    def __init__(self, config: BarkHfSemanticConfig | BarkHfCoarseConfig | BarkHfFineConfig, is_causal: bool):
        super().__init__()
        self.num_heads = config.num_heads
        self.hidden_size = config.hidden_size
        self.dropout = config.dropout
        self.is_causal = is_causal
        self.att_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.bias)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        past_key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        batch, length, width = hidden_states.shape
        head_dim = width // self.num_heads
        query, key, value = self.att_proj(hidden_states).split(width, dim=2)
        query = query.view(batch, length, self.num_heads, head_dim).transpose(1, 2)  # [B, H, T, D]
        key = key.view(batch, length, self.num_heads, head_dim).transpose(1, 2)  # [B, H, T, D]
        value = value.view(batch, length, self.num_heads, head_dim).transpose(1, 2)  # [B, H, T, D]
        if past_key_value is not None:
            key = torch.cat((past_key_value[0], key), dim=-2)  # [B, H, past + T, D]
            value = torch.cat((past_key_value[1], value), dim=-2)  # [B, H, past + T, D]
        present = (key, value) if use_cache else None

        # The original calls SDPA with is_causal=True without a cache and is_causal=False for a
        # one-token step with one; keeping those exact calls keeps the floating point identical.
        is_causal = self.is_causal and attention_mask is None and past_key_value is None
        if self.is_causal and attention_mask is None and past_key_value is not None and length > 1:
            total = key.shape[-2]
            attention_mask = torch.ones(length, total, dtype=torch.bool, device=key.device).tril(total - length)
        dropout = self.dropout if self.training else 0.0
        attended = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, is_causal=is_causal
        )  # [B, H, T, D]
        attended = attended.transpose(1, 2).contiguous().view(batch, length, width)  # [B, T, C]
        return self.resid_dropout(self.out_proj(attended)), present


class BarkHfMLP(nn.Module):
    def __init__(self, config: BarkHfSemanticConfig | BarkHfCoarseConfig | BarkHfFineConfig):
        super().__init__()
        self.in_proj = nn.Linear(config.hidden_size, 4 * config.hidden_size, bias=config.bias)
        self.out_proj = nn.Linear(4 * config.hidden_size, config.hidden_size, bias=config.bias)
        self.gelu = nn.GELU()
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.out_proj(self.gelu(self.in_proj(hidden_states))))


class BarkHfBlock(GradientCheckpointingLayer):
    """Pre-LayerNorm transformer block. The fine GPT's LayerNorms always have a bias (as in the original)."""

    def __init__(self, config: BarkHfSemanticConfig | BarkHfCoarseConfig | BarkHfFineConfig, is_causal: bool):
        super().__init__()
        norm_bias = config.bias if is_causal else True
        self.layernorm_1 = nn.LayerNorm(config.hidden_size, bias=norm_bias)
        self.attn = BarkHfAttention(config, is_causal=is_causal)
        self.layernorm_2 = nn.LayerNorm(config.hidden_size, bias=norm_bias)
        self.mlp = BarkHfMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        past_key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        attended, present = self.attn(self.layernorm_1(hidden_states), past_key_value, attention_mask, use_cache)
        hidden_states = hidden_states + attended
        hidden_states = hidden_states + self.mlp(self.layernorm_2(hidden_states))
        return hidden_states, present


class BarkHfPreTrainedModel(PreTrainedModel):
    """Shared loading and saving: weights through transformers, generation configs alongside."""

    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["BarkHfBlock"]
    # transformers' Bark checkpoints carry the causal-mask buffers; SDPA needs none.
    _keys_to_ignore_on_load_unexpected = [r"\.attn\.bias$"]
    generation_config_class: type = BarkHfSemanticGenerationConfig

    def save_pretrained(self, save_directory: str, *args: Any, **kwargs: Any) -> None:
        super().save_pretrained(save_directory, *args, **kwargs)
        save_generation_config(self.generation_config, save_directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, *args: Any, **kwargs: Any):
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True
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
    ties with the k-th value, and the temperature divides the surviving logits.
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
    if top_k is not None:
        kth_value = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth_value, -float("inf"))
    return torch.softmax(logits / temperature, dim=-1)


def _per_item(history_prompt: HistoryPrompt, batch_size: int) -> list[Mapping[str, Any] | None]:
    """One preset (or None) per batch item, from a single preset or a list of them."""
    if history_prompt is None or isinstance(history_prompt, Mapping):
        return [history_prompt] * batch_size
    prompts = list(history_prompt)
    if len(prompts) != batch_size:
        raise ValueError(
            f"history_prompt has {len(prompts)} presets for a batch of {batch_size}; "
            "pass one preset for all items or exactly one per item."
        )
    return prompts


def _prompt_tensor(prompt: Mapping[str, Any] | None, key: str, device: torch.device) -> torch.Tensor | None:
    if prompt is None:
        return None
    if key not in prompt:
        raise ValueError(f"The voice preset has no {key!r}; it needs semantic_prompt, coarse_prompt and fine_prompt.")
    value = prompt[key]
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value.astype(np.int64))
    return torch.as_tensor(value, dtype=torch.long, device=device)


def _empty_tokens(device: torch.device) -> torch.Tensor:
    return torch.empty(0, dtype=torch.long, device=device)


def _pad_stack(items: list[torch.Tensor], pad_value: int) -> torch.Tensor:
    """Stack tensors that differ only in their last dimension, right-padding with `pad_value`."""
    longest = max((item.shape[-1] for item in items), default=0)
    return torch.stack([F.pad(item, (0, longest - item.shape[-1]), value=pad_value) for item in items])


def _generate_items(
    tokens: torch.Tensor,
    lengths: torch.Tensor | None,
    history_prompt: HistoryPrompt,
    pad_value: int,
    device: torch.device,
    generate_one: Callable[[torch.Tensor, Mapping[str, Any] | None], torch.Tensor],
) -> BarkHfStageOutput:
    """Run `generate_one` on each item's valid tokens (`tokens[i, ..., :lengths[i]]`) and its preset,
    then right-pad the results into one batch. Coarse and fine items run one after another.
    """
    batch = tokens.shape[0]
    if lengths is None:
        lengths = torch.full((batch,), tokens.shape[-1])
    prompts = _per_item(history_prompt, batch)
    items = [generate_one(tokens[i, ..., : int(lengths[i])].to(device), prompts[i]) for i in range(batch)]
    item_lengths = torch.tensor([item.shape[-1] for item in items], dtype=torch.long, device=device)
    return BarkHfStageOutput(sequences=_pad_stack(items, pad_value), lengths=item_lengths)


class BarkHfCausalModel(BarkHfPreTrainedModel):
    """A GPT-2 style decoder (nanoGPT layout) shared by the semantic and coarse stages."""

    def __init__(self, config: BarkHfSemanticConfig | BarkHfCoarseConfig):
        super().__init__(config)
        self.input_embeds_layer = nn.Embedding(config.input_vocab_size, config.hidden_size)
        self.position_embeds_layer = nn.Embedding(config.block_size, config.hidden_size)
        self.drop = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList([BarkHfBlock(config, is_causal=True) for _ in range(config.num_layers)])
        self.layernorm_final = nn.LayerNorm(config.hidden_size, bias=config.bias)
        self.lm_head = nn.Linear(config.hidden_size, config.output_vocab_size, bias=False)
        self.generation_config = self.generation_config_class()
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.input_embeds_layer

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.input_embeds_layer = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        cache: PastKeyValues | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits `[B, T, V]` (the last `logits_to_keep` positions when > 0) for `input_ids` `[B, T]`
        or `inputs_embeds` `[B, T, C]`, after `cache` (one `(key, value)` pair of
        `[B, H, past, D]` per layer). `attention_mask` `[B, past + T]` marks real tokens with 1.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds.")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.training and self.is_activation_checkpointing:
            use_cache = False
        if inputs_embeds is None:
            inputs_embeds = self.input_embeds_layer(input_ids)  # [B, T, C]
        batch, length = inputs_embeds.shape[:2]
        past_length = 0 if cache is None else cache[0][0].shape[-2]
        if past_length + length > self.config.block_size:
            raise ValueError(
                f"Sequence of {past_length + length} positions exceeds this model's block_size "
                f"({self.config.block_size})."
            )
        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + length, device=inputs_embeds.device)[None]  # [1, T]
        hidden_states = self.drop(inputs_embeds + self.position_embeds_layer(position_ids))  # [B, T, C]

        mask = None
        if attention_mask is not None:
            keys = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, past + T]
            causal = torch.ones(length, past_length + length, dtype=torch.bool, device=keys.device)
            mask = keys & causal.tril(past_length)  # [B, 1, T, past + T]
            # A fully padded query row would make SDPA return NaN; let it see itself instead.
            mask = mask | F.pad(torch.eye(length, dtype=torch.bool, device=keys.device), (past_length, 0))

        presents = []
        for index, block in enumerate(self.layers):
            past = None if cache is None else cache[index]
            hidden_states, present = block(hidden_states, past, mask, use_cache)
            presents.append(present)
        hidden_states = self.layernorm_final(hidden_states)
        if logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]  # [B, keep, C]
        logits = self.lm_head(hidden_states)  # [B, T or keep, V]
        cache = tuple(presents) if use_cache else None
        if return_dict is False:
            return (logits, cache)
        return CausalLMOutputWithPast(logits=logits, cache=cache)

    def _next_logits(
        self,
        inputs_embeds: torch.Tensor,
        past_key_values: PastKeyValues | None,
        use_cache: bool,
    ) -> tuple[torch.Tensor, PastKeyValues | None]:
        """Logits of the last position `[B, V]` and the cache for the next step."""
        output = self(inputs_embeds=inputs_embeds, cache=past_key_values, use_cache=use_cache, logits_to_keep=1)
        return output.logits[:, -1], output.cache


class BarkHfSemanticModel(BarkHfCausalModel):
    """Text -> semantic tokens."""

    config_class = BarkHfSemanticConfig
    base_model_prefix = "semantic"
    generation_config_class = BarkHfSemanticGenerationConfig

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        history_prompt: HistoryPrompt = None,
        generation_config: BarkHfSemanticGenerationConfig | None = None,
        use_cache: bool | None = None,
        show_progress: bool = True,
        **settings: Any,
    ) -> BarkHfStageOutput:
        """Semantic tokens for tokenised text.

        `input_ids` `[B, L]` are the tokenizer's ids (no offset), `attention_mask` `[B, L]` marks
        real tokens; `history_prompt` a voice preset (or one per item); `settings` override fields
        of the generation config (`temperature`, `top_k`, `min_eos_p`, ...). Returns int64 tokens
        `[B, S]` padded with `semantic_pad_token`, and their lengths.
        Follows bark/generation.py `generate_text_semantic`.
        """
        config = (generation_config or self.generation_config).updated(**settings)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        device = self.device
        batch = input_ids.shape[0]
        window = config.max_input_semantic_length

        if input_ids.shape[1] > window:
            logger.warning(f"Text of {input_ids.shape[1]} tokens is longer than {window}; keeping the first {window}.")
        input_ids = input_ids[:, :window].to(device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask[:, :window].to(device).bool()
        text = torch.where(attention_mask, input_ids + config.text_encoding_offset, config.text_pad_token)
        text = F.pad(text, (0, window - text.shape[1]), value=config.text_pad_token)  # [B, 256]

        histories = []
        for prompt in _per_item(history_prompt, batch):
            semantic = _prompt_tensor(prompt, "semantic_prompt", device)
            semantic = semantic[-window:] if semantic is not None else _empty_tokens(device)
            histories.append(F.pad(semantic, (0, window - semantic.shape[0]), value=config.semantic_pad_token))
        history = torch.stack(histories)  # [B, 256]

        embed = self.input_embeds_layer
        prompt_embeds = embed(text) + embed(history)  # [B, 256, C]: the two windows share positions
        infer = torch.full((batch, 1), config.semantic_infer_token, dtype=torch.long, device=device)
        generated = torch.empty((batch, 0), dtype=torch.long, device=device)
        lengths = torch.full((batch,), -1, dtype=torch.long, device=device)  # -1 while running
        cache = None
        duration_s = 0.0
        progress = logging.tqdm(total=config.max_new_tokens, disable=not show_progress, desc="semantic")
        for _ in range(config.max_new_tokens):
            if use_cache and cache is not None:
                step_embeds = embed(generated[:, -1:])  # [B, 1, C]
            else:
                step_embeds = torch.cat([prompt_embeds, embed(torch.cat([infer, generated], dim=1))], dim=1)
            logits, cache = self._next_logits(step_embeds, cache, use_cache)  # [B, V]
            relevant = logits[:, : config.semantic_vocab_size]  # [B, 10000]
            if config.allow_early_stop:
                eos_logit = logits[:, config.semantic_pad_token : config.semantic_pad_token + 1]
                relevant = torch.cat([relevant, eos_logit], dim=1)  # [B, 10001]: the last entry is EOS
            probs = sampling_probabilities(relevant, config.temperature, config.top_k, config.top_p)
            next_token = torch.multinomial(probs, num_samples=1)  # [B, 1]
            if config.allow_early_stop:
                stopped = next_token[:, 0] == config.semantic_vocab_size
                if config.min_eos_p is not None:
                    stopped |= probs[:, -1] >= config.min_eos_p
                lengths = torch.where(stopped & (lengths < 0), generated.shape[1], lengths)
                if bool((lengths >= 0).all()):
                    break
            generated = torch.cat([generated, next_token], dim=1)
            progress.update(1)
            duration_s += 1 / config.semantic_rate_hz
            if config.max_gen_duration_s is not None and duration_s > config.max_gen_duration_s:
                break
        progress.close()
        lengths = torch.where(lengths < 0, generated.shape[1], lengths)
        positions = torch.arange(generated.shape[1], device=device)[None]  # [1, S]
        generated = generated.masked_fill(positions >= lengths[:, None], config.semantic_pad_token)
        return BarkHfStageOutput(sequences=generated, lengths=lengths)


class BarkHfCoarseModel(BarkHfCausalModel):
    """Semantic tokens -> the first two EnCodec codebooks, interleaved frame by frame."""

    config_class = BarkHfCoarseConfig
    base_model_prefix = "coarse_acoustics"
    generation_config_class = BarkHfCoarseGenerationConfig

    @torch.no_grad()
    def generate(
        self,
        semantic_tokens: torch.LongTensor,
        semantic_lengths: torch.Tensor | None = None,
        history_prompt: HistoryPrompt = None,
        generation_config: BarkHfCoarseGenerationConfig | None = None,
        use_cache: bool | None = None,
        show_progress: bool = True,
        **settings: Any,
    ) -> BarkHfStageOutput:
        """Coarse codes `[B, 2, T]` (padded with `codebook_size`) and lengths for semantic tokens
        `[B, S]` (each item valid up to `semantic_lengths`). Items are generated one after another.
        """
        config = (generation_config or self.generation_config).updated(**settings)
        use_cache = self.config.use_cache if use_cache is None else use_cache

        def generate_one(tokens: torch.Tensor, prompt: Mapping[str, Any] | None) -> torch.Tensor:
            return self._generate_one(tokens, prompt, config, use_cache, show_progress)

        return _generate_items(semantic_tokens, semantic_lengths, history_prompt, config.codebook_size, self.device,
                               generate_one)

    def _generate_one(
        self,
        semantic: torch.Tensor,
        prompt: Mapping[str, Any] | None,
        config: BarkHfCoarseGenerationConfig,
        use_cache: bool,
        show_progress: bool,
    ) -> torch.Tensor:
        """Coarse codes `[2, T]` for one item's semantic tokens `[S]`. Follows bark/generation.py `generate_coarse`."""
        device = semantic.device
        n_codebooks = config.n_coarse_codebooks
        if semantic.numel() == 0:
            logger.warning("An item has no semantic tokens (end of speech came first); its audio is empty.")
            return torch.empty((n_codebooks, 0), dtype=torch.long, device=device)
        ratio = config.semantic_to_coarse_ratio
        max_semantic_history = int(math.floor(config.max_coarse_history / ratio))
        codebook_offsets = config.semantic_vocab_size + config.codebook_size * torch.arange(n_codebooks, device=device)

        semantic_history = _prompt_tensor(prompt, "semantic_prompt", device)
        coarse_history = _prompt_tensor(prompt, "coarse_prompt", device)
        if semantic_history is None:
            semantic_history = _empty_tokens(device)
            coarse_flat = _empty_tokens(device)
        else:
            coarse_flat = (coarse_history + codebook_offsets[:, None]).T.reshape(-1)  # [2m]: frame by frame
            # Keep histories aligned in time: equal spans of semantic and coarse tokens.
            n_semantic = min(
                max_semantic_history,
                semantic_history.shape[0] - semantic_history.shape[0] % 2,
                int(math.floor(coarse_flat.shape[0] / ratio)),
            )
            n_coarse = int(round(n_semantic * ratio))
            semantic_history = semantic_history[-n_semantic:]
            coarse_flat = coarse_flat[-n_coarse:][:-2]  # the original drops two tokens: "sounds better"

        n_steps = int(round(math.floor(semantic.shape[0] * ratio / n_codebooks) * n_codebooks))
        semantic_all = torch.cat([semantic_history, semantic])  # [S_hist + S]
        coarse_all = coarse_flat  # grows by one token per step
        base_semantic_index = semantic_history.shape[0]
        infer = torch.tensor([config.coarse_infer_token], device=device)
        n_windows = math.ceil(n_steps / config.sliding_window_len)
        step = 0
        for _ in logging.tqdm(range(n_windows), disable=not show_progress, desc="coarse"):
            semantic_index = base_semantic_index + int(round(step / ratio))
            window = semantic_all[max(0, semantic_index - max_semantic_history) :][: config.max_coarse_input_length]
            window = F.pad(window, (0, config.max_coarse_input_length - window.shape[0]),
                           value=config.coarse_semantic_pad_token)  # [256]
            context = torch.cat([window, infer, coarse_all[-config.max_coarse_history :]])  # [257 + history]
            cache = None
            for _ in range(min(config.sliding_window_len, n_steps - step)):
                step_ids = context[-1:] if use_cache and cache is not None else context
                logits, cache = self._next_logits(self.input_embeds_layer(step_ids[None]),
                                                            cache, use_cache)  # [1, V]
                start = config.semantic_vocab_size + (step % n_codebooks) * config.codebook_size
                relevant = logits[:, start : start + config.codebook_size]  # [1, 1024]
                probs = sampling_probabilities(relevant, config.temperature, config.top_k, config.top_p)
                next_token = torch.multinomial(probs, num_samples=1)[0] + start  # [1]
                coarse_all = torch.cat([coarse_all, next_token])
                context = torch.cat([context, next_token])
                step += 1
        generated = coarse_all[coarse_flat.shape[0] :]  # [n_steps]
        return generated.view(-1, n_codebooks).T - codebook_offsets[:, None]  # [2, T]


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
        # Head i predicts codebook n_codes_given + i and shares its matrix with that codebook's embedding.
        self._tied_weights_keys = {
            f"lm_heads.{i}.weight": f"input_embeds_layers.{i + config.n_codes_given}.weight" for i in range(n_heads)
        }
        self.generation_config = self.generation_config_class()
        self.post_init()

    def get_input_embeddings(self) -> nn.ModuleList:
        return self.input_embeds_layers

    def set_input_embeddings(self, value: nn.ModuleList) -> None:
        self.input_embeds_layers = value

    def forward(
        self,
        codebook_idx: int,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        return_dict: bool | None = None,
    ) -> MaskedLMOutput | tuple:
        """Logits `[B, T, V]` for codebook `codebook_idx`, given codes `[B, T, 8]` of which
        codebooks `0..codebook_idx - 1` are known. `attention_mask` `[B, T]` marks real frames.
        """
        if not self.config.n_codes_given <= codebook_idx < self.config.n_codes_total:
            raise ValueError(
                f"codebook_idx must be in [{self.config.n_codes_given}, {self.config.n_codes_total}), "
                f"got {codebook_idx}."
            )
        length = input_ids.shape[1]
        if length > self.config.block_size:
            raise ValueError(f"Sequence of {length} frames exceeds block_size ({self.config.block_size}).")
        embeds = torch.cat(
            [layer(input_ids[:, :, i]).unsqueeze(-1) for i, layer in enumerate(self.input_embeds_layers)], dim=-1
        )  # [B, T, C, 8]
        hidden_states = embeds[:, :, :, : codebook_idx + 1].sum(dim=-1)  # [B, T, C]: the known codebooks
        positions = torch.arange(length, device=input_ids.device)[None]  # [1, T]
        hidden_states = self.drop(hidden_states + self.position_embeds_layer(positions))
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]  # [B, 1, 1, T]
        for block in self.layers:
            hidden_states, _ = block(hidden_states, None, mask, False)
        hidden_states = self.layernorm_final(hidden_states)
        logits = self.lm_heads[codebook_idx - self.config.n_codes_given](hidden_states)  # [B, T, V]
        if return_dict is False:
            return (logits,)
        return MaskedLMOutput(logits=logits)

    @torch.no_grad()
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
        """
        config = (generation_config or self.generation_config).updated(**settings)
        return _generate_items(coarse_tokens, coarse_lengths, history_prompt, config.codebook_size, self.device,
                               lambda tokens, prompt: self._generate_one(tokens, prompt, config, show_progress))

    def _generate_one(
        self,
        coarse: torch.Tensor,
        prompt: Mapping[str, Any] | None,
        config: BarkHfFineGenerationConfig,
        show_progress: bool,
    ) -> torch.Tensor:
        """Codes `[8, T]` for one item's coarse codes `[K, T]`. Follows bark/generation.py `generate_fine`."""
        device = coarse.device
        n_given, length = coarse.shape
        n_total, window, hop = config.n_fine_codebooks, config.max_fine_input_length, config.fine_window_hop
        if length == 0:
            return torch.empty((n_total, 0), dtype=torch.long, device=device)
        codes = torch.cat([coarse, torch.full((n_total - n_given, length), config.codebook_size, device=device)])
        history = _prompt_tensor(prompt, "fine_prompt", device)
        n_history = 0
        if history is not None:
            history = history[:, -config.max_fine_history_length :]
            n_history = history.shape[1]
            codes = torch.cat([history, codes], dim=1)  # [8, history + T]
        n_padding = max(0, window - codes.shape[1])  # the model is non-causal: fill one whole window
        codes = F.pad(codes, (0, n_padding), value=config.codebook_size).T.contiguous()  # [L, 8]

        n_windows = max(0, math.ceil((length - (window - n_history)) / hop)) + 1
        for index in logging.tqdm(range(n_windows), disable=not show_progress, desc="fine"):
            start = min(index * hop, codes.shape[0] - window)
            fill_start = min(n_history + index * hop, codes.shape[0] - hop)
            relative_fill = fill_start - start
            buffer = codes[start : start + window].clone()[None]  # [1, 1024, 8]
            for codebook in range(n_given, n_total):
                logits = self(codebook, buffer).logits[0, relative_fill:, : config.codebook_size]  # [fill, 1024]
                if config.temperature is None:
                    predicted = logits.argmax(dim=-1)
                else:
                    probs = torch.softmax(logits / config.temperature, dim=-1)
                    predicted = torch.multinomial(probs, num_samples=1)[:, 0]  # row by row, as the original
                buffer[0, relative_fill:, codebook] = predicted
            codes[fill_start : start + window, n_given:] = buffer[0, relative_fill:, n_given:]
        return codes.T[:, n_history : n_history + length]  # [8, T]


class BarkHfModel(BarkHfPreTrainedModel):
    """The whole text-to-audio model: semantic -> coarse -> fine GPTs, then EnCodec's decoder."""

    config_class = BarkHfConfig
    main_input_name = "input_ids"
    generation_config_class = BarkHfGenerationConfig
    STAGE_PREFIXES = ("semantic", "coarse", "fine")

    def __init__(self, config: BarkHfConfig):
        super().__init__(config)
        self.semantic = BarkHfSemanticModel(config.semantic_config)
        self.coarse_acoustics = BarkHfCoarseModel(config.coarse_acoustics_config)
        self.fine_acoustics = BarkHfFineModel(config.fine_acoustics_config)
        self.codec_model = AutoModel.from_config(config.codec_config)
        self.post_init()

    @property
    def generation_config(self) -> BarkHfGenerationConfig:
        """The stages' own generation configs, viewed together (no copy)."""
        return BarkHfGenerationConfig(
            semantic_config=self.semantic.generation_config,
            coarse_acoustics_config=self.coarse_acoustics.generation_config,
            fine_acoustics_config=self.fine_acoustics.generation_config,
        )

    @generation_config.setter
    def generation_config(self, value: BarkHfGenerationConfig) -> None:
        if "semantic" not in self._modules:  # set by PreTrainedModel before the stages exist
            return
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
        """Audio `[B, samples]` float32 and per-item sample counts from codes `[B, 8, T]`.

        Each item is decoded on its own valid frames, as bark/generation.py `codec_decode` does.
        """
        if lengths is None:
            lengths = torch.full((fine_tokens.shape[0],), fine_tokens.shape[-1])
        device = self.codec_model.device
        waves = []
        for codes, length in zip(fine_tokens, lengths, strict=True):
            codes = codes[:, : int(length)].to(device)[None].transpose(0, 1)  # [8, 1, T]
            if codes.shape[-1] == 0:
                waves.append(torch.zeros(0, device=device))
                continue
            embeddings = self.codec_model.quantizer.decode(codes)  # [1, D, T]
            waves.append(self.codec_model.decoder(embeddings)[0, 0].float())  # [T * hop]
        audio_lengths = torch.tensor([wave.shape[0] for wave in waves], dtype=torch.long)
        return _pad_stack(waves, 0), audio_lengths

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        history_prompt: HistoryPrompt = None,
        return_dict_in_generate: bool = False,
        use_cache: bool | None = None,
        show_progress: bool = True,
        **kwargs: Any,
    ) -> torch.Tensor | BarkHfGenerationOutput:
        """Audio for tokenised text: `generate(**processor(text, voice_preset=...))`.

        Keyword arguments prefixed `semantic_`, `coarse_` or `fine_` reach that stage's generation
        config (`semantic_top_k=1`, `coarse_temperature=0.5`, `fine_temperature=None`, ...);
        `use_cache=False` turns the KV cache off everywhere. Returns audio `[B, samples]` float32,
        or with `return_dict_in_generate=True` a `BarkHfGenerationOutput` with every stage's tokens.
        """
        stage_settings = self._split_stage_settings(kwargs)
        semantic = self.semantic.generate(input_ids, attention_mask, history_prompt, use_cache=use_cache,
                                          show_progress=show_progress, **stage_settings["semantic"])
        coarse = self.coarse_acoustics.generate(semantic.sequences, semantic.lengths, history_prompt,
                                                use_cache=use_cache, show_progress=show_progress,
                                                **stage_settings["coarse"])
        fine = self.fine_acoustics.generate(coarse.sequences, coarse.lengths, history_prompt,
                                            **stage_settings["fine"])
        audio, audio_lengths = self.codec_decode(fine.sequences, fine.lengths)
        if not return_dict_in_generate:
            return audio
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

    def _split_stage_settings(self, kwargs: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Route `semantic_x=...` to the semantic stage as `x=...`, and so on; refuse anything else."""
        settings: dict[str, dict[str, Any]] = {prefix: {} for prefix in self.STAGE_PREFIXES}
        for name, value in kwargs.items():
            prefix, _, setting = name.partition("_")
            if prefix not in settings or not setting:
                raise ValueError(
                    f"Unknown generate argument {name!r}. Stage settings take a stage prefix, e.g. "
                    "semantic_temperature, coarse_top_k, fine_temperature."
                )
            settings[prefix][setting] = value
        configs = {
            "semantic": self.semantic.generation_config,
            "coarse": self.coarse_acoustics.generation_config,
            "fine": self.fine_acoustics.generation_config,
        }
        for prefix, values in settings.items():
            try:
                configs[prefix].updated(**values)
            except ValueError as error:
                raise ValueError(f"Unknown or invalid {prefix} setting: {error}") from None
        return settings


__all__ = [
    "BarkHfCoarseModel",
    "BarkHfFineModel",
    "BarkHfGenerationOutput",
    "BarkHfModel",
    "BarkHfPreTrainedModel",
    "BarkHfSemanticModel",
    "BarkHfStageOutput",
]
