"""Training: stage losses, the collators' token layouts against generation, dataset preparation,
Trainer and LoRA fine-tuning, the example script and the model card. Tiny models, CPU, offline.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import soundfile
import torch
from huggingface_hub import ModelCard
from huggingface_hub.errors import RemoteEntryNotFoundError
from transformers import Trainer, TrainingArguments, pipeline

from bark_hf import (
    BarkHfCoarseConfig,
    BarkHfCoarseModel,
    BarkHfFineConfig,
    BarkHfFineModel,
    BarkHfModel,
    BarkHfSemanticConfig,
    BarkHfSemanticModel,
)
from bark_hf.model_card import BARK_LANGUAGES, GENERATED_CARD_MARKER, bark_model_card, save_model_card
from bark_hf.tiny_random import tiny_random_bark
from bark_hf.training import (
    BarkHfCoarseCollator,
    BarkHfFineCollator,
    BarkHfSemanticCollator,
    SemanticTokenizer,
    coarse_training_window,
    coarse_window_count,
    collator_for,
    decode_audio,
    encode_audio,
    fine_training_window,
    fine_window_count,
    prepare_dataset,
    resample_audio,
    semantic_prompt_windows,
    semantic_training_sequence,
)

TINY_STAGE = dict(num_layers=2, num_heads=2, hidden_size=32)
EXAMPLE_SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "finetune.py"


def tone(frequency: float, seconds: float = 0.4, rate: int = 24_000) -> np.ndarray:
    times = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * frequency * times)).astype(np.float32)


def wav_bytes(audio: np.ndarray, rate: int) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, audio, rate, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


class ToneTokenizer:
    """A stand-in semantic tokenizer: the loudest FFT bin of each 1 / 49.9 s frame, spread over the vocabulary."""

    calls = 0  # a class attribute, so that counting calls leaves the instance (and its cache hash) unchanged

    def __call__(self, audio: np.ndarray) -> np.ndarray:
        type(self).calls += 1
        hop = 24_000 / 49.9
        frames = [audio[int(i * hop) : int(i * hop) + 480] for i in range(int(len(audio) // hop))]
        return np.array([int(np.abs(np.fft.rfft(frame)).argmax()) * 37 % 10_000 for frame in frames])


def tiny_stage(stage: str, **overrides) -> BarkHfSemanticModel | BarkHfCoarseModel | BarkHfFineModel:
    torch.manual_seed(0)
    settings = {**TINY_STAGE, **overrides}
    if stage == "semantic":
        return BarkHfSemanticModel(BarkHfSemanticConfig(**settings))
    if stage == "coarse":
        return BarkHfCoarseModel(BarkHfCoarseConfig(**settings))
    return BarkHfFineModel(BarkHfFineConfig(**settings))


@pytest.fixture(scope="module")
def processor():
    return tiny_random_bark()[1]


def chirp(start_hz: float, end_hz: float, seconds: float = 0.4, rate: int = 24_000) -> np.ndarray:
    times = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * (start_hz * times + (end_hz - start_hz) * times**2 / (2 * seconds)))).astype(
        np.float32)


def fit_codebooks(codec, audios: list[np.ndarray]) -> None:
    """Codebook entries drawn from the audio's own encoder frames (EnCodec starts its k-means the same way).

    A random codec's frames barely change over time, so its random codebooks give one code per
    codebook for any sound; fitted ones give each frame its own codes.
    """
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        residual = torch.cat([codec.encoder(torch.from_numpy(audio)[None, None])[0].T for audio in audios])  # [F, D]
        for layer in codec.quantizer.layers:
            entries = residual[torch.randint(len(residual), (layer.codebook.embed.shape[0],), generator=generator)]
            noise = 1e-3 * residual.std(0) * torch.randn(entries.shape, generator=generator)
            layer.codebook.embed.copy_(entries + noise)
            residual = residual - layer.decode(layer.encode(residual.T[None]))[0].T


@pytest.fixture(scope="module")
def tone_rows() -> datasets.Dataset:
    """Two 0.4 s sweeps with text, prepared: semantic tokens from ToneTokenizer, codes from a random EnCodec."""
    model, _ = tiny_random_bark()
    audios = [chirp(200, 2000), chirp(3000, 300)]
    fit_codebooks(model.codec_model, audios)
    raw = datasets.Dataset.from_dict({
        "text": ["a rising tone", "a falling tone"],
        "audio": [{"array": audio, "sampling_rate": 24_000} for audio in audios],
    })
    prepared = prepare_dataset(raw, model.codec_model, semantic_tokenizer=ToneTokenizer())
    for row in prepared:  # sequences worth memorising: (nearly) every frame has its own codes
        assert len(set(row["semantic_tokens"])) > 15 and len(np.unique(np.array(row["fine_tokens"])[0])) == 30
    return prepared


def stage_batch(stage: str, processor, rows: int = 2) -> dict[str, torch.Tensor]:
    generator = np.random.default_rng(0)
    features = [{"text": f"row number {i}", "semantic_tokens": generator.integers(0, 10_000, 20 + 7 * i),
                 "fine_tokens": generator.integers(0, 1024, (8, 30 + 11 * i))} for i in range(rows)]
    features[0]["semantic_prompt"] = generator.integers(0, 10_000, 300)
    if stage == "semantic":
        return BarkHfSemanticCollator(processor)(features)
    if stage == "coarse":
        return BarkHfCoarseCollator()(features)
    return BarkHfFineCollator(codebooks=[4])(features)


# --- losses ---------------------------------------------------------------------------------------


def _rows_and_next_targets(logits: torch.Tensor, labels: torch.Tensor):
    """Each position's logits `[V]` with the label of the next position, where that label is not -100."""
    for item in range(labels.shape[0]):
        for position in range(labels.shape[1] - 1):
            target = int(labels[item, position + 1])
            if target != -100:
                yield logits[item, position], target


def test_semantic_loss_is_cross_entropy_over_semantic_tokens_and_eos(processor):
    model = tiny_stage("semantic")
    batch = stage_batch("semantic", processor)
    output = model(**batch)
    terms = []
    for row, target in _rows_and_next_targets(output.logits.detach(), batch["labels"]):
        categories = torch.cat([row[:10_000], row[10_000:10_001]])  # semantic tokens, then EOS
        terms.append(torch.logsumexp(categories, 0) - categories[target])
    assert len(terms) == 20 + 1 + 27 + 1  # every token and one EOS per row
    torch.testing.assert_close(output.loss.detach(), torch.stack(terms).mean())


def test_coarse_loss_is_cross_entropy_within_each_targets_codebook(processor):
    model = tiny_stage("coarse")
    batch = stage_batch("coarse", processor)
    output = model(**batch)
    terms = []
    for row, target in _rows_and_next_targets(output.logits.detach(), batch["labels"]):
        codebook, code = divmod(target - 10_000, 1024)
        row = row[10_000 + 1024 * codebook : 10_000 + 1024 * (codebook + 1)]
        terms.append(torch.logsumexp(row, 0) - row[code])
    assert len(terms) == 2 * 30 + 2 * 41  # both rows fit in the first window: every coarse token is a target
    torch.testing.assert_close(output.loss.detach(), torch.stack(terms).mean())


def test_fine_loss_is_cross_entropy_over_the_codes_of_one_codebook(processor):
    model = tiny_stage("fine")
    batch = stage_batch("fine", processor)
    assert int(batch["codebook_idx"]) == 4
    output = model(**batch)
    logits = output.logits.detach()[..., :1024]
    labels = batch["labels"]
    kept = labels != -100
    assert kept.sum() == 30 + 41  # real frames only, not the padding up to 1 024
    expected = (torch.logsumexp(logits, -1) - logits.gather(-1, labels.clamp(min=0)[..., None])[..., 0])[kept].mean()
    torch.testing.assert_close(output.loss.detach(), expected)


@pytest.mark.parametrize("stage", ["semantic", "coarse", "fine"])
def test_gradients_reach_every_parameter(stage, processor):
    model = tiny_stage(stage).train()
    batch = stage_batch(stage, processor)
    if stage == "fine":  # each pass reads codebooks up to its own: sum the passes of every predicted codebook
        loss = sum(model(**{**batch, "codebook_idx": k}).loss for k in range(1, 8))
    else:
        loss = model(**batch).loss
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("stage", ["semantic", "coarse", "fine"])
def test_gradient_checkpointing_gives_the_same_gradients(stage, processor):
    batch = stage_batch(stage, processor)
    gradients = []
    for checkpointing in (False, True):
        model = tiny_stage(stage, dropout=0.1).train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert all(block.gradient_checkpointing for block in model.layers)
        torch.manual_seed(1)  # the same dropout masks; checkpointing replays them in the recomputation
        model(**batch).loss.backward()
        gradients.append({name: parameter.grad for name, parameter in model.named_parameters()})
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], gradient, msg=name)


