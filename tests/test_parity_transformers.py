"""Parity with transformers' own Bark port (`transformers.BarkModel`) on the same tiny random weights.

Our stages use transformers' parameter names, minus the causal-mask buffers (`layers.N.attn.bias`),
so one state dict serves both. transformers computes attention eagerly (matmul, masked_fill,
softmax) while we call `scaled_dot_product_attention`: in float32 the logits agree to rounding
(max |diff| 3.5e-5 at |logits| <= 33), in float64 to <= 6e-14, which shows the two compute the same
function. Loading a transformers-format folder needs no conversion; saving our own model writes
safetensors without mask buffers and round-trips the generation config.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import TEXTS
from safetensors import safe_open
from torch.testing import assert_close
from transformers import BarkConfig, BarkModel, BarkProcessor, BertTokenizer
from transformers.initialization import no_init_weights
from transformers.models.bark.generation_configuration_bark import BarkGenerationConfig

from bark_hf import (
    BarkHfCoarseModel,
    BarkHfConfig,
    BarkHfFineModel,
    BarkHfGenerationConfig,
    BarkHfModel,
    BarkHfProcessor,
    BarkHfSemanticModel,
)

GREEDY = dict(semantic_top_k=1, coarse_top_k=1, fine_temperature=None)
PRESET = "v2/en_speaker_1"
PRESET_KEYS = ("semantic_prompt", "coarse_prompt", "fine_prompt")
CAUSAL_STAGES = {"semantic": "semantic", "coarse": "coarse_acoustics"}
STAGE_FIELDS = ("block_size", "input_vocab_size", "output_vocab_size", "num_layers", "num_heads", "hidden_size",
                "dropout", "bias")

# Eager attention vs SDPA: equal up to float32 rounding (observed max |diff| 5.5e-6 on |logits| <= 10 for the
# causal stages, 3.5e-5 on |logits| <= 33 for the fine stage); in float64 up to ~1e-13.
FLOAT32 = dict(rtol=1e-5, atol=1e-4)
FLOAT64 = dict(rtol=1e-10, atol=1e-10)
EXACT = dict(rtol=0, atol=0)


def _stage_dict(config) -> dict:
    """One of our stage configs as a dict transformers' stage configs accept."""
    return {k: v for k, v in config.to_dict().items() if k not in ("model_type", "transformers_version")}


def transformers_config(config) -> BarkConfig:
    return BarkConfig(
        semantic_config=_stage_dict(config.semantic_config),
        coarse_acoustics_config=_stage_dict(config.coarse_acoustics_config),
        fine_acoustics_config=_stage_dict(config.fine_acoustics_config),
        codec_config=config.codec_config.to_dict(),
    )


def random_ids(shape: tuple[int, ...], high: int, seed: int) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


def causal_ids(stage: str, config) -> torch.Tensor:
    return random_ids((2, 300), config.input_vocab_size, seed=0 if stage == "semantic" else 1)


def fine_codes(config) -> torch.Tensor:
    return random_ids((2, 1024, config.n_codes_total), config.input_vocab_size, seed=2)


@pytest.fixture(scope="module")
def reference(ours):
    """transformers' BarkModel with our converted weights loaded, and the load's key report.

    Random initialisation is skipped (it costs seconds, mostly EnCodec's) since the load overwrites
    every weight; the causal-mask buffers are built in `__init__` and checked below. Skipping
    `init_weights` also skips its weight tying, hence the explicit `tie_weights()`.
    """
    model = ours[0]
    with no_init_weights():
        bark = BarkModel(transformers_config(model.config))
    bark.tie_weights()
    report = bark.load_state_dict(model.state_dict(), strict=False)
    return bark.eval(), report


