"""Text and voice-preset preprocessing for Bark.

`BarkHfProcessor` turns text into the token ids Bark's semantic stage reads (exactly the ids
of the original `_tokenize`, without Bark's text offset, which the model adds) and turns voice
presets into the three prompt arrays the stages condition on. Presets are stored in
transformers' Bark layout (`speaker_embeddings_path.json` + `speaker_embeddings/*.npy`), so a
folder written here is readable by `transformers.BarkProcessor` and the other way round.
"""

from __future__ import annotations

import difflib
import json
import logging
import numbers
import os
import re
import unicodedata
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import PureWindowsPath
from typing import Any

import numpy as np
import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
from transformers import BatchEncoding, BertTokenizer, PreTrainedTokenizerBase, ProcessorMixin

from .atomic import atomic_path, check_save_directory
from .checks import is_number
from .generation_configuration_bark_hf import (
    COARSE_RATE_HZ,
    CODEBOOK_SIZE,
    N_COARSE_CODEBOOKS,
    N_FINE_CODEBOOKS,
    SEMANTIC_RATE_HZ,
    SEMANTIC_VOCAB_SIZE,
    BarkHfSemanticGenerationConfig,
)
from .hub import HUB_DOWNLOAD_OPTIONS, push_folder_to_hub

logger = logging.getLogger(__name__)

PRESET_KEYS = ("semantic_prompt", "coarse_prompt", "fine_prompt")
"""The arrays of a voice preset, in the order the stages use them."""
SPEAKER_EMBEDDINGS_FILE = "speaker_embeddings_path.json"
SPEAKER_EMBEDDINGS_DIR = "speaker_embeddings"
# transformers' index names the folder the paths are relative to under this key; it is not a preset.
_REPO_OR_PATH_KEY = "repo_or_path"
TRUNCATION_WARNING = ("Text is %d tokens long but Bark reads at most %d: its last %s%% (%d tokens) is dropped. "
                      "Split long text into sentences and generate them one by one to keep it all.")
"""Logged for each text cut to the semantic stage's window (the training collator counts them instead)."""

_PRESET_NDIM = {"semantic_prompt": 1, "coarse_prompt": 2, "fine_prompt": 2}
_PRESET_ROWS = {"coarse_prompt": N_COARSE_CODEBOOKS, "fine_prompt": N_FINE_CODEBOOKS}
_PRESET_VOCAB = {"semantic_prompt": SEMANTIC_VOCAB_SIZE, "coarse_prompt": CODEBOOK_SIZE, "fine_prompt": CODEBOOK_SIZE}
_PRESET_MEANING = {
    "semantic_prompt": "semantic tokens, shape (n,)",
    "coarse_prompt": f"coarse codes, shape ({N_COARSE_CODEBOOKS}, m)",
    "fine_prompt": f"fine codes, shape ({N_FINE_CODEBOOKS}, m)",
}

# A folder's tokenizer: transformers 5 saves tokenizer.json; the original release and older folders hold vocab.txt.
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")
# What a processor needs from a Hub repository: tokenizer files and presets, never the weights.
_HUB_ALLOW_PATTERNS = ["*.json", "*.txt", f"{SPEAKER_EMBEDDINGS_DIR}/*"]

VoicePreset = Mapping[str, Any] | str | os.PathLike
"""A preset name known to the processor, a path to an original `.npz`, or a dict of arrays."""


# The tokenizer settings transformers' BarkProcessor passes on, each with the value Bark's text encoding uses: the
# original encodes without special tokens and reads a fixed window, padded and cut to `max_length`.
_BARK_TOKENIZER_SETTINGS = {"add_special_tokens": False, "return_attention_mask": True, "return_token_type_ids": False,
                            "padding": "max_length", "truncation": True}


def _check_tokenizer_settings(settings: Mapping[str, Any]) -> None:
    """Refuse tokenizer settings Bark cannot honour, naming them, instead of ignoring them."""
    for key, value in settings.items():
        if key not in _BARK_TOKENIZER_SETTINGS:
            raise TypeError(f"BarkHfProcessor got an unknown setting {key!r}; it takes text, voice_preset, "
                            f"return_tensors, max_length and, as transformers' BarkProcessor, "
                            f"{', '.join(sorted(_BARK_TOKENIZER_SETTINGS))}.")
        expected = _BARK_TOKENIZER_SETTINGS[key]
        kind = (bool, np.bool_) if isinstance(expected, bool) else str  # str: also transformers' PaddingStrategy
        if not isinstance(value, kind) or value != expected:
            raise ValueError(f"Bark's text encoding uses {key}={expected!r}, as the original does; got {value!r}. "
                             "Leave the setting out (max_length sets the window's length).")