def test_labels_out_of_range_or_misshaped_are_refused(processor):
    semantic, coarse, fine = tiny_stage("semantic"), tiny_stage("coarse"), tiny_stage("fine")
    ids = torch.randint(10_000, 12_048, (1, 300))
    with pytest.raises(ValueError, match=r"not semantic tokens \(0..9999\) or end of speech"):
        semantic(input_ids=ids, labels=ids)
    with pytest.raises(ValueError, match=r"not coarse tokens \(10000..12047\), e.g. \[5\]"):
        coarse(input_ids=ids, labels=ids.clone().index_fill_(1, torch.tensor([7]), 5))
    with pytest.raises(ValueError, match="labels must have the inputs' shape"):
        coarse(input_ids=ids, labels=ids[:, :-1])
    with pytest.raises(ValueError, match=r"not codes \(0..1023\)"):
        fine(2, torch.zeros(1, 10, 8, dtype=torch.long), labels=torch.full((1, 10), 1024))
    text_ids = ids - 10_000
    cache = semantic(input_ids=text_ids[:, :5], use_cache=True).cache
    with pytest.raises(ValueError, match="history_input_ids covers the first positions"):
        semantic(input_ids=text_ids[:, 5:6], cache=cache, history_input_ids=text_ids[:, :1])


@pytest.mark.parametrize("stage", ["semantic", "coarse", "fine"])
def test_integer_labels_of_any_width_give_the_loss_and_floats_are_refused(stage, processor):
    """int32 labels (what numpy gives on some platforms) failed deep in torch: "expected target dtype to be Long"."""
    model = tiny_stage(stage)
    batch = stage_batch(stage, processor)
    expected = model(**batch).loss
    torch.testing.assert_close(model(**{**batch, "labels": batch["labels"].int()}).loss, expected)
    with pytest.raises(ValueError, match="labels must be integers .*got a torch.float32 tensor"):
        model(**{**batch, "labels": batch["labels"].float()})


def test_fine_codebook_idx_is_one_whole_number_for_the_batch(processor):
    """int() truncated 4.7 to 4 (another head trained unasked), and a tensor of one index per row failed with
    torch's "only one element tensors can be converted"; a repeated index per row means one codebook."""
    fine = tiny_stage("fine")
    batch = stage_batch("fine", processor)  # codebook 4, two rows
    expected = fine(**batch).loss
    for same in (4, np.int64(4), torch.tensor(4), torch.tensor([4, 4]), torch.tensor([[4], [4]])):
        torch.testing.assert_close(fine(**{**batch, "codebook_idx": same}).loss, expected)
    for wrong, message in ((4.7, "must be a whole number .*got 4.7"), (torch.tensor(4.0), "got a torch.float32"),
                           (torch.tensor([4, 5]), r"one whole number for the whole batch.*holding \[4, 5\]")):
        with pytest.raises(ValueError, match=message):
            fine(**{**batch, "codebook_idx": wrong})


# --- layouts equal what generation feeds the model ------------------------------------------------


def test_semantic_layout_equals_generation(processor):
    model, _ = tiny_random_bark()
    semantic = model.semantic
    encoding = processor(["Hello there", "Hi"])
    history = np.random.default_rng(0).integers(0, 10_000, 300)
    preset = {"semantic_prompt": history, "coarse_prompt": np.zeros((2, 450), np.int64),
              "fine_prompt": np.zeros((8, 450), np.int64)}
    embedded = []
    hook = semantic.input_embeds_layer.register_forward_hook(lambda module, args, out: embedded.append(args[0]))
    generated = semantic.generate(encoding["input_ids"], encoding["attention_mask"], [preset, None], top_k=1,
                                  use_cache=False, max_new_tokens=6, show_progress=False)
    hook.remove()
    text, history_window = semantic_prompt_windows(encoding["input_ids"], encoding["attention_mask"],
                                                   [torch.as_tensor(history), None], semantic.generation_config)
    assert torch.equal(embedded[0], text) and torch.equal(embedded[1], history_window)

    rows = [{"text": "Hello there", "semantic_tokens": generated.sequences[0], "semantic_prompt": history},
            {"text": "Hi", "semantic_tokens": generated.sequences[1]}]
    batch = BarkHfSemanticCollator(processor, semantic.generation_config)(rows)
    # The last step's input: both windows' ids, the infer token, then all but the last generated token.
    last_step = torch.cat([embedded[0], embedded[-1]], dim=1)  # [B, 256 + 1 + 5]
    assert torch.equal(batch["input_ids"][:, : last_step.shape[1]], last_step)
    assert torch.equal(batch["history_input_ids"], history_window)
    # Teacher forcing reproduces the greedy tokens: the loss trains what generation samples.
    logits = semantic(**batch).logits[:, 256 : 256 + 6, :10_000]
    assert torch.equal(logits.argmax(-1), generated.sequences)


def test_semantic_sequence_without_room_for_eos_is_cut():
    config = BarkHfSemanticModel(BarkHfSemanticConfig(**TINY_STAGE)).generation_config
    text = torch.full((256,), config.text_pad_token)
    ids, labels = semantic_training_sequence(text, torch.arange(900), config, block_size=1024)
    assert ids.shape == labels.shape == (1024,)
    assert torch.equal(labels[257:], torch.arange(767)) and (labels[:257] == -100).all()
    ids, labels = semantic_training_sequence(text, torch.arange(5), config, block_size=1024)
    assert labels[-1] == config.semantic_pad_token and ids[256] == config.semantic_infer_token


def test_coarse_windows_equal_generation_windows(monkeypatch):
    model, _ = tiny_random_bark()
    coarse = model.coarse_acoustics
    config = coarse.generation_config
    contexts = []
    generate_window = BarkHfCoarseModel._generate_window

    def spy(self, window_contexts, *args):  # each window's input (a window that goes on from the last has no prefill)
        contexts.append(window_contexts[0])
        return generate_window(self, window_contexts, *args)

    monkeypatch.setattr(BarkHfCoarseModel, "_generate_window", spy)
    semantic = torch.randint(0, 10_000, (240,), generator=torch.Generator().manual_seed(0))
    codes = coarse.generate(semantic[None], top_k=1, show_progress=False).sequences[0]  # [2, 360]
    assert len(contexts) == coarse_window_count(codes.shape[1], config) == 12  # the last ones keep 630 of history
    for index, context in enumerate(contexts):
        input_ids, labels = coarse_training_window(semantic, codes, index, config)
        assert torch.equal(input_ids[: context.shape[0]], context), index
        assert torch.equal(labels[257:], input_ids[257:]) and (labels[:257] == -100).all()


@pytest.mark.parametrize("n_frames", [300, 2100])
def test_fine_windows_equal_generation_windows(n_frames):
    model, _ = tiny_random_bark()
    fine = model.fine_acoustics
    config = fine.generation_config
    passes = []
    hook = fine.register_forward_pre_hook(lambda module, args: passes.append((args[0], args[1][0].clone())))
    coarse = torch.randint(0, 1024, (1, 2, n_frames), generator=torch.Generator().manual_seed(0))
    codes = fine.generate(coarse, temperature=None).sequences[0]  # [8, T]
    hook.remove()
    n_windows = fine_window_count(n_frames, config)
    assert len(passes) == 6 * n_windows
    real = torch.arange(1024) < n_frames  # padding frames hold generation's own guesses, never a target
    for codebook, window in passes[-6:]:  # the last window: its writes are final
        input_ids, labels = fine_training_window(codes, codebook, n_windows - 1, config)
        assert torch.equal(input_ids[real, :codebook], window[real, :codebook])
        assert torch.equal(input_ids[:, codebook] == 1024, window[:, codebook] == 1024)  # not predicted yet
        start = min((n_windows - 1) * 512, max(n_frames, 1024) - 1024)
        written = torch.arange(1024) >= min((n_windows - 1) * 512, max(n_frames, 1024) - 512) - start
        assert torch.equal(labels != -100, written & real)


# --- dataset preparation --------------------------------------------------------------------------


def test_prepare_reads_an_audio_column_at_any_rate():
    model, _ = tiny_random_bark()
    audio_16k = tone(300, seconds=0.5, rate=16_000)
    raw = datasets.Dataset.from_dict({
        "text": ["hi"],
        "audio": [{"bytes": wav_bytes(audio_16k, 16_000), "path": None}],
        "tokens": [[1, 2, 3] * 8],
    }).cast_column("audio", datasets.Audio())  # decoding it would need torchcodec; preparation does not
    prepared = prepare_dataset(raw, model.codec_model, semantic_column="tokens")
    assert prepared.column_names == ["text", "tokens", "fine_tokens", "semantic_tokens"]
    expected = encode_audio(model.codec_model, resample_audio(audio_16k, 16_000))
    assert expected.shape == (8, 38)  # 12 000 samples at 24 kHz, 320 per frame
    np.testing.assert_array_equal(np.array(prepared[0]["fine_tokens"]), expected)
    assert prepared[0]["semantic_tokens"] == [1, 2, 3] * 8


