"""Suno's `bark` API on bark-hf models: change `from bark import ...` to `from bark_hf.api import ...`.

The functions keep the original's names, arguments and return values (bark/api.py, and
`preload_models` and the one-stage functions of bark/generation.py). Like the original, the API
is stateful: `preload_models` loads one model and its processor into `_loaded`, and every function
uses them, loading the default model on first use.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers.utils import logging

from . import loading
from .atomic import atomic_path, check_replaceable, link_target
from .checks import checked_device, checked_dtype, checked_flag, checked_positive_number, checked_seed
from .generation_configuration_bark_hf import (  # the constants of bark.generation are importable from here too
    COARSE_RATE_HZ,
    CODEBOOK_SIZE,
    N_COARSE_CODEBOOKS,
    N_FINE_CODEBOOKS,
    SAMPLE_RATE,
    SEMANTIC_RATE_HZ,
    SEMANTIC_VOCAB_SIZE,
    BarkHfFineGenerationConfig,
)
from .longform import DEFAULT_HISTORY, DEFAULT_SILENCE_S, checked_history, checked_silence, generate_long_form
from .modeling_bark_hf import BarkHfModel
from .processing_bark_hf import BarkHfProcessor, VoicePreset, validate_voice_preset

logger = logging.get_logger(__name__)

USE_SMALL_MODELS_ENV = "SUNO_USE_SMALL_MODELS"
"""Environment flag, as in the original: load `suno/bark-small` when no model is named."""
OFFLOAD_CPU_ENV = "SUNO_OFFLOAD_CPU"
"""Environment flag, as in the original: keep stages on the CPU and move each to the GPU only while it runs."""
FINE_TEMPERATURE = BarkHfFineGenerationConfig().temperature
"""The original API always samples the fine stage at this temperature (0.5)."""

# The stage modules of `BarkHfModel`, in the order the `*_use_gpu` flags of `preload_models` name them.
_STAGES = BarkHfModel.STAGE_MODULES


@dataclass
class _LoadedBark:
    """What `preload_models` loaded, and the request it answered (to skip reloading the same one)."""

    model: BarkHfModel
    processor: BarkHfProcessor
    request: tuple[Any, ...]


_loaded: _LoadedBark | None = None
"""The model every API function uses: the original API keeps its models in module state too."""


def _env_flag(name: str) -> bool:
    """The original's reading of its `SUNO_*` variables: 'true', '1' or 't' (any case) turn them on."""
    return os.environ.get(name, "false").strip().lower() in ("true", "1", "t")


