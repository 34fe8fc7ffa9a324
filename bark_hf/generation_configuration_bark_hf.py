"""Every constant of Bark's decoding, written down once.

Each stage has a generation config: the sampling settings a user tunes (with the original's
defaults) and the token layout that the weights were trained with. The numbers below are the
single source of truth; the model code reads them from these configs, never from literals.

Token layout (see docs/architecture.md):

* semantic stage input: ``[text (256) | semantic history (256) | infer (1) | generated ...]``,
  text ids shifted by ``text_encoding_offset``; the first two windows are summed position-wise.
* coarse stage input: ``[semantic window (256) | infer (1) | coarse history + generated ...]``,
  coarse code ``c`` of codebook ``k`` is token ``semantic_vocab_size + k * codebook_size + c``.
* fine stage input: ``[T, 8]`` raw codes, ``codebook_size`` marks "not yet predicted".
"""

from __future__ import annotations

import dataclasses
import json
import os
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np

from .atomic import atomic_path
from .checks import checked_flag, checked_positive_number, checked_whole_number, is_number

if TYPE_CHECKING:
    from .modeling_bark_hf import BarkHfModel

# Facts shared by several stages. Each appears here once and feeds the fields below.
SEMANTIC_VOCAB_SIZE = 10_000
"""Number of semantic (HuBERT-cluster) tokens; token 10 000 is the semantic pad and EOS."""
TOKENIZER_PAD_ID = 0
"""[PAD] of Bark's tokenizer (BERT's multilingual vocabulary), which pads the processor's `input_ids`; no text
encodes to it."""
SEMANTIC_RATE_HZ = 49.9
"""Semantic tokens per second of audio."""
CODEBOOK_SIZE = 1_024
"""Entries in each EnCodec codebook."""
N_COARSE_CODEBOOKS = 2
N_FINE_CODEBOOKS = 8
COARSE_RATE_HZ = 75
"""EnCodec frames per second (24 kHz audio, hop 320)."""
SAMPLE_RATE = 24_000
"""Output audio sample rate in Hz."""

COARSE_HISTORY_RANGE = (60, 630)
"""Allowed `max_coarse_history`, as the original enforces: 60 is fastest, 630 the most context."""

GENERATION_CONFIG_NAME = "generation_config.json"

_ConfigT = TypeVar("_ConfigT", bound="_JsonConfig")

_PROBABILITIES = {"top_p": "the probability mass kept; 0 keeps only the likeliest token",
                  "min_eos_p": "the end-of-speech probability that stops an item; 0 stops at once"}
"""Settings that are probabilities, with what they mean, for their error."""
_LARGEST_FLOAT32 = float(np.finfo(np.float32).max)