def test_prepare_takes_arrays_and_a_semantic_tokenizer():
    model, _ = tiny_random_bark()
    stereo = np.stack([tone(300, rate=48_000), tone(300, rate=48_000)])  # [2 channels, samples]
    raw = datasets.Dataset.from_dict({"text": ["stereo"], "audio": [{"array": stereo, "sampling_rate": 48_000}]})
    tokenizer = ToneTokenizer()
    assert isinstance(tokenizer, SemanticTokenizer)
    prepared = prepare_dataset(raw, model.codec_model, semantic_tokenizer=tokenizer)
    mono_24k = resample_audio(stereo[0], 48_000)
    np.testing.assert_array_equal(prepared[0]["semantic_tokens"], tokenizer(mono_24k))
    np.testing.assert_array_equal(np.array(prepared[0]["fine_tokens"]), encode_audio(model.codec_model, mono_24k))
    assert "semantic_tokens" not in prepare_dataset(raw, model.codec_model).column_names  # fine-stage data only


def test_prepare_caches_results_of_datasets_on_disk(tmp_path):
    model, _ = tiny_random_bark()
    raw = datasets.Dataset.from_dict({"text": ["a", "b"], "audio": [{"array": tone(220), "sampling_rate": 24_000},
                                                                    {"array": tone(330), "sampling_rate": 24_000}]})
    raw.save_to_disk(tmp_path / "raw")
    on_disk = datasets.load_from_disk(tmp_path / "raw")
    before = ToneTokenizer.calls
    first = prepare_dataset(on_disk, model.codec_model, semantic_tokenizer=ToneTokenizer())
    assert ToneTokenizer.calls == before + 2 and first.cache_files
    again = prepare_dataset(on_disk, model.codec_model, semantic_tokenizer=ToneTokenizer())
    assert ToneTokenizer.calls == before + 2 and again.cache_files == first.cache_files
    with torch.no_grad():
        model.codec_model.quantizer.layers[0].codebook.embed.mul_(2)  # other weights: other codes, no cache hit
    prepare_dataset(on_disk, model.codec_model, semantic_tokenizer=ToneTokenizer())
    assert ToneTokenizer.calls == before + 4


def test_prepare_refuses_bad_input():
    model, _ = tiny_random_bark()
    raw = datasets.Dataset.from_dict({"text": ["a"], "audio": [{"array": tone(220), "sampling_rate": 24_000}],
                                      "tokens": [[10_000]]})
    with pytest.raises(ValueError, match="not both"):
        prepare_dataset(raw, model.codec_model, semantic_tokenizer=ToneTokenizer(), semantic_column="tokens")
    with pytest.raises(ValueError, match="no column 'speech'"):
        prepare_dataset(raw, model.codec_model, audio_column="speech")
    with pytest.raises(TypeError, match="must be callable"):
        prepare_dataset(raw, model.codec_model, semantic_tokenizer="hubert")
    with pytest.raises(ValueError, match=r"Row 0: semantic tokens must be in 0..9999"):
        prepare_dataset(raw, model.codec_model, semantic_column="tokens")
    blip = datasets.Dataset.from_dict({"audio": [{"array": tone(220, seconds=0.005), "sampling_rate": 24_000}]})
    with pytest.raises(ValueError, match=r"Row 0: no semantic tokens for 0.013 s of audio .*Drop clips this short"):
        prepare_dataset(blip, model.codec_model, semantic_tokenizer=ToneTokenizer())