def preload_models(
    model: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    *,
    text_use_gpu: bool = True,
    text_use_small: bool = False,
    coarse_use_gpu: bool = True,
    coarse_use_small: bool = False,
    fine_use_gpu: bool = True,
    fine_use_small: bool = False,
    codec_use_gpu: bool = True,
    force_reload: bool = False,
    path: str | os.PathLike | None = None,
) -> None:
    """Load the model and processor that the API functions use.

    `model` (or `path`) is a folder, a Hub id or `"tiny-random"`. Without one: `suno/bark-small`
    when `SUNO_USE_SMALL_MODELS` is set or any `*_use_small` flag is True, else `suno/bark` (both
    sizes come as one model here, so the flags pick the size of all stages). Without `device`,
    each stage goes to CUDA when it is available and that stage's `*_use_gpu` flag allows.
    `SUNO_OFFLOAD_CPU` turns on `model.enable_cpu_offload()` when any stage would use a GPU:
    the stages then wait on the CPU and each runs on the GPU only while it is needed. Calling
    again with the same request keeps the loaded model unless `force_reload=True`.
    """
    global _loaded
    if isinstance(model, bool):  # the original's first positional argument is text_use_gpu
        raise TypeError("preload_models takes the original's flags by keyword here (text_use_gpu=..., "
                        "text_use_small=..., ...); its first positional argument is the model folder or Hub id.")
    if model is not None and path is not None and os.fspath(model) != os.fspath(path):
        raise ValueError(f"Got both model={model!r} and path={path!r}; pass only one of them (path is an alias).")
    name = model if model is not None else path
    if name is None:
        use_small = _env_flag(USE_SMALL_MODELS_ENV) or text_use_small or coarse_use_small or fine_use_small
        name = loading.DEFAULT_MODEL if use_small else loading.LARGE_MODEL
    name = os.fspath(name)
    checked_dtype(dtype)  # before the loaded model is dropped

    use_gpu = (text_use_gpu, coarse_use_gpu, fine_use_gpu, codec_use_gpu)
    if device is None:
        has_cuda = torch.cuda.is_available()
        if not has_cuda and any(use_gpu):
            logger.warning("No GPU being used. Careful, inference might be very slow!")
        stage_devices = tuple(torch.device("cuda" if has_cuda and flag else "cpu") for flag in use_gpu)
    else:
        fix = "pass device='cpu', or None to use CUDA where it is available"
        stage_devices = (checked_device(device, "device", fix),) * len(_STAGES)
    offload = _env_flag(OFFLOAD_CPU_ENV)
    request = (name, stage_devices, dtype, offload)
    if _loaded is not None and _loaded.request == request and not force_reload:
        return

    loading.checked_model_name(name)  # a missing folder keeps the loaded model
    _loaded = None  # free the previous model before loading the next one
    bark, processor = loading.load_bark(name, dtype=dtype)
    on_gpu = {stage: stage_device for stage, stage_device in zip(_STAGES, stage_devices, strict=True)
              if stage_device.type != "cpu"}
    if offload and on_gpu:  # stages whose *_use_gpu is False stay on the CPU, as in the original
        bark.enable_cpu_offload(next(iter(on_gpu.values())), stages=list(on_gpu))
    else:
        if offload:
            logger.info(f"{OFFLOAD_CPU_ENV} has no effect: every stage runs on the CPU.")
        for stage, stage_device in zip(_STAGES, stage_devices, strict=True):
            getattr(bark, stage).to(stage_device)
    _loaded = _LoadedBark(bark, processor, request)


def loaded_model_and_processor() -> tuple[BarkHfModel, BarkHfProcessor]:
    """The model and processor the API functions use, loading the default ones if none are loaded."""
    if _loaded is None:
        preload_models()
    return _loaded.model, _loaded.processor


_MODEL_KEYS = ("text", "coarse", "fine", "codec")
"""The original's names of its four models, which `clean_models` takes."""


def clean_models(model_key: str | None = None) -> None:
    """Drop the loaded model to free its memory, as the original's `clean_models`; the next call loads one again.

    The original keeps one model per stage (`model_key` "text", "coarse", "fine" or "codec"); here the four
    stages are one model, so any key drops all of them.
    """
    global _loaded
    if model_key is not None and model_key not in _MODEL_KEYS:
        raise ValueError(f"model_key must be None (all) or one of {', '.join(map(repr, _MODEL_KEYS))}; "
                         f"got {model_key!r}.")
    _loaded = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _check_text(text: Any) -> str:
    if not isinstance(text, str):
        raise TypeError(f"text must be a string; got {type(text).__name__}.")
    if not text.strip():
        raise ValueError("text is empty or whitespace only; pass at least one word to speak.")
    return text


def _check_temperature(name: str, value: Any) -> float:
    return checked_positive_number(value, name, hint=" (0.7 is the default)")


def _seed(seed: int | None) -> None:
    seed = checked_seed(seed)
    if seed is not None:
        torch.manual_seed(seed)


def _voice_preset(processor: BarkHfProcessor, history_prompt: VoicePreset | None) -> dict[str, np.ndarray] | None:
    """Validated int64 arrays of a preset name, `.npz` path or dict; None stays None."""
    if history_prompt is None:
        return None
    return processor.load_voice_preset(history_prompt)


