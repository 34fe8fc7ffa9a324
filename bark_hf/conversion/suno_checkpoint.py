"""Suno's original GPT checkpoints (`text*.pt`, `coarse*.pt`, `fine*.pt`) -> our stage models.

The original files are `torch.save`d dicts: `model_args` (nanoGPT hyper-parameters), `model`
(the state dict, keys prefixed `_orig_mod.` when trained under `torch.compile`), and training
bookkeeping (`best_val_loss`, ...). Conversion is a key-rename table plus strict checks.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PretrainedConfig
from transformers.utils import logging

from ..configuration_bark_hf import BarkHfCoarseConfig, BarkHfFineConfig, BarkHfSemanticConfig
from ..generation_configuration_bark_hf import (
    CODEBOOK_SIZE,
    N_FINE_CODEBOOKS,
    BarkHfCoarseGenerationConfig,
    BarkHfSemanticGenerationConfig,
)
from ..modeling_bark_hf import BarkHfCoarseModel, BarkHfFineModel, BarkHfPreTrainedModel, BarkHfSemanticModel
from .safe_load import load_torch_file

logger = logging.get_logger(__name__)

STAGES = ("text", "coarse", "fine")
"""The original's names for the semantic, coarse and fine stages (and their file names)."""

STAGE_CLASSES: dict[str, tuple[type[PretrainedConfig], type[BarkHfPreTrainedModel]]] = {
    "text": (BarkHfSemanticConfig, BarkHfSemanticModel),
    "coarse": (BarkHfCoarseConfig, BarkHfCoarseModel),
    "fine": (BarkHfFineConfig, BarkHfFineModel),
}

# Original nanoGPT name -> transformers' Bark name; applied in order to each key.
KEY_RENAMES: list[tuple[str, str]] = [
    (r"^_orig_mod\.", ""),  # torch.compile wrapper
    (r"^transformer\.wtes\.", "input_embeds_layers."),  # fine: one embedding per codebook
    (r"^transformer\.wte\.", "input_embeds_layer."),
    (r"^transformer\.wpe\.", "position_embeds_layer."),
    (r"^transformer\.ln_f\.", "layernorm_final."),
    (r"^transformer\.h\.", "layers."),
    (r"\.ln_1\.", ".layernorm_1."),
    (r"\.ln_2\.", ".layernorm_2."),
    (r"\.attn\.c_attn\.", ".attn.att_proj."),
    (r"\.attn\.c_proj\.", ".attn.out_proj."),
    (r"\.mlp\.c_fc\.", ".mlp.in_proj."),
    (r"\.mlp\.c_proj\.", ".mlp.out_proj."),
]

IGNORED_KEYS = re.compile(r"\.attn\.bias$")
"""Causal-mask buffers that older torch versions saved; attention builds its own mask."""

MODEL_ARG_NAMES = {
    "block_size": "block_size",
    "input_vocab_size": "input_vocab_size",
    "output_vocab_size": "output_vocab_size",
    "n_layer": "num_layers",
    "n_head": "num_heads",
    "n_embd": "hidden_size",
    "dropout": "dropout",
    "bias": "bias",
    "n_codes_total": "n_codes_total",
    "n_codes_given": "n_codes_given",
}