def test_prepare_warns_once_of_semantic_tokens_at_another_rate(caplog):
    model, _ = tiny_random_bark()
    clips = [{"array": tone(220 + 50 * row, seconds=2.0), "sampling_rate": 24_000} for row in range(4)]
    raw = datasets.Dataset.from_dict({"audio": clips, "tokens": [[1] * 50] * 4})  # 25 a second: another tokenizer's
    with caplog.at_level(logging.WARNING):
        prepare_dataset(raw, model.codec_model, semantic_column="tokens", batch_size=2)
    warnings = [record.getMessage() for record in caplog.records if "per second" in record.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("Row 0: 50 semantic tokens for 2.00 s of audio")


def test_prepare_names_a_dataset_dict_or_a_streamed_dataset():
    model, _ = tiny_random_bark()
    raw = datasets.Dataset.from_dict({"text": ["a"], "audio": [{"array": tone(220), "sampling_rate": 24_000}]})
    with pytest.raises(TypeError, match=r"one split .* got a DatasetDict with splits \['train'\].*dataset\['train'\]"):
        prepare_dataset(datasets.DatasetDict({"train": raw}), model.codec_model)  # was: "no column 'audio'"
    with pytest.raises(TypeError, match="got IterableDataset.*without streaming=True"):  # was: AttributeError
        prepare_dataset(raw.to_iterable_dataset(), model.codec_model)


def test_decode_audio_finds_the_channels_axis_either_side():
    left, right = tone(300), tone(500)
    channels_first, rate = decode_audio({"array": np.stack([left, right]), "sampling_rate": 24_000})
    channels_last, _ = decode_audio({"array": np.stack([left, right], axis=1), "sampling_rate": 24_000})  # soundfile
    np.testing.assert_allclose(channels_first, (left + right) / 2)
    np.testing.assert_array_equal(channels_last, channels_first)
    assert rate == 24_000
    for shape in [(2, 2), (16, 9600), (1, 2, 9600), ()]:  # no shorter axis; too many channels; a batch; a number
        with pytest.raises(ValueError, match=rf"got an array of shape {re.escape(str(shape))}"):
            decode_audio({"array": np.zeros(shape, np.float32), "sampling_rate": 24_000})


def test_decode_audio_scales_integer_pcm_by_its_range():
    clip = tone(300)
    for dtype, scale, offset in [(np.int16, 32_768, 0), (np.int32, 2**31, 0), (np.uint8, 128, 128)]:
        pcm = np.round(clip * scale + offset).astype(dtype)  # as scipy.io.wavfile reads it
        decoded, _ = decode_audio({"array": pcm, "sampling_rate": 24_000})
        assert decoded.dtype == np.float32
        np.testing.assert_allclose(decoded, clip, atol=1 / scale)
    int8, _ = decode_audio({"array": np.array([-128, 0, 127], np.int8), "sampling_rate": 8})
    assert int8.tolist() == [-1, 0, 127 / 128]
    with pytest.raises(ValueError, match="int64.*Python ints"):  # a list of ints: its range is unknown
        decode_audio({"array": [0, 1000, -1000], "sampling_rate": 24_000})


def test_prepare_reads_int16_channels_last_columns_as_stored():
    model, _ = tiny_random_bark()
    clip = tone(300)
    pcm = np.round(clip * 32_768).astype(np.int16)
    raw = datasets.Dataset.from_dict({"audio": [{"array": np.stack([pcm, pcm], axis=1), "sampling_rate": 24_000}]})
    assert raw.features["audio"]["array"].feature.feature.dtype == "int16"  # rows come back as lists of ints
    prepared = prepare_dataset(raw, model.codec_model)
    expected = encode_audio(model.codec_model, pcm.astype(np.float32) / 32_768)
    np.testing.assert_array_equal(np.array(prepared[0]["fine_tokens"]), expected)


def test_prepare_names_the_row_of_a_bad_rate_or_unusable_audio():
    model, _ = tiny_random_bark()
    noisy = tone(300)
    noisy[100] = np.nan
    for bad_cell, message in [({"array": tone(300), "sampling_rate": 0}, "sampling_rate must be a whole number of "
                                                                          "Hz above 0, got 0"),
                              ({"array": tone(300), "sampling_rate": -16_000}, "got -16000"),
                              ({"array": noisy, "sampling_rate": 24_000}, "NaN or infinite samples"),
                              ({"array": np.full(960, np.inf, np.float32), "sampling_rate": 24_000}, "NaN or infinite"),
                              ({"array": np.zeros(0, np.float32), "sampling_rate": 24_000}, "The audio is empty")]:
        raw = datasets.Dataset.from_dict({"audio": [{"array": tone(220), "sampling_rate": 24_000}, bad_cell]})
        with pytest.raises(ValueError, match=rf"^Row 1: .*{message}"):
            prepare_dataset(raw, model.codec_model)
    missing = datasets.Dataset.from_dict({"audio": [{"array": tone(220), "sampling_rate": 24_000}, None]})
    with pytest.raises(TypeError, match=r"^Row 1: An audio cell must be .* got NoneType"):
        prepare_dataset(missing, model.codec_model)
    garbage = datasets.Dataset.from_dict({"audio": [{"array": tone(220), "sampling_rate": 24_000},
                                                    {"bytes": b"not a sound file", "path": None}]})
    with pytest.raises(ValueError, match=r"^Row 1: The audio cannot be read as a sound file"):
        prepare_dataset(garbage, model.codec_model)
    with pytest.raises(FileNotFoundError, match=r"^Row 0: The audio file /nowhere/clip.wav does not exist"):
        prepare_dataset(datasets.Dataset.from_dict({"audio": [{"bytes": None, "path": "/nowhere/clip.wav"}]}),
                        model.codec_model)
    with pytest.raises(ValueError, match="Sampling rates must be positive"):
        resample_audio(tone(300), 0)


@pytest.mark.parametrize("module, call", [
    ("scipy.signal", lambda: resample_audio(tone(300), 16_000)),
    ("soundfile", lambda: decode_audio({"bytes": b"RIFF", "path": None})),  # was: No module named 'soundfile'
    ("datasets", lambda: prepare_dataset(None, None)),                       # was: No module named 'datasets'
])
def test_a_missing_train_extra_names_its_pip_command(monkeypatch, module, call):
    monkeypatch.setitem(sys.modules, module, None)  # as if bark-hf[train] were not installed
    package = module.split(".")[0]
    with pytest.raises(ImportError, match=rf"needs {package}, an optional extra: pip install 'bark-hf\[train\]'"):
        call()


def test_an_installed_extra_that_fails_to_import_keeps_its_own_error(monkeypatch, tmp_path):
    """Only a missing package is named as a missing extra: a broken one (here soundfile, as a datasets too old for
    huggingface_hub fails) was reported as 'needs soundfile ... pip install', which pip then calls satisfied."""
    (tmp_path / "soundfile.py").write_text("from numpy import no_such_name\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "soundfile", raising=False)
    with pytest.raises(ImportError, match="cannot import name 'no_such_name'"):
        decode_audio({"bytes": b"RIFF", "path": None})


def test_example_script_names_the_pip_command_for_datasets(finetune, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    expected = r"--dataset needs datasets, an optional extra: pip install 'bark-hf\[train\]'"
    with pytest.raises(SystemExit, match=expected):
        finetune.load_training_data("some/dataset", "train")


def test_collators_explain_missing_columns_and_wrong_models(processor):
    with pytest.raises(KeyError, match="no 'fine_tokens' column.*remove_unused_columns=False"):
        BarkHfCoarseCollator()([{"semantic_tokens": [1, 2]}])
    with pytest.raises(KeyError, match="no 'semantic_tokens' column.*semantic_tokenizer="):  # not made from audio
        BarkHfCoarseCollator()([{"fine_tokens": np.zeros((8, 30), np.int64)}])
    with pytest.raises(ValueError, match="pass the processor"):
        collator_for(tiny_stage("semantic"))
    with pytest.raises(TypeError, match="takes a stage"):
        collator_for(tiny_random_bark()[0])


def test_semantic_collator_warns_once_of_long_texts_not_per_row(processor, caplog):
    """The processor warned for every text over 256 tokens: every row of every batch of a long run."""
    collator = collator_for(tiny_stage("semantic"), processor)
    rows = [{"text": " ".join(["word"] * 300), "semantic_tokens": np.arange(5)},
            {"text": "Short.", "semantic_tokens": np.arange(5)}]
    with caplog.at_level(logging.WARNING):
        first = collator(rows)
        collator(rows)
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert warnings == ["1 of this batch's 2 texts are longer than Bark reads (256 tokens); they train on their "
                        "first 256 tokens, as generation reads them. Split such rows into sentences to train on all "
                        "of them. (Said once per collator.)"]
    assert first["input_ids"].shape[0] == 2
    with caplog.at_level(logging.WARNING):
        processor(" ".join(["word"] * 300))  # alone, the processor still warns
    assert "Bark reads at most 256" in caplog.records[-1].getMessage()


def test_collators_refuse_rows_they_cannot_train_on(processor):
    rows = [{"text": "hi", "semantic_tokens": [1, 2]}, {"text": " ", "semantic_tokens": [1, 2]}]
    with pytest.raises(ValueError, match=r"Item 1 of this batch has no text to speak \(' '\)"):
        BarkHfSemanticCollator(processor)(rows)
    coarse_only = {"semantic_tokens": [1, 2], "fine_tokens": np.zeros((2, 30), np.int64)}
    with pytest.raises(ValueError, match=r"Item 0 of this batch: fine_tokens must be .* got shape \(2, 30\)"):
        BarkHfFineCollator()([coarse_only])
    assert BarkHfCoarseCollator()([coarse_only])["input_ids"].shape == (1, 257 + 60)  # the coarse stage reads two
    with pytest.raises(ValueError, match=r"got shape \(30, 8\)"):  # transposed: would train on garbage
        BarkHfFineCollator()([{"fine_tokens": np.zeros((30, 8), np.int64)}])
    with pytest.raises(ValueError, match=r"got shape \(1, 30\)"):
        BarkHfCoarseCollator()([{**coarse_only, "fine_tokens": np.zeros((1, 30), np.int64)}])
    for codebooks in ([], [0], [8], (2, 9), {2, 3}, 3, [True], [np.True_], [2.0], "2"):  # [True] trained head 1
        with pytest.raises(ValueError, match=r"codebooks must be a non-empty list of whole numbers 1..7"):
            BarkHfFineCollator(codebooks=codebooks)
    first_head = BarkHfFineCollator(codebooks=(1,))([{"fine_tokens": np.zeros((8, 30), np.int64)}])
    assert int(first_head["codebook_idx"]) == 1
    numpy_head = BarkHfFineCollator(codebooks=[np.int64(3)])([{"fine_tokens": np.zeros((8, 30), np.int64)}])
    assert numpy_head["codebook_idx"].dtype == torch.int64 and int(numpy_head["codebook_idx"]) == 3
    for collator in (BarkHfCoarseCollator, BarkHfFineCollator):
        with pytest.raises(ValueError, match=r"random_windows must be True or False, got 'no'"):
            collator(random_windows="no")


# --- Trainer, LoRA, the example script ------------------------------------------------------------


@pytest.mark.parametrize("stage, row, message", [
    ("fine", {"fine_tokens": np.zeros((8, 0), np.int64)}, r"with at least one frame .* got shape \(8, 0\)"),  # was NaN
    ("coarse", {"semantic_tokens": [1], "fine_tokens": np.zeros((8, 0), np.int64)}, r"got shape \(8, 0\)"),
    ("fine", {"fine_tokens": np.full((8, 5), 2000)}, r"fine_tokens must be in 0..1023, got 2000..2000"),
    ("coarse", {"semantic_tokens": [1], "fine_tokens": np.full((8, 5), 1024)}, r"fine_tokens must be in 0..1023"),
    ("coarse", {"semantic_tokens": [20_000], "fine_tokens": np.ones((8, 5), np.int64)},
     r"semantic_tokens must be in 0..9999"),
    ("coarse", {"semantic_tokens": [1], "fine_tokens": [[1, 2, 3], [1, 2]]}, r"fine_tokens must be a 2-D integer"),
    ("semantic", {"text": "hi", "semantic_tokens": [1, -1]}, r"semantic_tokens must be in 0..9999, got -1..1"),
    ("semantic", {"text": "hi", "semantic_tokens": [[1, 2]]}, r"semantic_tokens must be a 1-D integer array"),
    ("semantic", {"text": "hi", "semantic_tokens": None}, r"semantic_tokens must be a 1-D integer array"),
    ("semantic", {"text": "hi", "semantic_tokens": []}, r"semantic_tokens is empty"),  # trained "end at once"
    ("coarse", {"semantic_tokens": [], "fine_tokens": np.ones((8, 5), np.int64)}, r"semantic_tokens is empty"),
    ("semantic", {"text": "hi", "semantic_tokens": [1], "semantic_prompt": [20_000]},
     r"semantic_prompt must be in 0..9999.*voice preset"),  # was embedded as a text token without a word
    ("semantic", {"text": "hi", "semantic_tokens": [1], "semantic_prompt": [1.5]},
     r"semantic_prompt must be a 1-D integer array, got float64"),  # was truncated to 1
])
def test_collators_refuse_tokens_out_of_range_or_misshaped_naming_the_item(stage, row, message, processor):
    collator = {"semantic": BarkHfSemanticCollator(processor), "coarse": BarkHfCoarseCollator(),
                "fine": BarkHfFineCollator()}[stage]
    good = {"text": "fine", "semantic_tokens": [1, 2], "fine_tokens": np.ones((8, 5), np.int64)}
    with pytest.raises(ValueError, match=rf"Item 1 of this batch: .*{message}"):
        collator([good, row])


def trainer_arguments(output_dir: Path, steps: int, learning_rate: float = 1e-2) -> TrainingArguments:
    return TrainingArguments(output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=2,
                             learning_rate=learning_rate, lr_scheduler_type="constant", logging_steps=5,
                             save_strategy="no", report_to="none", use_cpu=True, remove_unused_columns=False,
                             disable_tqdm=True, seed=0)


def test_trainer_memorises_coarse_tokens_and_generation_reproduces_them(tone_rows, tmp_path):
    model, processor = tiny_random_bark(seed=1)
    coarse = model.coarse_acoustics.train()
    trainer = Trainer(model=coarse, args=trainer_arguments(tmp_path, steps=60), train_dataset=tone_rows,
                      data_collator=collator_for(coarse, processor))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]  # means over 5 steps
    assert losses[0] > 1.0 and losses[-1] < 0.05
    coarse.eval()
    for row in tone_rows:
        generated = coarse.generate(torch.tensor(row["semantic_tokens"])[None], top_k=1, show_progress=False)
        expected = torch.tensor(row["fine_tokens"])[:2]
        assert generated.sequences.shape[-1] == math.floor(len(row["semantic_tokens"]) * 75 / 49.9) == 28
        assert torch.equal(generated.sequences[0], expected[:, :28])


def test_trainer_memorises_fine_tokens_and_generation_reproduces_them(tone_rows, tmp_path):
    model, processor = tiny_random_bark(seed=1)
    fine = model.fine_acoustics.train()
    trainer = Trainer(model=fine, args=trainer_arguments(tmp_path, steps=60), train_dataset=tone_rows,
                      data_collator=collator_for(fine, processor))
    trainer.train()
    fine.eval()
    for row in tone_rows:
        codes = torch.tensor(row["fine_tokens"])
        assert torch.equal(fine.generate(codes[None, :2], temperature=None).sequences[0], codes)


@pytest.mark.parametrize("stage", ["semantic", "coarse", "fine"])
def test_gradient_accumulation_over_uneven_labels_equals_one_large_batch(stage, processor, tmp_path):
    generator = np.random.default_rng(3)
    rows = datasets.Dataset.from_dict({  # targets per row differ about sixfold
        "text": ["short", "a much longer row of text"],
        "semantic_tokens": [generator.integers(0, 10_000, n).tolist() for n in (8, 50)],
        "fine_tokens": [generator.integers(0, 1024, (8, n)).tolist() for n in (12, 75)],
    })
    collator = {"semantic": BarkHfSemanticCollator(processor), "coarse": BarkHfCoarseCollator(random_windows=False),
                "fine": BarkHfFineCollator(codebooks=[3], random_windows=False)}[stage]

    def collate(features: list[dict]) -> dict[str, torch.Tensor]:
        batch = collator(features)
        if stage != "fine":  # a label at the first position, which a next-token loss never predicts
            batch["labels"][:, 0] = 0
        return batch

    reference = tiny_stage(stage).train()  # one plain SGD step on the mean loss of both rows
    reference(**collate(list(rows))).loss.backward()
    expected = {name: (parameter - parameter.grad).detach() for name, parameter in reference.named_parameters()}
    for batch_size, accumulation in ((2, 1), (1, 2)):
        model = tiny_stage(stage).train()
        arguments = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=batch_size,
                                      gradient_accumulation_steps=accumulation, learning_rate=1.0, optim="sgd",
                                      max_grad_norm=0, lr_scheduler_type="constant", save_strategy="no",
                                      report_to="none", use_cpu=True, remove_unused_columns=False, disable_tqdm=True,
                                      seed=0)
        Trainer(model=model, args=arguments, train_dataset=rows, data_collator=collate).train()
        for name, parameter in model.named_parameters():
            torch.testing.assert_close(parameter.detach(), expected[name], msg=f"{name}, batch {batch_size}")


@pytest.mark.parametrize("stage", ["semantic", "coarse_acoustics"])
def test_a_stage_saved_after_trainer_still_generates_with_the_kv_cache(stage, tone_rows, tmp_path, monkeypatch):
    model, processor = tiny_random_bark(seed=1)
    trained = getattr(model, stage).train()
    Trainer(model=trained, args=trainer_arguments(tmp_path, steps=1), train_dataset=tone_rows,
            data_collator=collator_for(trained, processor)).train()
    trained.save_pretrained(tmp_path / "stage")
    reloaded = type(trained).from_pretrained(tmp_path / "stage").eval()
    assert reloaded.config.use_cache is False  # what TrainingArguments.use_cache set: forward's default
    sizes = []
    new_cache = type(trained)._new_cache
    monkeypatch.setattr(type(trained), "_new_cache", lambda self, size, *args: sizes.append(size)
                        or new_cache(self, size, *args))
    if stage == "semantic":
        reloaded.generate(**processor(["a tone"]), max_new_tokens=5, show_progress=False)
    else:
        reloaded.generate(torch.arange(20)[None], show_progress=False)
    assert len(sizes) == 1
    if stage == "semantic":  # None is transformers' usual "default": on, too
        reloaded.generate(**processor(["a tone"]), max_new_tokens=5, use_cache=None, show_progress=False)
        assert len(sizes) == 2
        with pytest.raises(ValueError, match="use_cache must be True, False or None"):
            reloaded.generate(**processor(["a tone"]), max_new_tokens=5, use_cache="no", show_progress=False)


def test_lora_adapters_train_and_merge_into_the_stage(tone_rows, tmp_path):
    from peft import LoraConfig, get_peft_model

    model, processor = tiny_random_bark(seed=1)
    semantic = model.semantic
    frozen = {name: value.clone() for name, value in semantic.state_dict().items()}
    lora = get_peft_model(semantic, LoraConfig(r=4, lora_alpha=8, target_modules=["att_proj", "in_proj", "out_proj"]))
    trainable = [name for name, parameter in lora.named_parameters() if parameter.requires_grad]
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    lora.train()
    trainer = Trainer(model=lora, args=trainer_arguments(tmp_path, steps=4, learning_rate=3e-2),
                      train_dataset=tone_rows, data_collator=collator_for(semantic, processor))
    trainer.train()
    lora.eval()
    batch = collator_for(semantic, processor)(list(tone_rows))
    with torch.no_grad():
        adapted = lora(**batch).logits
        lora.merge_and_unload()
        merged = model.semantic(**batch).logits  # the composite's own stage now holds the merged weights
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)
    changed = {name for name, value in model.semantic.state_dict().items() if not torch.equal(value, frozen[name])}
    assert changed and all(name.endswith(("att_proj.weight", "in_proj.weight", "out_proj.weight")) for name in changed)