def _checked_semantic_tokens(semantic_tokens: Any, name: str = "semantic_tokens",
                             caller: str = "semantic_to_waveform") -> np.ndarray:
    """The int64 copy of a 1-D array of semantic tokens, refusing what the coarse stage cannot read.

    An empty array passes (the semantic stage gives one when speech ends at once): its audio is empty.
    `name` and `caller` are the argument and function that errors name.
    """
    if isinstance(semantic_tokens, torch.Tensor):
        semantic_tokens = semantic_tokens.detach().cpu().numpy()
    if semantic_tokens is None or isinstance(semantic_tokens, (str, bytes)):
        raise TypeError(f"{name} must be a 1-D integer array (the output of text_to_semantic); got "
                        f"{type(semantic_tokens).__name__}.")
    try:
        tokens = np.asarray(semantic_tokens)
    except ValueError:  # ragged: the tokens of several texts, as a list
        raise ValueError(f"{name} must be one 1-D array (the output of text_to_semantic for one text); got a "
                         f"list of sequences of different lengths: call {caller} once per text.") from None
    if tokens.ndim != 1:
        raise ValueError(
            f"{name} must be a 1-D array (the output of text_to_semantic); got shape {tuple(tokens.shape)}."
        )
    if tokens.size == 0:
        return tokens.astype(np.int64)
    if not np.issubdtype(tokens.dtype, np.integer):
        raise TypeError(f"{name} must hold integers; got dtype {tokens.dtype}.")
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= SEMANTIC_VOCAB_SIZE:
        raise ValueError(
            f"{name} has values in [{low}, {high}]; expected values in [0, {SEMANTIC_VOCAB_SIZE})."
        )
    return tokens.astype(np.int64)


def _checked_codes(codes: Any, name: str, rows: tuple[int, int], source: str) -> np.ndarray:
    """The int64 copy of EnCodec codes `[K, T]` with `rows[0] <= K <= rows[1]`, values in the codebooks.

    The stages check batches `[B, K, T]`; this names the original's argument and the function that makes it.
    """
    if isinstance(codes, torch.Tensor):
        codes = codes.detach().cpu().numpy()
    try:
        array = np.asarray(codes) if isinstance(codes, (np.ndarray, list, tuple)) else None
    except ValueError:  # ragged lists
        array = None
    if array is None or array.ndim != 2 or not rows[0] <= array.shape[0] <= rows[1]:
        got = f"shape {tuple(array.shape)}" if array is not None else type(codes).__name__
        raise ValueError(f"{name} must be a 2-D array of {rows[0]} to {rows[1]} codebooks [K, T] (the output of "
                         f"{source}); got {got}.")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{name} must hold integers; got dtype {array.dtype}.")
    if array.size and (array.min() < 0 or array.max() >= CODEBOOK_SIZE):
        raise ValueError(f"{name} has values in [{array.min()}, {array.max()}]; expected codes in "
                         f"[0, {CODEBOOK_SIZE}).")
    return array.astype(np.int64)


def _run_stage(stage_name: str, tokens: torch.Tensor, mask_or_lengths: torch.Tensor | None,
               history_prompt: VoicePreset | None, **settings: Any) -> np.ndarray:
    """The loaded model's stage `stage_name` on one item, its output trimmed to the item's length. Under
    enable_cpu_offload only that stage sits on the accelerator, as in `BarkHfModel.generate`."""
    model, processor = loaded_model_and_processor()
    preset = _voice_preset(processor, history_prompt)
    stage = getattr(model, stage_name)
    with model.offload_scope():
        model.offload_all_but(stage)
        output = stage.generate(tokens, mask_or_lengths, preset, **settings)
    return output.sequences[0, ..., : output.lengths[0]].cpu().numpy()


