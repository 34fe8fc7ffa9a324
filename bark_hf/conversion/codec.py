"""Bark's codec: the `encodec` package's 24 kHz checkpoint as a `transformers.EncodecModel`.

Suno's Bark decodes with `encodec.EncodecModel.encodec_model_24khz()`, whose weights ship as a
plain state dict. The two implementations hold the same tensors under different names, so the
conversion is a pure rename followed by a strict check against transformers' module tree.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import EncodecConfig, EncodecModel, PretrainedConfig

from ..configuration_bark_hf import bark_codec_config
from ..generation_configuration_bark_hf import COARSE_RATE_HZ, CODEBOOK_SIZE, N_FINE_CODEBOOKS, SAMPLE_RATE
from .safe_load import load_torch_file
from .suno_checkpoint import check_finite

# A weight-normed convolution of the `encodec` package: `<stack>.model.<i>.conv.conv`, or
# `.convtr.convtr` for the decoder's upsampling layers, optionally inside a residual block
# (`.block.<j>.` or `.shortcut.`). Groups: 1 stack, 2 layer index, 3 residual-block part.
_ORIGINAL_CONV = (
    r"(encoder|decoder)\.model\.(\d+)\.((?:block\.\d+\.|shortcut\.)?)(?:conv\.conv|convtr\.convtr)"
)
_CONVERTED_CONV = r"\1.layers.\2.\3conv"

ENCODEC_KEY_RENAMES: tuple[tuple[str, str], ...] = (
    # Convolution bias: only the module path changes.
    (_ORIGINAL_CONV + r"\.bias", _CONVERTED_CONV + ".bias"),
    # `encodec` uses the old `torch.nn.utils.weight_norm` (weight_g = magnitude, weight_v =
    # direction); transformers uses the parametrization API, which stores the same two tensors
    # as original0 and original1.
    (_ORIGINAL_CONV + r"\.weight_g", _CONVERTED_CONV + ".parametrizations.weight.original0"),
    (_ORIGINAL_CONV + r"\.weight_v", _CONVERTED_CONV + ".parametrizations.weight.original1"),
    # The LSTM between the convolution stacks: `nn.LSTM` parameter names are shared.
    (r"(encoder|decoder)\.model\.(\d+)\.lstm\.((?:weight|bias)_(?:ih|hh)_l\d+)", r"\1.layers.\2.lstm.\3"),
    # Residual vector quantizer: the `vq.` level and the underscore of `_codebook` go away.
    (
        r"quantizer\.vq\.layers\.(\d+)\._codebook\.(inited|cluster_size|embed|embed_avg)",
        r"quantizer.layers.\1.codebook.\2",
    ),
)
"""(regex, replacement) pairs from `encodec` state-dict keys to `transformers.EncodecModel` keys.

Each regex must match a whole key; the first that does gives its new name. A key that no regex
matches is an error, so nothing in a checkpoint is silently dropped.
"""

_NOT_ENCODEC_24KHZ = "is not an EnCodec 24 kHz checkpoint (the `encodec` package's `encodec_model_24khz`)"


def convert_encodec_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an `encodec` 24 kHz state dict to `transformers.EncodecModel` keys, checking every key.

    Raises `ValueError` for keys the rename table does not know and for any key or shape that
    differs from `EncodecModel(bark_codec_config())`: a partial load would give a codec that
    decodes noise without any other sign of trouble.
    """
    converted: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, tensor in state_dict.items():
        new_key = _rename(key)
        if new_key is None:
            unknown.append(key)
        else:
            converted[new_key] = tensor
    if unknown:
        raise ValueError(f"State dict {_NOT_ENCODEC_24KHZ}: no rename rule for keys {_preview(unknown)}.")
    _check_against_reference(converted)
    return converted


