"""Batched generation gives every item the tokens it gets alone, and the KV cache is written in place.

The model is `ours` (tiny weights converted from original-format checkpoints, see conftest.py):
its tokens depend on text, history and position, so equal tokens are a real check. Greedy
settings throughout, except where sampling is only run. Items differ up to 10x in length and
mix voice presets with none.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TEXTS, random_voice_preset

import bark_hf.modeling_bark_hf as modeling
from bark_hf import cpu_kernels
from bark_hf.modeling_bark_hf import BarkHfCoarseModel, BarkHfFineModel, BarkHfKVCache

QUIET = dict(show_progress=False)
GREEDY = dict(semantic_top_k=1, coarse_top_k=1, fine_temperature=None)
SEMANTIC_PAD, CODEBOOK_SIZE = 10_000, 1_024
# Presets of different lengths (the coarse histories differ) and one item without a preset.
PRESETS = [random_voice_preset(1, n_semantic=40), None, random_voice_preset(2, n_semantic=120)]


def _padded(items: list[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad tensors along their last axis into one batch; return it and the lengths."""
    lengths = torch.tensor([item.shape[-1] for item in items])
    batch = torch.stack([torch.nn.functional.pad(item, (0, int(lengths.max()) - item.shape[-1]), value=pad)
                         for item in items])
    return batch, lengths


def _random_semantic(lengths: list[int], seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, SEMANTIC_PAD, (length,), generator=generator) for length in lengths]


def _assert_items_equal(batch, singles, pad: int) -> None:
    """Each item of the batch output equals its single run, and is padded with `pad` after its length."""
    assert batch.lengths.tolist() == [int(single.lengths[0]) for single in singles]
    for index, single in enumerate(singles):
        length = int(single.lengths[0])
        assert torch.equal(batch.sequences[index, ..., :length], single.sequences[0, ..., :length]), index
        assert (batch.sequences[index, ..., length:] == pad).all()


# --- semantic -----------------------------------------------------------------------------------


def test_semantic_batch_equals_items_alone(ours):
    model, processor = ours
    texts = ["Hi", " ".join([TEXTS["en"]] * 3), TEXTS["de"]]  # 2 to ~200 tokenizer ids
    presets = [random_voice_preset(3, n_semantic=300), None, random_voice_preset(4, n_semantic=30)]
    inputs = processor(texts, voice_preset=presets)
    batch = model.semantic.generate(inputs["input_ids"], inputs["attention_mask"], inputs["history_prompt"],
                                    top_k=1, **QUIET)
    singles = [model.semantic.generate(**processor(text, voice_preset=preset), top_k=1, **QUIET)
               for text, preset in zip(texts, presets, strict=True)]
    _assert_items_equal(batch, singles, SEMANTIC_PAD)
    lengths = batch.lengths.tolist()
    assert min(lengths) > 0 and len(set(lengths)) > 1  # the items stop at different steps
    assert not torch.equal(singles[0].sequences[0, :5], singles[2].sequences[0, :5])


# Bit for bit needs bark-hf's CPU kernels, which step each item alone: PyTorch's batched products round otherwise.
needs_cpu_kernels = pytest.mark.skipif(
    not cpu_kernels.cpu_kernels_wanted() or isinstance(cpu_kernels._load(), cpu_kernels.CpuKernelsUnavailable),
    reason="bark-hf's CPU kernels are off or cannot be built here")


def _recorded_logits(monkeypatch) -> list[torch.Tensor]:
    """The logits of every step that samples from here on, `[B, V]` each."""
    recorded, sampling = [], modeling.sampling_probabilities

    def recording(logits, *args, **kwargs):
        recorded.append(logits.clone())
        return sampling(logits, *args, **kwargs)

    monkeypatch.setattr(modeling, "sampling_probabilities", recording)
    return recorded


def _assert_steps_equal_bit_for_bit(batch_steps: list[torch.Tensor], item_steps: list[list[torch.Tensor]]) -> None:
    for index, steps in enumerate(item_steps):
        for step, (in_batch, alone) in enumerate(zip(batch_steps, steps, strict=False)):  # an item may end first
            assert torch.equal(in_batch[index], alone[0]), (index, step, (in_batch[index] - alone[0]).abs().max())