def text_to_semantic(
    text: str,
    history_prompt: VoicePreset | None = None,
    temp: float = 0.7,
    silent: bool = False,
) -> np.ndarray:
    """Semantic tokens `[S]` (int64) for `text`, to pass to `semantic_to_waveform`.

    `history_prompt` is a preset name of the loaded processor, an `.npz` path, or a dict of the
    three prompt arrays; `temp` the sampling temperature; `silent` hides the progress bar.
    """
    _check_text(text)
    temp = _check_temperature("temp", temp)
    inputs = loaded_model_and_processor()[1](text)
    return _run_stage("semantic", inputs["input_ids"], inputs["attention_mask"], history_prompt,
                      show_progress=not silent, temperature=temp)


def semantic_to_waveform(
    semantic_tokens: np.ndarray,
    history_prompt: VoicePreset | None = None,
    temp: float = 0.7,
    silent: bool = False,
    output_full: bool = False,
) -> np.ndarray | tuple[dict[str, np.ndarray], np.ndarray]:
    """Float32 audio `[samples]` at 24 kHz for semantic tokens `[S]`.

    `temp` is the coarse stage's temperature; the fine stage samples at 0.5, as in the original.
    With `output_full=True` returns `(full_generation, audio)`, where `full_generation` holds
    `semantic_prompt [S]`, `coarse_prompt [2, T]` and `fine_prompt [8, T]`: a voice preset for
    the next call (or for `save_as_prompt`).
    """
    tokens = _checked_semantic_tokens(semantic_tokens)
    temp = _check_temperature("temp", temp)
    model, processor = loaded_model_and_processor()
    preset = _voice_preset(processor, history_prompt)
    with model.offload_scope():  # offload_all_but is a no-op unless enable_cpu_offload is on
        model.offload_all_but(model.coarse_acoustics)
        coarse = model.coarse_acoustics.generate(torch.from_numpy(tokens)[None], None, preset,
                                                 show_progress=not silent, temperature=temp)  # [1, 2, T]
        model.offload_all_but(model.fine_acoustics)
        fine = model.fine_acoustics.generate(coarse.sequences, coarse.lengths, preset,
                                             temperature=FINE_TEMPERATURE)  # [1, 8, T]
        model.offload_all_but(model.codec_model)
        audio, audio_lengths = model.codec_decode(fine.sequences, fine.lengths)
    audio = audio[0, : audio_lengths[0]].cpu().numpy()
    if not output_full:
        return audio
    full_generation = {
        "semantic_prompt": tokens,
        "coarse_prompt": coarse.sequences[0, :, : coarse.lengths[0]].cpu().numpy(),
        "fine_prompt": fine.sequences[0, :, : fine.lengths[0]].cpu().numpy(),
    }
    return full_generation, audio


def generate_audio(
    text: str,
    history_prompt: VoicePreset | None = None,
    text_temp: float = 0.7,
    waveform_temp: float = 0.7,
    silent: bool = False,
    output_full: bool = False,
    *,
    seed: int | None = None,
) -> np.ndarray | tuple[dict[str, np.ndarray], np.ndarray]:
    """Float32 audio `[samples]` at 24 kHz for `text`: `text_to_semantic`, then `semantic_to_waveform`.

    `text_temp` is the semantic stage's temperature, `waveform_temp` the coarse stage's.
    `seed` (not in the original) seeds torch first, for a repeatable result. `output_full=True`
    returns `(full_generation, audio)` as `semantic_to_waveform` does.
    """
    text_temp = _check_temperature("text_temp", text_temp)
    waveform_temp = _check_temperature("waveform_temp", waveform_temp)  # before the long semantic stage
    _seed(seed)
    semantic_tokens = text_to_semantic(text, history_prompt, temp=text_temp, silent=silent)
    return semantic_to_waveform(semantic_tokens, history_prompt, temp=waveform_temp, silent=silent,
                                output_full=output_full)


# --- the original's low-level functions (bark/generation.py), one stage each -----------------------------------