class _JsonConfig:
    """Plain-dataclass configs saved as JSON.

    These are deliberately not `transformers.GenerationConfig`: Bark's stages run their own
    decoding loops, and GenerationConfig's validation of fields that do not apply to them
    (beams, `do_sample`) would only add noise.
    """

    TOKEN_LAYOUT: ClassVar[tuple[str, ...]] = ()
    """Fields that describe the checkpoint's token layout (vocabularies, special tokens, rates, codebooks,
    prompt windows): the weights were trained with them, so one `generate` call cannot change them."""
    _GREEDY_HINT: ClassVar[str] = " (top_k=1 decodes greedily)"
    """What a temperature error adds: 0 or None is how other libraries ask for greedy decoding."""

    def __post_init__(self) -> None:
        """Refuse settings that would fail deep inside torch or silently do something else: a zero temperature
        divides by zero, a window of 0 tokens too, a history of 0 frames slices them all, a rate of -75 runs."""
        # Stored as Python numbers: torch.topk, slices and range() take no 2.0 or numpy integers, and tensors
        # compare with no Fraction. Every whole-number field is a count, a length, a hop or a token id, every float
        # field a temperature, a rate or a duration: all > 0. Optional fields may be None; top_p and min_eos_p are
        # probabilities, below.
        for item in dataclasses.fields(self):  # type: ignore[arg-type]
            value, type_name = getattr(self, item.name), str(item.type)  # annotations are strings here
            if (value is None and type_name.endswith(" | None")) or item.name in _PROBABILITIES:
                continue
            name = f"{item.name} (or None)" if type_name.endswith(" | None") else item.name
            if type_name.startswith("int"):
                setattr(self, item.name, checked_whole_number(value, name))
            elif type_name.startswith("float"):
                hint = self._GREEDY_HINT if item.name == "temperature" else ""
                setattr(self, item.name, checked_positive_number(value, name, hint))
            elif type_name == "bool":
                checked_flag(value, item.name)
        for name, meaning in _PROBABILITIES.items():
            value = getattr(self, name, None)
            if value is not None:  # [0, 1] as the original and transformers take them; NaN fails both tests
                if not (is_number(value) and 0 <= value <= 1):
                    raise ValueError(f"{name} must be None or a number within [0, 1] ({meaning}), got {value!r}.")
                setattr(self, name, float(value))
        temperature = getattr(self, "temperature", None)
        filters = [name for name in ("top_k", "top_p") if getattr(self, name, None) is not None]
        if temperature is not None and temperature > _LARGEST_FLOAT32 and filters:
            raise ValueError(
                f"temperature={temperature!r} is larger than float32 can hold (sampling divides float32 logits by "
                f"it), so the logits that {' and '.join(filters)} removed (-inf) would become NaN; use a temperature "
                "of at most 3.4e38.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[_ConfigT], values: dict[str, Any]) -> _ConfigT:
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in values.items() if k in known})

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write this config as `generation_config.json` in `save_directory` (made if missing), as transformers'
        `GenerationConfig.save_pretrained` does; `from_pretrained` reads it back."""
        os.makedirs(save_directory, exist_ok=True)
        save_generation_config(self, save_directory)

    @classmethod
    def from_pretrained(cls: type[_ConfigT], directory: str | os.PathLike) -> _ConfigT:
        """The config in `directory`'s `generation_config.json` (a local folder, e.g. a saved model's)."""
        if not os.path.isfile(os.path.join(directory, GENERATION_CONFIG_NAME)):
            raise FileNotFoundError(f"{directory} holds no {GENERATION_CONFIG_NAME}; pass a local folder written by "
                                    "save_pretrained (a config's or a model's).")
        return load_generation_config(cls, directory)

    def updated(self: _ConfigT, **overrides: Any) -> _ConfigT:
        """A copy with `overrides` applied; unknown names raise a `ValueError` listing valid ones."""
        known = {f.name for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(
                f"{type(self).__name__} has no setting {', '.join(map(repr, unknown))}; "
                f"valid settings are: {', '.join(sorted(known))}."
            )
        return dataclasses.replace(self, **overrides)  # type: ignore[type-var]

    @classmethod
    def call_settings(cls) -> list[str]:
        """The fields one `generate` call may set: all but the token layout."""
        return sorted(item.name for item in dataclasses.fields(cls) if item.name not in cls.TOKEN_LAYOUT)

    def for_call(self: _ConfigT, **settings: Any) -> _ConfigT:
        """A copy with one `generate` call's `settings` (sampling, lengths, windows), refusing the token layout:
        a call with another vocabulary size or rate gave wrong-length output or an IndexError deep in torch."""
        unknown = sorted(set(settings) - {item.name for item in dataclasses.fields(self)})
        if unknown:  # `updated` would list the token layout too, which a call may not set
            raise ValueError(f"{type(self).__name__} has no setting {', '.join(map(repr, unknown))}; valid settings "
                             f"are: {', '.join(self.call_settings())}.")
        fixed = sorted(set(settings) & set(self.TOKEN_LAYOUT))
        if fixed:
            raise ValueError(
                f"{', '.join(fixed)} {'is' if len(fixed) == 1 else 'are'} part of the checkpoint's token layout, not a "
                "setting of one call; a model trained with another layout sets it in its saved generation config."
            )
        return self.updated(**settings)


@dataclass
class BarkHfSemanticGenerationConfig(_JsonConfig):
    """Text -> semantic tokens. Follows bark/generation.py `generate_text_semantic`."""

    TOKEN_LAYOUT: ClassVar[tuple[str, ...]] = (
        "max_input_semantic_length", "semantic_vocab_size", "semantic_pad_token", "text_encoding_offset",
        "text_pad_token", "semantic_infer_token", "semantic_rate_hz")

    temperature: float = 0.7
    """Softmax temperature of sampling."""
    top_k: int | None = None
    """Keep only the k most likely tokens before sampling (1 gives greedy decoding)."""
    top_p: float | None = None
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (0: the likeliest alone)."""
    min_eos_p: float | None = 0.2
    """Stop as soon as the end-of-speech probability reaches this, even if it was not drawn."""
    allow_early_stop: bool = True
    """Whether end-of-speech may be generated at all; False always runs to the step cap."""
    max_gen_duration_s: float | None = None
    """Stop after this many seconds of semantic tokens."""
    max_new_tokens: int = 768
    """Hard cap on generated semantic tokens (about 15 s of audio)."""
    max_input_semantic_length: int = 256
    """Length of both the text window and the semantic-history window."""
    semantic_vocab_size: int = SEMANTIC_VOCAB_SIZE
    semantic_pad_token: int = SEMANTIC_VOCAB_SIZE
    """Pads the semantic history; as a generated token it means end of speech."""
    text_encoding_offset: int = 10_048
    """Added to tokenizer ids so that text and semantic tokens share one embedding table."""
    text_pad_token: int = 129_595
    """Pads the text window."""
    semantic_infer_token: int = 129_599
    """Marks the start of generation, after the two windows."""
    semantic_rate_hz: float = SEMANTIC_RATE_HZ


