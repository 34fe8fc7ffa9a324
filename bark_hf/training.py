"""Training Bark's stages: token layouts, data collators and dataset preparation.

Suno never released training code. What a fine-tuned stage learns is only useful if it sees its
inputs exactly as its `generate` builds them, so the functions here lay out each stage's input
the way generation does (see docs/architecture.md), with labels beside it:

* semantic: `[text window (256) + history window (256), summed] [infer] [semantic tokens] [EOS]`;
* coarse: one of generation's sliding windows, `[semantic window (256)] [infer] [coarse history + window]`;
* fine: one of generation's 1 024-frame windows, one codebook to predict, later frames masked.

The collators turn rows of a prepared dataset into batches for `transformers.Trainer`;
`prepare_dataset` makes those rows from text and audio. See docs/training.md for the walk-through.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import logging as stdlib_logging
import math
import numbers
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from transformers.utils import logging

from .checks import checked_flag, is_number
from .generation_configuration_bark_hf import (
    COARSE_RATE_HZ,
    N_COARSE_CODEBOOKS,
    N_FINE_CODEBOOKS,
    SAMPLE_RATE,
    SEMANTIC_RATE_HZ,
    SEMANTIC_VOCAB_SIZE,
    BarkHfCoarseGenerationConfig,
    BarkHfFineGenerationConfig,
    BarkHfSemanticGenerationConfig,
)
from .modeling_bark_hf import (
    IGNORE_INDEX,
    BarkHfCoarseModel,
    BarkHfFineModel,
    BarkHfSemanticModel,
    coarse_flat_tokens,
    coarse_window_prompt,
    fine_window_count,
    semantic_prompt_windows,
)
from .processing_bark_hf import TRUNCATION_WARNING, BarkHfProcessor
from .processing_bark_hf import logger as processing_logger

if TYPE_CHECKING:
    import datasets

logger = logging.get_logger(__name__)

TEXT_COLUMN = "text"
SEMANTIC_TOKENS_COLUMN = "semantic_tokens"
"""Semantic tokens `[S]` of a row, 0..9 999 at 49.9 per second."""
FINE_TOKENS_COLUMN = "fine_tokens"
"""EnCodec codes `[8, T]` of a row, 0..1 023 at 75 frames per second; the first two rows are the coarse codes."""
SEMANTIC_PROMPT_COLUMN = "semantic_prompt"
"""Optional semantic history `[n]` of a row, used as a voice preset's `semantic_prompt` is."""

_PREPARATION_VERSION = "bark-hf-prepare-1"  # part of the cache fingerprint; change it when the output changes


def _long_tensor(values: Any) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values, dtype=np.int64))


# --- token layouts -------------------------------------------------------------------------------


