"""Load a model and its processor by folder, Hub id, or the offline tiny random model."""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers.utils import logging

from .checks import checked_dtype
from .modeling_bark_hf import BarkHfModel
from .processing_bark_hf import BarkHfProcessor, VoicePreset, looks_like_local_path

logger = logging.get_logger(__name__)

DEFAULT_MODEL = "suno/bark-small"
"""The model used when none is named: the smaller of Suno's two checkpoints."""
LARGE_MODEL = "suno/bark"


def checked_model_name(model: str | os.PathLike) -> str:
    """`model` with `~` expanded, refused if it names a local folder that is not there (else from_pretrained's
    error would be about Hub repo id syntax). Cheap, so callers can check before dropping a loaded model."""
    name = os.path.expanduser(os.fspath(model))
    if looks_like_local_path(name) and not os.path.isdir(name):
        raise FileNotFoundError(f"No model folder at {name!r}; pass a folder made with `bark-hf convert` or "
                                "`save_pretrained`, a Hub id, or 'tiny-random'.")
    return name


def _from_model_folder_or_hub(loader: type[BarkHfModel] | type[BarkHfProcessor], name: str, **options: Any) -> Any:
    """`loader.from_pretrained(name)`, its Hub errors given the fix: a local folder, or 'tiny-random'."""
    try:
        return loader.from_pretrained(name, **options)
    except (FileNotFoundError, NotADirectoryError):  # a local folder's own problem: no Hub advice
        raise
    except OSError as error:
        raise OSError(
            f"Could not load the model {name!r} ({str(error).splitlines()[0]}). If the Hugging Face Hub "
            "cannot be reached, point the model (`--model` in the CLI) at a local folder (made with "
            "`bark-hf convert` or `save_pretrained`), or try 'tiny-random' for an offline test model."
        ) from None


def load_bark(
    model: str | os.PathLike = DEFAULT_MODEL,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    voice_preset: VoicePreset | None = None,
) -> tuple[BarkHfModel, BarkHfProcessor]:
    """Model (in eval mode) and processor from a folder, a Hub id, or `"tiny-random"`.

    `"tiny-random"` builds a 2-layer random model offline: the whole path runs, the audio is noise.
    A `voice_preset` the processor cannot read is refused before the model (maybe gigabytes) loads.
    """
    from .tiny_random import TINY_RANDOM, tiny_random_bark

    name, dtype = checked_model_name(model), checked_dtype(dtype)
    if name == TINY_RANDOM:
        logger.warning("Using the tiny random model: its audio is noise, not speech.")
        bark, processor = tiny_random_bark()
        if voice_preset is not None:
            processor.load_voice_preset(voice_preset)
        if dtype not in (None, "auto"):
            bark = bark.to(dtype)
            bark.codec_model.float()  # the codec stays float32, as from_pretrained keeps it
    else:
        processor = _from_model_folder_or_hub(BarkHfProcessor, name)
        if voice_preset is not None:  # outside the Hub advice: a preset file's problem is its own
            processor.load_voice_preset(voice_preset)
        bark = _from_model_folder_or_hub(BarkHfModel, name, dtype=dtype)
    if device is not None:
        bark = bark.to(device)
    return bark.eval(), processor