def test_transformers_config_mirrors_ours(ours, reference):
    model, bark = ours[0], reference[0]
    assert bark.config.model_type == "bark"
    for name in ("semantic_config", "coarse_acoustics_config", "fine_acoustics_config"):
        theirs, mine = getattr(bark.config, name), getattr(model.config, name)
        for field in STAGE_FIELDS:
            assert getattr(theirs, field) == getattr(mine, field), f"{name}.{field}"
    for field in ("n_codes_total", "n_codes_given", "tie_word_embeddings"):
        assert getattr(bark.config.fine_acoustics_config, field) == getattr(model.config.fine_acoustics_config, field)
    # Both layer-norm layouts are covered: the tiny semantic stage has no biases, the coarse one has.
    assert not model.config.semantic_config.bias and model.config.coarse_acoustics_config.bias
    assert bark.config.codec_config.to_dict() == model.config.codec_config.to_dict()


def test_state_dict_loads_into_transformers_missing_only_mask_buffers(ours, reference):
    model, (bark, report) = ours[0], reference
    expected_missing = sorted(
        f"{prefix}.layers.{layer}.attn.bias"
        for prefix, config in (("semantic", model.config.semantic_config),
                               ("coarse_acoustics", model.config.coarse_acoustics_config))
        for layer in range(config.num_layers)
    )
    assert sorted(report.missing_keys) == expected_missing
    assert report.unexpected_keys == []
    assert not any(key.endswith("attn.bias") for key in model.state_dict())
    # The buffers transformers keeps are its own causal masks, untouched by the load.
    block_size = model.config.semantic_config.block_size
    tril = torch.tril(torch.ones(block_size, block_size, dtype=torch.bool))
    for key in expected_missing:
        assert torch.equal(bark.get_buffer(key)[0, 0], tril)
    theirs = bark.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(theirs[key], value), key


@torch.no_grad()
def _chunked_logits(stage, ids: torch.Tensor, splits: tuple[int, ...]) -> tuple[torch.Tensor, object]:
    """Logits of `ids` fed in chunks through the stage's KV cache (ours: tuples; transformers: DynamicCache),
    and the final cache."""
    pieces, cache, start = [], None, 0
    for end in (*splits, ids.shape[1]):
        output = stage(ids[:, start:end], cache=cache, use_cache=True)
        pieces.append(output.logits)
        cache, start = output.cache, end
    return torch.cat(pieces, dim=1), cache


# A prompt, a multi-token chunk after it, then one token: the steps generation takes.
SPLITS = (200, 299)


@pytest.mark.parametrize("stage", list(CAUSAL_STAGES))
@torch.no_grad()
def test_causal_stage_logits_equal_transformers(ours, reference, stage):
    mine = getattr(ours[0], CAUSAL_STAGES[stage])
    theirs = getattr(reference[0], CAUSAL_STAGES[stage])
    ids = causal_ids(stage, mine.config)  # [2, 300]
    expected = theirs(ids, use_cache=False).logits  # [2, 300, V]
    actual = mine(ids, use_cache=False).logits
    assert actual.shape == expected.shape == (2, 300, mine.config.output_vocab_size)
    assert_close(actual, expected, **FLOAT32)
    # With our KV cache against transformers without one ...
    cached, cache = _chunked_logits(mine, ids, SPLITS)
    assert_close(cached, expected, **FLOAT32)
    # ... and against transformers with its cache, where a cache is read (after the prompt).
    assert_close(cached[:, SPLITS[0]:], _chunked_logits(theirs, ids, SPLITS)[0][:, SPLITS[0]:], **FLOAT32)
    # Our cache holds one (key, value) pair [B, H, T, D] per layer.
    head_dim = mine.config.hidden_size // mine.config.num_heads
    assert len(cache) == mine.config.num_layers
    assert all(k.shape == v.shape == (2, mine.config.num_heads, 300, head_dim) for k, v in cache)
    # The last position alone (what generation reads) agrees too.
    assert_close(mine(ids, logits_to_keep=1).logits, expected[:, -1:], **FLOAT32)