_FLOAT_FIX = (" The original casts floats to integers silently; here convert them first: array.astype(np.int64) "
              "or tensor.long().")


def normalize_whitespace(text: str) -> str:
    """Every whitespace run as one space, none at the ends: the original's `_normalize_whitespace`, also used by
    long-form chunking, whose token counts must be the processor's."""
    return re.sub(r"\s+", " ", text).strip()


def _as_array(key: str, value: Any) -> np.ndarray:
    """`value` as a numpy array; what numpy cannot take (bfloat16, meta or sparse tensors, ragged lists) is named."""
    if isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex()):
        raise ValueError(f"Voice preset {key!r} has dtype {value.dtype}; expected an integer dtype "
                         f"({_PRESET_MEANING[key]}).{_FLOAT_FIX if value.is_floating_point() else ''}")
    try:
        if isinstance(value, torch.Tensor):
            return value.detach().cpu().numpy()
        return np.asarray(value)
    except (TypeError, ValueError, RuntimeError, NotImplementedError) as error:
        raise ValueError(f"Voice preset {key!r} cannot be read as an integer array ({_PRESET_MEANING[key]}): "
                         f"{error}") from None


def _checked_codes(key: str, value: Any) -> np.ndarray:
    array = _as_array(key, value)
    if array.ndim != _PRESET_NDIM[key]:
        raise ValueError(
            f"Voice preset {key!r} has {array.ndim} dimension(s) (shape {tuple(array.shape)}); "
            f"expected {_PRESET_NDIM[key]}: {_PRESET_MEANING[key]}."
        )
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"Voice preset {key!r} has dtype {array.dtype}; expected an integer dtype ({_PRESET_MEANING[key]})."
            f"{_FLOAT_FIX if np.issubdtype(array.dtype, np.floating) else ''}"
        )
    if key in _PRESET_ROWS and array.shape[0] != _PRESET_ROWS[key]:
        raise ValueError(
            f"Voice preset {key!r} has {array.shape[0]} codebook rows (shape {tuple(array.shape)}); "
            f"expected {_PRESET_ROWS[key]}: {_PRESET_MEANING[key]}."
        )
    if key == "semantic_prompt" and array.size == 0:
        raise ValueError("Voice preset 'semantic_prompt' is empty; expected at least one semantic token.")
    if array.size:
        low, high = int(array.min()), int(array.max())
        if low < 0 or high >= _PRESET_VOCAB[key]:
            raise ValueError(
                f"Voice preset {key!r} has values in [{low}, {high}]; expected values in "
                f"[0, {_PRESET_VOCAB[key]})."
            )
    return array.astype(np.int64)


def check_not_output_pair(value: Any) -> None:
    """Refuse the `(full_generation, audio)` pair of `generate_audio(..., output_full=True)` where a preset is meant,
    with one message at every entry point; a tuple otherwise reads as one preset per text, or is "not a mapping".
    Only an audio array second tells the pair apart: `(preset, "v2/en_speaker_1")` or `(preset, None)` are presets
    for two texts."""
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], Mapping) \
            and isinstance(value[1], (np.ndarray, torch.Tensor)):
        raise TypeError("A voice preset is a dict of arrays, not the (full_generation, audio) tuple that "
                        "generate_audio(..., output_full=True) returns; pass its first item: full_generation, audio "
                        "= generate_audio(..., output_full=True).")