def _vocab_needs() -> dict[str, dict[str, int]]:
    """Per stage, the least each size may be: the highest token id the stage's generation reads or writes, plus one."""
    semantic, coarse = BarkHfSemanticGenerationConfig(), BarkHfCoarseGenerationConfig()
    return {
        "text": {"input_vocab_size": semantic.semantic_infer_token + 1,
                 "output_vocab_size": semantic.semantic_pad_token + 1},
        "coarse": {"input_vocab_size": coarse.coarse_infer_token + 1,
                   "output_vocab_size": coarse.semantic_vocab_size + coarse.n_coarse_codebooks * CODEBOOK_SIZE},
        "fine": {"input_vocab_size": CODEBOOK_SIZE + 1, "output_vocab_size": CODEBOOK_SIZE,
                 "n_codes_total": N_FINE_CODEBOOKS},
    }


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted; the message names the file and the problem."""


def find_stage_files(checkpoint_dir: str | os.PathLike, size: str | None = None) -> dict[str, Path]:
    """The three checkpoint files in `checkpoint_dir`: `text.pt`... (small) or `text_2.pt`... (large)."""
    folder = Path(checkpoint_dir)
    if folder.exists() and not folder.is_dir():  # one checkpoint file, say, where its folder is meant
        raise NotADirectoryError(f"--checkpoint-dir {folder} is a file; pass the folder that holds text.pt, "
                                 "coarse.pt and fine.pt (or text_2.pt, coarse_2.pt and fine_2.pt).")
    if not folder.is_dir():
        raise FileNotFoundError(f"Checkpoint folder {folder} does not exist.")
    names = {"small": "{}.pt", "large": "{}_2.pt"}
    found = {s: {stage: folder / pattern.format(stage) for stage in STAGES} for s, pattern in names.items()}
    complete = [s for s, files in found.items() if all(path.is_file() for path in files.values())]
    if size is not None:
        if size not in names:
            raise ValueError(f"size must be 'small' or 'large', got {size!r}.")
        if size not in complete:
            missing = [p.name for p in found[size].values() if not p.is_file()]
            raise FileNotFoundError(f"{folder} lacks the {size} checkpoints: {', '.join(missing)}.")
        return found[size]
    if len(complete) == 1:
        return found[complete[0]]
    if len(complete) == 2:
        raise ValueError(f"{folder} holds both small and large checkpoints; choose one with --size small|large.")
    raise FileNotFoundError(
        f"{folder} must hold text.pt, coarse.pt, fine.pt (bark-small) or text_2.pt, coarse_2.pt, fine_2.pt (bark)."
    )


def load_original_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """`(model_args, state_dict)` of an original checkpoint, loaded without running any pickle code."""
    checkpoint = load_torch_file(path)
    if not isinstance(checkpoint, Mapping) or "model" not in checkpoint or "model_args" not in checkpoint:
        raise CheckpointError(f"{path} is not a Suno Bark checkpoint: expected a dict with 'model_args' and 'model'.")
    model_args, state_dict = checkpoint["model_args"], checkpoint["model"]
    if not isinstance(model_args, Mapping) or not isinstance(state_dict, Mapping):
        raise CheckpointError(f"{path} is not a Suno Bark checkpoint: its 'model_args' and 'model' must be dicts.")
    not_tensors = [str(key) for key, value in state_dict.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{path} is not a Suno Bark checkpoint: 'model' holds non-tensors at {not_tensors[:8]}.")
    return dict(model_args), dict(state_dict)


def stage_config(stage: str, model_args: Mapping[str, Any]) -> PretrainedConfig:
    """Our stage config from the original's `model_args` (numpy numbers as Python ones, which JSON can hold)."""
    args = {key: value.item() if isinstance(value, np.generic) else value for key, value in model_args.items()}
    if "vocab_size" in args:  # the oldest checkpoints name one vocabulary for both ends
        args.setdefault("input_vocab_size", args["vocab_size"])
        args.setdefault("output_vocab_size", args.pop("vocab_size"))
    config_cls = STAGE_CLASSES[stage][0]
    return config_cls(**{ours: args[theirs] for theirs, ours in MODEL_ARG_NAMES.items() if theirs in args})


def rename_state_dict(state_dict: Mapping[str, torch.Tensor],
                      source: str = "The state dict") -> dict[str, torch.Tensor]:
    """Apply `KEY_RENAMES` and drop the named ignorable keys.

    Two keys that rename to one (`x` beside `_orig_mod.x`) are refused when their tensors differ: keeping either
    would silently drop the other (the original keeps the prefixed one whatever their order). Equal ones lose
    nothing and load in the original, so one of them is kept.
    """
    renamed, sources = {}, {}
    for original_key, value in state_dict.items():
        key = original_key
        for pattern, replacement in KEY_RENAMES:
            key = re.sub(pattern, replacement, key)
        if IGNORED_KEYS.search(key):
            continue
        if key in renamed and not _same_tensor(renamed[key], value):
            raise CheckpointError(f"{source} holds both {sources[key]!r} and {original_key!r}, which name the "
                                  f"same weight {key!r}; keep one of them (a file saved from one model has no such "
                                  "pair).")
        renamed[key], sources[key] = value, original_key
    return renamed


