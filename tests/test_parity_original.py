"""Exact parity with Suno's original implementation on the same (tiny, random) weights.

Both sides load the same original-format checkpoints: the original through its own
`bark.generation._load_model`, ours through the conversion command. With top-k 1 at the
semantic and coarse stages and fine temperature None, every token must be equal and the
waveforms agree to 1e-5; with a fixed seed and default sampling, batch 1, tokens are equal too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TEXTS, random_voice_preset

GREEDY = dict(semantic_top_k=1, coarse_top_k=1, fine_temperature=None)


@pytest.fixture(scope="session")
def original(original_checkpoint_dir, original_codec_path, tokenizer_dir):
    """`bark.generation` with its global model cache filled from our files, nothing downloaded."""
    import bark.generation as generation
    import encodec
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(tokenizer_dir)

    class LocalTokenizer:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            return tokenizer

    patch = pytest.MonkeyPatch()
    patch.setattr(generation, "BertTokenizer", LocalTokenizer)
    for stage in ("text", "coarse", "fine"):
        path = str(original_checkpoint_dir / f"{stage}.pt")
        generation.models[stage] = generation._load_model(path, "cpu", model_type=stage)
    codec = encodec.EncodecModel.encodec_model_24khz(pretrained=False)
    codec.load_state_dict(torch.load(original_codec_path, weights_only=True))
    codec.set_target_bandwidth(6.0)
    generation.models["codec"] = codec.eval()
    yield generation
    generation.models.clear()
    patch.undo()


def run_original(generation, text, preset, *, use_cache, semantic=None, coarse=None, fine_temperature=0.5):
    semantic_tokens = generation.generate_text_semantic(
        text, history_prompt=preset, silent=True, use_kv_caching=use_cache, **(semantic or {})
    )
    coarse_tokens = generation.generate_coarse(
        semantic_tokens, history_prompt=preset, silent=True, use_kv_caching=use_cache, **(coarse or {})
    )
    fine_tokens = generation.generate_fine(coarse_tokens, history_prompt=preset, temp=fine_temperature)
    return semantic_tokens, coarse_tokens, fine_tokens, generation.codec_decode(fine_tokens)


def run_ours(ours, text, preset, **kwargs):
    model, processor = ours
    output = model.generate(**processor(text, voice_preset=preset), return_dict_in_generate=True,
                            show_progress=False, **kwargs)
    semantic = output.semantic_tokens[0, : output.semantic_lengths[0]].numpy()
    coarse = output.coarse_tokens[0, :, : output.coarse_lengths[0]].numpy()
    fine = output.fine_tokens[0, :, : output.fine_lengths[0]].numpy()
    audio = output.audio[0, : output.audio_lengths[0]].numpy()
    return semantic, coarse, fine, audio


def assert_same(expected, actual):
    names = ("semantic", "coarse", "fine")
    for name, want, got in zip(names, expected[:3], actual[:3], strict=True):
        assert want.shape == got.shape, f"{name} shape {got.shape} != original {want.shape}"
        np.testing.assert_array_equal(got, want, err_msg=f"{name} tokens differ from the original")
    assert actual[3].dtype == np.float32
    np.testing.assert_allclose(actual[3], expected[3], atol=1e-5, rtol=0, err_msg="waveforms differ")


def preset_path(request, name):
    """The real preset's .npz path; only cases that use a preset need (and skip without) the shared folder."""
    return None if name is None else str(request.getfixturevalue("shared_presets_dir") / f"{name}.npz")


LONG_TEXT = " ".join([TEXTS["en"]] * 12)  # well over 256 tokens