def validate_voice_preset(preset: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Check a voice preset as the original's three stages do, and return int64 copies.

    The original checks each array only when the stage that reads it runs (with asserts);
    checking all of them up front turns a late crash deep in generation into one message here.
    Two checks are stricter than the original's: exactly the three keys, and as many fine frames
    as coarse frames (a preset the original saves always has both).
    """
    check_not_output_pair(preset)
    if not isinstance(preset, Mapping):
        raise TypeError(
            f"A voice preset is a mapping of {', '.join(PRESET_KEYS)} to integer arrays; "
            f"got {type(preset).__name__}."
        )
    missing = [key for key in PRESET_KEYS if key not in preset]
    extra = sorted(map(str, set(preset) - set(PRESET_KEYS)))
    if missing or extra:
        found = ", ".join(sorted(map(str, preset))) or "no keys"
        # a processor's whole output (input_ids, attention_mask, history_prompt) passed as the preset
        hint = " This is a processor's output; pass its ['history_prompt']." if "history_prompt" in preset else ""
        raise ValueError(
            f"A voice preset holds exactly the keys {', '.join(PRESET_KEYS)}; found {found} "
            f"(missing: {', '.join(missing) or 'none'}; unexpected: {', '.join(extra) or 'none'}).{hint}"
        )
    arrays = {key: _checked_codes(key, preset[key]) for key in PRESET_KEYS}
    n_semantic = arrays["semantic_prompt"].shape[0]
    n_coarse = arrays["coarse_prompt"].shape[1]
    n_fine = arrays["fine_prompt"].shape[1]
    if n_fine != n_coarse:
        raise ValueError(
            f"Voice preset 'fine_prompt' has {n_fine} frames but 'coarse_prompt' has {n_coarse}; "
            "expected the same number of frames in both."
        )
    expected_ratio = round(COARSE_RATE_HZ / SEMANTIC_RATE_HZ, 1)
    ratio = round(n_coarse / n_semantic, 1)
    if ratio != expected_ratio:
        raise ValueError(
            f"Voice preset 'coarse_prompt' has {n_coarse} frames for {n_semantic} semantic tokens "
            f"(ratio {ratio}); expected a ratio of {expected_ratio} ({COARSE_RATE_HZ} Hz coarse frames "
            f"per {SEMANTIC_RATE_HZ} Hz semantic tokens), as the original `generate_coarse` requires."
        )
    return arrays


def _explained(error: ValueError) -> str:
    """numpy's refusal of a pickled object array names the flag that unlocks it; say why it stays locked instead."""
    if "allow_pickle" in str(error):
        return ("it holds a pickled object array, which bark-hf never loads (unpickling can run code); save the "
                "preset's integer arrays with np.savez or np.save instead")
    return str(error)


def read_voice_preset_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read and validate one original Bark preset (`.npz`); errors name the file. `~` is expanded, as for model
    folders."""
    path = os.path.expanduser(os.fspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(f"The voice preset {path!r} is a folder; give the path of an .npz file.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No voice preset file at {path!r}. A preset stored with the model is named without "
                                "'.npz' (see `processor.available_voice_presets` or `bark-hf voices`).")
    if not zipfile.is_zipfile(path):  # else numpy takes it for a pickle, and its error advises loading that
        raise ValueError(f"Voice preset file {path!r} is not an .npz archive; a Bark preset is an .npz of "
                         "semantic_prompt, coarse_prompt and fine_prompt.")
    try:
        with np.load(path, allow_pickle=False) as loaded:
            arrays = {key: loaded[key] for key in loaded.files}
        # numpy hands back a member that is not .npy data as raw bytes, which the checks saw as "shape ()"
        raw = sorted(key for key, value in arrays.items() if not isinstance(value, np.ndarray))
        if raw:
            raise ValueError(f"its member(s) {', '.join(raw)} are not .npy arrays; save the preset's integer arrays "
                             "with np.savez")
        return validate_voice_preset(arrays)
    except ValueError as error:
        raise ValueError(f"Voice preset file {path!r}: {_explained(error)}") from error
    except (OSError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"Voice preset file {path!r} is not a readable .npz archive: {error}") from error


def check_voice_preset_name(name: str) -> str:
    """Refuse names that could not be saved as files inside `speaker_embeddings/`.

    Names become file paths on save (`v2/en_speaker_1` -> `speaker_embeddings/v2/en_speaker_1_*.npy`),
    so anything that could point outside that folder is rejected.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"A voice preset name is a non-empty string such as 'v2/en_speaker_1'; got {name!r}.")
    if "\\" in name or os.path.isabs(name) or PureWindowsPath(name).drive:
        raise ValueError(
            f"Voice preset name {name!r} must be a relative, '/'-separated path such as 'v2/en_speaker_1' "
            "(no backslashes, drives or leading '/')."
        )
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise ValueError(
            f"Voice preset name {name!r} has an empty, '.' or '..' component; use a plain relative path "
            "such as 'v2/en_speaker_1'."
        )
    if name == _REPO_OR_PATH_KEY:
        raise ValueError(f"{_REPO_OR_PATH_KEY!r} is reserved by the preset index; choose another name.")
    return name