@dataclass
class BarkHfCoarseGenerationConfig(_JsonConfig):
    """Semantic tokens -> the first two EnCodec codebooks. Follows bark/generation.py `generate_coarse`."""

    TOKEN_LAYOUT: ClassVar[tuple[str, ...]] = (
        "max_coarse_input_length", "semantic_vocab_size", "coarse_semantic_pad_token", "coarse_infer_token",
        "codebook_size", "n_coarse_codebooks", "semantic_rate_hz", "coarse_rate_hz", "context_window_size")

    temperature: float = 0.7
    top_k: int | None = None
    top_p: float | None = None
    max_coarse_history: int = 630
    """Coarse tokens of history kept in each window (60 = faster, 630 = most context)."""
    sliding_window_len: int = 60
    """Coarse tokens generated per window before the context is rebuilt."""
    max_coarse_input_length: int = 256
    """Length of the semantic window fed before the infer token."""
    semantic_vocab_size: int = SEMANTIC_VOCAB_SIZE
    """Coarse codes are offset past the semantic vocabulary."""
    coarse_semantic_pad_token: int = 12_048
    """Pads the semantic window."""
    coarse_infer_token: int = 12_050
    """Separates the semantic window from the coarse tokens."""
    codebook_size: int = CODEBOOK_SIZE
    n_coarse_codebooks: int = N_COARSE_CODEBOOKS
    semantic_rate_hz: float = SEMANTIC_RATE_HZ
    coarse_rate_hz: float = COARSE_RATE_HZ
    context_window_size: int = 1_024
    """Positions the coarse GPT can attend over; bounds history + window + semantic context."""

    def __post_init__(self) -> None:
        low, high = COARSE_HISTORY_RANGE
        # Before the base class's checks, so that 0 is told the range rather than "a whole number >= 1".
        if is_number(self.max_coarse_history) and not low <= self.max_coarse_history <= high:
            raise ValueError(f"max_coarse_history must be within [{low}, {high}], got {self.max_coarse_history}.")
        super().__post_init__()
        room = self.context_window_size - self.max_coarse_input_length
        if self.max_coarse_history + self.sliding_window_len > room:
            raise ValueError(
                f"max_coarse_history + sliding_window_len must be at most {room}, got "
                f"{self.max_coarse_history} + {self.sliding_window_len}."
            )

    @property
    def semantic_to_coarse_ratio(self) -> float:
        """Coarse tokens (both codebooks interleaved) per semantic token."""
        return self.coarse_rate_hz / self.semantic_rate_hz * self.n_coarse_codebooks


@dataclass
class BarkHfFineGenerationConfig(_JsonConfig):
    """Coarse codebooks -> all eight. Follows bark/generation.py `generate_fine`."""

    TOKEN_LAYOUT: ClassVar[tuple[str, ...]] = ("codebook_size", "n_fine_codebooks")
    _GREEDY_HINT: ClassVar[str] = " (None takes the argmax)"

    temperature: float | None = 0.5
    """Softmax temperature; None takes the argmax."""
    max_fine_history_length: int = 512
    """Frames of the voice preset's fine codes placed before the coarse codes."""
    max_fine_input_length: int = 1_024
    """Frames in one (non-causal) window."""
    fine_window_hop: int = 512
    """Frames the window advances by."""
    codebook_size: int = CODEBOOK_SIZE
    """Also the input id that marks a code not predicted yet."""
    n_fine_codebooks: int = N_FINE_CODEBOOKS

    def __post_init__(self) -> None:
        super().__post_init__()
        # Window i fills from history + i * hop; the next one starts filling a hop later, within this window.
        if self.max_fine_history_length + self.fine_window_hop > self.max_fine_input_length:
            raise ValueError(
                f"max_fine_history_length + fine_window_hop must be at most max_fine_input_length "
                f"({self.max_fine_input_length}), got {self.max_fine_history_length} + {self.fine_window_hop}: "
                "frames between two windows would never be predicted."
            )