GREEDY_CASES = [
    # id, text, preset, use_cache, semantic settings (ours / original's names)
    ("en-nopreset-cache", TEXTS["en"], None, True, {}),
    ("de-v2-nocache", TEXTS["de"], "v2/de_speaker_1", False, {}),
    ("ko-v1-cache-noearlystop", TEXTS["ko"], "en_speaker_3", True, dict(allow_early_stop=False, max_gen_duration_s=4)),
    ("zh-v2-cache", TEXTS["zh"], "v2/zh_speaker_0", True, {}),
    ("long-text", LONG_TEXT, "v2/en_speaker_1", True, {}),
    ("announcer-uint16-nocache-2fine", TEXTS["en"], "announcer", False,
     dict(allow_early_stop=False, max_gen_duration_s=8)),
    ("full-768-2fine-nopreset", TEXTS["de"], None, True, dict(allow_early_stop=False)),
]


@pytest.mark.parametrize("text,preset,use_cache,semantic", [c[1:] for c in GREEDY_CASES],
                         ids=[c[0] for c in GREEDY_CASES])
def test_greedy_tokens_and_audio_equal_original(ours, original, request, text, preset, use_cache, semantic):
    path = preset_path(request, preset)
    expected = run_original(original, text, path, use_cache=use_cache, semantic=dict(top_k=1, **semantic),
                            coarse=dict(top_k=1), fine_temperature=None)
    actual = run_ours(ours, text, path, use_cache=use_cache, **GREEDY,
                      **{f"semantic_{key}": value for key, value in semantic.items()})
    assert_same(expected, actual)


def test_long_generation_covers_several_windows(ours):
    """The 768-token case above really spans many coarse windows and two fine windows."""
    semantic, coarse, fine, audio = run_ours(ours, TEXTS["de"], None, semantic_allow_early_stop=False, **GREEDY)
    assert semantic.shape == (768,)
    assert coarse.shape[1] > 1024  # > one fine window without history, so two fine windows
    assert coarse.shape[1] * 2 > 60 * 30  # dozens of 60-token coarse windows
    assert audio.shape == (coarse.shape[1] * 320,)


@pytest.mark.parametrize("seed,text,preset,use_cache", [
    (0, TEXTS["en"], "v2/en_speaker_1", True),
    (1, TEXTS["de"], None, True),
    (7, TEXTS["zh"], "v2/zh_speaker_4", False),
])
def test_seeded_sampling_equals_original(ours, original, request, seed, text, preset, use_cache):
    path = preset_path(request, preset)
    torch.manual_seed(seed)
    expected = run_original(original, text, path, use_cache=use_cache)
    torch.manual_seed(seed)
    actual = run_ours(ours, text, path, use_cache=use_cache)
    assert_same(expected, actual)


def _semantic_on_both(ours, original, preset, **settings):
    """The semantic tokens of the original and ours from seed 0, each with the random-number state it leaves.
    `settings` take the original's names."""
    model, processor = ours
    torch.manual_seed(0)
    expected = original.generate_text_semantic(TEXTS["en"], history_prompt=preset, silent=True, **settings)
    expected_state = torch.random.get_rng_state()
    names = dict(temp="temperature", use_kv_caching="use_cache")
    torch.manual_seed(0)
    output = model.semantic.generate(**processor(TEXTS["en"], voice_preset=preset), show_progress=False,
                                     **{names.get(name, name): value for name, value in settings.items()})
    return (expected, expected_state), (output.sequences[0, : output.lengths[0]].numpy(), torch.random.get_rng_state())


@pytest.mark.parametrize("case", ["stops-by-itself", "stops-at-the-first-draw", "stops-at-the-last-allowed-draw",
                                  "duration-ends-a-draw-before-the-stop", "no-cache", "no-early-stop"])