def test_saving_a_model_with_unmerged_lora_adapters_is_refused(tone_rows, tmp_path):
    """The adapted layers were saved as `base_layer` and adapter weights, which from_pretrained left out: the folder
    loaded with those layers newly initialised, under a mere load report."""
    from peft import LoraConfig, PeftModel, get_peft_model

    model, processor = tiny_random_bark(seed=1)
    lora = get_peft_model(model.coarse_acoustics, LoraConfig(r=4, target_modules=["att_proj"]))
    arguments = trainer_arguments(tmp_path / "run", steps=1)
    arguments.save_strategy, arguments.save_steps = "steps", 1  # a Trainer checkpoint of a PeftModel: its adapters
    Trainer(model=lora, args=arguments, train_dataset=tone_rows,
            data_collator=collator_for(model.coarse_acoustics, processor)).train()
    assert (tmp_path / "run" / "checkpoint-1" / "adapter_config.json").is_file()
    for saved in (model, model.coarse_acoustics):
        with pytest.raises(ValueError, match="peft adapters that are not merged.*merge_and_unload"):
            saved.save_pretrained(tmp_path / "unmerged")
    assert not (tmp_path / "unmerged" / "model.safetensors").exists()
    lora.save_pretrained(tmp_path / "adapter")
    fresh = PeftModel.from_pretrained(tiny_random_bark(seed=1)[0].coarse_acoustics, tmp_path / "adapter")
    torch.testing.assert_close(fresh.base_model.model.state_dict(), model.coarse_acoustics.state_dict())
    lora.merge_and_unload()
    model.save_pretrained(tmp_path / "merged")
    reloaded = BarkHfModel.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(reloaded.coarse_acoustics.state_dict(), model.coarse_acoustics.state_dict())


@pytest.mark.parametrize("target", ["lm_heads.2", "input_embeds_layers.3"])
def test_example_script_refuses_lora_on_a_tied_fine_layer_whose_merge_changes_its_twin(finetune, target, tmp_path):
    """Head i and embedding i + 1 of the fine stage are one weight: merging an adapter of either changed the other
    too, so the script saved a model that was not the one trained. It allowed both as --lora-targets."""
    from peft import LoraConfig, get_peft_model

    fine = tiny_random_bark(seed=1)[0].fine_acoustics
    lora = get_peft_model(fine, LoraConfig(r=2, target_modules=[target], init_lora_weights=False))
    codes = torch.randint(0, 1024, (1, 40, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = [lora(codebook_idx=k, input_ids=codes).logits for k in (3, 4)]
        lora.merge_and_unload()
        merged = [fine(codebook_idx=k, input_ids=codes).logits for k in (3, 4)]
    assert any(not torch.allclose(a, m, atol=1e-4) for a, m in zip(adapted, merged, strict=True))
    with pytest.raises(SystemExit, match=f"names {re.escape(target)}, whose weight the fine stage ties"):
        finetune.check_lora_targets("fine", [target])
    finetune.check_lora_targets("fine", ["input_embeds_layers.0", "att_proj"])  # embedding 0 has no head


@pytest.mark.parametrize("stage", ["semantic", "coarse", "fine"])
def test_lora_under_reentrant_gradient_checkpointing_gets_gradients(stage, processor):
    """Reentrant checkpointing needs inputs that require gradients (enable_input_require_grads); the fine stage's
    eight embeddings are a ModuleList, whose hook never ran, so backward found no gradient to compute."""
    from peft import LoraConfig, get_peft_model

    model = tiny_stage(stage).train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["att_proj"], init_lora_weights=False))
    lora(**stage_batch(stage, processor)).loss.backward()
    adapters = {name: parameter.grad for name, parameter in lora.named_parameters() if parameter.requires_grad}
    assert adapters and all(grad is not None and grad.abs().sum() > 0 for grad in adapters.values())
    lora.base_model.model.disable_input_require_grads()
    assert not model._require_grads_hooks