@dataclass
class BarkHfGenerationConfig(_JsonConfig):
    """The three stage configs of a composite model, saved together as generation_config.json."""

    semantic_config: BarkHfSemanticGenerationConfig = field(default_factory=BarkHfSemanticGenerationConfig)
    coarse_acoustics_config: BarkHfCoarseGenerationConfig = field(default_factory=BarkHfCoarseGenerationConfig)
    fine_acoustics_config: BarkHfFineGenerationConfig = field(default_factory=BarkHfFineGenerationConfig)
    sample_rate: int = SAMPLE_RATE

    STAGE_CLASSES: ClassVar[dict[str, type]] = {
        "semantic_config": BarkHfSemanticGenerationConfig,
        "coarse_acoustics_config": BarkHfCoarseGenerationConfig,
        "fine_acoustics_config": BarkHfFineGenerationConfig,
    }

    def __setattr__(self, name: str, value: Any) -> None:
        """Stage configs must be of their stage's class. On a composite model's view (`view_of`), assigning one
        also sets that stage's own config, and `sample_rate`, which is the codec's, cannot be set."""
        stage_cls = self.STAGE_CLASSES.get(name)
        if stage_cls is not None and not isinstance(value, stage_cls):
            raise TypeError(f"{name} must be a {stage_cls.__name__}, got {type(value).__name__}.")
        model_reference = self.__dict__.get("_model")
        model = None if model_reference is None else model_reference()
        if model is not None and name == "sample_rate":
            raise AttributeError("A model's generation_config.sample_rate cannot be set: the audio's rate is the "
                                 "codec's. Set the stage configs (semantic_config, ...) or their fields.")
        super().__setattr__(name, value)
        if model is not None and stage_cls is not None:
            getattr(model, name.removesuffix("_config")).generation_config = value

    @classmethod
    def view_of(cls, model: BarkHfModel) -> BarkHfGenerationConfig:
        """The stage configs of the composite `model` (its `semantic`, `coarse_acoustics` and `fine_acoustics`
        stages), not copied: changing a field or assigning a stage config changes the model's. A deep copy
        (or a pickle) is a plain config again, tied to no model."""
        view = cls(**{name: getattr(model, name.removesuffix("_config")).generation_config
                      for name in cls.STAGE_CLASSES}, sample_rate=model.sampling_rate)
        object.__setattr__(view, "_model", weakref.ref(model))
        return view

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles are plain configs, tied to no model."""
        return {name: value for name, value in self.__dict__.items() if name != "_model"}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BarkHfGenerationConfig:
        stages = {name: stage_cls.from_dict(values.get(name) or {}) for name, stage_cls in cls.STAGE_CLASSES.items()}
        return cls(**stages, sample_rate=values.get("sample_rate", SAMPLE_RATE))


def generation_config_json(config: _JsonConfig) -> str:
    """`config` as JSON, checked first: a field set by assignment skipped the checks, and a folder must not
    hold a config that cannot be loaded (or written)."""
    for part in (config, *(value for value in vars(config).values() if isinstance(value, _JsonConfig))):
        dataclasses.replace(part)  # runs __post_init__
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=_json_scalar) + "\n"


def save_generation_config(config: _JsonConfig, save_directory: str | os.PathLike) -> None:
    """Write `config` as `generation_config.json` in `save_directory`."""
    text = generation_config_json(config)
    with atomic_path(os.path.join(save_directory, GENERATION_CONFIG_NAME)) as path:
        path.write_text(text, encoding="utf-8")


def _json_scalar(value: Any) -> Any:
    """A numpy scalar (number or bool), which the configs accept, as the Python value JSON can hold."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        return value.item()
    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    raise TypeError(f"A generation setting of type {kind} ({value!r}) cannot be saved as JSON; use a plain number.")


