"""`BarkPipeline`: the text-to-audio pipeline for bark-hf models.

`pipeline("text-to-audio", model=folder)` builds it once `bark_hf` is imported (see registration.py),
and a folder saved with `save_pretrained(..., save_code=True)` names it in its config, so
`trust_remote_code=True` finds it without the package. It adds what transformers' generic
pipeline cannot do for Bark: voice presets by name, per-item presets in a batch, stage-prefixed
generation settings, seeds, and long-form text.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Pipeline

from .checks import checked_device, checked_dtype, checked_flag, checked_seed, checked_whole_number
from .hub import HUB_DOWNLOAD_OPTIONS, MODEL_WEIGHTS, push_folder_to_hub
from .longform import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_HISTORY,
    DEFAULT_SILENCE_S,
    checked_generate_kwargs,
    checked_history,
    checked_silence,
    generate_long_form,
    needs_long_form,
)
from .model_card import bark_model_card, save_model_card
from .modeling_bark_hf import BarkHfModel, refuse_int8
from .processing_bark_hf import BarkHfProcessor, check_not_output_pair, gives_tokens

# Settings the pipeline understands, and the call step each belongs to.
_PREPROCESS_KEYS = ("voice_preset",)
_FORWARD_KEYS = ("generate_kwargs", "forward_params", "long_form", "history", "silence_s", "seed", "show_progress")
# transformers' TextToAudioPipeline settings that mean nothing here, each with what to do instead: refused by name,
# not as unknown, and num_workers also when building, where transformers' Pipeline took it and left it unused.
_REFUSED_KEYS = {
    "num_workers": "it reads texts in the calling process, batch_size texts at a time; leave num_workers out",
    "preprocess_params": "the processor's one setting is the voice; pass voice_preset=... directly",
    "processor_kwargs": "the processor's one setting is the voice; pass voice_preset=... directly",
}


@dataclass(frozen=True)
class _Call:
    """The checked settings of one pipeline call."""

    voice_preset: Any
    generate_kwargs: dict[str, Any]
    batch_size: int
    long_form: bool | None
    history: str
    silence_s: float
    seed: int | None
    show_progress: bool


class BarkPipeline(Pipeline):
    """Text (a string, a list or a stream of strings) to `{"audio": float32 [samples], "sampling_rate": 24000}`
    per text.

    Call settings (also accepted when the pipeline is built, as defaults):
        voice_preset: a preset name, an `.npz` path or a dict of arrays; one for all texts or a list
            with one per text (None for no preset).
        generate_kwargs: stage settings with their prefix, e.g. `{"semantic_temperature": 0.6,
            "coarse_top_k": 50, "fine_temperature": None}`. `forward_params` is merged under them.
        batch_size: texts generated together (default 8); also chunks of a long text.
        long_form: split the text into sentences and join the chunks' audio; None (default) turns it
            on for texts longer than one generation holds.
        history: what long-form chunks are conditioned on: "auto" (default; the preset for every chunk,
            batched, or without one each chunk continues the one before), "first" (without a preset, the
            first chunk's generation for every other; batched) or "previous" (each chunk continues the one before).
        silence_s: the silence between long-form chunks, in seconds (default 0.25).
        seed: seeds torch before generating, so a call is repeatable.
    """

    _pipeline_calls_generate = False  # our generate has its own stage configs; keep transformers' defaults out
    _load_processor = False
    _load_tokenizer = False
    _load_feature_extractor = False
    _load_image_processor = False

    def __init__(self, model: BarkHfModel, processor: BarkHfProcessor | None = None, **kwargs: Any) -> None:
        # A name or a single stage would otherwise fail later, deep inside (no name_or_path, no split_stage_settings).
        # Not isinstance: remote code can load the model's class and this module's BarkHfModel as separate copies.
        if not hasattr(model, "split_stage_settings"):
            hint = ("for a folder or Hub id, use BarkPipeline.from_pretrained(model) or pipeline('text-to-audio', "
                    "model=...)" if isinstance(model, (str, os.PathLike)) else
                    "a single stage cannot speak; load the whole model with BarkHfModel.from_pretrained(folder)")
            raise TypeError(f"BarkPipeline takes a BarkHfModel, got {type(model).__name__}: {hint}.")
        if getattr(model, "offload_device", None) is not None:  # enable_cpu_offload(): generate places the stages
            device = kwargs.get("device")  # None, -1 or the CPU: transformers' ways to say where the inputs go
            on_cpu = device < 0 if isinstance(device, int) else device is None or torch.device(device).type == "cpu"
            if not on_cpu:
                raise ValueError("This model moves its stages to the GPU one at a time (enable_cpu_offload()); leave "
                                 "the pipeline's device unset, or load the model without offload to place it whole.")
            # The stages wait on the CPU; transformers' default device (GPU 0) would move the whole model there at
            # once, which offload is meant to avoid.
            kwargs["device"] = torch.device("cpu")
        _check_device(kwargs.get("device"))
        if kwargs.get("num_workers") is not None:
            self._sanitize_parameters(num_workers=kwargs["num_workers"])
        # pipeline(..., dtype="int8"): from_pretrained refused it, and transformers then loaded float32 quietly.
        checked_dtype(kwargs.get("dtype"))
        tokenizer = kwargs.pop("tokenizer", None)
        if not isinstance(processor, BarkHfProcessor):
            processor = self._processor_for(model, tokenizer)
        super().__init__(model=model, processor=processor, tokenizer=processor.tokenizer, **kwargs)
        # Defaults given when building are checked now: a bad one was found only by the first call, and by every call.
        defaults = self._checked_call({})
        preset = defaults.voice_preset
        self._loaded_presets(list(preset) if isinstance(preset, (list, tuple)) else [preset])

    @property
    def sampling_rate(self) -> int:
        """The audio's sampling rate (24000), where transformers' `TextToAudioPipeline` keeps it."""
        return self.model.sampling_rate

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike,
        device: int | str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        device_map: str | dict[str, Any] | None = None,
        torch_dtype: torch.dtype | str | None = None,
        **settings: Any,
    ) -> BarkPipeline:
        """A pipeline for any Bark folder or Hub id, transformers' format included (`suno/bark`,
        `suno/bark-small`), which `pipeline("text-to-audio")` hands to transformers' own Bark.
        `device_map` and `dtype` (`torch_dtype`, transformers' older name) go to `BarkHfModel.from_pretrained`;
        the Hub options `revision`, `token`, `cache_dir`, `local_files_only`, `force_download` and `subfolder` to the
        model's and the processor's `from_pretrained`; other `settings` are call defaults (`voice_preset=`,
        `batch_size=`). (`subfolder` was kept as a call default, and the processor looked for its tokenizer in the
        folder above.)"""
        hub_options = {key: settings.pop(key) for key in (*HUB_DOWNLOAD_OPTIONS, "subfolder") if key in settings}
        if torch_dtype is not None:  # was taken by Pipeline.__init__ and ignored: the model stayed float32
            if dtype is not None:
                raise ValueError("Got both dtype and torch_dtype; pass only dtype (torch_dtype is its older name).")
            dtype = torch_dtype
        if device_map is not None and device is not None:
            raise ValueError("Got both device and device_map; pass one: device places the whole model, device_map "
                             "its parts.")
        _check_device(device)  # before the model loads
        # The processor first: it names a missing folder as one, where the model's loader calls it a bad Hub id.
        processor = BarkHfProcessor.from_pretrained(model, **hub_options)
        bark = BarkHfModel.from_pretrained(model, dtype=dtype, device_map=device_map, **hub_options)
        if device_map is not None and getattr(bark, "hf_device_map", None) is None:
            device = bark.device  # one device, as pipeline() does: else the pipeline's default would move the model
        return cls(model=bark, processor=processor, device=device, **settings)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """The model (`kwargs`, e.g. `save_code=True`, go to its `save_pretrained`) and the processor: the
        tokenizer and the voice presets, which transformers' `Pipeline.save_pretrained` would leave out."""
        if os.path.isfile(save_directory):
            raise ValueError(f"{save_directory} is a file; save the pipeline to a folder.")
        self.model.save_pretrained(save_directory, **kwargs)
        self.processor.save_pretrained(save_directory)

    def push_to_hub(self, repo_id: str, *, tags: str | Sequence[str] | None = (), save_code: bool = False,
                    max_shard_size: int | str | None = None, **hub_options: Any) -> Any:
        """Upload what `save_pretrained` writes (model, tokenizer, presets) to the Hub repo `repo_id`, with
        bark-hf's model card listing the presets. Options as for `BarkHfModel.push_to_hub`."""
        refuse_int8(self.model, "Push")  # before the repo is created on the Hub

        def write(folder: Path, full_repo_id: str) -> None:
            shards = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
            self.save_pretrained(folder, save_code=save_code, **shards)
            card = bark_model_card(self.model.config, model_id=full_repo_id, tags=tags,
                                   voice_presets=self.processor.available_voice_presets)
            save_model_card(card, folder, overwrite=True)

        return push_folder_to_hub(repo_id, write, type(self).__name__, replaces=MODEL_WEIGHTS, **hub_options)

    @staticmethod
    def _processor_for(model: BarkHfModel, tokenizer: Any) -> BarkHfProcessor:
        """The processor saved beside the model (with its presets), else one around the given tokenizer."""
        try:
            return BarkHfProcessor.from_pretrained(model.name_or_path)
        except (OSError, ValueError):
            if tokenizer is None:
                raise ValueError(
                    f"No bark-hf processor found with the model ({model.name_or_path!r}). Pass one: "
                    "BarkPipeline(model=model, processor=BarkHfProcessor.from_pretrained(folder))."
                ) from None
            return BarkHfProcessor(tokenizer)

    def _sanitize_parameters(self, **settings: Any) -> tuple[dict, dict, dict]:
        refused = sorted(settings.keys() & _REFUSED_KEYS.keys())
        if refused:
            key = refused[0]
            raise TypeError(f"BarkPipeline does not take {key} (a setting of transformers' TextToAudioPipeline): "
                            f"{_REFUSED_KEYS[key]}.")
        unknown = sorted(set(settings) - set(_PREPROCESS_KEYS) - set(_FORWARD_KEYS))
        if unknown:
            raise TypeError(
                f"Unknown BarkPipeline setting(s) {unknown}. Known: {sorted((*_PREPROCESS_KEYS, *_FORWARD_KEYS))} "
                "and batch_size; stage settings go in generate_kwargs, e.g. {'semantic_temperature': 0.6}."
            )
        preprocess = {key: settings[key] for key in _PREPROCESS_KEYS if key in settings}
        forward = {key: settings[key] for key in _FORWARD_KEYS if key in settings}
        return preprocess, forward, {}

    def __call__(
        self, text_inputs: str | Sequence[str] | Iterable[str], **settings: Any
    ) -> dict[str, Any] | list[dict[str, Any]] | Iterator[dict[str, Any]]:
        """Audio for one text (a dict), for a list of texts (a list of dicts, in order), or for any other
        iterable of texts, such as a generator or `KeyDataset(dataset, "text")`, an iterator of dicts that
        generates `batch_size` texts at a time, as transformers' pipelines stream datasets."""
        call = self._checked_call(settings)
        stream = _text_stream(text_inputs)
        if stream is not None:
            return self._stream(stream, call)
        texts = _checked_texts(text_inputs, self.processor.tokenizer)
        presets = _presets_per_text(call.voice_preset, len(texts))  # a list of presets must match, even for no text
        if not texts:  # as transformers' pipelines answer an empty list
            return []
        presets = self._loaded_presets(presets)
        if call.seed is not None:
            torch.manual_seed(call.seed)
        outputs = self._generate(texts, presets, call)
        return outputs[0] if isinstance(text_inputs, str) else outputs

    def _checked_call(self, settings: dict[str, Any]) -> _Call:
        """A call's settings over the pipeline's defaults, every one checked before any text is read."""
        # A call's batch size holds for that call; Pipeline.__init__ keeps the one given at construction.
        batch_size = settings.pop("batch_size", self._batch_size)
        batch_size = DEFAULT_BATCH_SIZE if batch_size is None else checked_whole_number(batch_size, "batch_size")
        preprocess, forward, _ = self._sanitize_parameters(**settings)
        preprocess = {**self._preprocess_params, **preprocess}
        forward = {**self._forward_params, **forward}
        long_form = checked_flag(forward.get("long_form"), "long_form", none_means="on when the text needs it")
        check_not_output_pair(preprocess.get("voice_preset"))  # else read as one preset per text
        generate_kwargs = {**checked_generate_kwargs(forward.get("forward_params"), self.model),
                           **checked_generate_kwargs(forward.get("generate_kwargs"), self.model)}
        return _Call(
            voice_preset=preprocess.get("voice_preset"),
            generate_kwargs=generate_kwargs,
            batch_size=batch_size,
            long_form=long_form,
            history=checked_history(forward.get("history", DEFAULT_HISTORY), "history"),
            silence_s=checked_silence(forward.get("silence_s", DEFAULT_SILENCE_S), "silence_s"),
            seed=checked_seed(forward.get("seed")),
            show_progress=checked_flag(forward.get("show_progress", False), "show_progress"),
        )

    def _stream(self, texts: Iterator[Any], call: _Call) -> Iterator[dict[str, Any]]:
        """Outputs for a stream of texts, `batch_size` texts at a time. The one preset is loaded now, so a
        bad one fails at the call; a seed seeds once, before the first batch, so the stream repeats as a whole."""
        if isinstance(call.voice_preset, (list, tuple)):
            raise ValueError("A list of voice presets (one per text) needs a list of texts; for a stream of texts, "
                             "pass one preset for all.")
        preset = self._loaded_presets([call.voice_preset])[0]

        def outputs() -> Iterator[dict[str, Any]]:
            if call.seed is not None:
                torch.manual_seed(call.seed)
            done = 0
            while batch := list(itertools.islice(texts, call.batch_size)):
                checked = _checked_texts(batch, self.processor.tokenizer, first_index=done)
                yield from self._generate(checked, [preset] * len(batch), call)
                done += len(batch)

        return outputs()

    def _loaded_presets(self, presets: list[Any]) -> list[dict[str, np.ndarray] | None]:
        """The texts' presets read now, so that a bad one fails before anything is generated; an object given
        for several texts is read once."""
        loaded: dict[int, dict[str, np.ndarray]] = {}
        for preset in presets:
            if preset is not None and id(preset) not in loaded:
                loaded[id(preset)] = self.processor.load_voice_preset(preset)
        return [None if preset is None else loaded[id(preset)] for preset in presets]

    def _generate(self, texts: list[str], presets: list[Any], call: _Call) -> list[dict[str, Any]]:
        """One output per text: long texts through long-form generation, the others in batches."""
        outputs: list[dict[str, Any] | None] = [None] * len(texts)
        short = []
        for index, text in enumerate(texts):
            if call.long_form or (call.long_form is None and needs_long_form(text, self.processor.tokenizer)):
                result = generate_long_form(
                    self.model, self.processor, text, voice_preset=presets[index], history=call.history,
                    silence_s=call.silence_s, batch_size=call.batch_size,
                    generate_kwargs=call.generate_kwargs, show_progress=call.show_progress,
                )
                outputs[index] = self.postprocess(result.audio)
            else:
                short.append(index)
        for start in range(0, len(short), call.batch_size):
            batch = short[start : start + call.batch_size]
            inputs = self.preprocess([texts[i] for i in batch], [presets[i] for i in batch])
            audios = self.forward(inputs, generate_kwargs=call.generate_kwargs, show_progress=call.show_progress)
            for index, audio in zip(batch, audios, strict=True):
                outputs[index] = self.postprocess(audio)
        return outputs

    def preprocess(self, texts: list[str], presets: list[Any]) -> dict[str, Any]:
        single_preset = all(preset is presets[0] for preset in presets)
        return self.processor(texts, voice_preset=presets[0] if single_preset else presets)

    def _forward(
        self, inputs: dict[str, Any], generate_kwargs: dict[str, Any], show_progress: bool
    ) -> list[np.ndarray]:
        output = self.model.generate(**inputs, return_dict_in_generate=True, show_progress=show_progress,
                                     **generate_kwargs)
        audios = zip(output.audio, output.audio_lengths, strict=True)
        return [audio[:length].float().cpu().numpy() for audio, length in audios]

    def postprocess(self, audio: np.ndarray) -> dict[str, Any]:
        return {"audio": np.asarray(audio, dtype=np.float32), "sampling_rate": self.model.sampling_rate}


def _check_device(device: Any) -> None:
    """Refuse a named device this torch cannot use (device="cuda" without CUDA) with the fix: transformers' Pipeline
    moved the model there and failed inside torch with an AssertionError. Numbers are transformers' to read (-1: the
    CPU, 0: the first accelerator)."""
    if isinstance(device, (str, torch.device)):
        checked_device(device, "device", "pass device='cpu', or leave it unset for the GPU where there is one")


def _text_stream(text_inputs: Any) -> Iterator[Any] | None:
    """An iterator over `text_inputs` when they are neither a text nor a list-like of texts (a generator, a
    `KeyDataset`, a `datasets.Dataset`); else None."""
    if isinstance(text_inputs, Mapping):
        raise TypeError(f"BarkPipeline takes texts, not a {type(text_inputs).__name__}; for a dataset's column, "
                        "pass e.g. KeyDataset(dataset, 'text') (transformers.pipelines.pt_utils).")
    if isinstance(text_inputs, (set, frozenset)):
        raise TypeError("A set of texts has no order, so its outputs could not be matched to it; pass a list.")
    if isinstance(text_inputs, (str, bytes, bytearray, Sequence, np.ndarray)):
        return None
    try:
        return iter(text_inputs)  # also datasets that only index (torch's Dataset has no __iter__)
    except TypeError:
        return None


def _checked_texts(text_inputs: Any, tokenizer: Any, first_index: int = 0) -> list[str]:
    """The texts as a list; errors number them from `first_index` (a batch's place in a stream). A text that gives
    no tokens is refused here, before any batch is generated: the processor found it only when its batch came up,
    and named it by its row in that batch."""
    texts = [text_inputs] if isinstance(text_inputs, str) else text_inputs
    if isinstance(texts, np.ndarray) and texts.ndim == 1:
        texts = texts.tolist()
    if not isinstance(texts, Sequence) or isinstance(texts, (bytes, bytearray)):
        raise TypeError(f"BarkPipeline takes a string, a list of strings or an iterable of strings, got "
                        f"{type(text_inputs).__name__}.")
    for index, text in enumerate(texts, start=first_index):
        if isinstance(text, Mapping):  # a row of a datasets.Dataset
            raise TypeError(f"Text {index} is a {type(text).__name__}, not a string; for a dataset, pass its text "
                            "column, e.g. KeyDataset(dataset, 'text') (transformers.pipelines.pt_utils).")
        if not isinstance(text, str):
            raise TypeError(f"Text {index} is a {type(text).__name__}, not a string; pass text as str.")
        if not text.strip():
            raise ValueError(f"Text {index} is empty or only whitespace; give the words to speak.")
        if not gives_tokens(tokenizer, text):
            raise ValueError(f"Text {index} ({text!r}) gives no tokens (the tokenizer drops all its characters, "
                             "e.g. zero-width spaces); give the words to speak.")
    return list(texts)


def _presets_per_text(voice_preset: Any, n_texts: int) -> list[Any]:
    """One preset per text: a list is taken as one per text; anything else is shared."""
    if isinstance(voice_preset, (list, tuple)):
        if len(voice_preset) != n_texts:
            raise ValueError(
                f"voice_preset has {len(voice_preset)} entries for {n_texts} texts; pass one preset for all texts "
                "or a list with exactly one per text (None for no preset)."
            )
        return list(voice_preset)
    return [voice_preset] * n_texts


__all__ = ["BarkPipeline"]