@pytest.mark.parametrize("stage", ["semantic", "coarse", "fine"])
def test_trainer_with_reentrant_checkpointing_trains_lora_wrapped_before_it(stage, processor, tmp_path):
    """The Trainer enables checkpointing on the PeftModel after wrapping; transformers then makes embedding outputs
    require grad only for a main input `input_ids`, and the fine stage's backward raised that nothing required grad."""
    from peft import LoraConfig, get_peft_model

    generator = np.random.default_rng(3)
    rows = datasets.Dataset.from_dict({"text": ["short", "a longer row"],
                                       "semantic_tokens": [generator.integers(0, 10_000, 20).tolist()] * 2,
                                       "fine_tokens": [generator.integers(0, 1024, (8, 30)).tolist()] * 2})
    model = tiny_stage(stage).train()
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["att_proj"], init_lora_weights=False))
    before = {name: parameter.clone() for name, parameter in lora.named_parameters() if parameter.requires_grad}
    arguments = trainer_arguments(tmp_path, steps=1)
    arguments.activation_checkpointing, arguments.activation_checkpointing_kwargs = True, {"use_reentrant": True}
    Trainer(model=lora, args=arguments, train_dataset=rows, data_collator=collator_for(model, processor)).train()
    assert all(not torch.equal(parameter, before[name]) for name, parameter in lora.named_parameters()
               if parameter.requires_grad)


@pytest.mark.parametrize("stage", ["semantic", "coarse_acoustics", "fine_acoustics"])
def test_lora_with_the_causal_lm_task_type_gives_the_loss_and_generates(stage, tone_rows, processor):
    """The fine stage too: peft's wrapper failed on it with an AttributeError (no prepare_inputs_for_generation),
    then passed inputs_embeds and output_attentions, which its forward did not take."""
    from peft import LoraConfig, get_peft_model

    model, _ = tiny_random_bark(seed=1)
    causal = getattr(model, stage)
    torch.manual_seed(0)  # the fine collator draws its codebook
    batch = collator_for(causal, processor)(list(tone_rows))
    plain = causal(**batch).loss
    lora = get_peft_model(causal, LoraConfig(r=4, target_modules=["att_proj"], task_type="CAUSAL_LM"))
    torch.testing.assert_close(lora(**batch).loss, plain)  # the adapters start at zero
    assert type(collator_for(lora, processor)) is type(collator_for(causal, processor))  # a TypeError before
    if stage == "semantic":
        inputs, settings = [*processor(["a tone"]).values()], dict(max_new_tokens=5, top_k=1)
    elif stage == "coarse_acoustics":
        inputs, settings = [torch.tensor(tone_rows[0]["semantic_tokens"])[None]], dict(top_k=1)
    else:
        inputs, settings = [torch.tensor(tone_rows[0]["fine_tokens"])[None, :2]], dict(temperature=None)
    generated = lora.eval().generate(*inputs, show_progress=False, **settings).sequences
    assert torch.equal(generated, causal.generate(*inputs, show_progress=False, **settings).sequences)
    with pytest.raises(ValueError, match="neither attentions nor hidden states"):
        causal(**batch, output_hidden_states=True)
    if stage == "fine_acoustics":
        with pytest.raises(ValueError, match="pass input_ids, not inputs_embeds"):
            causal(**batch, inputs_embeds=torch.zeros(2, 1024, 32))


@pytest.fixture(scope="module")
def finetune():
    spec = importlib.util.spec_from_file_location("finetune_example", EXAMPLE_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_script_writes_a_model_folder_others_can_read(finetune, tmp_path):
    """The folder was mkdtemp's, renamed into place: owner-only (0700), so other users of a shared machine could not
    load the fine-tuned model."""
    model, processor = tiny_random_bark()
    card = bark_model_card(model.config, model_id="tuned")
    previous = os.umask(0o022)
    try:
        folder = finetune.write_model_folder(model, processor, tmp_path / "tuned", overwrite=False, card=card)
    finally:
        os.umask(previous)
    assert folder.stat().st_mode & 0o777 == 0o755
    assert torch.equal(BarkHfModel.from_pretrained(folder).semantic.lm_head.weight, model.semantic.lm_head.weight)


def test_example_script_keeps_a_folder_made_while_training_and_the_trained_model(finetune, tmp_path):
    """The final rename failed with a bare OSError and the trained model was deleted with its staging folder."""
    model, processor = tiny_random_bark()
    card = bark_model_card(model.config, model_id="tuned")
    (tmp_path / "tuned").mkdir()
    (tmp_path / "tuned" / "notes.txt").write_text("someone else's", encoding="utf-8")
    with pytest.raises(SystemExit, match="tuned was created while training ran.*it is kept in") as info:
        finetune.write_model_folder(model, processor, tmp_path / "tuned", overwrite=False, card=card)
    kept = Path(str(info.value).rsplit("it is kept in ", 1)[1].removesuffix(": rename that folder."))
    assert torch.equal(BarkHfModel.from_pretrained(kept).semantic.lm_head.weight, model.semantic.lm_head.weight)
    assert [path.name for path in (tmp_path / "tuned").iterdir()] == ["notes.txt"]


def save_tone_dataset(folder: Path, **columns) -> Path:
    datasets.Dataset.from_dict({
        "text": ["a low tone", "a high tone"],
        "audio": [{"array": tone(220), "sampling_rate": 24_000}, {"array": tone(440), "sampling_rate": 24_000}],
        **columns,
    }).save_to_disk(folder)
    return folder


def test_example_script_prepares_trains_with_lora_and_writes_a_loadable_folder(finetune, tmp_path):
    data = save_tone_dataset(tmp_path / "data", tokens=[list(range(19)), list(range(100, 119))])
    output = tmp_path / "bark-tones"
    argv = ["--model", "tiny-random", "--dataset", str(data), "--stage", "coarse", "--semantic-column",
            "tokens", "--output-dir", str(output), "--max-steps", "2", "--batch-size", "2", "--lora-rank", "4",
            "--learning-rate", "1e-2"]
    assert finetune.main(argv) == output

    original, _ = tiny_random_bark()
    tuned = BarkHfModel.from_pretrained(output)
    for stage in ("semantic", "fine_acoustics"):
        for name, value in getattr(original, stage).state_dict().items():
            assert torch.equal(getattr(tuned, stage).state_dict()[name], value), f"{stage}.{name}"
    tuned_coarse = tuned.coarse_acoustics.state_dict()
    assert any(not torch.equal(tuned_coarse[name], value) for name, value in original.coarse_acoustics.state_dict()
               .items())
    assert not any("lora" in name for name in tuned.state_dict())
    card = ModelCard.load(output / "README.md")
    assert card.data.library_name == "bark-hf" and card.data.base_model is None
    speech = pipeline("text-to-audio", model=str(output))("Hi", generate_kwargs={"semantic_max_new_tokens": 3},
                                                          show_progress=False)
    assert speech["sampling_rate"] == 24_000 and speech["audio"].size > 0
    with pytest.raises(SystemExit, match="already exists"):
        finetune.main(argv)


def test_example_script_pushes_a_card_that_names_the_hub_repo(finetune, tmp_path, monkeypatch):
    import bark_hf.hub

    uploaded = {}

    class FakeHub:  # a bare name gains the user's namespace, as on the Hub
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kwargs):
            return SimpleNamespace(repo_id=f"me/{repo_id}")

        def hf_hub_download(self, repo_id, filename, revision=None):
            raise RemoteEntryNotFoundError("no card yet", response=SimpleNamespace(headers={}, request=None))

        def upload_folder(self, repo_id, folder_path, **kwargs):
            uploaded.update(repo_id=repo_id, files={path.name for path in Path(folder_path).rglob("*")},
                            card=ModelCard.load(Path(folder_path) / "README.md"))

    monkeypatch.setattr(bark_hf.hub, "HfApi", FakeHub)
    monkeypatch.setenv("HF_TOKEN", "hf_test")  # a push without a token is refused before training
    data = save_tone_dataset(tmp_path / "data")
    output = finetune.main(["--model", "tiny-random", "--dataset", str(data), "--stage", "fine", "--max-steps", "1",
                            "--output-dir", str(tmp_path / "bark-tones"), "--push-to-hub", "bark-tones"])
    assert uploaded["repo_id"] == "me/bark-tones"
    assert {"model.safetensors", "tokenizer.json"} <= uploaded["files"]
    assert 'pipeline("text-to-audio", model="me/bark-tones")' in uploaded["card"].text
    assert 'model="me/bark-tones"' not in (output / "README.md").read_text()  # the local card: the name given