_TRANSFORMERS_SAME_FIELDS = {
    "semantic_config": ("max_new_tokens", "max_input_semantic_length", "semantic_vocab_size", "semantic_pad_token",
                        "text_encoding_offset", "text_pad_token", "semantic_infer_token", "semantic_rate_hz"),
    "coarse_acoustics_config": ("max_coarse_history", "sliding_window_len", "max_coarse_input_length",
                                "coarse_semantic_pad_token", "coarse_infer_token", "n_coarse_codebooks",
                                "coarse_rate_hz"),
    "fine_acoustics_config": ("max_fine_history_length", "max_fine_input_length", "n_fine_codebooks"),
}
"""Fields of transformers' `BarkGenerationConfig` stages that mean what ours of the same name mean."""


def from_transformers_generation_config(values: dict[str, Any]) -> dict[str, Any]:
    """The settings of transformers' nested `BarkGenerationConfig` (as `suno/bark` saves it) in our layout, taken
    where they change what transformers' Bark does; Bark's defaults fill the rest.

    Lengths, windows and the token layout are taken as they are. A semantic or coarse temperature is taken only
    where the stage has `do_sample` true, since transformers' Bark decodes greedily otherwise and ignores it
    (greedy decoding is asked per call here: `do_sample=False`). A fine temperature of 1.0 or None is
    transformers' argmax, which is our None. `top_k` and `top_p` are left out: suno/bark's file holds
    `GenerationConfig`'s generic top_k=50, which Bark's sampling never had. Before, the whole file was
    replaced by the defaults, so an edited max_new_tokens or temperature was dropped without a word.
    """
    stages = {name: values[name] if isinstance(values.get(name), dict) else {} for name in _TRANSFORMERS_SAME_FIELDS}
    ours = {name: {key: stages[name][key] for key in keys if key in stages[name]}
            for name, keys in _TRANSFORMERS_SAME_FIELDS.items()}
    for name in ("semantic_config", "coarse_acoustics_config"):
        if stages[name].get("do_sample") is True and stages[name].get("temperature") is not None:
            ours[name]["temperature"] = stages[name]["temperature"]
    if is_number(stages["semantic_config"].get("min_eos_p")):  # None is transformers' "not set"
        ours["semantic_config"]["min_eos_p"] = stages["semantic_config"]["min_eos_p"]
    if "temperature" in stages["fine_acoustics_config"]:
        temperature = stages["fine_acoustics_config"]["temperature"]
        ours["fine_acoustics_config"]["temperature"] = None if temperature in (None, 1) else temperature
    # transformers keeps these once; each of our stages that reads them holds its own copy.
    for key in ("semantic_vocab_size", "semantic_rate_hz"):
        if key in ours["semantic_config"]:
            ours["coarse_acoustics_config"][key] = ours["semantic_config"][key]
    if "codebook_size" in values:
        for name in ("coarse_acoustics_config", "fine_acoustics_config"):
            ours[name]["codebook_size"] = values["codebook_size"]
    return ours


def load_generation_config(config_cls: type[_ConfigT], directory: str | os.PathLike) -> _ConfigT:
    """Read `generation_config.json` from `directory`, or the defaults when there is none.

    A transformers-format Bark folder's file (another layout) is read through
    `from_transformers_generation_config`.
    """
    path = os.path.join(directory, GENERATION_CONFIG_NAME)
    if not os.path.isfile(path):
        return config_cls()
    fix = "correct it, delete it (Bark's default settings then apply) or save the model again"
    try:
        with open(path, encoding="utf-8") as handle:
            values = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); {fix}.") from error
    if not isinstance(values, dict):
        raise ValueError(f"{path} holds a JSON {type(values).__name__}, not an object of generation settings; {fix}.")
    if values.get("model_type") == "bark" or "transformers_version" in values:
        values = from_transformers_generation_config(values)
    # A stage loaded from a whole model's folder: its settings are one part of the file (else all were defaults).
    for name, stage_cls in BarkHfGenerationConfig.STAGE_CLASSES.items():
        if config_cls is stage_cls and isinstance(values.get(name), dict):
            values = values[name]
    try:
        return config_cls.from_dict(values)
    except (AttributeError, TypeError, ValueError) as error:  # AttributeError: a stage's settings not an object
        raise ValueError(f"{path}: {error}; {fix}.") from error