def semantic_training_sequence(
    text_window: torch.Tensor, semantic_tokens: torch.Tensor, config: BarkHfSemanticGenerationConfig, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`input_ids` and `labels` `[L]` for one item: `[text window] [infer] [semantic tokens] [EOS]`.

    Labels are the tokens themselves (the model shifts them) and -100 on the prompt. Tokens past
    what fits in `block_size` are dropped, and then so is EOS: the speech goes on.
    """
    prompt = torch.cat([text_window, torch.tensor([config.semantic_infer_token])])  # [257]
    room = block_size - prompt.shape[0]
    if semantic_tokens.shape[0] < room:
        targets = torch.cat([semantic_tokens, torch.tensor([config.semantic_pad_token])])  # EOS
    else:
        targets = semantic_tokens[:room]
    labels = torch.cat([torch.full_like(prompt, IGNORE_INDEX), targets])
    return torch.cat([prompt, targets]), labels


def coarse_window_count(n_frames: int, config: BarkHfCoarseGenerationConfig) -> int:
    """How many sliding windows generation runs over `n_frames` frames of coarse codes."""
    return max(1, math.ceil(n_frames * config.n_coarse_codebooks / config.sliding_window_len))


def coarse_training_window(
    semantic_tokens: torch.Tensor,
    coarse_codes: torch.Tensor,
    window_index: int,
    config: BarkHfCoarseGenerationConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`input_ids` and `labels` `[L]` of generation's window `window_index` over one item.

    Same context as `BarkHfCoarseModel.generate` (without a voice preset) builds before that window:
    the semantic window aligned with the coarse history, the infer token, up to `max_coarse_history`
    coarse tokens of history, then the window's `sliding_window_len` tokens. Every coarse token is
    a target (history tokens too: their semantic context is aligned the same way); the prompt is -100.
    """
    step = window_index * config.sliding_window_len
    prompt = coarse_window_prompt(semantic_tokens, int(round(step / config.semantic_to_coarse_ratio)), config)  # [257]
    coarse = coarse_flat_tokens(coarse_codes, config)
    coarse = coarse[max(0, step - config.max_coarse_history) : step + config.sliding_window_len]  # [<= 690]
    return torch.cat([prompt, coarse]), torch.cat([torch.full_like(prompt, IGNORE_INDEX), coarse])


def fine_training_window(
    codes: torch.Tensor, codebook_idx: int, window_index: int, config: BarkHfFineGenerationConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """`input_ids` `[1024, 8]` and `labels` `[1024]` of generation's window `window_index` over one item's
    codes `[8, T]`, at the pass that predicts codebook `codebook_idx`.

    As `BarkHfFineModel.generate` (without a voice preset) sees it: frames padded to a whole window
    with `codebook_size`; codebooks below `codebook_idx` known; codebook `codebook_idx` known only
    in frames an earlier window already filled, `codebook_size` in the rest. Targets are the
    frames that this window writes; padding and frames it leaves alone are -100.
    """
    window, hop, size = config.max_fine_input_length, config.fine_window_hop, config.codebook_size
    n_frames = codes.shape[1]
    frames = F.pad(codes, (0, max(0, window - n_frames)), value=size).T  # [L, 8], L >= 1024
    start = min(window_index * hop, frames.shape[0] - window)
    fill_start = min(window_index * hop, frames.shape[0] - hop)
    filled_end = 0 if window_index == 0 else min((window_index - 1) * hop, frames.shape[0] - window) + window
    input_ids = frames[start : start + window].clone()  # [1024, 8]
    labels = input_ids[:, codebook_idx].clone()  # [1024]
    input_ids[max(0, filled_end - start) :, codebook_idx:] = size  # not predicted yet
    labels[: fill_start - start] = IGNORE_INDEX
    labels[max(0, n_frames - start) :] = IGNORE_INDEX  # padding frames
    return input_ids, labels


# --- collators -----------------------------------------------------------------------------------


def _pad_right(sequences: list[torch.Tensor], value: int) -> torch.Tensor:
    longest = max(sequence.shape[0] for sequence in sequences)
    return torch.stack([F.pad(sequence, (0, longest - sequence.shape[0]), value=value) for sequence in sequences])


def _random_index(count: int, random: bool) -> int:
    """A uniform draw from `range(count)` with torch's generator (seeded per worker by the Trainer), or 0."""
    return int(torch.randint(count, ())) if random and count > 1 else 0


def _column(feature: Mapping[str, Any], name: str) -> Any:
    if name not in feature:
        source = (
            "prepare_dataset adds it only from semantic_column= or semantic_tokenizer=: bark-hf cannot make semantic "
            "tokens from audio (see docs/training.md)" if name == SEMANTIC_TOKENS_COLUMN
            else "Make rows with bark_hf.training.prepare_dataset"
        )
        raise KeyError(f"A dataset row has no {name!r} column (it has {sorted(feature)}). {source}. Pass "
                       "remove_unused_columns=False to TrainingArguments, or the Trainer drops it.")
    return feature[name]


def _text(feature: Mapping[str, Any], position: int) -> str:
    text = _column(feature, TEXT_COLUMN)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"Item {position} of this batch has no text to speak ({text!r}). Drop such rows before "
                         "training, e.g. dataset.filter(lambda row: (row['text'] or '').strip()).")
    return text


def _checked_row_tokens(values: Any, position: int, name: str, ndim: int, high: int) -> torch.Tensor:
    """A row's tokens as int64, refused with the item named unless an integer array of `ndim` axes in 0..high - 1.

    Without this, a wrong value reached the model as an embedding IndexError or a wrong target.
    """
    fix = ("Give a semantic history as a voice preset's semantic_prompt is" if name == SEMANTIC_PROMPT_COLUMN
           else "prepare_dataset makes them")
    try:
        array = np.asarray(values)
    except ValueError:  # ragged nested lists
        array = np.asarray(values, dtype=object)
    if array.ndim != ndim or (array.size and not np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"Item {position} of this batch: {name} must be a {ndim}-D integer array, got "
                         f"{array.dtype} of shape {array.shape}. {fix}.")
    if array.size and (array.min() < 0 or array.max() >= high):
        raise ValueError(f"Item {position} of this batch: {name} must be in 0..{high - 1}, got "
                         f"{array.min()}..{array.max()}. {fix}.")
    return _long_tensor(array)


def _semantic(feature: Mapping[str, Any], position: int, name: str = SEMANTIC_TOKENS_COLUMN) -> torch.Tensor | None:
    """A row's semantic tokens `[S]` (or its `semantic_prompt`, which may be absent: None)."""
    values = _column(feature, name) if name == SEMANTIC_TOKENS_COLUMN else feature.get(name)
    if values is None and name == SEMANTIC_PROMPT_COLUMN:
        return None
    tokens = _checked_row_tokens(values, position, name, 1, SEMANTIC_VOCAB_SIZE)
    if name == SEMANTIC_TOKENS_COLUMN and tokens.numel() == 0:  # would train "text, then end of speech at once"
        raise ValueError(f"Item {position} of this batch: {name} is empty, so there is nothing to learn from it. "
                         f"Drop such rows before training, e.g. dataset.filter(lambda row: len(row['{name}']) > 0).")
    return tokens


def _codes(feature: Mapping[str, Any], position: int, n_codebooks: int, codebook_size: int) -> torch.Tensor:
    """A row's `fine_tokens` `[codebooks, frames]`, of which the stage reads the first `n_codebooks`."""
    codes = _checked_row_tokens(_column(feature, FINE_TOKENS_COLUMN), position, FINE_TOKENS_COLUMN, 2, codebook_size)
    if not n_codebooks <= codes.shape[0] <= N_FINE_CODEBOOKS or codes.shape[1] == 0:
        raise ValueError(f"Item {position} of this batch: fine_tokens must be EnCodec codes [{N_FINE_CODEBOOKS}, "
                         f"frames] with at least one frame (this stage reads the first {n_codebooks}), got shape "
                         f"{tuple(codes.shape)}. prepare_dataset makes them.")
    return codes


class _TruncationCounter(stdlib_logging.Filter):
    """Counts, and keeps out of the log, the processor's warnings that a text is cut to Bark's window."""

    def __enter__(self) -> _TruncationCounter:
        self.count = 0
        processing_logger.addFilter(self)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        processing_logger.removeFilter(self)

    def filter(self, record: stdlib_logging.LogRecord) -> bool:
        if record.msg is TRUNCATION_WARNING:
            self.count += 1
            return False
        return True


@dataclass
class BarkHfSemanticCollator:
    """Batches for the semantic stage from rows with `text`, `semantic_tokens` and optionally
    `semantic_prompt` (a semantic history, as in a voice preset).

    Gives `input_ids` and `labels` `[B, L]` (right-padded; causal attention never looks right, so
    no attention mask is needed) and `history_input_ids` `[B, 256]`.
    """

    processor: BarkHfProcessor
    generation_config: BarkHfSemanticGenerationConfig = field(default_factory=BarkHfSemanticGenerationConfig)
    block_size: int = 1024

    _warned_of_long_text: bool = field(default=False, init=False, repr=False)

    def __call__(self, features: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        config = self.generation_config
        texts = [_text(feature, position) for position, feature in enumerate(features)]
        with _TruncationCounter() as long_texts:  # the processor warns per text: every row of every batch
            encoding = self.processor(texts)
        if long_texts.count and not self._warned_of_long_text:
            self._warned_of_long_text = True
            logger.warning(f"{long_texts.count} of this batch's {len(texts)} texts are longer than Bark reads "
                           f"({config.max_input_semantic_length} tokens); they train on their first "
                           f"{config.max_input_semantic_length} tokens, as generation reads them. Split such rows "
                           "into sentences to train on all of them. (Said once per collator.)")
        histories = [_semantic(feature, position, SEMANTIC_PROMPT_COLUMN) for position, feature in enumerate(features)]
        text, history = semantic_prompt_windows(encoding["input_ids"], encoding["attention_mask"], histories, config)
        sequences = [
            semantic_training_sequence(window, _semantic(feature, position), config, self.block_size)
            for position, (window, feature) in enumerate(zip(text, features, strict=True))
        ]
        return {
            "input_ids": _pad_right([ids for ids, _ in sequences], config.semantic_pad_token),
            "history_input_ids": history,
            "labels": _pad_right([labels for _, labels in sequences], IGNORE_INDEX),
        }


@dataclass
class BarkHfCoarseCollator:
    """Batches for the coarse stage from rows with `semantic_tokens` and `fine_tokens` (the first two
    codebooks are used). Each row gives one of generation's sliding windows, drawn at random
    (`random_windows=False`: always the first). Gives right-padded `input_ids` and `labels` `[B, L]`.
    """

    generation_config: BarkHfCoarseGenerationConfig = field(default_factory=BarkHfCoarseGenerationConfig)
    random_windows: bool = True

    def __post_init__(self) -> None:
        self.random_windows = checked_flag(self.random_windows, "random_windows")  # "no" is true

    def __call__(self, features: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        config = self.generation_config
        windows = []
        for position, feature in enumerate(features):
            codes = _codes(feature, position, config.n_coarse_codebooks, config.codebook_size)
            coarse = codes[: config.n_coarse_codebooks]  # [2, T]
            index = _random_index(coarse_window_count(coarse.shape[1], config), self.random_windows)
            windows.append(coarse_training_window(_semantic(feature, position), coarse, index, config))
        return {
            "input_ids": _pad_right([ids for ids, _ in windows], config.coarse_semantic_pad_token),
            "labels": _pad_right([labels for _, labels in windows], IGNORE_INDEX),
        }


@dataclass
class BarkHfFineCollator:
    """Batches for the fine stage from rows with `fine_tokens` `[8, T]`.

    One codebook per batch, drawn from `codebooks` (default: 2..7, the ones generation predicts),
    since the model predicts one codebook per pass; one of generation's windows per row, drawn at
    random (`random_windows=False`: the first). Gives `codebook_idx` (a 0-d tensor), `input_ids`
    `[B, 1024, 8]` and `labels` `[B, 1024]`.
    """

    generation_config: BarkHfFineGenerationConfig = field(default_factory=BarkHfFineGenerationConfig)
    codebooks: Sequence[int] | None = None
    random_windows: bool = True

    def __post_init__(self) -> None:
        # Codebook 0 always comes from the coarse stage; the model has a head for each of the others.
        self.random_windows = checked_flag(self.random_windows, "random_windows")
        predicted = range(1, self.generation_config.n_fine_codebooks)
        if self.codebooks is None:
            return
        # True == 1 and 2.0 == 2 pass `in range`: a bool or a float would have trained a head by accident.
        if not isinstance(self.codebooks, Sequence) or isinstance(self.codebooks, str) or not self.codebooks or any(
                not is_number(k, numbers.Integral) or k not in predicted for k in self.codebooks):
            raise ValueError(f"codebooks must be a non-empty list of whole numbers 1..{predicted[-1]} (generation "
                             f"predicts {N_COARSE_CODEBOOKS}..{predicted[-1]}), got {self.codebooks!r}.")
        self.codebooks = tuple(int(k) for k in self.codebooks)

    def __call__(self, features: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        config = self.generation_config
        codebooks = range(N_COARSE_CODEBOOKS, config.n_fine_codebooks) if self.codebooks is None else self.codebooks
        codebook_idx = codebooks[_random_index(len(codebooks), random=True)]
        windows = []
        for position, feature in enumerate(features):
            codes = _codes(feature, position, config.n_fine_codebooks, config.codebook_size)  # [8, T]
            index = _random_index(fine_window_count(codes.shape[1], config), self.random_windows)
            windows.append(fine_training_window(codes, codebook_idx, index, config))
        return {
            "codebook_idx": torch.tensor(codebook_idx),
            "input_ids": torch.stack([ids for ids, _ in windows]),
            "labels": torch.stack([labels for _, labels in windows]),
        }


def collator_for(
    model: BarkHfSemanticModel | BarkHfCoarseModel | BarkHfFineModel, processor: BarkHfProcessor | None = None
) -> BarkHfSemanticCollator | BarkHfCoarseCollator | BarkHfFineCollator:
    """The collator that trains `model` (a stage of `BarkHfModel`, or a peft model wrapping one) with its own
    generation config."""
    if callable(getattr(model, "get_base_model", None)):  # a PeftModel, as the Trainer gets it with LoRA
        model = model.get_base_model()
    if isinstance(model, BarkHfSemanticModel):
        if processor is None:
            raise ValueError("The semantic stage reads text: pass the processor to collator_for(model, processor).")
        return BarkHfSemanticCollator(processor, model.generation_config, model.config.block_size)
    if isinstance(model, BarkHfCoarseModel):
        return BarkHfCoarseCollator(model.generation_config)
    if isinstance(model, BarkHfFineModel):
        return BarkHfFineCollator(model.generation_config)
    raise TypeError(
        f"collator_for takes a stage (model.semantic, model.coarse_acoustics or model.fine_acoustics), "
        f"got {type(model).__name__}."
    )


# --- dataset preparation -------------------------------------------------------------------------


@runtime_checkable
class SemanticTokenizer(Protocol):
    """Audio -> Bark semantic tokens, for datasets that have none.

    Suno's tokenizer (HuBERT features, then k-means into 10 000 clusters) was never released; any
    object with this call fits: mono float32 audio `[samples]` at 24 kHz in, integer tokens `[S]`
    in 0..9 999 at 49.9 per second out. Resample inside if the model expects another rate.
    """

    def __call__(self, audio: np.ndarray) -> np.ndarray: ...


def import_train_extra(module: str, purpose: str) -> ModuleType:
    """`module`, imported; if it is missing, an ImportError naming the optional extra that installs it (a bare
    "No module named 'soundfile'" said nothing of how to get it). An installed package that fails to import (a
    datasets too old for this huggingface_hub) keeps its own error: reinstalling the extra would not fix it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name is None or not f"{module}.".startswith(f"{error.name}."):
            raise
        raise ImportError(f"{purpose} needs {module.split('.')[0]}, an optional extra: "
                          "pip install 'bark-hf[train]'.") from None


def resample_audio(audio: np.ndarray, sampling_rate: int, target_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float32 audio at `target_rate`, by polyphase filtering (`scipy.signal.resample_poly`)."""
    if sampling_rate < 1 or target_rate < 1:
        raise ValueError(f"Sampling rates must be positive, got {sampling_rate} Hz -> {target_rate} Hz.")
    if sampling_rate == target_rate:
        return audio
    resample_poly = import_train_extra("scipy.signal",
                                       f"Resampling audio from {sampling_rate} Hz to {target_rate} Hz").resample_poly
    divisor = math.gcd(int(sampling_rate), int(target_rate))
    return resample_poly(audio, target_rate // divisor, sampling_rate // divisor).astype(np.float32)


_MAX_CHANNELS = 8  # 7.1 sound


def _float_samples(array: np.ndarray) -> np.ndarray:
    """Float32 samples; integer PCM (int16, int32 or uint8, as scipy.io.wavfile reads it) scaled to [-1, 1]."""
    if array.dtype.kind not in "iu":
        return array.astype(np.float32)
    if array.dtype.itemsize > 4:
        raise ValueError(f"Integer samples must be 8, 16 or 32-bit PCM, got {array.dtype} (what a list of Python ints "
                         "becomes, so its range is unknown): give an int16/int32/uint8 array, or floats in [-1, 1].")
    info = np.iinfo(array.dtype)
    half_range = (int(info.max) - int(info.min) + 1) / 2  # 32 768 for int16; uint8 centres on 128
    return ((array - (int(info.min) + half_range)) / half_range).astype(np.float32)


def _mono(array: np.ndarray) -> np.ndarray:
    """Channels averaged. `datasets` puts them first, soundfile and scipy last: they are the shorter axis."""
    if array.ndim == 1 or array.size == 0:
        return array.reshape(-1)
    if array.ndim == 2 and array.shape[0] != array.shape[1] and min(array.shape) <= _MAX_CHANNELS:
        return array.mean(axis=int(np.argmin(array.shape)))
    raise ValueError(f"Audio must be mono [samples], or [channels, samples] or [samples, channels] with up to "
                     f"{_MAX_CHANNELS} channels on the shorter axis; got an array of shape {array.shape}. Give one "
                     "clip per row.")


def decode_audio(value: Any, sample_dtype: Any = None) -> tuple[np.ndarray, int]:
    """Mono float32 samples and their rate from a dataset cell; empty, NaN or infinite audio is refused.

    Takes `{"array", "sampling_rate"}` (a 2-D array's channels are its shorter axis, first or last;
    integer PCM is scaled to [-1, 1]) or an undecoded `Audio` cell `{"bytes", "path"}`, read with
    `soundfile`. Channels are averaged. `sample_dtype` is the dtype the array was stored in, which
    rows of a `datasets.Dataset` lose: they hold lists of Python numbers.
    """
    if isinstance(value, Mapping) and value.get("array") is not None:
        rate = value.get("sampling_rate")
        if rate is None:
            raise ValueError("An audio cell has an 'array' but no 'sampling_rate'; give both.")
        if not (float(rate) >= 1 and float(rate).is_integer()):
            raise ValueError(f"An audio cell's sampling_rate must be a whole number of Hz above 0, got {rate}.")
        samples = _mono(_float_samples(np.asarray(value["array"], dtype=sample_dtype)))
    elif isinstance(value, Mapping) and (value.get("bytes") is not None or value.get("path") is not None):
        soundfile = import_train_extra("soundfile", "Reading an audio cell's bytes or file")
        source = io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value["path"]
        if isinstance(source, str) and not os.path.isfile(source):
            raise FileNotFoundError(f"The audio file {source} does not exist.")
        try:
            array, rate = soundfile.read(source, dtype="float32", always_2d=True)  # [samples, channels]
        except soundfile.SoundFileError as error:
            raise ValueError(f"The audio cannot be read as a sound file ({error}).") from error
        samples = array.mean(axis=1)
    else:
        raise TypeError(
            "An audio cell must be {'array': samples, 'sampling_rate': Hz} or an audio file as {'bytes': ..., "
            f"'path': ...}} (a datasets Audio column); got {type(value).__name__}."
        )
    if samples.size == 0:
        raise ValueError("The audio is empty.")
    if not np.isfinite(samples).all():
        raise ValueError("The audio holds NaN or infinite samples; repair or drop the clip.")
    return samples, int(rate)


def _stored_sample_dtype(feature: Any) -> str | None:
    """The dtype an audio column of `{"array", "sampling_rate"}` stores its samples in, or None."""
    samples = feature.get("array") if isinstance(feature, dict) else None
    while hasattr(samples, "feature"):  # List(List(Value("int16"))) for [channels, samples]
        samples = samples.feature
    return getattr(samples, "dtype", None)


@torch.no_grad()
def encode_audio(codec_model: torch.nn.Module, audio: np.ndarray) -> np.ndarray:
    """EnCodec codes `[8, T]` (int16) of mono 24 kHz audio at Bark's 6 kbps, `T = ceil(samples / 320)`."""
    config = codec_model.config
    bandwidth = N_FINE_CODEBOOKS * math.log2(config.codebook_size) * config.frame_rate / 1000  # kbps
    weight = next(codec_model.parameters())
    values = torch.from_numpy(np.ascontiguousarray(audio)).to(weight.device, weight.dtype)[None, None]  # [1, 1, N]
    codes = codec_model.encode(values, bandwidth=bandwidth).audio_codes  # [1 chunk, 1, 8, T]
    return codes[0, 0].cpu().numpy().astype(np.int16)


def _checked_semantic_tokens(tokens: Any, row: int, n_frames: int) -> np.ndarray:
    array = np.asarray(tokens)
    if array.ndim == 1 and array.size == 0:  # e.g. a clip too short for one token: the error named no fix
        seconds = n_frames / COARSE_RATE_HZ
        fix = ("Drop clips this short (under about 0.05 s) before preparing" if seconds < 2 / SEMANTIC_RATE_HZ
               else "Give every row its tokens")
        raise ValueError(f"Row {row}: no semantic tokens for {seconds:.3f} s of audio (Bark's come at "
                         f"{SEMANTIC_RATE_HZ} per second), so the semantic and coarse stages have nothing to learn "
                         f"from it. {fix}.")
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"Row {row}: semantic tokens must be a non-empty 1-D integer array, got "
                         f"{array.dtype} of shape {array.shape}.")
    if array.min() < 0 or array.max() >= SEMANTIC_VOCAB_SIZE:
        raise ValueError(f"Row {row}: semantic tokens must be in 0..{SEMANTIC_VOCAB_SIZE - 1}, got "
                         f"{array.min()}..{array.max()}.")
    return array.astype(np.int16)


def _off_rate_warning(n_tokens: int, row: int, n_frames: int) -> str | None:
    """A warning when a row's semantic tokens do not come at Bark's rate (a tokenizer of another model), else None."""
    expected = n_frames * SEMANTIC_RATE_HZ / COARSE_RATE_HZ
    if abs(n_tokens - expected) <= 0.1 * expected + 2:
        return None
    return (f"Row {row}: {n_tokens} semantic tokens for {n_frames / COARSE_RATE_HZ:.2f} s of audio; Bark's semantic "
            f"tokens come at {SEMANTIC_RATE_HZ} per second (about {expected:.0f} here). Coarse windows pair semantic "
            "and codec tokens by that rate. (Said for the first such row only.)")


def _preparation_fingerprint(
    dataset: datasets.Dataset, codec_model: torch.nn.Module, semantic_tokenizer: Any, settings: Iterable[Any]
) -> str | None:
    """A cache key from the input dataset, the codec's weights, the tokenizer and the settings, or
    None (no caching) when the tokenizer cannot be hashed. EnCodec itself cannot be pickled, so
    `datasets` could not hash the map function on its own.
    """
    from datasets.fingerprint import Hasher

    weights = hashlib.sha256()
    for name, tensor in codec_model.state_dict().items():
        weights.update(name.encode())
        weights.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    try:
        tokenizer_hash = Hasher.hash(semantic_tokenizer)
    except Exception as error:  # any pickling failure: fall back to an uncached map
        logger.warning(f"The semantic tokenizer cannot be hashed ({error}); prepared data will not be cached.")
        return None
    return Hasher.hash([dataset._fingerprint, _PREPARATION_VERSION, weights.hexdigest(), tokenizer_hash, *settings])


def prepare_dataset(
    dataset: datasets.Dataset,
    codec_model: torch.nn.Module,
    semantic_tokenizer: SemanticTokenizer | None = None,
    semantic_column: str | None = None,
    audio_column: str = "audio",
    batch_size: int = 16,
    load_from_cache_file: bool = True,
) -> datasets.Dataset:
    """Tokens to train on, from a dataset of audio (and text).

    Adds `fine_tokens` (EnCodec codes `[8, T]` from `codec_model`, usually `BarkHfModel.codec_model`;
    its first two rows are the coarse codes) and `semantic_tokens` `[S]` (from `semantic_column`, or
    made by `semantic_tokenizer`, or left out when neither is given: the fine stage needs none),
    and drops the audio column. Audio may be an `Audio` column (decoded here with `soundfile`, not
    torchcodec) or `{"array", "sampling_rate"}` dicts, at any rate: it is resampled to 24 kHz.
    Runs as a batched `.map` with a progress bar; a dataset with cache files (e.g. from
    `load_from_disk`) caches the result, keyed on its fingerprint, the codec weights and the settings.
    """
    datasets = import_train_extra("datasets", "prepare_dataset")
    # A DatasetDict failed as "no column 'audio'" and a streamed IterableDataset as an AttributeError.
    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        raise TypeError(f"prepare_dataset takes one split (a datasets.Dataset); got a {type(dataset).__name__} with "
                        f"splits {sorted(dataset)}: pass one, e.g. dataset[{sorted(dataset)[0]!r}].")
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"prepare_dataset takes a datasets.Dataset, got {type(dataset).__name__}. Load the data "
                        "without streaming=True (its result is cached and saved with save_to_disk), or convert it: "
                        "datasets.Dataset.from_list(list(streamed)).")
    if semantic_tokenizer is not None and semantic_column is not None:
        raise ValueError("Pass semantic_column (tokens already in the dataset) or semantic_tokenizer, not both.")
    if semantic_tokenizer is not None and not isinstance(semantic_tokenizer, SemanticTokenizer):
        raise TypeError(
            f"semantic_tokenizer must be callable (audio -> tokens); got {type(semantic_tokenizer).__name__}."
        )
    for column in (audio_column, semantic_column):
        if column is not None and column not in dataset.column_names:
            raise ValueError(f"The dataset has no column {column!r}; its columns are {dataset.column_names}.")
    sample_dtype = _stored_sample_dtype(dataset.features[audio_column])  # an int16 clip reads back as Python ints
    if isinstance(dataset.features[audio_column], datasets.Audio):
        # Decoding an Audio column needs torchcodec; reading its bytes with soundfile does not.
        dataset = dataset.cast_column(audio_column, datasets.Audio(decode=False))

    warned_of_rate = False

    def encode_batch(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        nonlocal warned_of_rate
        encoded: dict[str, list] = {FINE_TOKENS_COLUMN: [], SEMANTIC_TOKENS_COLUMN: []}
        for position, row in enumerate(indices):
            try:
                audio = resample_audio(*decode_audio(batch[audio_column][position], sample_dtype))
            except (TypeError, ValueError, FileNotFoundError) as error:  # decode_audio's refusals, with the row
                kind = next(kind for kind in (TypeError, FileNotFoundError, ValueError) if isinstance(error, kind))
                raise kind(f"Row {row}: {error}") from error
            codes = encode_audio(codec_model, audio)
            encoded[FINE_TOKENS_COLUMN].append(codes)
            if semantic_column is not None:
                semantic = batch[semantic_column][position]
            elif semantic_tokenizer is not None:
                semantic = semantic_tokenizer(audio)
            else:
                continue
            tokens = _checked_semantic_tokens(semantic, row, codes.shape[1])
            warning = None if warned_of_rate else _off_rate_warning(tokens.size, row, codes.shape[1])
            if warning:
                logger.warning(warning)
                warned_of_rate = True
            encoded[SEMANTIC_TOKENS_COLUMN].append(tokens)
        if not encoded[SEMANTIC_TOKENS_COLUMN]:
            del encoded[SEMANTIC_TOKENS_COLUMN]
        return encoded

    settings = (audio_column, semantic_column, semantic_tokenizer is not None)
    return dataset.map(
        encode_batch,
        with_indices=True,
        batched=True,
        batch_size=batch_size,
        remove_columns=[audio_column],
        load_from_cache_file=load_from_cache_file,
        new_fingerprint=_preparation_fingerprint(dataset, codec_model, semantic_tokenizer, settings),
        desc="Encoding audio for Bark",
    )