@needs_cpu_kernels
@pytest.mark.parametrize("n_items", [3, 18], ids=["3-items", "18-items"])
def test_a_cpu_semantic_batch_gives_each_item_its_own_logits_bit_for_bit(ours, monkeypatch, n_items):
    """On a CPU a batch's prefill runs item by item and its decoding steps compute each item alone (the block
    kernel; the head MATVEC_MAX_ROWS rows at a time past 16 items), so every logit is the item's own, not merely
    close: logits within 1e-7 of a tie flipped greedy tokens."""
    model, processor = ours
    texts = [list(TEXTS.values())[index % 4] + " " * (index // 4) for index in range(n_items)]
    presets = [PRESETS[index % 3] for index in range(n_items)]
    recorded = _recorded_logits(monkeypatch)
    model.semantic.generate(**processor(texts, voice_preset=presets), top_k=1, max_new_tokens=5, **QUIET)
    batch_steps = recorded[:]
    item_steps = []
    for text, preset in zip(texts, presets, strict=True):
        recorded.clear()
        model.semantic.generate(**processor(text, voice_preset=preset), top_k=1, max_new_tokens=5, **QUIET)
        item_steps.append(recorded[:])
    assert len(batch_steps) == 5 and batch_steps[0].shape[0] == n_items
    _assert_steps_equal_bit_for_bit(batch_steps, item_steps)


# --- coarse -------------------------------------------------------------------------------------


@needs_cpu_kernels
def test_a_cpu_coarse_window_of_left_padded_items_gives_each_its_own_logits_bit_for_bit(ours, monkeypatch):
    """As a batch, left-padded prefills (with a mask) and products of more rows rounded the last bits otherwise."""
    coarse = ours[0].coarse_acoustics
    semantic = _random_semantic([70, 7, 33])
    tokens, lengths = _padded(semantic, SEMANTIC_PAD)
    recorded = _recorded_logits(monkeypatch)
    coarse.generate(tokens, lengths, PRESETS, top_k=1, **QUIET)
    first_window = recorded[:60]
    item_steps = []
    for item, preset in zip(semantic, PRESETS, strict=True):
        recorded.clear()
        coarse.generate(item[None], None, preset, top_k=1, **QUIET)
        item_steps.append(recorded[:60])
    assert first_window[0].shape[0] == 3 and len({int(length) for length in lengths}) == 3
    _assert_steps_equal_bit_for_bit(first_window, item_steps)


@pytest.mark.parametrize("settings", [dict(), dict(use_cache=False),
                                      dict(max_coarse_history=60, sliding_window_len=30)],
                         ids=["cache", "no-cache", "short-history-and-window"])
def test_coarse_batch_equals_items_alone(ours, monkeypatch, settings):
    coarse = ours[0].coarse_acoustics
    semantic = _random_semantic([70, 7, 33])  # 10x apart: 210, 20 and 98 coarse tokens
    tokens, lengths = _padded(semantic, SEMANTIC_PAD)
    window_batches = []
    generate_window = BarkHfCoarseModel._generate_window

    def counting(self, contexts, *args):
        window_batches.append(sorted(context.shape[0] for context in contexts))
        return generate_window(self, contexts, *args)

    monkeypatch.setattr(BarkHfCoarseModel, "_generate_window", counting)
    batch = coarse.generate(tokens, lengths, PRESETS, top_k=1, **settings, **QUIET)
    n_windows = len(window_batches)
    singles = [coarse.generate(item[None], None, preset, top_k=1, **settings, **QUIET)
               for item, preset in zip(semantic, PRESETS, strict=True)]
    _assert_items_equal(batch, singles, CODEBOOK_SIZE)
    assert batch.lengths.tolist() == [105, 10, 49]

    # One window call per window index for the whole batch; items leave after their last window.
    window_len = settings.get("sliding_window_len", 60)
    assert n_windows == -(-210 // window_len)
    assert [len(sizes) for sizes in window_batches[:n_windows]] == [
        sum(-(-steps // window_len) > index for steps in (210, 20, 98)) for index in range(n_windows)
    ]
    assert len(set(window_batches[0])) > 1  # the first window really is left-padded
    assert not torch.equal(batch.sequences[0, :, :10], batch.sequences[2, :, :10])


def test_coarse_batch_with_one_shared_preset_and_sampling(ours):
    """Sampling runs batched (draws cannot match one-by-one runs); shapes, ranges and lengths are right."""
    coarse = ours[0].coarse_acoustics
    tokens, lengths = _padded(_random_semantic([40, 4], seed=1), SEMANTIC_PAD)
    torch.manual_seed(0)
    output = coarse.generate(tokens, lengths, PRESETS[0], temperature=0.7, top_p=0.9, **QUIET)
    assert output.lengths.tolist() == [60, 6]
    assert output.sequences.shape == (2, 2, 60)
    assert (output.sequences[0] < CODEBOOK_SIZE).all() and (output.sequences[1, :, :6] < CODEBOOK_SIZE).all()
    assert (output.sequences[1, :, 6:] == CODEBOOK_SIZE).all()


def test_coarse_empty_item_in_a_batch(ours):
    coarse = ours[0].coarse_acoustics
    semantic = _random_semantic([20, 0], seed=2)
    tokens, lengths = _padded(semantic, SEMANTIC_PAD)
    batch = coarse.generate(tokens, lengths, top_k=1, **QUIET)
    alone = coarse.generate(semantic[0][None], top_k=1, **QUIET)
    assert batch.lengths.tolist() == [30, 0]
    assert torch.equal(batch.sequences[0], alone.sequences[0])


def _spy_on_continuations(patch) -> list[list[int] | None]:
    """Record what `_CoarseWindow.rows_continued_by` answers, window by window (`patch`: a monkeypatch)."""
    answers = []
    rows_continued_by = modeling._CoarseWindow.rows_continued_by

    def spy(window, items, contexts):
        answers.append(rows_continued_by(window, items, contexts))
        return answers[-1]

    patch.setattr(modeling._CoarseWindow, "rows_continued_by", spy)
    return answers


def test_coarse_windows_go_on_from_the_last_where_their_input_extends_it(ours, monkeypatch):
    """Until the semantic window moves and the coarse history is cut, a window's input is the last window's
    sequence: it goes on from that window's cache instead of a prefill, batched and alone, with the tokens of
    runs that prefill every window. Here the item with the longest input leaves after the first window, so the
    batch goes on with two of its rows and without the padding only that item needed."""
    coarse = ours[0].coarse_acoustics
    presets = [random_voice_preset(5, n_semantic=20), random_voice_preset(6, n_semantic=50), None]
    semantic = _random_semantic([70, 15, 40], seed=4)  # 210, 45 and 120 coarse tokens: 4, 1 and 2 windows
    tokens, lengths = _padded(semantic, SEMANTIC_PAD)
    kept = []
    keep = BarkHfKVCache.keep

    def spy_keep(cache, rows, start):
        kept.append((rows, start))
        keep(cache, rows, start)

    with monkeypatch.context() as patched:
        continued = _spy_on_continuations(patched)
        patched.setattr(BarkHfKVCache, "keep", spy_keep)
        batch = coarse.generate(tokens, lengths, presets, top_k=1, **QUIET)
        assert continued == [[0, 2], [0], [0]]  # every window after the first
        assert kept[0] == ([0, 2], 90)  # contexts of 257 + 55, 257 + 145 and 257 tokens: pads of 90, 0 and 145
        singles = [coarse.generate(item[None], None, preset, top_k=1, **QUIET)
                   for item, preset in zip(semantic, presets, strict=True)]
    _assert_items_equal(batch, singles, CODEBOOK_SIZE)
    monkeypatch.setattr(modeling._CoarseWindow, "rows_continued_by", lambda *args: None)
    prefilled = coarse.generate(tokens, lengths, presets, top_k=1, **QUIET)
    assert torch.equal(batch.sequences, prefilled.sequences) and torch.equal(batch.lengths, prefilled.lengths)


@needs_cpu_kernels
def test_a_coarse_window_that_some_items_go_on_gives_each_its_own_logits_bit_for_bit(ours, monkeypatch):
    """Without a preset, or with a short one, an item goes on from the last window's cache; after a long preset's it
    starts afresh. In one batch each part runs as the items' own runs do (before, the whole batch was prefilled, so
    the items that go on alone were rounded otherwise), every step of every window."""
    coarse = ours[0].coarse_acoustics
    presets = [None, random_voice_preset(8, n_semantic=400), random_voice_preset(9, n_semantic=20)]
    semantic = _random_semantic([60, 60, 60], seed=5)  # 180 coarse tokens each: three windows, all items in all
    tokens, lengths = _padded(semantic, SEMANTIC_PAD)
    recorded = _recorded_logits(monkeypatch)
    continued = _spy_on_continuations(monkeypatch)
    batch = coarse.generate(tokens, lengths, presets, top_k=1, **QUIET)
    assert continued == [[0, None, 2], [0, None, 2]]
    batch_steps = recorded[:]
    item_steps, singles = [], []
    for item, preset in zip(semantic, presets, strict=True):
        recorded.clear()
        singles.append(coarse.generate(item[None], None, preset, top_k=1, **QUIET))
        item_steps.append(recorded[:])
    assert len(batch_steps) == 180 and all(len(steps) == 180 for steps in item_steps)
    _assert_steps_equal_bit_for_bit(batch_steps, item_steps)
    _assert_items_equal(batch, singles, CODEBOOK_SIZE)


def test_a_coarse_window_goes_on_only_from_its_own_row(ours, monkeypatch):
    """A window goes on from the last only where its input is that item's row, generated tokens and all. A long
    preset moves the semantic window from the first window on: every window is prefilled."""
    item = modeling._CoarseItem(torch.arange(3), torch.arange(2), 0, 0, 4)
    window = modeling._CoarseWindow([item], torch.tensor([[7, 7, 1, 2, 3]]), [2])
    assert window.rows_continued_by([item], [torch.tensor([1, 2, 3])]) == [0]
    assert window.rows_continued_by([item], [torch.tensor([7, 1, 2, 3])]) == [None]  # the padding is not its input
    assert window.rows_continued_by([item], [torch.tensor([2, 3])]) == [None]  # cut: positions moved
    assert window.rows_continued_by([item], [torch.tensor([1, 2, 4])]) == [None]
    assert window.rows_continued_by([copy.copy(item)], [torch.tensor([1, 2, 3])]) == [None]  # another item

    continued = _spy_on_continuations(monkeypatch)
    ours[0].coarse_acoustics.generate(_random_semantic([70])[0][None], None, random_voice_preset(7, n_semantic=400),
                                      top_k=1, **QUIET)
    assert continued == [[None]] * 3


# --- fine ---------------------------------------------------------------------------------------


def test_fine_batch_equals_items_alone(ours, monkeypatch):
    fine = ours[0].fine_acoustics
    generator = torch.Generator().manual_seed(5)
    coarse = [torch.randint(0, CODEBOOK_SIZE, (2, length), generator=generator) for length in (1500, 150, 700)]
    tokens, lengths = _padded(coarse, CODEBOOK_SIZE)
    window_batches = []
    fill_window = BarkHfFineModel._fill_window

    def counting(self, buffer, *args):
        window_batches.append(buffer.shape[0])
        return fill_window(self, buffer, *args)

    monkeypatch.setattr(BarkHfFineModel, "_fill_window", counting)
    batch = fine.generate(tokens, lengths, PRESETS, temperature=None)
    # 1 500 frames after a 60-frame history take 3 windows, the others 1: batches of 3, then 1, then 1.
    assert window_batches == [3, 1, 1]
    singles = [fine.generate(item[None], None, preset, temperature=None)
               for item, preset in zip(coarse, PRESETS, strict=True)]
    _assert_items_equal(batch, singles, CODEBOOK_SIZE)
    for index, item in enumerate(coarse):
        assert torch.equal(batch.sequences[index, :2, : item.shape[-1]], item)  # the coarse codebooks stay


def test_fine_sampling_batch(ours):
    """Sampling runs batched (draws cannot match one-by-one runs; a batch of one keeps the original's)."""
    fine = ours[0].fine_acoustics
    coarse = torch.randint(0, CODEBOOK_SIZE, (2, 2, 300), generator=torch.Generator().manual_seed(8))
    torch.manual_seed(0)
    output = fine.generate(coarse, torch.tensor([300, 30]), PRESETS[:2], temperature=0.5)
    assert output.lengths.tolist() == [300, 30]
    assert torch.equal(output.sequences[0, :2], coarse[0])
    assert torch.equal(output.sequences[1, :2, :30], coarse[1, :, :30])
    assert (output.sequences[0] < CODEBOOK_SIZE).all() and (output.sequences[1, :, :30] < CODEBOOK_SIZE).all()
    assert (output.sequences[1, :, 30:] == CODEBOOK_SIZE).all()


# --- codec --------------------------------------------------------------------------------------


def test_codec_decode_batch_equals_items_alone_exactly(ours):
    model = ours[0]
    generator = torch.Generator().manual_seed(6)
    codes = [torch.randint(0, CODEBOOK_SIZE, (8, length), generator=generator) for length in (90, 9, 0, 40)]
    tokens, lengths = _padded(codes, CODEBOOK_SIZE)
    audio, audio_lengths = model.codec_decode(tokens, lengths)
    hop = model.config.codec_config.hop_length
    assert audio_lengths.tolist() == [90 * hop, 9 * hop, 0, 40 * hop]
    assert audio.shape == (4, 90 * hop) and audio.dtype == torch.float32
    codec = model.codec_model
    for index, item in enumerate(codes):
        length = int(audio_lengths[index])
        assert (audio[index, length:] == 0).all()
        if item.shape[-1] == 0:
            continue
        with torch.no_grad():  # the item alone, as bark/generation.py decodes it
            alone = codec.decoder(codec.quantizer.decode(item[:, None]))[0, 0]
        torch.testing.assert_close(audio[index, :length], alone, atol=0, rtol=0)  # bit-exact
        assert alone.abs().max() > 1e-3


def test_codec_decode_empty_batch(ours):
    audio, audio_lengths = ours[0].codec_decode(torch.zeros((2, 8, 0), dtype=torch.long))
    assert audio.shape == (2, 0) and audio_lengths.tolist() == [0, 0]


# --- the whole model ----------------------------------------------------------------------------


@pytest.mark.parametrize("mlp_rows", [modeling.MLP_ROWS_AT_ONCE, 1], ids=["mlp-whole-batch", "mlp-item-by-item"])
def test_generate_batch_equals_items_alone(ours, monkeypatch, mlp_rows):
    monkeypatch.setattr(modeling, "MLP_ROWS_AT_ONCE", mlp_rows)
    model, processor = ours
    texts = [TEXTS["en"], "Ja.", TEXTS["zh"]]
    batch = model.generate(**processor(texts, voice_preset=PRESETS), return_dict_in_generate=True, **GREEDY, **QUIET)
    for index, (text, preset) in enumerate(zip(texts, PRESETS, strict=True)):
        single = model.generate(**processor(text, voice_preset=preset), return_dict_in_generate=True,
                                **GREEDY, **QUIET)
        for stage in ("semantic", "coarse", "fine"):
            length = int(getattr(single, f"{stage}_lengths")[0])
            assert int(getattr(batch, f"{stage}_lengths")[index]) == length
            expected = getattr(single, f"{stage}_tokens")[0, ..., :length]
            assert torch.equal(getattr(batch, f"{stage}_tokens")[index, ..., :length], expected), (index, stage)
        length = int(single.audio_lengths[0])
        assert int(batch.audio_lengths[index]) == length
        torch.testing.assert_close(batch.audio[index, :length], single.audio[0], atol=1e-6, rtol=0)


def test_generation_runs_a_batch_mlp_a_few_items_at_a_time_with_the_same_values(ours, monkeypatch):
    mlp = ours[0].coarse_acoustics.layers[0].mlp
    hidden = torch.randn(5, 7, mlp.in_proj.in_features, generator=torch.Generator().manual_seed(9))
    shapes = []
    rows = type(mlp)._rows

    def recording(self, part):
        shapes.append(tuple(part.shape[:2]))
        return rows(self, part)

    monkeypatch.setattr(type(mlp), "_rows", recording)
    with torch.no_grad(), modeling.generation_kernels():
        whole = mlp(hidden)
        alone = torch.cat([mlp(item) for item in hidden.split(1)])
        shapes.clear()
        monkeypatch.setattr(modeling, "MLP_ROWS_AT_ONCE", 7)
        item_by_item = mlp(hidden)
        monkeypatch.setattr(modeling, "MLP_ROWS_AT_ONCE", 15)
        two_at_once = mlp(hidden)
        step = mlp(hidden[:, :1])  # a decoding step's 5 rows stay together
    assert shapes == [(1, 7)] * 5 + [(2, 7), (2, 7), (1, 7), (5, 1)]
    assert torch.equal(item_by_item, alone)  # an item's rows are multiplied as in its own run
    torch.testing.assert_close(two_at_once, whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step, whole[:, :1], atol=1e-5, rtol=1e-5)

    shapes.clear()
    with torch.no_grad():
        mlp(hidden)  # outside generation (evaluation, scoring, training): PyTorch's products, all rows at once
    assert shapes == [(5, 7)]


# --- the KV cache -------------------------------------------------------------------------------


def test_preallocated_cache_is_written_in_place_and_gives_the_same_logits(ours):
    coarse = ours[0].coarse_acoustics
    ids = torch.randint(0, 12_000, (2, 40), generator=torch.Generator().manual_seed(7))
    expected = coarse(ids, use_cache=False).logits
    cache = BarkHfKVCache(len(coarse.layers), max_length=40)
    pieces = [coarse(ids[:, :30], cache=cache, use_cache=True).logits]
    buffers = [key.untyped_storage().data_ptr() for key, _ in cache]
    for position in range(30, 40):
        output = coarse(ids[:, position : position + 1], cache=cache, use_cache=True)
        assert output.cache is cache
        pieces.append(output.logits)
    assert cache.length == 40 and len(cache) == len(coarse.layers)
    assert [key.untyped_storage().data_ptr() for key, _ in cache] == buffers  # never reallocated
    torch.testing.assert_close(torch.cat(pieces, dim=1), expected, atol=1e-5, rtol=1e-5)
    for key, value in cache:
        assert key.shape == value.shape == (2, coarse.config.num_heads, 40, 16)


def test_cache_grows_past_its_size():
    cache = BarkHfKVCache(num_layers=1, max_length=4)
    keys = torch.randn(1, 2, 7, 3)
    values = torch.randn(1, 2, 7, 3)
    cache.update(0, keys[:, :, :3], values[:, :, :3])
    key, value = cache.update(0, keys[:, :, 3:], values[:, :, 3:])  # past max_length: grows
    assert torch.equal(key, keys) and torch.equal(value, values)
    assert cache.length == 7
    with pytest.raises(IndexError, match="holds nothing yet"):
        BarkHfKVCache(num_layers=2)[1]


def test_a_cache_stored_in_float16_returns_the_keys_dtype_and_stays_finite():
    """int8 models' cache: float16 buffers, read back as float32; out-of-range values clamped, not infinite."""
    cache = BarkHfKVCache(num_layers=1, max_length=6, storage_dtype=torch.float16)
    keys = torch.tensor([1 / 3, 1e5, -1e6, float("nan")]).view(1, 1, 1, 4)
    values = torch.randn(1, 1, 1, 4)
    key, value = cache.update(0, keys, values)
    assert key.dtype == value.dtype == torch.float32 and cache[0][0].dtype == torch.float16
    assert key[0, 0, 0, :3].tolist() == [torch.tensor(1 / 3).half().item(), 65504.0, -65504.0]
    assert key[0, 0, 0, 3].isnan() and torch.equal(value, values.half().float())
    key, _ = cache.update(0, keys, values)  # a second write goes on in the same buffers
    assert key.shape == (1, 1, 2, 4) and cache.allocations == 1
    with pytest.raises(ValueError, match="without storage_dtype"):
        cache.start_static_steps()


@pytest.mark.parametrize("static", [False, True])
def test_cache_keeps_rows_from_a_position_on(static):
    cache = BarkHfKVCache(num_layers=2, max_length=8)
    keys, values = torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4)
    for layer in range(2):
        cache.update(layer, keys, values)
    if static:  # the compiled steps: the lengths stay, the write position counts
        cache.start_static_steps()
        for layer in range(2):
            cache.update(layer, keys[:, :, :1], values[:, :, :1])
        cache.write_position += 1
    allocations = cache.allocations
    cache.keep([0, 2], 0)  # rows only
    cache.keep([1], 2)  # then from position 2: the old row 2
    length = 4 if static else 3
    assert cache.allocations == allocations + 2
    for layer in range(2):
        key, value = (buffer[:, :, :length] for buffer in (cache._keys[layer], cache._values[layer]))
        assert key.shape == (1, 2, length, 4) and cache._keys[layer].shape[2] == 8
        assert torch.equal(key[:, :, :3], keys[2:, :, 2:]) and torch.equal(value[:, :, :3], values[2:, :, 2:])
        if static:
            assert torch.equal(key[:, :, 3], keys[2:, :, 0])
    assert cache.length == length
    if static:
        assert cache.write_position.tolist() == [4]
    cache.keep([0], 0)  # everything: nothing copied
    assert cache.allocations == allocations + 2


def test_cache_reuse_keeps_buffers_and_reallocates_when_it_must():
    """`reset` keeps the buffers for the same batch; another batch size, or buffers made under
    torch.inference_mode and written outside it, get new ones; a mismatch mid-run is a clear error."""
    cache = BarkHfKVCache(num_layers=1, max_length=6)
    with torch.inference_mode():
        cache.update(0, torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4))
        cache.start_static_steps()
    allocations = cache.allocations
    cache.reset()
    keys = torch.randn(2, 2, 3, 4)
    key, _ = cache.update(0, keys, keys)  # outside inference mode now: new buffers
    assert torch.equal(key, keys) and cache.allocations == allocations + 1 and not key.is_inference()
    cache.start_static_steps()
    assert not cache.write_position.is_inference() and cache.write_position.tolist() == [3]
    cache.reset()
    buffer = cache.update(0, keys, keys)[0].untyped_storage().data_ptr()
    assert buffer == key.untyped_storage().data_ptr()  # same batch: the same buffers
    cache.zero_()
    assert not cache[0][0].any()  # zeroed in place
    cache.reset()
    cache.update(0, keys[:1], keys[:1])  # another batch size: new buffers
    assert cache.allocations == allocations + 2
    with pytest.raises(ValueError, match="holds a batch of 1 .* call reset"):
        cache.update(0, keys, keys)  # mid-run, without reset


# --- the compiled path ----------------------------------------------------------------------------


def _compiled_runs_equal_eager(model, processor) -> None:
    """Semantic and coarse stages: `compile=True` gives the eager tokens (batch of 3 with padding, and 1)."""
    inputs = processor(["Hi", TEXTS["de"], TEXTS["en"]], voice_preset=PRESETS)
    semantic = {compile: model.semantic.generate(**inputs, top_k=1, max_new_tokens=40, compile=compile, **QUIET)
                for compile in (False, True)}
    assert torch.equal(semantic[True].sequences, semantic[False].sequences)
    assert torch.equal(semantic[True].lengths, semantic[False].lengths)
    tokens, lengths = _padded(_random_semantic([70, 7, 33], seed=3), SEMANTIC_PAD)
    for batch in (slice(0, 3), slice(0, 1)):
        coarse = {compile: model.coarse_acoustics.generate(tokens[batch], lengths[batch], PRESETS[batch], top_k=1,
                                                           compile=compile, **QUIET)
                  for compile in (False, True)}
        assert torch.equal(coarse[True].sequences, coarse[False].sequences)


def test_static_decoding_step_equals_eager(ours, monkeypatch):
    """The compiled path's static-shape step, run uncompiled here (fast): same tokens as the eager path."""
    import bark_hf.modeling_bark_hf as modeling

    monkeypatch.setattr(modeling, "_compiled_decode_step", lambda device_type: modeling.BarkHfCausalModel._decode_step)
    _compiled_runs_equal_eager(*ours)


@pytest.mark.slow
def test_compiled_decoding_equals_eager(ours):
    """The same with torch.compile on the CPU (compiling takes a while the first time)."""
    _compiled_runs_equal_eager(*ours)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_decoding_equals_eager(ours, monkeypatch):
    """On CUDA the compiled steps replay CUDA graphs over a cache the stage keeps. Equal tokens twice in a
    row, with batches that shrink between coarse windows (new captures), and after the weights moved."""
    import bark_hf.modeling_bark_hf as modeling

    captures = []
    capture = modeling._CUDAGraphStep.__init__

    def counting(self, *args):
        captures.append(args[1].shape[0])  # the batch size of the captured step
        capture(self, *args)

    monkeypatch.setattr(modeling._CUDAGraphStep, "__init__", counting)
    model = copy.deepcopy(ours[0]).to("cuda")
    _compiled_runs_equal_eager(model, ours[1])
    first = len(captures)
    assert first >= 3 and {1, 3} <= set(captures)
    _compiled_runs_equal_eager(model, ours[1])
    model.cpu()  # the weights move, as with CPU offload: the graphs and their caches go
    assert model.semantic._cuda_graphs is None and model.coarse_acoustics._cuda_graphs is None
    model.to("cuda")
    _compiled_runs_equal_eager(model, ours[1])
    assert len(captures) > first
    for stage in (model.semantic, model.coarse_acoustics):
        assert stage._cuda_graphs is not None and not stage._cuda_graphs.failed


def test_moving_or_copying_a_stage_leaves_its_cuda_graph_state_behind(ours):
    """The captured graph and its cache hold the weights' addresses (and GPU memory): a move frees them, and
    copies (deepcopy, pickle) start without them."""
    import pickle

    import bark_hf.modeling_bark_hf as modeling

    stage = copy.deepcopy(ours[0].coarse_acoustics)
    stage._cuda_graphs = modeling._CUDAGraphDecoding(BarkHfKVCache(len(stage.layers), 8), (0,), step=lambda: None)
    assert copy.deepcopy(stage)._cuda_graphs is None
    assert pickle.loads(pickle.dumps(stage))._cuda_graphs is None
    assert stage._cuda_graphs is not None
    stage.to(torch.float64)
    assert stage._cuda_graphs is None


def test_steps_past_the_compiled_graphs_limit_decode_eagerly(ours, monkeypatch):
    """Every stage, model size and batch kind compiles a graph of the one `_decode_step`: dynamo's default limit of
    8 per function was reached by two model sizes in a process, an error under fullgraph=True. The limit is raised
    to DECODE_STEP_GRAPHS while a step runs, and past it the step runs eagerly: the same tokens, and a warning."""
    limits = []

    def limit_reached(model, *args):
        limits.append(torch._dynamo.config.recompile_limit)
        raise torch._dynamo.exc.FailOnRecompileLimitHit("recompile_limit reached")

    monkeypatch.setattr(modeling, "_compiled_decode_step", lambda device_type: limit_reached)
    warnings = []
    monkeypatch.setattr(modeling.logger, "warning_once", warnings.append)
    coarse = ours[0].coarse_acoustics
    semantic = torch.randint(0, SEMANTIC_PAD, (2, 10))
    eager = coarse.generate(semantic, top_k=1, **QUIET)
    compiled = coarse.generate(semantic, top_k=1, compile=True, **QUIET)
    assert torch.equal(compiled.sequences, eager.sequences)
    assert limits and set(limits) == {max(8, modeling.DECODE_STEP_GRAPHS)}
    assert torch._dynamo.config.recompile_limit == 8  # put back after each step
    assert len(warnings) == len(limits) and "steps of new kinds decode eagerly" in warnings[0]
    assert "raise torch._dynamo.config.recompile_limit" in warnings[0]


@pytest.mark.slow
def test_real_compiles_past_the_limit_decode_eagerly(monkeypatch):
    """The same with torch.compile itself, its limit cut to one graph (a fresh model size needs its own)."""
    from bark_hf import BarkHfSemanticConfig, BarkHfSemanticModel

    torch.manual_seed(0)
    semantic = BarkHfSemanticModel(BarkHfSemanticConfig(num_layers=1, num_heads=3, hidden_size=24)).eval()
    monkeypatch.setattr(modeling, "DECODE_STEP_GRAPHS", 1)
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    warnings = []
    monkeypatch.setattr(modeling.logger, "warning_once", warnings.append)
    text = torch.randint(0, 1000, (1, 6))
    for batch in (1, 2):  # one graph for a batch of one, another for more
        inputs = text.expand(batch, -1)
        eager = semantic.generate(inputs, top_k=1, max_new_tokens=5, allow_early_stop=False, **QUIET)
        compiled = semantic.generate(inputs, top_k=1, max_new_tokens=5, allow_early_stop=False, compile=True, **QUIET)
        assert torch.equal(compiled.sequences, eager.sequences)
    assert any("steps of new kinds decode eagerly" in warning for warning in warnings)


def test_compile_switches(ours, monkeypatch):
    import bark_hf.modeling_bark_hf as modeling

    calls = []
    step = modeling.BarkHfCausalModel._decode_step

    def counting(*args):
        calls.append(1)
        return step(*args)

    monkeypatch.setattr(modeling, "_compiled_decode_step", lambda device_type: counting)
    coarse = ours[0].coarse_acoustics
    semantic = torch.randint(0, SEMANTIC_PAD, (1, 10))
    coarse.generate(semantic, top_k=1, **QUIET)
    assert not calls  # off by default
    monkeypatch.setenv(modeling.COMPILE_ENV_VAR, "1")
    coarse.generate(semantic, top_k=1, **QUIET)
    assert len(calls) == 29  # 30 coarse tokens: a prefill, then 29 compiled steps
    coarse.generate(semantic, top_k=1, use_cache=False, **QUIET)  # the variable does not apply without a cache
    assert len(calls) == 29
    # Other spellings of on and off: "true" was read as "not 1", off.
    for value, more_calls in (("true", 29), ("Yes", 29), ("false", 0), ("0", 0), ("", 0)):
        monkeypatch.setenv(modeling.COMPILE_ENV_VAR, value)
        before = len(calls)
        coarse.generate(semantic, top_k=1, **QUIET)
        assert len(calls) - before == more_calls, value
    monkeypatch.setenv(modeling.COMPILE_ENV_VAR, "compile")
    with pytest.raises(ValueError, match="BARK_HF_COMPILE is 'compile'; set it to 1 .* or 0"):
        coarse.generate(semantic, top_k=1, **QUIET)
    with pytest.raises(ValueError, match="compile=True .* needs use_cache=True"):
        coarse.generate(semantic, compile=True, use_cache=False, **QUIET)