def generate_text_semantic(
    text: str,
    history_prompt: VoicePreset | None = None,
    temp: float = 0.7,
    top_k: int | None = None,
    top_p: float | None = None,
    silent: bool = False,
    min_eos_p: float | None = 0.2,
    max_gen_duration_s: float | None = None,
    allow_early_stop: bool = True,
    use_kv_caching: bool = False,
) -> np.ndarray:
    """Semantic tokens `[S]` (int64) for `text`, with every setting of the original's semantic stage.

    Code such as the original long-form notebook's (`generate_text_semantic(sentence, ..., min_eos_p=0.05)`)
    runs unchanged. `use_kv_caching=False`, the original's default, recomputes the whole prefix at each step,
    as the original does; True is much faster (`text_to_semantic` uses it).
    """
    _check_text(text)
    temp = _check_temperature("temp", temp)
    use_kv_caching = checked_flag(use_kv_caching, "use_kv_caching")
    inputs = loaded_model_and_processor()[1](text)
    return _run_stage("semantic", inputs["input_ids"], inputs["attention_mask"], history_prompt,
                      use_cache=use_kv_caching, show_progress=not silent, temperature=temp, top_k=top_k, top_p=top_p,
                      min_eos_p=min_eos_p, max_gen_duration_s=max_gen_duration_s, allow_early_stop=allow_early_stop)


def generate_coarse(
    x_semantic: np.ndarray,
    history_prompt: VoicePreset | None = None,
    temp: float = 0.7,
    top_k: int | None = None,
    top_p: float | None = None,
    silent: bool = False,
    max_coarse_history: int = 630,
    sliding_window_len: int = 60,
    use_kv_caching: bool = False,
) -> np.ndarray:
    """The first two EnCodec codebooks `[2, T]` (int64) for semantic tokens `[S]`, as the original's function.

    `max_coarse_history` (60 to 630 frames of history) and `sliding_window_len` work as in the original;
    `use_kv_caching` as in `generate_text_semantic`.
    """
    tokens = _checked_semantic_tokens(x_semantic, "x_semantic", "generate_coarse")
    temp = _check_temperature("temp", temp)
    use_kv_caching = checked_flag(use_kv_caching, "use_kv_caching")
    return _run_stage("coarse_acoustics", torch.from_numpy(tokens)[None], None, history_prompt,
                      use_cache=use_kv_caching, show_progress=not silent, temperature=temp, top_k=top_k, top_p=top_p,
                      max_coarse_history=max_coarse_history, sliding_window_len=sliding_window_len)


def generate_fine(
    x_coarse_gen: np.ndarray,
    history_prompt: VoicePreset | None = None,
    temp: float | None = 0.5,
    silent: bool = True,
) -> np.ndarray:
    """All eight EnCodec codebooks `[8, T]` (int64) for the coarse ones `[K, T]`, as the original's function.

    `temp=None` takes the most likely code instead of sampling, as in the original.
    """
    codes = _checked_codes(x_coarse_gen, "x_coarse_gen", (1, N_FINE_CODEBOOKS - 1), "generate_coarse")
    if temp is not None:
        temp = checked_positive_number(temp, "temp", hint=" (0.5 is the default; None takes the argmax)")
    return _run_stage("fine_acoustics", torch.from_numpy(codes)[None], None, history_prompt,
                      show_progress=not silent, temperature=temp)


def codec_decode(fine_tokens: np.ndarray) -> np.ndarray:
    """Float32 audio `[samples]` at 24 kHz for EnCodec codes `[8, T]` (the output of `generate_fine`)."""
    codes = _checked_codes(fine_tokens, "fine_tokens", (1, N_FINE_CODEBOOKS), "generate_fine")
    model, _ = loaded_model_and_processor()
    with model.offload_scope():
        model.offload_all_but(model.codec_model)
        audio, audio_lengths = model.codec_decode(torch.from_numpy(codes)[None])
    return audio[0, : audio_lengths[0]].cpu().numpy()