def test_example_script_resumes_from_its_last_checkpoint(finetune, tmp_path, monkeypatch):
    """A run could write checkpoints but not continue from them: run again, and it started afresh over them."""
    data = save_tone_dataset(tmp_path / "data")
    argv = ["--model", "tiny-random", "--dataset", str(data), "--stage", "fine", "--checkpoint-dir",
            str(tmp_path / "ckpt"), "--save-steps", "1", "--overwrite", "--output-dir", str(tmp_path / "out")]
    finetune.main([*argv, "--max-steps", "2"])
    assert (tmp_path / "ckpt" / "checkpoint-2").is_dir()
    steps_run = []
    training_step = finetune.Trainer.training_step

    def counting_step(trainer, *args, **kwargs):
        steps_run.append(trainer.state.global_step)
        return training_step(trainer, *args, **kwargs)

    monkeypatch.setattr(finetune.Trainer, "training_step", counting_step)
    finetune.main([*argv, "--max-steps", "3", "--resume"])
    assert steps_run == [2]  # only the third step ran: the first two came from checkpoint-2
    assert (tmp_path / "ckpt" / "checkpoint-3").is_dir()


@pytest.fixture(scope="module")
def fine_checkpoints(finetune, tmp_path_factory) -> Path:
    """Checkpoint folders of one-step fine-stage runs: `whole` trained every weight, `lora` rank-4 adapters."""
    folder = tmp_path_factory.mktemp("checkpoints")
    data = save_tone_dataset(folder / "data")
    for name, extra in (("whole", []), ("lora", ["--lora-rank", "4"])):
        finetune.main(["--model", "tiny-random", "--dataset", str(data), "--stage", "fine", "--max-steps", "1",
                       "--checkpoint-dir", str(folder / name), "--save-steps", "1",
                       "--output-dir", str(folder / f"{name}-out"), *extra])
    return folder


@pytest.mark.parametrize("checkpoints, extra, message", [
    ("lora", [], "holds LoRA adapters, but this run trains the whole stage; add that run's --lora-rank"),
    ("whole", ["--lora-rank", "4"], "holds a whole stage's weights, but --lora-rank trains LoRA adapters"),
    ("whole", ["--stage", "coarse"], "holds a bark_hf_fine checkpoint, not one of the coarse stage"),
    ("lora", ["--lora-rank", "8"], "were made with --lora-rank 4, --lora-alpha 8; pass the same"),
    ("lora", ["--lora-rank", "4", "--lora-targets", "att_proj"], "made with --lora-targets att_proj,in_proj,out_proj;"),
])
def test_example_script_refuses_to_resume_another_kind_of_run(finetune, fine_checkpoints, monkeypatch, checkpoints,
                                                               extra, message):
    """The Trainer failed deep inside: no weights index, an optimizer group of another size, a size mismatch."""
    refuse_before_loading(finetune, monkeypatch)
    argv = ["--model", "tiny-random", "--dataset", str(fine_checkpoints / "data"), "--stage", "fine",
            "--checkpoint-dir", str(fine_checkpoints / checkpoints), "--resume", "--max-steps", "2",
            "--output-dir", str(fine_checkpoints / "resumed")]
    with pytest.raises(SystemExit, match=re.escape(message)):
        finetune.main([*argv, *extra])


def test_example_script_resumes_lora_adapters_given_a_target_twice(finetune, tmp_path):
    """peft keeps the targets as a set, so the run's own --lora-targets with a name twice were refused as others."""
    from peft import LoraConfig

    args = finetune.build_parser().parse_args(["--dataset", "d", "--stage", "fine", "--output-dir", "o",
                                               "--lora-rank", "4", "--lora-targets", "in_proj,in_proj,out_proj"])
    LoraConfig(**finetune.lora_settings(args)).save_pretrained(tmp_path)
    finetune.check_resumable(tmp_path, args)


def test_example_script_trains_in_bf16_without_cuda(finetune, tmp_path):
    data = save_tone_dataset(tmp_path / "data")
    output = finetune.main(["--model", "tiny-random", "--dataset", str(data), "--stage", "fine", "--max-steps", "1",
                            "--bf16", "--output-dir", str(tmp_path / "bark-tones")])
    assert BarkHfModel.from_pretrained(output).fine_acoustics.dtype == torch.float32  # mixed precision: fp32 weights