@pytest.mark.parametrize("stage", list(CAUSAL_STAGES))
@torch.no_grad()
def test_causal_stage_logits_equal_transformers_float64(ours, reference, stage):
    """In float64 rounding vanishes: the two implementations compute the same function."""
    mine = copy.deepcopy(getattr(ours[0], CAUSAL_STAGES[stage])).double()
    theirs = copy.deepcopy(getattr(reference[0], CAUSAL_STAGES[stage])).double()
    ids = causal_ids(stage, mine.config)[:, :96]
    expected = theirs(ids, use_cache=False).logits
    assert expected.dtype == torch.float64
    assert_close(mine(ids, use_cache=False).logits, expected, **FLOAT64)
    assert_close(_chunked_logits(mine, ids, (64, 95))[0], expected, **FLOAT64)


@pytest.mark.parametrize("stage", list(CAUSAL_STAGES))
@torch.no_grad()
def test_causal_stage_attention_mask_equals_transformers(ours, reference, stage):
    """Left padding: real positions agree (fully padded rows are unspecified and may differ)."""
    mine = getattr(ours[0], CAUSAL_STAGES[stage])
    theirs = getattr(reference[0], CAUSAL_STAGES[stage])
    ids = causal_ids(stage, mine.config)[:, :64]
    mask = torch.ones_like(ids)
    mask[1, :20] = 0
    real = mask.bool()
    expected = theirs(ids, attention_mask=mask, use_cache=False).logits
    actual = mine(ids, attention_mask=mask, use_cache=False).logits
    assert_close(actual[real], expected[real], **FLOAT32)
    assert_close(actual[0], mine(ids[:1], use_cache=False).logits[0], **FLOAT32)  # an unpadded row = alone


@pytest.mark.parametrize("codebook_idx", range(1, 8))
@torch.no_grad()
def test_fine_logits_equal_transformers(ours, reference, codebook_idx):
    mine, theirs = ours[0].fine_acoustics, reference[0].fine_acoustics
    codes = fine_codes(mine.config)
    expected = theirs(codebook_idx, codes).logits
    actual = mine(codebook_idx, codes).logits
    assert actual.shape == expected.shape == (2, 1024, mine.config.output_vocab_size)
    assert_close(actual, expected, **FLOAT32)


@torch.no_grad()
def test_fine_logits_equal_transformers_float64(ours, reference):
    mine = copy.deepcopy(ours[0].fine_acoustics).double()
    theirs = copy.deepcopy(reference[0].fine_acoustics).double()
    codes = fine_codes(mine.config)[:1, :512]
    for codebook_idx in range(1, 8):
        assert_close(mine(codebook_idx, codes).logits, theirs(codebook_idx, codes).logits, **FLOAT64)


@torch.no_grad()
def test_fine_heads_tied_like_transformers(ours, reference):
    for model in (ours[0], reference[0]):
        fine = model.fine_acoustics
        for head, lm_head in enumerate(fine.lm_heads):
            assert lm_head.weight.data_ptr() == fine.input_embeds_layers[head + 1].weight.data_ptr()


# --- A folder written by transformers (model + BarkProcessor), loaded without conversion ---


@pytest.fixture(scope="module")
def transformers_folder(reference, tokenizer_dir, shared_presets_dir, tmp_path_factory):
    """`BarkModel.save_pretrained` + `BarkProcessor.save_pretrained` with one real preset, in one folder."""
    bark = reference[0]
    folder = tmp_path_factory.mktemp("transformers_bark")
    bark.save_pretrained(folder)

    # transformers' BarkProcessor reads presets as three .npy files named in a JSON index.
    staging = tmp_path_factory.mktemp("transformers_presets")
    entry = {}
    with np.load(shared_presets_dir / f"{PRESET}.npz") as arrays:
        for key in PRESET_KEYS:
            relative = f"speaker_embeddings/{PRESET}_{key}.npy"
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            np.save(staging / relative, arrays[key])
            entry[key] = relative
    processor = BarkProcessor(tokenizer=BertTokenizer.from_pretrained(tokenizer_dir),
                              speaker_embeddings={"repo_or_path": str(staging), PRESET: entry})
    processor.save_pretrained(str(folder))  # transformers writes this path into the index as is
    return folder