def _same_tensor(a: Any, b: Any) -> bool:
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and a.dtype == b.dtype and torch.equal(a, b))


def convert_stage(stage: str, path: str | os.PathLike) -> BarkHfPreTrainedModel:
    """Load one original checkpoint into our stage model, strictly, and verify every weight."""
    model_args, state_dict = load_original_checkpoint(path)
    try:
        config = stage_config(stage, model_args)
        model = STAGE_CLASSES[stage][1](config)
    except (TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path}: its model_args do not describe a Bark {stage} model: {error}") from None
    # Text and coarse checkpoints have the same layout, so a swapped pair would convert and only fail when generating.
    small = [f"{name} {getattr(config, name)} (needs at least {least})"
             for name, least in _vocab_needs()[stage].items() if getattr(config, name) < least]
    if small:
        raise CheckpointError(f"{path} is not a Bark {stage} checkpoint: {', '.join(small)}. Check that the files "
                              "are named text*.pt, coarse*.pt and fine*.pt for what they hold.")
    weights = rename_state_dict(state_dict, source=str(path))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match a Bark {stage} model with {model_args}: "
            f"missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}."
        )
    wrong = [f"{key}: {tuple(weights[key].shape)} vs {tuple(value.shape)}"
             for key, value in expected.items() if weights[key].shape != value.shape]
    if wrong:
        raise CheckpointError(f"{path} has tensors of the wrong shape for its model_args: {'; '.join(wrong[:8])}.")
    check_finite(weights, source=str(path))
    # One tensor loads into each tied pair: different values would end as 'Converted weights differ'.
    untied = [f"{head} and {embedding}" for head, embedding in (model._tied_weights_keys or {}).items()
              if not torch.equal(weights[head], weights[embedding])]
    if untied:
        raise CheckpointError(f"{path} holds different values for {', '.join(untied[:8])}, which the {stage} model "
                              "ties into one tensor (as the original does); the file was not saved from one Bark "
                              "model. Use the original file.")
    model.load_state_dict(weights, strict=True)
    verify_weights(model, weights, source=str(path))
    if stage != "fine" and config.dropout > 0:
        logger.warning(f"{path} has dropout {config.dropout}. The original's causal attention applies it even when "
                       "generating, so its outputs are random there; bark-hf applies dropout in training only, and "
                       "its tokens will not equal the original's. Suno's released checkpoints have dropout 0.")
    return model.eval()


def check_finite(weights: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise, naming the tensors, if any weight is NaN or infinite: such a model generates noise or silence, and
    `verify_weights` would only report that the converted weights differ (NaN never equals itself)."""
    bad = []
    for key, value in weights.items():
        n_nan, n_inf = int(torch.isnan(value).sum()), int(torch.isinf(value).sum())
        if n_nan or n_inf:
            bad.append(f"{key} ({n_nan} NaN, {n_inf} inf)")
    if bad:
        raise CheckpointError(f"{source} holds NaN or infinite weights at {', '.join(bad[:8])}"
                              f"{f' and {len(bad) - 8} more tensors' if len(bad) > 8 else ''}: the file is damaged or "
                              "comes from a diverged training run. Use an intact copy of the original file.")


def verify_weights(model: torch.nn.Module, weights: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise unless every tensor of `model` equals its source tensor (catches broken weight tying)."""
    state = model.state_dict()
    differing = [key for key, value in weights.items() if not torch.equal(state[key].cpu(), value.to(state[key].dtype))]
    if differing:
        raise CheckpointError(f"Converted weights differ from {source} at {differing[:8]}.")