def _inside_folder(folder: str, relative: Any, index_path: str) -> str:
    """Resolve a path read from an index file, refusing any that leaves the folder.

    The check is lexical on purpose: a Hub cache snapshot holds symlinks into a sibling blobs
    folder, which resolving links would wrongly reject.
    """
    if not isinstance(relative, str) or not relative:
        raise ValueError(f"{index_path}: expected a relative file path, found {relative!r}.")
    base = os.path.abspath(folder)
    target = os.path.abspath(os.path.join(base, relative))
    try:
        inside = os.path.commonpath([base, target]) == base
    except ValueError:  # different drives
        inside = False
    if not inside or target == base:
        raise ValueError(f"{index_path}: path {relative!r} points outside {base}; refusing to read it.")
    return target


def _read_preset_index(folder: str, index_name: str) -> dict[str, dict[str, str]]:
    """Map preset names to the absolute paths of their three `.npy` files, without loading them."""
    index_path = os.path.join(folder, index_name)
    if not os.path.isfile(index_path):
        logger.info("No %s in %s: the processor starts without voice presets.", index_name, folder)
        return {}
    with open(index_path, encoding="utf-8") as handle:
        try:
            index = json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:  # the second: bytes that are not UTF-8 text
            raise ValueError(f"{index_path} is not valid JSON: {error}") from error
    if not isinstance(index, dict):
        raise ValueError(f"{index_path}: expected a JSON object mapping preset names to files.")
    files = {}
    for name, entry in index.items():
        if name == _REPO_OR_PATH_KEY:
            continue
        try:
            check_voice_preset_name(name)
        except ValueError as error:
            raise ValueError(f"{index_path}: {error}") from error
        if not isinstance(entry, dict) or set(entry) != set(PRESET_KEYS):
            raise ValueError(
                f"{index_path}: preset {name!r} must map exactly {', '.join(PRESET_KEYS)} to .npy paths; "
                f"found {entry!r}."
            )
        files[name] = {key: _inside_folder(folder, entry[key], index_path) for key in PRESET_KEYS}
    return files


def gives_tokens(tokenizer: Any, text: str) -> bool:
    """Whether `text` gives any token (zero-width spaces alone give none). Word by word: tokenizing a whole
    long-form text drew transformers' warning that it is longer than the model's maximum; the first word with a
    token ends the check."""
    return any(tokenizer.tokenize(word) for word in text.split())


def has_visible_text(text: str) -> bool:
    """Whether `text` holds a character other than whitespace and Unicode format characters (category Cf:
    zero-width spaces and joiners, direction marks, soft hyphens, BOMs), which show nothing and which Bark's BERT
    tokenizer drops (or, the few its Unicode tables predate, reads as [UNK]). Needs no tokenizer, so the CLI can
    refuse such a text before a model loads; `gives_tokens` is the full check, for what only the tokenizer drops."""
    return any(not char.isspace() and unicodedata.category(char) != "Cf" for char in text)


def looks_like_local_path(path: str) -> bool:
    """Whether `path` can only mean a local path, never a Hub id (`user/name`), so a missing one is named as such.
    A trailing `/` is a folder's (shell completion adds it), never a Hub id's."""
    return (os.path.isabs(path) or path.startswith((".", "~")) or "\\" in path or path.count("/") > 1
            or path.endswith("/"))


def _local_folder(name_or_path: str | os.PathLike, hub_kwargs: dict[str, Any], subfolder: str = "") -> str:
    """A local folder for `name_or_path` (its `subfolder`), downloading only the processor's files from the Hub."""
    path = os.path.expanduser(os.fspath(name_or_path))
    if os.path.isdir(path):
        if not os.path.isdir(os.path.join(path, subfolder)):  # else the tokenizer takes it for a malformed Hub id
            raise FileNotFoundError(f"{path!r} has no subfolder {subfolder!r}; pass a subfolder that holds the "
                                    "tokenizer and presets.")
        return os.path.join(path, subfolder) if subfolder else path  # errors name the folder without a "/" added
    if os.path.exists(path):
        raise ValueError(f"{path!r} is a file; pass the folder that holds the tokenizer and presets.")
    if looks_like_local_path(path):
        raise FileNotFoundError(f"No folder at {path!r}; pass a folder saved with `save_pretrained`.")
    try:
        patterns = [f"{subfolder}/{pattern}" if subfolder else pattern for pattern in _HUB_ALLOW_PATTERNS]
        snapshot = snapshot_download(path, allow_patterns=patterns, **hub_kwargs)
        return os.path.join(snapshot, subfolder) if subfolder else snapshot
    except RepositoryNotFoundError as error:
        raise OSError(
            f"{path!r} is neither a local folder nor a repository on the Hugging Face Hub (or it is private: "
            "pass `token=`). Pass a local folder saved with `save_pretrained`."
        ) from error
    except (LocalEntryNotFoundError, ConnectionError) as error:
        raise ConnectionError(
            f"Could not reach the Hugging Face Hub to fetch {path!r}, and it is not in the local cache ({error}). "
            "Download it where the Hub is reachable and pass the local folder instead."
        ) from error