def test_transformers_folder_layout(transformers_folder):
    config = json.loads((transformers_folder / "config.json").read_text())
    assert config["model_type"] == "bark"
    assert config["semantic_config"]["model_type"] == "semantic"
    index = json.loads((transformers_folder / "speaker_embeddings_path.json").read_text())
    assert set(index) == {"repo_or_path", PRESET}
    for key in PRESET_KEYS:
        assert (transformers_folder / index[PRESET][key]).is_file()
    # transformers' own processor reads the folder back.
    processor = BarkProcessor.from_pretrained(transformers_folder)
    assert processor.available_voice_presets == [PRESET]


@pytest.fixture(scope="module")
def loaded(transformers_folder):
    return BarkHfModel.from_pretrained(transformers_folder), BarkHfProcessor.from_pretrained(transformers_folder)


def test_transformers_folder_loads_without_a_foreign_model_type_warning(transformers_folder):
    """transformers warned that loading a `bark` config into `bark_hf` "is otherwise not supported and can yield
    errors", on a path bark-hf supports."""
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging

    with CaptureLogger(logging.get_logger("transformers.configuration_utils")) as captured:
        config = BarkHfConfig.from_pretrained(transformers_folder)
    assert "model of type `bark`" not in captured.out
    assert config.semantic_config.num_layers == json.loads((transformers_folder / "config.json").read_text())[
        "semantic_config"]["num_layers"]


def assert_same_weights_with_tied_heads(actual_model, expected_model):
    """Every tensor equal, and each fine head still sharing storage with its codebook's embedding."""
    expected = expected_model.state_dict()
    actual = actual_model.state_dict()
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key
    fine = actual_model.fine_acoustics
    for head, lm_head in enumerate(fine.lm_heads):
        assert lm_head.weight.data_ptr() == fine.input_embeds_layers[head + 1].weight.data_ptr()


def test_transformers_folder_weights_equal_ours(ours, loaded):
    model, from_transformers = ours[0], loaded[0]
    assert type(from_transformers.config.semantic_config) is type(model.config.semantic_config)
    assert from_transformers.config.to_diff_dict()["semantic_config"] == model.config.to_diff_dict()["semantic_config"]
    assert_same_weights_with_tied_heads(from_transformers, model)
    # transformers 5 saves a plain GenerationConfig for a new BarkModel: no Bark settings, so our defaults apply.
    assert from_transformers.generation_config.to_dict() == model.generation_config.to_dict()


def _with_transformers_generation_config(bark: BarkModel, folder, **stages) -> BarkHfModel:
    """`bark` saved by transformers with a generation_config.json in its nested `BarkGenerationConfig` layout (as
    suno/bark holds it; transformers 5 fails to save one itself), loaded by bark-hf."""
    bark.save_pretrained(folder)
    (folder / "generation_config.json").write_text(BarkGenerationConfig(**stages).to_json_string())
    return BarkHfModel.from_pretrained(folder)


def test_transformers_generation_config_values_are_honoured(reference, tmp_path):
    """The settings in transformers' generation_config.json were replaced by the defaults: an edited max_new_tokens
    or temperature was dropped without a word."""
    loaded = _with_transformers_generation_config(
        reference[0], tmp_path,
        semantic_config=dict(do_sample=True, temperature=0.6, max_new_tokens=100, min_eos_p=0.3),
        coarse_acoustics_config=dict(do_sample=True, temperature=0.9, max_coarse_history=120, sliding_window_len=30),
        fine_acoustics_config=dict(temperature=0.4, max_fine_history_length=256))
    semantic = loaded.semantic.generation_config
    assert (semantic.temperature, semantic.max_new_tokens, semantic.min_eos_p) == (0.6, 100, 0.3)
    coarse = loaded.coarse_acoustics.generation_config
    assert (coarse.temperature, coarse.max_coarse_history, coarse.sliding_window_len) == (0.9, 120, 30)
    fine = loaded.fine_acoustics.generation_config
    assert (fine.temperature, fine.max_fine_history_length) == (0.4, 256)
    assert semantic.top_k is None and coarse.top_k is None  # GenerationConfig's generic top_k=50 is not Bark's