def test_semantic_leaves_the_random_numbers_where_the_original_does(ours, original, case):
    """However the semantic loop ends (its stop verdict is read a step late), it has drawn exactly the original's
    random numbers: the coarse and fine stages of a seeded run draw from there."""
    preset = random_voice_preset(5, n_semantic=60)
    (natural, _), _ = _semantic_on_both(ours, original, preset)
    n_tokens = natural.shape[0]
    assert 2 < n_tokens < 700  # the run stops on its own, at a draw the cases below aim at
    settings = {
        "stops-by-itself": {},
        "stops-at-the-first-draw": dict(min_eos_p=0.0),
        "stops-at-the-last-allowed-draw": dict(max_gen_duration_s=(n_tokens + 0.5) / 49.9),
        "duration-ends-a-draw-before-the-stop": dict(max_gen_duration_s=(n_tokens - 0.5) / 49.9),
        "no-cache": dict(use_kv_caching=False),
        "no-early-stop": dict(allow_early_stop=False, max_gen_duration_s=(n_tokens + 5.5) / 49.9),
    }[case]
    (expected, expected_state), (actual, actual_state) = _semantic_on_both(ours, original, preset, **settings)
    np.testing.assert_array_equal(actual, expected)
    assert torch.equal(actual_state, expected_state)


def test_sampling_settings_top_p_top_k_equal_original(ours, original, request):
    path = preset_path(request, "v2/en_speaker_6")
    torch.manual_seed(3)
    expected = run_original(original, TEXTS["en"], path, use_cache=True,
                            semantic=dict(temp=0.9, top_k=50, top_p=0.95, min_eos_p=0.05),
                            coarse=dict(temp=0.6, top_p=0.9), fine_temperature=0.8)
    torch.manual_seed(3)
    actual = run_ours(ours, TEXTS["en"], path, use_cache=True, semantic_temperature=0.9, semantic_top_k=50,
                      semantic_top_p=0.95, semantic_min_eos_p=0.05, coarse_temperature=0.6, coarse_top_p=0.9,
                      fine_temperature=0.8)
    assert_same(expected, actual)


def test_top_p_zero_equals_original(ours, original):
    """top_p=0, which the original takes (the likeliest token alone), was refused as outside (0, 1]."""
    path = random_voice_preset(5, n_semantic=60)
    torch.manual_seed(5)
    expected = run_original(original, TEXTS["de"], path, use_cache=True, semantic=dict(temp=1.0, top_p=0.0),
                            coarse=dict(top_p=0))
    torch.manual_seed(5)
    actual = run_ours(ours, TEXTS["de"], path, use_cache=True, semantic_temperature=1.0, semantic_top_p=0.0,
                      coarse_top_p=0)
    assert_same(expected, actual)


def test_history_window_options_equal_original(ours, original, request):
    path = preset_path(request, "v2/fr_speaker_2")
    expected = run_original(original, TEXTS["en"], path, use_cache=True, semantic=dict(top_k=1),
                            coarse=dict(top_k=1, max_coarse_history=120, sliding_window_len=30),
                            fine_temperature=None)
    actual = run_ours(ours, TEXTS["en"], path, use_cache=True, coarse_max_coarse_history=120,
                      coarse_sliding_window_len=30, **GREEDY)
    assert_same(expected, actual)


def test_batch_items_equal_their_single_runs(ours, request):
    model, processor = ours
    texts = [TEXTS["en"], TEXTS["ko"], TEXTS["zh"]]
    presets = [preset_path(request, "v2/en_speaker_0"), None, preset_path(request, "announcer")]
    batch = model.generate(**processor(texts, voice_preset=presets), return_dict_in_generate=True,
                           show_progress=False, **GREEDY)
    for index, (text, preset) in enumerate(zip(texts, presets, strict=True)):
        single = run_ours(ours, text, preset, **GREEDY)
        assert int(batch.semantic_lengths[index]) == single[0].shape[0]
        np.testing.assert_array_equal(batch.semantic_tokens[index, : single[0].shape[0]].numpy(), single[0])
        np.testing.assert_array_equal(batch.fine_tokens[index, :, : single[2].shape[1]].numpy(), single[2])
        np.testing.assert_allclose(batch.audio[index, : single[3].shape[0]].numpy(), single[3], atol=1e-5, rtol=0)