def _indexed_preset_files(index_path: str) -> set[str]:
    """The preset files that an earlier save's index in the same folder lists, as written by `save_pretrained`."""
    try:
        with open(index_path, encoding="utf-8") as handle:
            index = json.load(handle)
    except (OSError, ValueError):
        return set()
    if not isinstance(index, dict) or index.get(_REPO_OR_PATH_KEY) != ".":
        return set()
    return {relative for entry in index.values() if isinstance(entry, dict) for relative in entry.values()
            if isinstance(relative, str) and relative.startswith(f"{SPEAKER_EMBEDDINGS_DIR}/")
            and relative.endswith(".npy") and ".." not in relative.split("/") and "\\" not in relative}


class BarkHfProcessor(ProcessorMixin):
    """Tokenizer plus voice presets: the inputs of Bark's generation.

    Presets read from a folder stay on disk until first used; presets added in memory or used
    once are kept, validated, as int64 arrays.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        voice_presets: Mapping[str, VoicePreset] | None = None,
    ) -> None:
        super().__init__(tokenizer)
        if tokenizer.pad_token_id is None:
            raise ValueError("The tokenizer has no pad token; set `tokenizer.pad_token` (BERT's is '[PAD]').")
        # Private names: ProcessorMixin.to_dict serialises attributes named like __init__ arguments.
        self._presets: dict[str, dict[str, np.ndarray]] = {}
        self._preset_files: dict[str, dict[str, str]] = {}
        for name, preset in (voice_presets or {}).items():
            self.add_voice_preset(name, preset)

    @property
    def available_voice_presets(self) -> list[str]:
        """Names usable as `voice_preset=`, sorted."""
        return sorted({*self._presets, *self._preset_files})

    def add_voice_preset(self, name: str, preset: VoicePreset) -> None:
        """Validate `preset` and store it under `name` (replacing any preset of that name)."""
        check_voice_preset_name(name)
        arrays = self.load_voice_preset(preset)
        self._preset_files.pop(name, None)
        self._presets[name] = arrays

    def load_voice_preset(self, preset: VoicePreset) -> dict[str, np.ndarray]:
        """The validated int64 arrays of a preset name, an original `.npz` path, or a dict of arrays."""
        if isinstance(preset, Mapping):
            return validate_voice_preset(preset)
        check_not_output_pair(preset)
        if not isinstance(preset, (str, os.PathLike)):
            raise TypeError(
                "voice_preset must be a preset name, a path to an .npz file or a dict of arrays; "
                f"got {type(preset).__name__}."
            )
        if isinstance(preset, str) and (preset in self._presets or preset in self._preset_files):
            return {key: array.copy() for key, array in self._stored_preset(preset).items()}
        path = os.fspath(preset)
        expanded = os.path.expanduser(path)
        if path.endswith(".npz"):
            if not os.path.exists(expanded):  # Suno's file name of a stored preset, say: name the fix
                raise FileNotFoundError(f"No voice preset file at {path!r}. {self._npz_name_hint(path[:-4])}")
            return read_voice_preset_file(path)
        if os.path.isfile(expanded):
            return read_voice_preset_file(path)
        if path in self._presets or path in self._preset_files:  # only a path object gets here with a stored name
            raise ValueError(f"voice_preset is a {type(preset).__name__}, read as a file, and there is no file at "
                             f"{path!r}; to use the stored preset of that name, pass it as a string: {path!r}.")
        if os.path.isfile(f"{expanded}.npz"):  # transformers' BarkProcessor adds the suffix to a name it lacks
            return read_voice_preset_file(f"{path}.npz")
        raise ValueError(self._unknown_preset_message(path))

    def _close_names(self, name: str) -> list[str]:
        """Stored names like `name`, ignoring case and '\\' for '/' (the original's names on Windows)."""
        by_key: dict[str, list[str]] = {}
        for stored in self.available_voice_presets:
            by_key.setdefault(stored.lower(), []).append(stored)
        keys = difflib.get_close_matches(name.replace("\\", "/").lower(), list(by_key), n=5, cutoff=0.6)
        return [stored for key in keys for stored in by_key[key]][:5]

    def _close_matches_hint(self, name: str) -> str:
        close = self._close_names(name)
        return f"Close matches: {', '.join(close)}." if close else "No stored preset has a similar name."

    def _npz_name_hint(self, stem: str) -> str:
        if stem in self._presets or stem in self._preset_files:
            return (f"The stored preset {stem!r} has this name without '.npz'; to use it, pass "
                    f"voice_preset={stem!r}.")
        return (f"{self._close_matches_hint(stem)} Stored presets are named without '.npz' "
                "(see `processor.available_voice_presets` or `bark-hf voices`).")

    def _unknown_preset_message(self, name: str) -> str:
        return (
            f"Unknown voice preset {name!r}. {self._close_matches_hint(name)} This processor holds "
            f"{len(self.available_voice_presets)} presets (see `processor.available_voice_presets` or "
            "`bark-hf voices`). To use an original Bark preset file instead, pass its path ending in '.npz'."
        )

    def _stored_preset(self, name: str) -> dict[str, np.ndarray]:
        """A stored preset, read from disk and validated on first use."""
        if name not in self._presets:
            files = self._preset_files[name]
            arrays = {}
            for key, path in files.items():
                try:
                    with open(path, "rb") as file:  # else numpy takes any other file for a pickle
                        if file.read(len(np.lib.format.MAGIC_PREFIX)) != np.lib.format.MAGIC_PREFIX:
                            raise ValueError("it is not a NumPy .npy file")
                    arrays[key] = np.load(path, allow_pickle=False)
                except FileNotFoundError as error:
                    raise FileNotFoundError(f"Voice preset {name!r}: its {key} file {path} is missing.") from error
                except (ValueError, OSError, EOFError) as error:
                    raise ValueError(f"Voice preset {name!r}: cannot read {path}: {_explained(error)}") from error
            try:
                self._presets[name] = validate_voice_preset(arrays)
            except ValueError as error:
                folder = os.path.dirname(files["semantic_prompt"])
                raise ValueError(f"Voice preset {name!r} ({folder}): {error}") from error
            del self._preset_files[name]
        return self._presets[name]

    def __call__(
        self,
        text: str | list[str],
        voice_preset: VoicePreset | Sequence[VoicePreset | None] | None = None,
        return_tensors: str = "pt",
        max_length: int | None = None,
        **tokenizer_settings: Any,
    ) -> BatchEncoding:
        """Tokenise text (and load voice presets) for `BarkHfModel.generate`.

        Returns `input_ids` and `attention_mask` of shape `[batch, max_length]` (default: the
        semantic stage's 256-token text window), ids right-padded with the tokenizer's pad id,
        and, when a preset is given, `history_prompt`: one dict of arrays for the whole batch,
        or a list with one dict (or None) per text. `tokenizer_settings` are the ones transformers'
        `BarkProcessor` takes (`add_special_tokens=False`, `padding="max_length"`, ...), accepted with the
        one value Bark's text encoding has, so that code written for it runs unchanged.
        """
        if return_tensors not in ("pt", "np"):
            raise ValueError(f"return_tensors must be 'pt' or 'np'; got {return_tensors!r}.")
        _check_tokenizer_settings(tokenizer_settings)
        window = BarkHfSemanticGenerationConfig().max_input_semantic_length
        if max_length is None:
            max_length = window
        elif not is_number(max_length, numbers.Integral) or not 1 <= max_length <= window:  # numpy ints too
            raise ValueError(
                f"max_length must be an integer in [1, {window}] (Bark's text window); got {max_length!r}."
            )
        max_length = int(max_length)
        texts = self._texts(text)
        input_ids = np.full((len(texts), max_length), self.tokenizer.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(texts), max_length), dtype=np.int64)
        for row, item in enumerate(texts):
            ids = self._encode(item, max_length, "Text" if isinstance(text, str) else f"text[{row}]")
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1

        convert = torch.from_numpy if return_tensors == "pt" else (lambda array: array)
        encoding = BatchEncoding({"input_ids": convert(input_ids), "attention_mask": convert(attention_mask)})
        check_not_output_pair(voice_preset)
        if isinstance(voice_preset, (list, tuple)):
            if isinstance(text, str) or len(voice_preset) != len(texts):
                raise ValueError(
                    f"A list of voice presets needs a list of texts of the same length; got {len(voice_preset)} "
                    f"presets for {'one text' if isinstance(text, str) else f'{len(texts)} texts'}. "
                    "Pass a single preset to use it for every text."
                )
            encoding["history_prompt"] = [
                None if item is None else self._converted(self.load_voice_preset(item), convert)
                for item in voice_preset
            ]
        elif voice_preset is not None:
            encoding["history_prompt"] = self._converted(self.load_voice_preset(voice_preset), convert)
        return encoding

    @staticmethod
    def _converted(preset: dict[str, np.ndarray], convert: Callable[[np.ndarray], Any]) -> dict[str, Any]:
        return {key: convert(array) for key, array in preset.items()}

    @staticmethod
    def _texts(text: str | list[str]) -> list[str]:
        if isinstance(text, str):
            texts = [text]
        elif isinstance(text, (list, tuple)):
            texts = list(text)
        else:
            raise TypeError(f"text must be a string or a list of strings; got {type(text).__name__}.")
        if not texts:
            raise ValueError("text is an empty list; pass at least one string.")
        for index, item in enumerate(texts):
            if not isinstance(item, str):
                raise TypeError(
                    f"text[{index}] is a {type(item).__name__}; pass strings only (convert with str())."
                )
        return texts

    def _encode(self, text: str, max_length: int, name: str) -> list[int]:
        """Token ids of `text`; `name` says which text an error is about ("text[3]" in a batch)."""
        normalized = normalize_whitespace(text)
        if not normalized:
            raise ValueError(f"{name} is empty or whitespace only; pass at least one word to speak.")
        ids = self.tokenizer.encode(normalized, add_special_tokens=False)
        if not ids:
            raise ValueError(f"{name} ({text!r}) gives no tokens; pass text with at least one word to speak.")
        if len(ids) > max_length:
            cut = round((len(ids) - max_length) / len(ids) * 100, 1)
            logger.warning(TRUNCATION_WARNING, len(ids), max_length, cut, len(ids) - max_length)
            ids = ids[:max_length]
        return ids

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> list[str]:
        """Save the tokenizer and every voice preset in transformers' Bark layout.

        The index stores paths relative to the folder (and `repo_or_path: "."`, which
        transformers' `BarkProcessor` needs to find them), so the folder can be moved or uploaded.
        """
        if kwargs.pop("push_to_hub", False):
            raise ValueError("save_pretrained(push_to_hub=True) is not supported; call processor.push_to_hub(repo_id).")
        # transformers' BarkProcessor takes other names for the index and the arrays' folder; they were ignored.
        for setting, fixed in (("speaker_embeddings_dict_path", SPEAKER_EMBEDDINGS_FILE),
                               ("speaker_embeddings_directory", SPEAKER_EMBEDDINGS_DIR)):
            if kwargs.pop(setting, fixed) != fixed:
                raise ValueError(f"save_pretrained: bark-hf always writes the presets' {setting} as {fixed!r}, the "
                                 "layout that both bark-hf and transformers read by default; leave the setting out.")
        check_save_directory(save_directory)
        save_directory = os.fspath(save_directory)
        os.makedirs(save_directory, exist_ok=True)
        index_path = os.path.join(save_directory, SPEAKER_EMBEDDINGS_FILE)
        previous_files = _indexed_preset_files(index_path)
        index: dict[str, Any] = {_REPO_OR_PATH_KEY: "."}
        for name in self.available_voice_presets:
            preset = self._stored_preset(name)
            entry = {}
            for key in PRESET_KEYS:
                relative = f"{SPEAKER_EMBEDDINGS_DIR}/{name}_{key}.npy"
                target = os.path.join(save_directory, *relative.split("/"))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                # Through a temporary file: a save that fails part-way leaves the earlier files whole.
                with atomic_path(target) as temporary, open(temporary, "wb") as handle:
                    np.save(handle, preset[key], allow_pickle=False)
                entry[key] = relative
            index[name] = entry
        with atomic_path(index_path) as temporary, open(temporary, "w", encoding="utf-8") as handle:
            json.dump(index, handle, indent=2)
            handle.write("\n")
        written = {relative for entry in index.values() if isinstance(entry, dict) for relative in entry.values()}
        for relative in previous_files - written:  # presets of an earlier save that this one no longer has
            stale = os.path.join(save_directory, *relative.split("/"))
            if os.path.isfile(stale):
                os.remove(stale)
        return [*super().save_pretrained(save_directory, **kwargs), index_path]

    def push_to_hub(self, repo_id: str, **hub_options: Any) -> Any:
        """Upload what `save_pretrained` writes, presets included, to the Hub repo `repo_id` (transformers'
        own `push_to_hub` misses the presets' subfolders). `hub_options` as for `BarkHfModel.push_to_hub`."""
        return push_folder_to_hub(repo_id, lambda folder, _: self.save_pretrained(folder), type(self).__name__,
                                  **hub_options)

    def to_dict(self) -> dict[str, Any]:
        """processor_config.json: also names this class for `AutoProcessor`, so that a folder saved with its
        code (`save_pretrained(..., save_code=True)`) gives this processor to `trust_remote_code=True`."""
        return {**super().to_dict(), "auto_map": {"AutoProcessor": f"processing_bark_hf.{type(self).__name__}"}}

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        speaker_embeddings_dict_path: str | None = SPEAKER_EMBEDDINGS_FILE,
        **kwargs: Any,
    ) -> BarkHfProcessor:
        """Load a folder written by this class or by transformers' `BarkProcessor`, or a Hub repo.

        For a Hub id only the tokenizer and preset files are downloaded (`revision`, `cache_dir`,
        `token`, `local_files_only` and `force_download` go to `snapshot_download`); other
        keyword arguments go to `BertTokenizer.from_pretrained`. Presets are read on first use;
        `speaker_embeddings_dict_path=None` loads none, as in transformers' `BarkProcessor`.
        """
        hub_kwargs = {key: kwargs.pop(key) for key in HUB_DOWNLOAD_OPTIONS if key in kwargs}
        subfolder = kwargs.pop("subfolder", None) or ""
        folder = _local_folder(pretrained_model_name_or_path, hub_kwargs, subfolder)
        # Without these files BertTokenizer loads with only its 5 special tokens: every word became [UNK], and a
        # model folder holding only weights generated noise for any text, without an error.
        if not any(os.path.isfile(os.path.join(folder, name)) for name in _TOKENIZER_FILES):
            source = repr(os.fspath(pretrained_model_name_or_path))
            source += f" (subfolder {subfolder!r})" if subfolder else ""
            if os.path.isdir(pretrained_model_name_or_path):
                fix = (f"save a processor there with `BarkHfProcessor.from_pretrained(<the folder or Hub id the model "
                       f"came from, e.g. 'suno/bark-small'>).save_pretrained({folder!r})`, or pass a folder written "
                       "by `bark-hf convert` or by both the model's and the processor's `save_pretrained`")
            else:  # a Hub repo: the folder is a download cache, not a place to save into
                fix = "push a processor to that repo with `BarkHfProcessor.push_to_hub`, or use a repo that has one"
            raise FileNotFoundError(
                f"{source} holds no tokenizer ({' or '.join(_TOKENIZER_FILES)}): {fix}. transformers' pipeline() "
                "also takes them directly: pipeline('text-to-audio', model=..., tokenizer=processor.tokenizer, "
                "processor=processor)."
            )
        try:
            tokenizer = BertTokenizer.from_pretrained(folder, **kwargs)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:  # neither names the file
            raise ValueError(f"The tokenizer files in {folder!r} ({', '.join(_TOKENIZER_FILES)} and their JSON "
                             f"configs) cannot be read ({error}); save or convert the model again.") from None
        processor = cls(tokenizer)
        if speaker_embeddings_dict_path is not None:
            processor._preset_files = _read_preset_index(folder, speaker_embeddings_dict_path)
        return processor


__all__ = [
    "PRESET_KEYS",
    "BarkHfProcessor",
    "check_not_output_pair",
    "check_voice_preset_name",
    "read_voice_preset_file",
    "validate_voice_preset",
]