def test_transformers_generation_config_greedy_and_published_forms(reference, tmp_path):
    """Where transformers' Bark ignores a temperature (do_sample false: greedy) Bark's default stays; its fine
    temperature 1.0 is an argmax, our None. The published values load as Bark's defaults."""
    loaded = _with_transformers_generation_config(
        reference[0], tmp_path / "greedy", semantic_config=dict(temperature=1.0),
        coarse_acoustics_config=dict(temperature=1.0, do_sample=False), fine_acoustics_config=dict(temperature=1.0))
    assert loaded.semantic.generation_config.temperature == 0.7
    assert loaded.coarse_acoustics.generation_config.temperature == 0.7
    assert loaded.fine_acoustics.generation_config.temperature is None
    published = _with_transformers_generation_config(
        reference[0], tmp_path / "published",
        semantic_config=dict(do_sample=True, temperature=0.7, max_new_tokens=768, top_k=50, top_p=1.0),
        coarse_acoustics_config=dict(do_sample=True, temperature=0.7, top_k=50, top_p=1.0),
        fine_acoustics_config=dict(temperature=0.5))
    assert published.generation_config.to_dict() == BarkHfGenerationConfig().to_dict()


@torch.no_grad()
def test_transformers_folder_logits_equal_transformers(ours, reference, loaded):
    model, bark, from_transformers = ours[0], reference[0], loaded[0]
    # Smaller inputs than above: these weights are ours, so equality with ours is exact.
    for prefix in CAUSAL_STAGES.values():
        ids = causal_ids(prefix, getattr(model, prefix).config)[:1, :128]
        actual = getattr(from_transformers, prefix)(ids).logits
        assert_close(actual, getattr(bark, prefix)(ids).logits, **FLOAT32)
        assert_close(actual, getattr(model, prefix)(ids).logits, **EXACT)
    codes = fine_codes(model.fine_acoustics.config)[:1, :256]
    for codebook_idx in range(1, 8):
        actual = from_transformers.fine_acoustics(codebook_idx, codes).logits
        assert_close(actual, bark.fine_acoustics(codebook_idx, codes).logits, **FLOAT32)
        assert_close(actual, model.fine_acoustics(codebook_idx, codes).logits, **EXACT)


@pytest.mark.parametrize("language", list(TEXTS))
def test_transformers_folder_processor_matches_transformers(loaded, transformers_folder, language):
    theirs = BarkProcessor.from_pretrained(transformers_folder)
    expected = theirs(TEXTS[language], voice_preset=PRESET)
    actual = loaded[1](TEXTS[language], voice_preset=PRESET)
    assert_close(actual["input_ids"], expected["input_ids"], **EXACT)
    assert_close(actual["attention_mask"], expected["attention_mask"], **EXACT)
    for key in PRESET_KEYS:
        assert_close(actual["history_prompt"][key], expected["history_prompt"][key].long(), **EXACT)


def test_transformers_folder_greedy_generation_equals_ours(ours, loaded, shared_presets_dir):
    model, processor = ours
    from_transformers, loaded_processor = loaded
    assert loaded_processor.available_voice_presets == [PRESET]
    text = TEXTS["en"]
    # 24 semantic tokens -> 36 coarse frames (72 tokens: two sliding windows of 60) keep it fast.
    settings = dict(return_dict_in_generate=True, show_progress=False, semantic_max_new_tokens=24, **GREEDY)
    expected = model.generate(**processor(text, voice_preset=str(shared_presets_dir / f"{PRESET}.npz")), **settings)
    actual = from_transformers.generate(**loaded_processor(text, voice_preset=PRESET), **settings)
    assert int(expected.semantic_lengths[0]) == 24 and int(expected.coarse_lengths[0]) == 36
    assert int(expected.audio_lengths[0]) == 36 * 320
    for name in ("semantic_tokens", "semantic_lengths", "coarse_tokens", "coarse_lengths", "fine_tokens",
                 "fine_lengths", "audio_lengths"):
        assert_close(getattr(actual, name), getattr(expected, name), **EXACT, msg=name)
    assert_close(actual.audio, expected.audio, **EXACT)