def generate_long_audio(
    text: str,
    history_prompt: VoicePreset | None = None,
    silence_s: float = DEFAULT_SILENCE_S,
    text_temp: float = 0.7,
    waveform_temp: float = 0.7,
    silent: bool = False,
    output_full: bool = False,
    seed: int | None = None,
    history: str = DEFAULT_HISTORY,
) -> np.ndarray | tuple[list[dict[str, np.ndarray]], np.ndarray]:
    """Float32 audio at 24 kHz for text of any length (not in the original API).

    The text is cut into sentence chunks that each fit one generation, all spoken in one voice
    (`history_prompt` for every chunk; without one each chunk continues the one before, see `history`
    in `generate_long_form`), and joined with `silence_s` seconds of silence; see
    `bark_hf.longform.generate_long_form`. `output_full=True` returns
    `(full_generations, audio)` with one full generation per chunk.
    """
    settings = {
        "semantic_temperature": _check_temperature("text_temp", text_temp),
        "coarse_temperature": _check_temperature("waveform_temp", waveform_temp),
        "fine_temperature": FINE_TEMPERATURE,
    }
    # Before the first call loads (or downloads) the default model, as the other functions check theirs.
    _check_text(text)
    checked_silence(silence_s, "silence_s")
    checked_seed(seed)
    checked_history(history, "history")
    model, processor = loaded_model_and_processor()
    result = generate_long_form(model, processor, text, voice_preset=history_prompt, history=history,
                                silence_s=silence_s, seed=seed, generate_kwargs=settings, show_progress=not silent)
    if output_full:
        return result.generations, result.audio
    return result.audio


def save_as_prompt(filepath: str | os.PathLike, full_generation: Mapping[str, Any], *, overwrite: bool = False) -> None:
    """Save a `full_generation` (see `generate_audio(..., output_full=True)`) as an `.npz` voice preset.

    The arrays are validated first, so the file always loads back as a `history_prompt`. The file
    is written to a temporary name and renamed; an existing file is replaced only with `overwrite=True`.
    A symlink is written through: the file it points to is replaced, and the link stays.
    """
    if not isinstance(filepath, (str, os.PathLike)):  # os.fspath's error named neither the argument nor the fix
        raise TypeError(f"filepath must be a path ending in '.npz', got {type(filepath).__name__}; the path comes "
                        "first: save_as_prompt('voice.npz', full_generation).")
    filepath = os.path.expanduser(os.fspath(filepath))  # as model folders and history_prompt paths
    if Path(filepath).suffix != ".npz":
        raise ValueError(f"A voice preset file name ends in '.npz'; got {filepath!r}.")
    path = link_target(filepath)  # a symlink is written through and stays
    arrays = validate_voice_preset(full_generation)
    if path.parent.exists() and not path.parent.is_dir():
        raise NotADirectoryError(f"{path.parent} is a file, not a folder; choose a path inside a folder.")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"The folder {path.parent} does not exist; create it or choose another path.")
    check_replaceable(path)  # before the overwrite advice: overwrite=True cannot replace a folder either
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it.")
    with atomic_path(path, replace=overwrite) as temporary, open(temporary, "wb") as file:
        np.savez(file, **arrays)


__all__ = [
    "COARSE_RATE_HZ",
    "CODEBOOK_SIZE",
    "N_COARSE_CODEBOOKS",
    "N_FINE_CODEBOOKS",
    "SAMPLE_RATE",
    "SEMANTIC_RATE_HZ",
    "SEMANTIC_VOCAB_SIZE",
    "clean_models",
    "codec_decode",
    "generate_audio",
    "generate_coarse",
    "generate_fine",
    "generate_long_audio",
    "generate_text_semantic",
    "loaded_model_and_processor",
    "preload_models",
    "save_as_prompt",
    "semantic_to_waveform",
    "text_to_semantic",
]