def load_codec(path: str | os.PathLike) -> EncodecModel:
    """Load Bark's codec from the original `encodec` state-dict file or a transformers EnCodec folder.

    Returns the model in eval mode and float32, the precision the original decodes in.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"No EnCodec checkpoint at {path}: expected the `encodec` package's 24 kHz state-dict file "
            "or a transformers EnCodec folder (config.json + weights)."
        )
    if path.is_dir():
        model = _load_transformers_folder(path)
    else:
        model = EncodecModel(bark_codec_config())
        model.load_state_dict(convert_encodec_state_dict(_read_state_dict(path)), strict=True)
    check_finite(model.state_dict(), source=str(path))
    return model.float().eval()


def _rename(key: str) -> str | None:
    for pattern, replacement in ENCODEC_KEY_RENAMES:
        match = re.fullmatch(pattern, key)
        if match is not None:
            return match.expand(replacement)
    return None


def _check_against_reference(converted: Mapping[str, torch.Tensor]) -> None:
    """Compare keys and shapes with an `EncodecModel` built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        reference = EncodecModel(bark_codec_config()).state_dict()
    missing = sorted(set(reference) - set(converted))
    unexpected = sorted(set(converted) - set(reference))
    wrong_shapes = [
        f"{key} {tuple(converted[key].shape)} (expected {tuple(reference[key].shape)})"
        for key in sorted(set(reference) & set(converted))
        if converted[key].shape != reference[key].shape
    ]
    labelled = (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong_shapes))
    problems = [f"{label}: {_preview(keys)}" for label, keys in labelled if keys]
    if problems:
        raise ValueError(f"State dict {_NOT_ENCODEC_24KHZ}; " + "; ".join(problems) + ".")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A plain `model.state_dict()` file, read without unpickling anything else."""
    loaded = load_torch_file(path)
    if not isinstance(loaded, Mapping) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in loaded.items()
    ):
        raise ValueError(f"{path} {_NOT_ENCODEC_24KHZ}: it does not hold a state dict of named tensors.")
    return dict(loaded)


def _load_transformers_folder(path: Path) -> EncodecModel:
    """`from_pretrained`, after checking that the folder's config is the codec Bark was trained with."""
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is a folder without config.json, so not a transformers EnCodec folder.")
    config_dict, _ = PretrainedConfig.get_config_dict(str(path))
    if config_dict.get("model_type") != "encodec":
        raise ValueError(f"{path}/config.json has model_type {config_dict.get('model_type')!r}, not encodec.")
    config = EncodecConfig.from_pretrained(str(path))
    mismatches = [
        f"{name} {actual} (Bark needs {expected})"
        for name, actual, expected in (
            ("sampling_rate", config.sampling_rate, SAMPLE_RATE),
            ("audio_channels", config.audio_channels, 1),
            ("frame_rate", config.frame_rate, COARSE_RATE_HZ),
            ("codebook_size", config.codebook_size, CODEBOOK_SIZE),
        )
        if actual != expected
    ]
    if config.num_quantizers < N_FINE_CODEBOOKS:
        mismatches.append(f"num_quantizers {config.num_quantizers} (Bark needs at least {N_FINE_CODEBOOKS})")
    if mismatches:
        raise ValueError(
            f"{path} holds an EnCodec that Bark cannot decode with: {', '.join(mismatches)}. "
            "Bark needs the 24 kHz mono codec with 75 Hz frames and 1024-entry codebooks."
        )
    # Mismatched shapes are reported below as a ValueError rather than transformers' RuntimeError.
    model, info = EncodecModel.from_pretrained(
        str(path), config=config, output_loading_info=True, ignore_mismatched_sizes=True
    )
    kinds = ("missing_keys", "mismatched_keys")
    incomplete = [f"{kind.replace('_', ' ')}: {_preview(info[kind])}" for kind in kinds if info[kind]]
    if incomplete:
        raise ValueError(f"The weights in {path} do not fit its EnCodec config; {'; '.join(incomplete)}.")
    return model


def _preview(items: list | set, limit: int = 8) -> str:
    """The first few items of a long list, so an error message stays readable."""
    items = sorted(map(str, items))
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown} and {len(items) - limit} more"


__all__ = ["ENCODEC_KEY_RENAMES", "convert_encodec_state_dict", "load_codec"]