@pytest.mark.parametrize("stage", ["semantic", "coarse"])
def test_example_script_refuses_data_without_semantic_tokens_before_preparing(finetune, stage, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the script loaded the model or prepared data before refusing")

    monkeypatch.setattr(finetune, "load_bark", fail)
    monkeypatch.setattr(finetune, "prepare_dataset", fail)
    audio = save_tone_dataset(tmp_path / "audio")
    argv = ["--model", "tiny-random", "--stage", stage, "--output-dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match=r"an audio dataset without --semantic-column.*semantic_tokenizer="):
        finetune.main([*argv, "--dataset", str(audio)])
    prepared = datasets.Dataset.from_dict({"text": ["a", "b"], "fine_tokens": np.zeros((2, 8, 30), np.int16)})
    prepared.save_to_disk(tmp_path / "prepared")
    with pytest.raises(SystemExit, match=r"a prepared dataset \(it has 'fine_tokens'\) without 'semantic_tokens'"):
        finetune.main([*argv, "--dataset", str(tmp_path / "prepared"), "--semantic-column", "tokens"])


def test_example_script_refuses_an_output_dir_it_would_destroy_or_collide_with(finetune, tmp_path, monkeypatch):
    monkeypatch.setattr(finetune, "load_bark", lambda *args: pytest.fail("loaded the model before refusing"))
    output = tmp_path / "out"
    argv = ["--model", "tiny-random", "--stage", "fine", "--overwrite"]
    holds = "holds the dataset, the --model folder or --checkpoint-dir"
    with pytest.raises(SystemExit, match=holds):  # else: deleted after training
        finetune.main([*argv, "--output-dir", str(output), "--dataset", str(save_tone_dataset(output / "data"))])
    data = str(save_tone_dataset(tmp_path / "data"))
    with pytest.raises(SystemExit, match=holds):  # else: the rename fails at the end
        finetune.main([*argv, "--output-dir", str(output), "--dataset", data, "--checkpoint-dir", str(output / "ckpt")])
    (output / "base").mkdir()
    with pytest.raises(SystemExit, match=holds):  # else: the base model is deleted with the old folder
        finetune.main(["--model", str(output / "base"), "--stage", "fine", "--overwrite", "--output-dir", str(output),
                       "--dataset", data])
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="is a file, not a model folder"):  # said first, not "pass --overwrite"
        finetune.main([*argv[:-1], "--output-dir", str(tmp_path / "file"), "--dataset", data])


def test_example_script_names_rows_without_text_before_training(finetune, tmp_path, monkeypatch):
    monkeypatch.setattr(finetune, "load_bark", lambda *args: pytest.fail("loaded the model before refusing"))
    data = save_tone_dataset(tmp_path / "data", text=["a low tone", " "], tokens=[[1, 2], [3, 4]])
    with pytest.raises(SystemExit, match=r"Rows \[1\] have no text to speak"):
        finetune.main(["--model", "tiny-random", "--dataset", str(data), "--stage", "semantic",
                       "--semantic-column", "tokens", "--output-dir", str(tmp_path / "out")])



def test_example_script_refuses_unusable_settings_before_loading_the_model(finetune, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(finetune, "load_bark", lambda *args: pytest.fail("loaded the model before refusing"))
    data = save_tone_dataset(tmp_path / "data", tokens=[[1, 2], [3, 4]])
    argv = ["--model", "tiny-random", "--dataset", str(data), "--stage", "fine", "--output-dir", str(tmp_path / "out")]
    for flag, value in (("--batch-size", "0"), ("--gradient-accumulation", "0"), ("--lora-rank", "-2"),
                        ("--save-steps", "0"), ("--batch-size", "two"),
                        # these wrote an untrained model as if trained (no step, or a learning rate of 0)
                        ("--max-steps", "0"), ("--max-steps", "-1"), ("--epochs", "0"), ("--epochs", "-1"),
                        ("--learning-rate", "0"), ("--lora-alpha", "0"),
                        # these failed after the model loaded, with a traceback
                        ("--epochs", "nan"), ("--learning-rate", "-1"), ("--learning-rate", "inf"), ("--seed", "-1"),
                        ("--seed", str(2**32)), ("--lora-targets", "att_proj,,out_proj")):
        with pytest.raises(SystemExit) as exit_info:  # was: a torch error after loading, or (--lora-rank -2) training
            finetune.main([*argv, flag, value])       # every weight
        assert exit_info.value.code == 2 and f"argument {flag}" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"--audio-column wav: the dataset has no such column"):
        finetune.main([*argv, "--audio-column", "wav"])
    with pytest.raises(SystemExit, match=r"--semantic-column nope: the dataset has no such column"):
        finetune.main([*argv[:-3], "coarse", *argv[-2:], "--semantic-column", "nope"])
    datasets.load_from_disk(data).train_test_split(test_size=1, seed=0).save_to_disk(tmp_path / "splits")
    with pytest.raises(SystemExit, match=r"no split 'validation'; its splits are \['test', 'train'\]"):  # KeyError
        finetune.main([*argv, "--dataset", str(tmp_path / "splits"), "--split", "validation"])

def refuse_before_loading(finetune, monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("the script loaded the model or the data before refusing")

    monkeypatch.setattr(finetune, "load_bark", fail)
    monkeypatch.setattr(finetune, "load_training_data", fail)


@pytest.mark.parametrize("extra, message", [
    # peft's NoMatchingPeftModuleError, with a traceback, after the model loaded
    (["--lora-rank", "4", "--lora-targets", "attn_proj"], r"--lora-targets attn_proj: the fine stage has no module of "
     r"that name; choose from att_proj, in_proj, input_embeds_layers.0, out_proj, "),
    # each fine head shares its weight with a codebook's embedding: merging an adapter changed both
    (["--lora-rank", "4", "--lora-targets", "att_proj,lm_heads.2"], "names lm_heads.2, whose weight the fine stage "
     "ties to another layer"),
    (["--lora-rank", "4", "--lora-targets", "input_embeds_layers.3"], "names input_embeds_layers.3, whose weight"),
    # silently ignored beside a name that matched
    (["--lora-rank", "4", "--lora-targets", "att_proj,nope"], "--lora-targets nope: the fine stage has no module"),
    (["--lora-rank", "4", "--lora-targets", "layernorm_1"], "names a LayerNorm, which LoRA cannot adapt"),
    (["--lora-targets", "att_proj"], "--lora-targets only applies to LoRA training; add --lora-rank"),  # were ignored
    (["--lora-alpha", "8"], "--lora-alpha only applies to LoRA training"),
    (["--save-steps", "10"], "there are none without --checkpoint-dir"),
    (["--checkpoint-dir", "{tmp}/file"], "is a file; choose a folder"),  # was: FileExistsError after training
    (["--resume"], "--resume continues from the last checkpoint .* and add --checkpoint-dir"),  # there was no --resume
    (["--resume", "--checkpoint-dir", "{tmp}"], "and {tmp} holds none; drop --resume"),
    (["--push-to-hub", "a/b/c"], "is not a Hub repo id"),  # was: HFValidationError after training and writing
    (["--push-to-hub", "me/tones"], "needs a Hugging Face token"),  # was: an error from the Hub after training
    (["--model", "{tmp}/bark-small"], "No model folder at '{tmp}/bark-small'"),  # was: a traceback after the data
    (["--model", "{tmp}/file"], "is a file; pass the model folder"),
])
def test_example_script_refuses_arguments_before_loading_anything(finetune, tmp_path, monkeypatch, extra, message):
    refuse_before_loading(finetune, monkeypatch)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored token
    (tmp_path / "file").write_text("")
    argv = ["--model", "tiny-random", "--dataset", str(tmp_path / "data"), "--stage", "fine",
            "--output-dir", str(tmp_path / "out"), *(value.format(tmp=tmp_path) for value in extra)]
    with pytest.raises(SystemExit, match=re.escape(message.format(tmp=tmp_path)) if "{tmp}" in message else message):
        finetune.main(argv)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_example_script_names_a_dataset_it_cannot_load_in_one_line(finetune, tmp_path, monkeypatch):
    monkeypatch.setattr(finetune, "load_bark", lambda *args: pytest.fail("loaded the model before refusing"))
    (tmp_path / "wavs").mkdir()
    (tmp_path / "wavs" / "a.wav").write_bytes(b"RIFF")
    (tmp_path / "data.csv").write_text("text\n")
    datasets.Dataset.from_dict({"text": ["a"]}).select([]).save_to_disk(tmp_path / "empty")
    argv = ["--model", "tiny-random", "--stage", "fine", "--output-dir", str(tmp_path / "out")]
    for dataset, message in ((tmp_path / "nope", r"^No dataset folder at '.*nope'"),  # was: datasets' FileNotFoundError
                             (tmp_path / "wavs", r"is not a folder written by save_to_disk.*'audiofolder'"),
                             (tmp_path / "data.csv", r"is a file; pass a folder written by Dataset.save_to_disk"),
                             (tmp_path / "empty", r"holds no rows"),  # was: an IndexError in datasets
                             ("bark-hf-tests-no-such-dataset-here", r"there is no folder of that name, and the Hub "
                              r"dataset could not be loaded")):
        with pytest.raises(SystemExit, match=message):
            finetune.main([*argv, "--dataset", str(dataset)])
    assert not (tmp_path / "out").exists()


def test_example_script_exits_with_one_line_and_writes_nothing(tmp_path):
    data = save_tone_dataset(tmp_path / "data")
    result = subprocess.run([sys.executable, str(EXAMPLE_SCRIPT), "--model", "tiny-random", "--dataset", str(data),
                             "--stage", "fine", "--output-dir", str(tmp_path / "out"), "--lora-rank", "2",
                             "--lora-targets", "foo"], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(EXAMPLE_SCRIPT.parents[1])})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "--lora-targets foo" in result.stderr
    assert not (tmp_path / "out").exists()


def test_example_script_writes_nothing_when_no_step_ran(finetune, tmp_path, monkeypatch):
    class NoSteps:  # what data too small for any step would give
        def __init__(self, **kwargs):
            self.state = SimpleNamespace(global_step=0)

        def train(self):
            pass

    monkeypatch.setattr(finetune, "Trainer", NoSteps)
    data = save_tone_dataset(tmp_path / "data")
    with pytest.raises(SystemExit, match="ran no optimizer step.*nothing was written"):
        finetune.main(["--model", "tiny-random", "--dataset", str(data), "--stage", "fine",
                       "--output-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_example_script_keeps_the_folder_and_says_how_to_upload_when_the_push_fails(finetune, tmp_path, monkeypatch):
    import bark_hf.hub

    class OfflineHub:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kwargs):
            raise ConnectionError("the Hub cannot be reached")

    monkeypatch.setattr(bark_hf.hub, "HfApi", OfflineHub)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    data = save_tone_dataset(tmp_path / "data")
    output = tmp_path / "bark-tones"
    with pytest.raises(SystemExit, match=rf"Wrote the fine-tuned model to {re.escape(str(output))}, but the upload "
                                         r"to me/tones failed \(the Hub cannot be reached\)\. .*`hf upload me/tones"):
        finetune.main(["--model", "tiny-random", "--dataset", str(data), "--stage", "fine", "--max-steps", "1",
                       "--output-dir", str(output), "--push-to-hub", "me/tones"])
    assert (output / "model.safetensors").is_file()


# --- model card -----------------------------------------------------------------------------------


def test_model_card_metadata_and_snippets():
    config = tiny_random_bark()[0].config
    card = bark_model_card(config, model_id="me/bark-tones", voice_presets=["v2/en_speaker_1"],
                           training_data=["me/tones"], base_model="suno/bark-small")
    parsed = ModelCard(str(card))  # what the Hub reads back
    assert parsed.data.library_name == "bark-hf"
    assert parsed.data.pipeline_tag == "text-to-audio"
    assert parsed.data.language == BARK_LANGUAGES
    assert parsed.data.license == "mit"
    assert parsed.data.datasets == ["me/tones"] and parsed.data.base_model == "suno/bark-small"
    assert 'pipeline("text-to-audio", model="me/bark-tones")' in parsed.text
    assert 'BarkHfModel.from_pretrained("me/bark-tones")' in parsed.text
    assert 'voice_preset="v2/en_speaker_1"' in parsed.text
    assert "Fine-tuned from [`suno/bark-small`]" in parsed.text and "(https://huggingface.co/datasets/me/tones)" in \
        parsed.text
    assert "semantic GPT 2 layers x 32 wide" in parsed.text


def test_save_pretrained_writes_the_card_but_keeps_an_authors_readme(tmp_path):
    model, _ = tiny_random_bark()
    model.save_pretrained(tmp_path / "bark-tiny")
    card = ModelCard.load(tmp_path / "bark-tiny" / "README.md")
    assert card.data.library_name == "bark-hf" and card.data.pipeline_tag == "text-to-audio"
    assert card.data.language == BARK_LANGUAGES and card.data.license == "mit"
    assert GENERATED_CARD_MARKER in card.content

    authors = tmp_path / "bark-tiny" / "README.md"
    authors.write_text("# My Bark\n", encoding="utf-8")
    model.save_pretrained(tmp_path / "bark-tiny")
    assert authors.read_text(encoding="utf-8") == "# My Bark\n"
    assert save_model_card(bark_model_card(model.config), tmp_path / "bark-tiny") is None
    assert save_model_card(bark_model_card(model.config), tmp_path / "bark-tiny", overwrite=True) == authors

    model.semantic.save_pretrained(tmp_path / "semantic-only")
    assert not (tmp_path / "semantic-only" / "README.md").exists()  # a single stage is no text-to-audio model


def test_fine_collator_draws_codebooks_and_windows_from_torch_seed():
    rows = [{"fine_tokens": np.random.default_rng(i).integers(0, 1024, (8, 1600))} for i in range(2)]
    collator = BarkHfFineCollator()
    torch.manual_seed(3)
    first = collator(rows)
    torch.manual_seed(3)
    again = collator(rows)
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert 2 <= int(first["codebook_idx"]) <= 7
    drawn = {int(collator(rows)["codebook_idx"]) for _ in range(40)}
    assert drawn == set(range(2, 8))  # the codebooks generation predicts