# --- Our own save / load round trip ---


@pytest.fixture(scope="module")
def round_trip(converted_dir, tmp_path_factory):
    """A fresh copy of the converted model (the session's `ours` stays untouched), changed, saved, reloaded."""
    model = BarkHfModel.from_pretrained(converted_dir)
    model.semantic.generation_config.temperature = 0.5
    model.coarse_acoustics.generation_config.max_coarse_history = 120
    model.fine_acoustics.generation_config.temperature = None
    folder = tmp_path_factory.mktemp("round_trip")
    model.save_pretrained(folder)
    return model, folder, BarkHfModel.from_pretrained(folder)


def test_save_writes_safetensors_without_mask_buffers(round_trip):
    model, folder, _ = round_trip
    assert (folder / "model.safetensors").is_file()
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt"))
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
    assert not [key for key in keys if key.endswith("attn.bias")]
    # Every saved tensor is a parameter or buffer of ours (tied lm_heads may be left out as aliases).
    assert keys <= set(model.state_dict())
    assert {key for key in model.state_dict() if not key.startswith("fine_acoustics.lm_heads.")} <= keys


def test_generation_config_round_trips(round_trip):
    model, folder, reloaded = round_trip
    saved = json.loads((folder / "generation_config.json").read_text())
    assert saved["semantic_config"]["temperature"] == 0.5
    assert reloaded.semantic.generation_config.temperature == 0.5
    assert reloaded.coarse_acoustics.generation_config.max_coarse_history == 120
    assert reloaded.fine_acoustics.generation_config.temperature is None
    assert reloaded.generation_config.to_dict() == model.generation_config.to_dict()


@torch.no_grad()
def test_reloaded_weights_and_logits_identical(round_trip):
    model, _, reloaded = round_trip
    assert_same_weights_with_tied_heads(reloaded, model)
    for prefix in CAUSAL_STAGES.values():
        ids = causal_ids(prefix, getattr(model, prefix).config)[:1, :128]
        assert_close(getattr(reloaded, prefix)(ids).logits, getattr(model, prefix)(ids).logits, **EXACT)
    codes = fine_codes(model.fine_acoustics.config)[:1, :256]
    for codebook_idx in range(1, 8):
        assert_close(reloaded.fine_acoustics(codebook_idx, codes).logits,
                     model.fine_acoustics(codebook_idx, codes).logits, **EXACT)


@pytest.mark.parametrize("prefix,stage_cls", [("semantic", BarkHfSemanticModel),
                                              ("coarse_acoustics", BarkHfCoarseModel),
                                              ("fine_acoustics", BarkHfFineModel)])
@torch.no_grad()
def test_stage_round_trip(round_trip, tmp_path, prefix, stage_cls):
    """Each stage saves and loads on its own too, with its generation config."""
    stage = getattr(round_trip[0], prefix)
    stage.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    reloaded = stage_cls.from_pretrained(tmp_path)
    assert reloaded.generation_config == stage.generation_config
    expected, actual = stage.state_dict(), reloaded.state_dict()
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key
    if prefix == "fine_acoustics":
        codes = fine_codes(stage.config)[:1, :256]
        assert_close(reloaded(7, codes).logits, stage(7, codes).logits, **EXACT)
    else:
        ids = causal_ids(prefix, stage.config)[:1, :128]
        assert_close(reloaded(ids).logits, stage(ids).logits, **EXACT)
