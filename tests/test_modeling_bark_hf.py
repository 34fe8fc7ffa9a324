"""The stage models and the composite, on tiny random models built here (nothing converted).

Forward passes use tiny vocabularies and a short block_size; the composite keeps Bark's real
vocabularies (its token layout needs them) with tiny widths and a tiny EnCodec.
"""

from __future__ import annotations

import copy
import dataclasses
import fractions
import functools
import json
import logging
import math
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize_
from transformers import AutoModel, GenerationConfig

import bark_hf.modeling_bark_hf as modeling
from bark_hf import cpu_features, cpu_kernels
from bark_hf.configuration_bark_hf import (
    BarkHfCoarseConfig,
    BarkHfConfig,
    BarkHfFineConfig,
    BarkHfSemanticConfig,
    bark_codec_config,
)
from bark_hf.generation_configuration_bark_hf import (
    GENERATION_CONFIG_NAME,
    BarkHfCoarseGenerationConfig,
    BarkHfFineGenerationConfig,
    BarkHfGenerationConfig,
    BarkHfSemanticGenerationConfig,
)
from bark_hf.modeling_bark_hf import (
    BarkHfCoarseModel,
    BarkHfFineModel,
    BarkHfGenerationOutput,
    BarkHfModel,
    BarkHfSemanticModel,
)

TINY = dict(num_layers=2, num_heads=2, hidden_size=16)
BLOCK = 32
VOCAB_IN, VOCAB_OUT = 50, 40
CAUSAL = {"semantic": (BarkHfSemanticModel, BarkHfSemanticConfig), "coarse": (BarkHfCoarseModel, BarkHfCoarseConfig)}

SEMANTIC_PAD = 10_000
CODEBOOK_SIZE = 1_024
HOP = 320  # audio samples per EnCodec frame
QUIET = dict(show_progress=False)
GREEDY = dict(semantic_top_k=1, coarse_top_k=1, fine_temperature=None)

# Tokenizer ids (any below the tokenizer's vocab): two texts of 8 and 3 tokens, right-padded.
INPUT_IDS = torch.tensor([[101, 7, 33, 45, 12, 9, 87, 3], [55, 14, 71, 0, 0, 0, 0, 0]])
ATTENTION_MASK = (torch.arange(8)[None] < torch.tensor([[8], [3]])).long()
INPUT_IDS_3 = torch.tensor([[101, 7, 33, 45], [55, 14, 71, 0], [9, 9, 2, 0]])
ATTENTION_MASK_3 = (torch.arange(4)[None] < torch.tensor([[4], [3], [3]])).long()


def tiny_codec_config():
    return bark_codec_config(num_filters=4, hidden_size=16, codebook_dim=16, num_lstm_layers=1)


# --- per-stage forward --------------------------------------------------------------------------


@pytest.fixture(scope="module", params=sorted(CAUSAL))
def causal(request):
    model_cls, config_cls = CAUSAL[request.param]
    torch.manual_seed(0)
    model = model_cls(config_cls(**TINY, block_size=BLOCK, input_vocab_size=VOCAB_IN, output_vocab_size=VOCAB_OUT,
                                 bias=request.param == "coarse"))
    randomize_(model, seed=1)
    return model.eval()


@pytest.fixture(scope="module")
def fine():
    torch.manual_seed(0)
    model = BarkHfFineModel(BarkHfFineConfig(**TINY, block_size=BLOCK, input_vocab_size=VOCAB_IN,
                                             output_vocab_size=VOCAB_IN))
    randomize_(model, seed=2)
    return model.eval()


def _ids(batch: int, length: int, seed: int = 0, high: int = VOCAB_IN) -> torch.Tensor:
    return torch.randint(0, high, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_causal_forward_shapes(causal):
    ids = _ids(2, 10)
    output = causal(ids, use_cache=True)
    assert output.logits.shape == (2, 10, VOCAB_OUT)
    assert len(output.cache) == TINY["num_layers"]
    for key, value in output.cache:
        assert key.shape == value.shape == (2, TINY["num_heads"], 10, TINY["hidden_size"] // TINY["num_heads"])
    assert causal(ids, use_cache=False).cache is None
    logits, cache = causal(ids, use_cache=False, return_dict=False)
    torch.testing.assert_close(logits, output.logits)
    assert cache is None


def test_inputs_embeds_path(causal):
    ids = _ids(2, 10)
    expected = causal(ids).logits
    torch.testing.assert_close(causal(inputs_embeds=causal.get_input_embeddings()(ids)).logits, expected)
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        causal()
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        causal(ids, inputs_embeds=causal.get_input_embeddings()(ids))


@pytest.mark.parametrize("keep", [1, 3, 10])
def test_logits_to_keep(causal, keep):
    ids = _ids(2, 10)
    full = causal(ids).logits
    kept = causal(ids, logits_to_keep=keep).logits
    assert kept.shape == (2, keep, VOCAB_OUT)
    torch.testing.assert_close(kept, full[:, -keep:])


@pytest.mark.parametrize("keep", [1, 3])
@pytest.mark.parametrize("past", [0, 4])
@pytest.mark.parametrize("padded", [False, True])
def test_logits_to_keep_computes_the_last_block_at_those_positions_alone(causal, keep, past, padded):
    """With logits_to_keep the last block computes only the kept positions (a prefill's last): their logits are
    the whole pass's, after a cache and under a padding mask, and every position's keys and values still reach the
    cache, bit for bit those of the whole pass (they come before the positions are dropped)."""
    ids = _ids(2, 10, seed=3)
    mask = torch.ones(2, 10, dtype=torch.long)
    if padded:
        mask[1, :3] = 0  # the second item is left-padded by three positions
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    def run(logits_to_keep: int) -> tuple[torch.Tensor, modeling.BarkHfKVCache]:
        cache = modeling.BarkHfKVCache(TINY["num_layers"], max_length=12)
        if past:
            causal(ids[:, :past], cache=cache, attention_mask=mask[:, :past], position_ids=positions[:, :past],
                   use_cache=True)
        logits = causal(ids[:, past:], cache=cache, attention_mask=mask, position_ids=positions[:, past:],
                        use_cache=True, logits_to_keep=logits_to_keep).logits
        return logits, cache

    blocks_called = []
    handle = causal.layers[-1].register_forward_hook(lambda block, args, output: blocks_called.append(output.shape))
    with torch.no_grad():
        try:
            full, full_cache = run(0)
            kept, kept_cache = run(keep)
        finally:
            handle.remove()
    width = TINY["hidden_size"]
    prefix = [(2, past, width)] if past else []
    assert blocks_called == [*prefix, (2, 10 - past, width), *prefix, (2, keep, width)]
    torch.testing.assert_close(kept, full[:, -keep:], rtol=1e-5, atol=1e-5)
    assert kept_cache.length == full_cache.length == 10
    for (key, value), (full_key, full_value) in zip(kept_cache, full_cache, strict=True):
        assert torch.equal(key, full_key) and torch.equal(value, full_value)


def test_logits_to_keep_leaves_a_replaced_last_block_whole(causal):
    """A last block that is not bark-hf's own (a user's subclass) is called as before, without `queries`."""
    class Traced(modeling.BarkHfBlock):
        def forward(self, hidden_states, attention_mask=None, cache=None):
            self.seen = hidden_states.shape
            return super().forward(hidden_states, attention_mask, cache=cache)

    ids = _ids(2, 10)
    expected = causal(ids).logits[:, -1:]
    replaced = copy.deepcopy(causal)
    traced = Traced(replaced.config, is_causal=True, layer_idx=TINY["num_layers"] - 1)
    traced.load_state_dict(replaced.layers[-1].state_dict())
    replaced.layers[-1] = traced
    torch.testing.assert_close(replaced(ids, logits_to_keep=1).logits, expected)
    assert traced.seen == (2, 10, TINY["hidden_size"])


needs_onednn = pytest.mark.skipif(not cpu_features._onednn_built(), reason="this PyTorch has no oneDNN")
ONEDNN_OP = "mkldnn::_linear_pointwise"
MATVEC_BUILT = not isinstance(cpu_kernels._load(), cpu_kernels.CpuKernelsUnavailable)
needs_matvec = pytest.mark.skipif(not MATVEC_BUILT, reason="bark-hf's CPU matrix-vector kernel cannot be built here")


@pytest.mark.parametrize(("grad", "onednn", "matvec"), [
    (True, "0", "0"), (False, "0", "0"), pytest.param(False, "1", "0", marks=needs_onednn),
    pytest.param(False, "0", "1", marks=needs_matvec),
])
@pytest.mark.parametrize("rows", [slice(0, 40), slice(8, 24), slice(20, 40)])
def test_vocab_rows_are_exactly_those_of_the_whole_head(causal, rows, grad, onednn, matvec, monkeypatch):
    """Coarse generation reads one codebook's rows of the head at one position per item (a prefill's last,
    or a decoding step): through MKL and through bark-hf's matrix-vector kernel they must be bit for bit the
    whole head's, as the original computes it, for an int8 head too. Through oneDNN (generation's library on
    other vendors' CPUs), which rounds the original's products differently anyway, within float rounding of
    them."""
    monkeypatch.setenv("BARK_HF_ONEDNN_LINEAR", onednn)
    monkeypatch.setenv("BARK_HF_CPU_KERNELS", matvec)
    same = torch.equal if onednn == "0" else functools.partial(torch.allclose, rtol=1e-6, atol=1e-6)
    with torch.set_grad_enabled(grad), modeling.generation_kernels():
        ids = _ids(3, 10, seed=5)
        full = causal(ids).logits
        torch.testing.assert_close(causal(ids, vocab_rows=rows).logits, full[..., rows])
        # Against the whole head at the same one position: the head's product over 1 and over 10 positions may
        # round differently (it does on AVX2 CPUs), and generation never compares those.
        last = causal(ids, logits_to_keep=1).logits
        assert same(causal(ids, logits_to_keep=1, vocab_rows=rows).logits, last[..., rows])
        with torch.no_grad():  # a cache with autograd history cannot be deep-copied
            cache = causal(ids[:, :9], use_cache=True).cache
        whole_step = causal(ids[:, 9:], cache=copy.deepcopy(cache), use_cache=True).logits
        step = causal(ids[:, 9:], cache=cache, use_cache=True, vocab_rows=rows).logits
        assert same(step, whole_step[..., rows])
        with pytest.raises(ValueError, match="vocab_rows None"):
            causal(ids, labels=ids, vocab_rows=rows)

        quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(causal), {torch.nn.Linear}, dtype=torch.qint8)
        assert torch.equal(quantized(ids, vocab_rows=rows).logits, quantized(ids).logits[..., rows])


def _ops_run(call) -> set[str]:
    with torch.profiler.profile() as profile:
        call()
    return {event.name for event in profile.events()}


class _Wrapped(torch.Tensor):
    """A tensor subclass, as torchao's quantized weights and DTensor are: it expects its own dispatch."""


@needs_onednn
def test_linear_layers_take_onednn_only_in_generation_without_autograd_autocast_or_hooks(monkeypatch):
    monkeypatch.setenv("BARK_HF_ONEDNN_LINEAR", "1")
    monkeypatch.setenv("BARK_HF_CPU_KERNELS", "0")  # its own test: test_cpu_kernels.py
    layer, inputs = torch.nn.Linear(16, 24), torch.randn(2, 3, 16)
    with torch.no_grad():
        assert ONEDNN_OP not in _ops_run(lambda: modeling.project(layer, inputs))  # evaluation, scoring
        with modeling.generation_kernels():
            assert ONEDNN_OP in _ops_run(lambda: modeling.project(layer, inputs))
            torch.testing.assert_close(modeling.project(layer, inputs), layer(inputs))
            assert ONEDNN_OP not in _ops_run(lambda: modeling.project(layer.double(), inputs.double()))
            layer.float()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert modeling.project(layer, inputs).dtype == torch.bfloat16
            assert type(modeling.linear(inputs.as_subclass(_Wrapped), layer.weight, layer.bias)) is _Wrapped
            torch.testing.assert_close(modeling.linear(inputs, layer.weight[3], None), inputs @ layer.weight[3])
            strided_bias = torch.randn(48)[::2]  # oneDNN would read it as if contiguous
            torch.testing.assert_close(modeling.linear(inputs, layer.weight, strided_bias),
                                       torch.nn.functional.linear(inputs, layer.weight, strided_bias))
        # The switches are read on entering: once per `generate`, not per layer call.
        monkeypatch.setenv("BARK_HF_ONEDNN_LINEAR", "0")
        with modeling.generation_kernels():
            assert ONEDNN_OP not in _ops_run(lambda: modeling.project(layer, inputs))
        monkeypatch.setenv("BARK_HF_ONEDNN_LINEAR", "1")
        with torch.backends.mkldnn.flags(enabled=False), modeling.generation_kernels():
            assert ONEDNN_OP not in _ops_run(lambda: modeling.project(layer, inputs))
        monkeypatch.setenv("BARK_HF_ONEDNN_LINEAR", "fast")
        with pytest.raises(ValueError, match="BARK_HF_ONEDNN_LINEAR is 'fast'"), modeling.generation_kernels():
            pass
        monkeypatch.setenv("BARK_HF_ONEDNN_LINEAR", "1")

    # oneDNN's op has no backward: autograd must get MKL's, and the right gradients (a bias alone trained too).
    layer.weight.requires_grad_(False)
    with modeling.generation_kernels():
        assert ONEDNN_OP not in _ops_run(lambda: modeling.project(layer, inputs))
        modeling.project(layer, inputs).sum().backward()
    torch.testing.assert_close(layer.bias.grad, torch.full((24,), 6.0))

    seen = []
    layer.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    with torch.no_grad(), modeling.generation_kernels():
        assert ONEDNN_OP not in _ops_run(lambda: modeling.project(layer, inputs))
    assert seen == [(2, 3, 24)]

    replaced = torch.nn.Linear(16, 24)
    replaced.forward = lambda values: torch.zeros(7)
    with torch.no_grad(), modeling.generation_kernels():
        assert torch.equal(modeling.project(replaced, inputs), torch.zeros(7))


CPU_PRODUCTS = {  # BARK_HF_CPU_KERNELS, BARK_HF_ONEDNN_LINEAR, whether this machine has it
    "mkl": ("0", "0", True),
    "onednn": ("0", "1", cpu_features._onednn_built()),
    "bark-hf's kernels": ("1", "0", MATVEC_BUILT),
}


def test_greedy_generation_is_the_same_through_every_cpu_product(model, monkeypatch):
    """MKL (PyTorch's default), oneDNN and bark-hf's kernels (products and whole block steps) round differently in
    the last bits; the tokens must not change (they are tested equal to the original's in test_parity_original.py)."""
    outputs = {}
    for name, (kernels, onednn, available) in CPU_PRODUCTS.items():
        if not available:
            continue
        monkeypatch.setenv("BARK_HF_CPU_KERNELS", kernels)
        monkeypatch.setenv("BARK_HF_ONEDNN_LINEAR", onednn)
        product_calls, block_calls = [], []
        monkeypatch.setattr(modeling, "cpu_matvec", _counting(cpu_kernels.cpu_matvec, product_calls))
        monkeypatch.setattr(modeling, "cpu_block_step", _counting(cpu_kernels.cpu_block_step, block_calls))
        with torch.profiler.profile() as profile:
            outputs[name] = model.generate(INPUT_IDS, ATTENTION_MASK, semantic_allow_early_stop=False,
                                           semantic_max_new_tokens=40, return_dict_in_generate=True, **GREEDY, **QUIET)
        assert (ONEDNN_OP in {event.name for event in profile.events()}) is (onednn == "1")
        assert bool(product_calls) is bool(block_calls) is (kernels == "1")
    reference = outputs.pop("mkl")
    assert reference.fine_tokens.shape[-1] == 60  # 40 semantic tokens: 60 frames, two coarse windows
    for name, output in outputs.items():
        for tokens in ("semantic_tokens", "coarse_tokens", "fine_tokens"):
            assert torch.equal(getattr(reference, tokens), getattr(output, tokens)), (name, tokens)
        torch.testing.assert_close(reference.audio, output.audio, atol=1e-5, rtol=0)


def _counting(get_kernel, calls: list):
    """`cpu_matvec` or `cpu_block_step` whose kernel records each call in `calls`."""
    def counted():
        kernel = get_kernel()
        return None if kernel is None else lambda *args: calls.append(1) or kernel(*args)

    return counted


def test_forward_arguments_keep_their_positions(causal):
    """`vocab_rows` came after `logits_to_keep`, so `return_dict` given by position became `vocab_rows`."""
    ids = _ids(2, 6, seed=3)
    logits, cache = causal(ids, None, None, None, None, False, 0, False)  # ..., use_cache, logits_to_keep, return_dict
    assert cache is None
    torch.testing.assert_close(logits, causal(ids).logits)
    with pytest.raises(ValueError, match="labels must have the inputs' shape"):
        causal(ids, None, None, None, None, False, 0, False, None, ids[:, :5])  # ..., history_input_ids, labels


@pytest.mark.parametrize("chunk", [1, 3])
def test_kv_cache_equals_full_sequence(causal, chunk):
    """Decoding step by step (or a few tokens at a time) with the cache gives the full-sequence logits."""
    ids = _ids(2, 16, seed=3)
    full = causal(ids, use_cache=False).logits
    output = causal(ids[:, :4], use_cache=True)
    pieces, cache = [output.logits], output.cache
    for start in range(4, 16, chunk):
        output = causal(ids[:, start : start + chunk], cache=cache, use_cache=True)
        pieces.append(output.logits)
        cache = output.cache
    assert cache[0][0].shape[-2] == 16
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    assert (full[:, -1] - full[:, 0]).abs().max() > 1e-2  # the positions differ: the comparison has teeth


def test_left_padding_gives_the_unpadded_logits(causal):
    """A left-padded item (mask 0 on the pads, positions counted from its first real token) gives the
    same last-position logits as the item alone, and so does one cached step after it."""
    long, short = _ids(1, 10, seed=4)[0], _ids(1, 6, seed=5)[0]
    ids = torch.stack([long, torch.cat([torch.zeros(4, dtype=torch.long), short])])
    mask = torch.tensor([[1] * 10, [0] * 4 + [1] * 6])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    padded = causal(ids, attention_mask=mask, position_ids=positions, use_cache=True)
    torch.testing.assert_close(padded.logits[0, -1], causal(long[None]).logits[0, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded.logits[1, -1], causal(short[None]).logits[0, -1], atol=1e-5, rtol=1e-5)

    step_ids = torch.tensor([[7], [8]])
    step_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
    step = causal(step_ids, cache=padded.cache, attention_mask=step_mask, position_ids=positions[:, -1:] + 1)
    alone = causal(torch.cat([short, torch.tensor([8])])[None]).logits[0, -1]
    torch.testing.assert_close(step.logits[1, -1], alone, atol=1e-5, rtol=1e-5)


def test_all_ones_mask_equals_no_mask(causal):
    ids = _ids(2, 10)
    masked = causal(ids, attention_mask=torch.ones(2, 10, dtype=torch.long)).logits
    torch.testing.assert_close(masked, causal(ids).logits, atol=1e-5, rtol=1e-5)


def test_causal_over_block_size_raises(causal):
    with pytest.raises(ValueError, match=rf"Sequence of {BLOCK + 1} positions exceeds this model's block_size "
                                         rf"\({BLOCK}\)"):
        causal(_ids(1, BLOCK + 1))
    cache = causal(_ids(1, BLOCK - 2), use_cache=True).cache
    with pytest.raises(ValueError, match=rf"Sequence of {BLOCK + 1} positions exceeds"):
        causal(_ids(1, 3), cache=cache)
    assert causal(_ids(1, 2), cache=cache).logits.shape == (1, 2, VOCAB_OUT)  # exactly block_size is fine


def _codes(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB_IN, (batch, length, 8), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("codebook_idx", range(1, 8))
def test_fine_forward_shapes(fine, codebook_idx):
    codes = _codes(2, 12)
    output = fine(codebook_idx, codes)
    assert output.logits.shape == (2, 12, VOCAB_IN)
    (logits,) = fine(codebook_idx, codes, return_dict=False)
    torch.testing.assert_close(logits, output.logits)


@pytest.mark.parametrize("codebook_idx", [0, 8, -1])
def test_fine_codebook_idx_out_of_range(fine, codebook_idx):
    with pytest.raises(ValueError, match=rf"codebook_idx must be in \[1, 8\), got {codebook_idx}"):
        fine(codebook_idx, _codes(1, 4))


def test_fine_reads_only_the_known_codebooks(fine):
    """Predicting codebook k sees codebooks 0..k (k holds the 'unknown' marker at generation time)."""
    codes = _codes(1, 12)
    changed = codes.clone()
    changed[:, :, 4:] = _codes(1, 12, seed=9)[:, :, 4:]
    torch.testing.assert_close(fine(3, changed).logits, fine(3, codes).logits)
    assert not torch.allclose(fine(4, changed).logits, fine(4, codes).logits)


def test_fine_padding_mask(fine):
    """Padded frames (mask 0) do not change the logits of the real frames of a non-causal pass."""
    codes = _codes(1, 12)
    padded = torch.cat([codes, _codes(1, 5, seed=7)], dim=1)
    mask = torch.tensor([[1] * 12 + [0] * 5])
    torch.testing.assert_close(fine(2, padded, attention_mask=mask).logits[:, :12], fine(2, codes).logits,
                               atol=1e-5, rtol=1e-5)
    assert not torch.allclose(fine(2, padded).logits[:, :12], fine(2, codes).logits, atol=1e-4)


def test_fine_over_block_size_raises(fine):
    with pytest.raises(ValueError, match=rf"Sequence of {BLOCK + 1} frames exceeds block_size \({BLOCK}\)"):
        fine(1, _codes(1, BLOCK + 1))


def test_fine_heads_are_tied_to_embeddings(fine):
    for head in range(7):
        assert fine.lm_heads[head].weight is fine.input_embeds_layers[head + 1].weight


# --- the composite's generate -------------------------------------------------------------------


@pytest.fixture(scope="module")
def model() -> BarkHfModel:
    torch.manual_seed(0)
    config = BarkHfConfig(
        semantic_config=dict(TINY, bias=True),
        coarse_acoustics_config=dict(TINY),
        fine_acoustics_config=dict(TINY),
        codec_config=tiny_codec_config(),
    )
    model = BarkHfModel(config)
    for seed, stage in enumerate((model.semantic, model.coarse_acoustics, model.fine_acoustics)):
        randomize_(stage, seed=seed)
    return model.eval()


EOS_PROBABILITY = 0.15


@pytest.fixture(scope="module")
def eos_model(model) -> BarkHfModel:
    """A copy whose semantic stage draws uniformly over the 10 000 tokens, or end-of-speech with
    probability EOS_PROBABILITY (at temperature 1): items stop at different, seed-given steps."""
    model = copy.deepcopy(model)
    semantic = model.semantic
    with torch.no_grad():
        semantic.layernorm_final.weight[0] = 0.0
        semantic.layernorm_final.bias[0] = 1.0  # feature 0 of the final hidden state is always 1
        semantic.lm_head.weight.zero_()
        semantic.lm_head.weight[SEMANTIC_PAD, 0] = math.log(EOS_PROBABILITY / (1 - EOS_PROBABILITY) * SEMANTIC_PAD)
    return model


EOS_SETTINGS = dict(temperature=1.0, min_eos_p=None, max_new_tokens=24)


def _seed_where(eos_model, predicate) -> tuple[int, list[int]]:
    """The first seed whose semantic lengths (for the 3-item batch) satisfy `predicate`."""
    for seed in range(200):
        torch.manual_seed(seed)
        lengths = eos_model.semantic.generate(INPUT_IDS_3, ATTENTION_MASK_3, **QUIET, **EOS_SETTINGS).lengths.tolist()
        if predicate(lengths):
            return seed, lengths
    pytest.fail("no seed in 0..199 gives the wanted lengths")


def _generate_eos(eos_model, seed: int, **kwargs):
    torch.manual_seed(seed)
    settings = {f"semantic_{name}": value for name, value in EOS_SETTINGS.items()}
    return eos_model.generate(INPUT_IDS_3, ATTENTION_MASK_3, **QUIET, **settings, **kwargs)


def _assert_consistent(output: BarkHfGenerationOutput, semantic_lengths: list[int]) -> None:
    """Shapes, dtypes, per-item lengths and padding of a generation output, as documented."""
    batch = len(semantic_lengths)
    assert output.semantic_lengths.tolist() == semantic_lengths
    coarse_lengths = [math.floor(length * 75 / 49.9) for length in semantic_lengths]
    assert output.coarse_lengths.tolist() == coarse_lengths
    assert output.fine_lengths.tolist() == coarse_lengths
    assert output.audio_lengths.tolist() == [length * HOP for length in coarse_lengths]

    assert output.semantic_tokens.shape == (batch, max(semantic_lengths))
    assert output.coarse_tokens.shape == (batch, 2, max(coarse_lengths))
    assert output.fine_tokens.shape == (batch, 8, max(coarse_lengths))
    assert output.audio.shape == (batch, max(coarse_lengths) * HOP)
    for name in ("semantic_tokens", "coarse_tokens", "fine_tokens", "semantic_lengths", "coarse_lengths",
                 "fine_lengths", "audio_lengths"):
        assert getattr(output, name).dtype == torch.int64, name
    assert output.audio.dtype == torch.float32

    for item in range(batch):
        s, t = semantic_lengths[item], coarse_lengths[item]
        semantic, coarse, fine = output.semantic_tokens[item], output.coarse_tokens[item], output.fine_tokens[item]
        assert (semantic[:s] < SEMANTIC_PAD).all() and (semantic[s:] == SEMANTIC_PAD).all()
        assert (coarse[:, :t] < CODEBOOK_SIZE).all() and (coarse[:, t:] == CODEBOOK_SIZE).all()
        assert (fine[:, :t] < CODEBOOK_SIZE).all() and (fine[:, t:] == CODEBOOK_SIZE).all()
        assert torch.equal(fine[:2, :t], coarse[:, :t])  # the fine stage keeps the coarse codebooks
        assert (output.audio[item, t * HOP :] == 0).all()
        assert torch.isfinite(output.audio[item]).all()


def test_return_dict_shapes_and_per_item_lengths(eos_model):
    seed, lengths = _seed_where(eos_model, lambda lengths: len(set(lengths)) == 3 and min(lengths) > 1)
    output = _generate_eos(eos_model, seed, return_dict_in_generate=True)
    assert isinstance(output, BarkHfGenerationOutput)
    _assert_consistent(output, lengths)
    assert all(output.audio[item, : output.audio_lengths[item]].abs().max() > 0 for item in range(3))

    audio = _generate_eos(eos_model, seed)  # without return_dict_in_generate: the audio alone
    assert isinstance(audio, torch.Tensor) and audio.dtype == torch.float32
    torch.testing.assert_close(audio, output.audio)


def test_return_output_lengths_gives_transformers_tuple(eos_model):
    """transformers' Bark returns (audio, lengths) with return_output_lengths=True; it was an unknown argument."""
    seed, _ = _seed_where(eos_model, lambda lengths: len(set(lengths)) == 3 and min(lengths) > 1)
    output = _generate_eos(eos_model, seed, return_dict_in_generate=True)
    audio, lengths = _generate_eos(eos_model, seed, return_output_lengths=True)
    torch.testing.assert_close(audio, output.audio)
    assert torch.equal(lengths, output.audio_lengths)
    both = _generate_eos(eos_model, seed, return_output_lengths=True, return_dict_in_generate=True)
    assert isinstance(both, BarkHfGenerationOutput)  # the dict holds the lengths too
    with pytest.raises(ValueError, match="return_output_lengths must be True, False or None"):
        eos_model.generate(INPUT_IDS_3, ATTENTION_MASK_3, return_output_lengths="no", **QUIET)


def test_item_stopping_at_once_gives_empty_outputs(eos_model):
    seed, lengths = _seed_where(eos_model, lambda lengths: lengths[1] == 0 and min(lengths[0], lengths[2]) > 1)
    output = _generate_eos(eos_model, seed, return_dict_in_generate=True)
    _assert_consistent(output, lengths)
    assert output.coarse_lengths[1] == output.fine_lengths[1] == output.audio_lengths[1] == 0
    assert (output.audio[1] == 0).all()


def _record_bars(monkeypatch) -> list[tuple[str, int, int]]:
    """Stands in for the module's tqdm; the list gets (desc, n, total) of each bar as it closes."""
    closed = []

    class RecordingBar:
        def __init__(self, iterable=None, total=None, desc=None, **kwargs):
            self.iterable, self.desc, self.n = iterable, desc, 0
            self.total = len(iterable) if total is None else total

        def __iter__(self):
            for item in self.iterable:
                yield item
                self.n += 1
            self.close()

        def update(self, n):
            self.n += n

        def close(self):
            closed.append((self.desc, self.n, self.total))

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            self.close()

    monkeypatch.setattr(modeling.logging, "tqdm", RecordingBar)
    return closed


def test_semantic_progress_bar_ends_at_the_tokens_returned(eos_model, monkeypatch):
    """Once every item has stopped the loop drops the token it drew last; the bar must not count it. It ends full
    (total set to the steps made), as the coarse and fine bars do: a notebook's bar left short turns red."""
    seed, lengths = _seed_where(eos_model, lambda lengths: max(lengths) < EOS_SETTINGS["max_new_tokens"] - 1)
    closed = _record_bars(monkeypatch)
    torch.manual_seed(seed)
    output = eos_model.semantic.generate(INPUT_IDS_3, ATTENTION_MASK_3, **EOS_SETTINGS)
    assert output.sequences.shape[1] == max(lengths)
    assert closed == [("semantic", max(lengths), max(lengths))]


@pytest.mark.parametrize("cap, tokens", [
    (dict(semantic_max_new_tokens=7), 7),
    (dict(semantic_max_gen_duration_s=0.1), 5),  # 0.1 s at 49.9 Hz: the 5th token passes it
    (dict(semantic_max_gen_duration_s=3), 150),  # ended at 150/151
    (dict(semantic_max_gen_duration_s=4 / 49.9), 5),  # 4 tokens' float sum is not above 4 / 49.9
])
def test_semantic_progress_bar_that_runs_to_the_cap_ends_full(model, monkeypatch, cap, tokens):
    """The bar's total was an upper bound on the tokens a duration cap lets through (+1 for float sums), so a run
    that hit max_gen_duration_s ended one short of it (150/151)."""
    closed = _record_bars(monkeypatch)
    settings = dict(semantic_allow_early_stop=False, semantic_max_new_tokens=200, **GREEDY) | cap
    output = model.generate(INPUT_IDS[:1], ATTENTION_MASK[:1], return_dict_in_generate=True, **settings)
    assert output.semantic_tokens.shape[1] == tokens
    semantic = [bar for bar in closed if bar[0] == "semantic"]
    assert semantic == [("semantic", tokens, tokens)]
    assert all(n == total for _, n, total in closed)  # the coarse and fine bars too


def test_an_interrupted_call_leaves_no_progress_bar_open(model):
    """Ctrl-C in the semantic loop left its bar open while the traceback lived (an interactive session keeps the
    last one), so every later call's bars were drawn a line further down."""
    from tqdm import tqdm

    def interrupt(*args):
        raise KeyboardInterrupt

    hook = model.semantic.register_forward_hook(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt) as interrupted:
            model.semantic.generate(INPUT_IDS, ATTENTION_MASK, top_k=1, max_new_tokens=4)
    finally:
        hook.remove()
    assert interrupted.traceback  # still alive, holding the call's frames
    assert not [bar for bar in tqdm._instances if bar.desc == "semantic"]


def test_compiled_steps_stop_as_eager_ones(eos_model, monkeypatch):
    """compile=True (its static-shape step, run uncompiled here) with items that stop at different draws, one at
    the first, and with max_new_tokens ending at the draw that stops the last item (the cache sized to the end):
    the eager tokens, lengths and random-number state. This model's logits do not depend on the inputs, so the
    compiled path's rounding cannot change a draw."""
    monkeypatch.setattr(modeling, "_compiled_decode_step", lambda device_type: BarkHfSemanticModel._decode_step)
    seed, lengths = _seed_where(eos_model, lambda lengths: lengths[1] == 0 and len(set(lengths)) == 3
                                and max(lengths) < EOS_SETTINGS["max_new_tokens"] - 1)
    for settings in (EOS_SETTINGS, dict(EOS_SETTINGS, max_new_tokens=max(lengths) + 1)):
        runs = []
        for compile in (False, True):
            torch.manual_seed(seed)
            output = eos_model.semantic.generate(INPUT_IDS_3, ATTENTION_MASK_3, compile=compile, **QUIET, **settings)
            runs.append((output.sequences, output.lengths, torch.random.get_rng_state()))
        assert runs[0][1].tolist() == lengths
        assert all(torch.equal(eager, compiled) for eager, compiled in zip(*runs, strict=True))


def test_training_mode_dropout_draws_nothing_past_the_step_where_every_item_stopped(eos_model):
    """With dropout on, every forward pass draws random numbers, so the loop must not run a pass after the draw
    that stopped the last item: the run leaves the random numbers where a run that max_new_tokens ends at that
    draw leaves them (the later stages draw from there)."""
    semantic = copy.deepcopy(eos_model.semantic).train()
    for module in semantic.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.1
    for seed in range(50):
        torch.manual_seed(seed)
        stopped = semantic.generate(INPUT_IDS_3, ATTENTION_MASK_3, **QUIET, **EOS_SETTINGS)
        n_draws = int(stopped.lengths.max()) + 1  # the last item stopped at this draw
        if n_draws < EOS_SETTINGS["max_new_tokens"]:
            break
    else:
        pytest.fail("no seed in 0..49 stops every item early")
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    cut = semantic.generate(INPUT_IDS_3, ATTENTION_MASK_3, **QUIET, **dict(EOS_SETTINGS, max_new_tokens=n_draws))
    assert torch.equal(cut.sequences, stopped.sequences) and torch.equal(cut.lengths, stopped.lengths)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_forced_end_of_speech_everywhere(model):
    output = model.generate(INPUT_IDS, ATTENTION_MASK, semantic_min_eos_p=0.0, return_dict_in_generate=True, **QUIET)
    _assert_consistent(output, [0, 0])
    assert output.audio.shape == (2, 0)
    audio = model.generate(INPUT_IDS, ATTENTION_MASK, semantic_min_eos_p=0.0, **QUIET)
    assert audio.shape == (2, 0) and audio.dtype == torch.float32


def test_stage_settings_reach_their_stages(model, monkeypatch):
    temperatures, configs = [], {}
    sampling = modeling.sampling_probabilities

    def spy_sampling(logits, temperature, top_k=None, top_p=None):
        temperatures.append(temperature)
        return sampling(logits, temperature, top_k, top_p)

    def spy(stage_cls, method, name):
        original = getattr(stage_cls, method)

        def run_window(self, inputs, config, *args):
            configs[name] = config
            return original(self, inputs, config, *args)

        monkeypatch.setattr(stage_cls, method, run_window)

    monkeypatch.setattr(modeling, "sampling_probabilities", spy_sampling)
    spy(BarkHfCoarseModel, "_generate_window", "coarse")
    spy(BarkHfFineModel, "_fill_window", "fine")
    before = copy.deepcopy(model.generation_config)
    output = model.generate(INPUT_IDS[:1], ATTENTION_MASK[:1], semantic_temperature=0.35, semantic_max_new_tokens=6,
                            semantic_min_eos_p=None, coarse_max_coarse_history=120, fine_temperature=0.9,
                            return_dict_in_generate=True, **QUIET)
    n_semantic = int(output.semantic_lengths[0])
    assert n_semantic > 0
    assert temperatures[:n_semantic] == [0.35] * n_semantic  # the semantic stage samples first
    assert set(temperatures[n_semantic + 1 :]) == {0.7}  # then the coarse stage, at its default
    assert configs["coarse"].max_coarse_history == 120
    assert configs["coarse"].temperature == 0.7
    assert configs["fine"].temperature == 0.9
    assert model.generation_config == before  # settings apply to one call; the stored configs are unchanged


@pytest.mark.parametrize(("name", "fragments"), [
    ("temperature", ["Unknown generate argument 'temperature'", "semantic_temperature", "fine_temperature"]),
    # transformers' Bark takes these for every stage: the fix names the prefixed ones, or how Bark does it.
    ("max_new_tokens", ["Unknown generate argument 'max_new_tokens'", "pass semantic_max_new_tokens instead"]),
    ("top_k", ["pass semantic_top_k, coarse_top_k instead"]),
    ("do_sample", ["do_sample must be True or False, got 1"]),  # transformers' switch, a flag here too
    ("foo_bar", ["Unknown generate argument 'foo_bar'", "stage prefix", "semantic_allow_early_stop",
                 "coarse_sliding_window_len", "fine_window_hop", "fine_temperature."]),
    ("semantic_tempreature", ["Unknown or invalid semantic setting", "'tempreature'", "valid settings are:",
                              "temperature", "top_k", "min_eos_p"]),
    ("semantic_bogus", ["valid settings are: allow_early_stop, max_gen_duration_s, max_new_tokens, min_eos_p, "
                        "temperature, top_k, top_p."]),  # not the token layout, which a call may not set
    ("coarse_sliding_window", ["Unknown or invalid coarse setting", "valid settings are:", "sliding_window_len"]),
    ("fine_top_k", ["Unknown or invalid fine setting", "valid settings are:", "temperature"]),
    ("semantic_", ["Unknown generate argument 'semantic_'"]),
])
def test_unknown_generate_arguments(model, monkeypatch, name, fragments):
    def must_not_run(*args, **kwargs):
        raise AssertionError("generation started before the arguments were checked")

    monkeypatch.setattr(BarkHfSemanticModel, "generate", must_not_run)
    with pytest.raises(ValueError) as error:
        model.generate(INPUT_IDS, ATTENTION_MASK, **{name: 1}, **QUIET)
    for fragment in fragments:
        assert fragment in str(error.value)


@pytest.mark.parametrize("call", ["model", "semantic", "coarse", "fine"])
def test_on_off_arguments_given_as_strings_are_refused(model, call):
    """show_progress="no" showed the bars and return_dict_in_generate="no" returned the dict: strings are true."""
    calls = {
        "model": lambda: model.generate(INPUT_IDS, ATTENTION_MASK, show_progress=False, return_dict_in_generate="no"),
        "semantic": lambda: model.semantic.generate(INPUT_IDS, ATTENTION_MASK, show_progress="no"),
        "coarse": lambda: model.coarse_acoustics.generate(torch.ones(1, 4, dtype=torch.long), show_progress="no"),
        "fine": lambda: model.fine_acoustics.generate(torch.ones(1, 2, 4, dtype=torch.long), show_progress="no"),
    }
    with pytest.raises(ValueError, match="(show_progress|return_dict_in_generate) must be True or False, got 'no'"):
        calls[call]()


def test_do_sample_is_transformers_switch_between_sampling_and_greedy_decoding(model):
    """transformers' Bark examples pass do_sample=True (its Bark decodes greedily by default); it was refused."""
    def tokens(**settings):
        torch.manual_seed(3)
        output = model.generate(INPUT_IDS, ATTENTION_MASK, return_dict_in_generate=True, **QUIET, **settings)
        return output.semantic_tokens, output.coarse_tokens, output.fine_tokens

    def assert_same(first, second):
        assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))

    assert not torch.equal(tokens()[2], tokens(**GREEDY)[2])  # so sampling and greedy decoding can be told apart
    assert_same(tokens(do_sample=True), tokens())  # Bark samples by default
    assert_same(tokens(do_sample=False), tokens(**GREEDY))
    assert_same(tokens(coarse_do_sample=False), tokens(coarse_top_k=1))
    assert_same(tokens(do_sample=False, fine_temperature=0.5), tokens(**{**GREEDY, "fine_temperature": 0.5}))
    with pytest.raises(ValueError, match="fine_do_sample must be True or False, got 'no'"):
        model.generate(INPUT_IDS, ATTENTION_MASK, fine_do_sample="no", **QUIET)


@pytest.mark.parametrize(("settings", "match"), [
    (dict(coarse_max_coarse_history=10), r"max_coarse_history must be within \[60, 630\], got 10"),
    (dict(coarse_max_coarse_history=0), r"max_coarse_history must be within \[60, 630\], got 0"),  # not ">= 1"
    (dict(coarse_max_coarse_history=700), r"max_coarse_history must be within \[60, 630\], got 700"),
    (dict(coarse_max_coarse_history=630, coarse_sliding_window_len=200),
     r"max_coarse_history \+ sliding_window_len must be at most 768, got 630 \+ 200"),
])
def test_bad_coarse_settings(model, settings, match):
    with pytest.raises(ValueError, match=match):
        model.generate(INPUT_IDS, ATTENTION_MASK, semantic_max_new_tokens=4, **settings, **QUIET)


@pytest.mark.parametrize(("settings", "match"), [
    (dict(coarse_sliding_window_len=0), "sliding_window_len must be a whole number >= 1; got 0"),  # divided by 0
    (dict(coarse_sliding_window_len=-5), "sliding_window_len must be a whole number >= 1; got -5"),  # no audio
    (dict(coarse_max_coarse_history=100.5), "max_coarse_history must be a whole number >= 1; got 100.5"),
    (dict(fine_fine_window_hop=0), "fine_window_hop must be a whole number >= 1; got 0"),
    (dict(fine_max_fine_history_length=0), "max_fine_history_length must be a whole number >= 1"),  # [-0:]: all
    (dict(fine_max_fine_input_length=100), r"max_fine_history_length \+ fine_window_hop must be at most "
                                           r"max_fine_input_length \(100\), got 512 \+ 512"),
    (dict(fine_fine_window_hop=2000), r"got 512 \+ 2000: frames between two windows would never be predicted"),
    (dict(semantic_max_gen_duration_s="2"), r"max_gen_duration_s \(or None\) must be a finite number > 0; got '2'"),
    (dict(semantic_max_gen_duration_s=math.inf), r"max_gen_duration_s \(or None\) must be a finite number > 0; got in"),
    (dict(fine_temperature=math.inf), r"temperature \(or None\) must be a finite number > 0 \(None takes the "
                                    r"argmax\); got inf"),
    (dict(semantic_allow_early_stop="no"), "allow_early_stop must be True or False, got 'no'"),
    (dict(semantic_temperature=10**400), r"temperature must be a finite number > 0 \(top_k=1 decodes greedily\); "
                                        "got 1000"),  # float() overflowed
])
def test_bad_stage_setting_values_are_refused_before_generating(model, monkeypatch, settings, match):
    def must_not_run(*args, **kwargs):
        raise AssertionError("generation started before the settings were checked")

    monkeypatch.setattr(BarkHfSemanticModel, "generate", must_not_run)
    with pytest.raises(ValueError, match=match):
        model.generate(INPUT_IDS, ATTENTION_MASK, **settings, **QUIET)


@pytest.mark.parametrize(("settings", "match"), [
    (dict(max_fine_input_length=2048), r"max_fine_input_length=2048 needs 2048 positions, but the fine_acoustics "
                                       r"stage has 1024 \(block_size\); lower the setting"),
    (dict(max_fine_input_length=1536, fine_window_hop=1024), "max_fine_input_length=1536 needs 1536 positions"),
])
def test_a_fine_window_longer_than_its_positions_is_refused_before_any_stage_runs(model, monkeypatch, settings, match):
    """The fine stage's window was not checked: forward failed ("Sequence of 2048 frames exceeds block_size") after
    the semantic and coarse stages had run, without naming the setting. The fine stage's generate, and
    split_stage_settings (the composite's, the pipeline's and long-form's early check), now refuse it first."""
    with pytest.raises(ValueError, match=match):
        model.fine_acoustics.generate(torch.zeros((1, 2, 4), dtype=torch.long), **settings)
    prefixed = {f"fine_{name}": value for name, value in settings.items()}
    monkeypatch.setattr(BarkHfSemanticModel, "generate", lambda *args, **kwargs: pytest.fail("generation started"))
    with pytest.raises(ValueError, match=match):
        model.split_stage_settings(prefixed)
    with pytest.raises(ValueError, match=match):
        model.generate(INPUT_IDS, ATTENTION_MASK, **prefixed, **QUIET)


@pytest.mark.parametrize("settings", [dict(coarse_coarse_rate_hz=10), dict(semantic_semantic_vocab_size=5),
                                      dict(fine_n_fine_codebooks=4), dict(semantic_text_pad_token=0)])
def test_token_layout_is_refused_as_a_call_setting(model, monkeypatch, settings):
    """Wrong-length output or an IndexError deep in torch, before; a saved generation config may still set them."""
    monkeypatch.setattr(BarkHfSemanticModel, "generate", lambda *args, **kwargs: pytest.fail("generation started"))
    (name,) = settings
    with pytest.raises(ValueError, match=f"{name.partition('_')[2]} is part of the checkpoint's token layout"):
        model.generate(INPUT_IDS, ATTENTION_MASK, **settings, **QUIET)


@pytest.mark.parametrize("name", ["semantic_rate_hz", "semantic_pad_token", "coarse_infer_token"])
def test_a_stage_field_named_with_its_stage_is_that_field(model, name):
    """semantic_rate_hz=10 was read as a semantic setting 'rate_hz': 'no setting' listing semantic_rate_hz as valid."""
    with pytest.raises(ValueError, match=f"{name} is part of the checkpoint's token layout"):
        model.generate(INPUT_IDS, ATTENTION_MASK, **{name: 10}, **QUIET)


def test_fine_window_hop_needs_no_second_prefix(model):
    assert model.split_stage_settings(dict(fine_window_hop=256))["fine"] == {"fine_window_hop": 256}
    assert model.split_stage_settings(dict(fine_fine_window_hop=256))["fine"] == {"fine_window_hop": 256}


@pytest.mark.parametrize("name", ["coarse_use_cache", "semantic_compile", "fine_show_progress"])
def test_whole_call_arguments_with_a_stage_prefix_are_refused_with_the_fix(model, name):
    """The error listed the stage config's fields, none of which is the argument meant."""
    setting = name.partition("_")[2]
    with pytest.raises(ValueError, match=f"{name}: {setting} is an argument of the whole call, not a .* stage "
                                         f"setting; pass {setting}=... without the prefix"):
        model.generate(INPUT_IDS, ATTENTION_MASK, **{name: False}, **QUIET)


def test_token_layout_is_refused_by_each_stage_too(model):
    with pytest.raises(ValueError, match="semantic_rate_hz, semantic_vocab_size are part of the checkpoint's"):
        model.semantic.generate(INPUT_IDS, ATTENTION_MASK, semantic_vocab_size=5, semantic_rate_hz=10, **QUIET)
    with pytest.raises(ValueError, match="codebook_size is part of"):
        model.fine_acoustics.generate(torch.zeros(1, 2, 5, dtype=torch.long), codebook_size=512)
    custom = model.coarse_acoustics.generation_config.updated(coarse_rate_hz=80)  # a config may hold another layout
    assert custom.semantic_to_coarse_ratio > model.coarse_acoustics.generation_config.semantic_to_coarse_ratio


@pytest.mark.parametrize("stage", ["semantic", "coarse_acoustics"])
def test_compile_must_be_a_flag(model, stage):
    """compile='no' is a true string: it compiled."""
    inputs = (INPUT_IDS, ATTENTION_MASK) if stage == "semantic" else (torch.arange(10)[None],)
    with pytest.raises(ValueError, match="compile must be True, False or None .*BARK_HF_COMPILE.*got 'no'"):
        getattr(model, stage).generate(*inputs, compile="no", **QUIET)


def test_whole_number_settings_become_ints(model):
    output = model.generate(INPUT_IDS, ATTENTION_MASK, semantic_max_new_tokens=4, coarse_max_coarse_history=120.0,
                            fine_max_fine_input_length=np.int64(100), fine_max_fine_history_length=50,
                            fine_fine_window_hop=50, return_dict_in_generate=True, **QUIET)
    assert output.audio.shape[0] == INPUT_IDS.shape[0]


def test_use_cache_off_gives_the_same_tokens(model):
    """Greedy settings: the KV cache changes nothing (semantic and coarse stages, batch of two)."""
    outputs = {}
    for use_cache in (True, False):
        torch.manual_seed(0)
        outputs[use_cache] = model.generate(INPUT_IDS, ATTENTION_MASK, use_cache=use_cache, semantic_max_new_tokens=14,
                                            return_dict_in_generate=True, **GREEDY, **QUIET)
    cached, uncached = outputs[True], outputs[False]
    assert cached.coarse_tokens.shape[-1] > 0
    for name in ("semantic_tokens", "semantic_lengths", "coarse_tokens", "coarse_lengths", "fine_tokens"):
        assert torch.equal(getattr(cached, name), getattr(uncached, name)), name
    torch.testing.assert_close(cached.audio, uncached.audio)


# --- generation configs -------------------------------------------------------------------------

STAGE_GENERATION = {
    "semantic": (BarkHfSemanticModel, BarkHfSemanticConfig, dict(temperature=0.4, top_k=5, min_eos_p=None,
                                                                 max_new_tokens=100, allow_early_stop=False)),
    "coarse": (BarkHfCoarseModel, BarkHfCoarseConfig, dict(temperature=0.5, top_p=0.9, max_coarse_history=120,
                                                           sliding_window_len=30)),
    "fine": (BarkHfFineModel, BarkHfFineConfig, dict(temperature=None, fine_window_hop=256)),
}


@pytest.mark.parametrize("n_codes_given", [0, 9])
def test_a_fine_config_without_a_given_codebook_is_refused_naming_it(n_codes_given):
    """Head i is tied to embedding i + 1 (as in the original FineGPT): with n_codes_given 0 the last head had no
    embedding, and building the model failed as "ModuleList has no attribute `8`"."""
    with pytest.raises(ValueError, match=rf"n_codes_given \({n_codes_given}\) must be in \[1, n_codes_total \(8\)\]"):
        BarkHfFineConfig(n_codes_given=n_codes_given)
    fine = BarkHfFineModel(BarkHfFineConfig(num_layers=1, num_heads=1, hidden_size=8, n_codes_given=2))
    assert len(fine.lm_heads) == 6


@pytest.mark.parametrize("stage", sorted(STAGE_GENERATION))
def test_stage_generation_config_round_trip(stage, tmp_path):
    model_cls, config_cls, changes = STAGE_GENERATION[stage]
    model = model_cls(config_cls(**TINY, block_size=BLOCK, input_vocab_size=VOCAB_IN, output_vocab_size=VOCAB_IN))
    defaults = model.generation_config
    assert isinstance(defaults, model_cls.generation_config_class)
    model.generation_config = defaults.updated(**changes)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / GENERATION_CONFIG_NAME).read_text())["temperature"] == changes["temperature"]

    reloaded = model_cls.from_pretrained(tmp_path)
    assert reloaded.generation_config == defaults.updated(**changes)
    assert reloaded.generation_config != defaults

    (tmp_path / GENERATION_CONFIG_NAME).unlink()  # a folder without one gets the defaults
    assert model_cls.from_pretrained(tmp_path).generation_config == defaults


def test_saved_weights_get_the_umasks_mode(model, tmp_path):
    """safetensors 0.8 writes weights owner-only; other users of a shared model folder must be able to read them."""
    previous = os.umask(0o022)
    try:
        model.save_pretrained(tmp_path / "whole")
        model.save_pretrained(tmp_path / "shards", max_shard_size="100KB")
    finally:
        os.umask(previous)
    weights = [*(tmp_path / "whole").glob("*.safetensors"), *(tmp_path / "shards").glob("*.safetensors")]
    assert len(weights) > 2
    assert {stat.S_IMODE(path.stat().st_mode) for path in weights} == {0o644}


def test_saving_with_other_sharding_over_a_saved_model_leaves_no_stale_weights(model, tmp_path):
    """transformers removes only old shards: a single model.safetensors stayed beside new shards and loaded instead."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.semantic.lm_head.weight.add_(1.0)
    model.save_pretrained(tmp_path)
    other.save_pretrained(tmp_path, max_shard_size="100KB")
    assert not (tmp_path / "model.safetensors").exists()
    reloaded = BarkHfModel.from_pretrained(tmp_path)
    assert torch.equal(reloaded.semantic.lm_head.weight, other.semantic.lm_head.weight)

    model.save_pretrained(tmp_path)  # and back to one file: no index naming the removed shards
    assert sorted(path.name for path in tmp_path.glob("model*")) == ["model.safetensors"]
    assert torch.equal(BarkHfModel.from_pretrained(tmp_path).semantic.lm_head.weight, model.semantic.lm_head.weight)


def test_composite_generation_config_round_trip(model, tmp_path):
    model = copy.deepcopy(model)
    changed = BarkHfGenerationConfig(
        semantic_config=BarkHfSemanticGenerationConfig(temperature=0.6, max_gen_duration_s=3.5),
        coarse_acoustics_config=BarkHfCoarseGenerationConfig(max_coarse_history=60, top_k=50),
        fine_acoustics_config=BarkHfFineGenerationConfig(temperature=0.3),
    )
    model.generation_config = changed
    assert model.semantic.generation_config.max_gen_duration_s == 3.5  # the composite's view sets the stages
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / GENERATION_CONFIG_NAME).read_text())
    assert saved["coarse_acoustics_config"]["max_coarse_history"] == 60

    reloaded = BarkHfModel.from_pretrained(tmp_path)
    assert reloaded.generation_config == changed
    assert reloaded.semantic.generation_config == changed.semantic_config
    assert reloaded.coarse_acoustics.generation_config.top_k == 50
    assert reloaded.fine_acoustics.generation_config.temperature == 0.3


def test_a_stage_loaded_from_a_whole_models_folder_keeps_its_generation_config(model, tmp_path):
    model = copy.deepcopy(model)
    model.semantic.generation_config.top_k = 7
    model.coarse_acoustics.generation_config.max_coarse_history = 120
    model.fine_acoustics.generation_config.temperature = None
    model.save_pretrained(tmp_path)
    for stage_cls, name in ((BarkHfSemanticModel, "semantic"), (BarkHfCoarseModel, "coarse_acoustics"),
                            (BarkHfFineModel, "fine_acoustics")):
        assert stage_cls.from_pretrained(tmp_path).generation_config == getattr(model, name).generation_config


def test_a_folder_of_another_model_is_refused_naming_the_class_that_loads_it(model, tmp_path):
    """transformers only warned: the whole model from a stage's folder was a default-sized random one, and a
    coarse model from the semantic stage's folder took its weights."""
    model.semantic.save_pretrained(tmp_path / "semantic")
    for other in (BarkHfModel, BarkHfCoarseModel, BarkHfFineModel):
        with pytest.raises(ValueError, match=f"holds a BarkHfSemanticModel .*, not a {other.__name__}; load it with "
                                             "BarkHfSemanticModel.from_pretrained"):
            other.from_pretrained(tmp_path / "semantic")
    assert isinstance(AutoModel.from_pretrained(tmp_path / "semantic"), BarkHfSemanticModel)


def test_a_config_json_that_is_not_an_object_is_refused_naming_the_file(model, tmp_path):
    """A JSON list failed inside the model-type check with "'list' object has no attribute 'get'"."""
    model.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]", encoding="utf-8")
    for model_cls in (BarkHfModel, BarkHfSemanticModel):
        with pytest.raises(ValueError, match="config.json in .* holds a JSON list, not an object of settings"):
            model_cls.from_pretrained(tmp_path)


def test_attn_implementation_sdpa_loads_and_others_are_refused_with_the_reason(model, tmp_path):
    """transformers' Bark docs pass attn_implementation: "sdpa" reached the codec, which has no SDPA path, and
    "flash_attention_2" got transformers' generic "does not support Flash Attention 2 yet"."""
    model.save_pretrained(tmp_path)
    for load in (BarkHfModel.from_pretrained, AutoModel.from_pretrained):
        loaded = load(tmp_path, attn_implementation="sdpa")
        assert torch.equal(loaded.semantic.lm_head.weight, model.semantic.lm_head.weight)
        for name in ("flash_attention_2", "eager"):
            with pytest.raises(ValueError, match=f"attn_implementation='{name}': .* always attend through PyTorch's "
                                                 "scaled_dot_product_attention.*leave attn_implementation out"):
                load(tmp_path, attn_implementation=name)
    BarkHfModel.from_pretrained(tmp_path, config=loaded.config)  # a loaded model's config (codec: eager) still loads


@pytest.mark.parametrize("model_cls", [BarkHfModel, BarkHfSemanticModel])
def test_a_missing_folder_or_a_file_is_named_as_such(model_cls, tmp_path):
    """transformers' error was about Hub ids: "Repo id must be in the form 'repo_name' or 'namespace/repo_name'"."""
    with pytest.raises(FileNotFoundError, match=f"No model folder at '{tmp_path}/missing'; pass a folder saved with"):
        model_cls.from_pretrained(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(NotADirectoryError, match="config.json' is a file; pass the model folder that holds it"):
        model_cls.from_pretrained(tmp_path / "config.json")


def test_a_folder_without_its_config_is_refused(model, tmp_path):
    """transformers 5 reads a missing config.json as {}: a default-sized model was built around the weights and
    failed with a RuntimeError under a page-long report, or loaded them where the sizes happened to match."""
    model.save_pretrained(tmp_path)
    config = BarkHfModel.config_class.from_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="holds no config.json; pass the whole folder written by"):
        BarkHfModel.from_pretrained(tmp_path)
    loaded = BarkHfModel.from_pretrained(tmp_path, config=config)  # a config given instead: no file needed
    assert loaded.config.semantic_config.hidden_size == TINY["hidden_size"]


def test_a_peft_adapter_folder_loads_onto_its_base_model(model, tmp_path):
    """An adapter folder holds adapter_config.json, not config.json: transformers loads the base model it names."""
    from peft import LoraConfig, get_peft_model

    model.semantic.save_pretrained(tmp_path / "base")
    base = BarkHfSemanticModel.from_pretrained(tmp_path / "base")
    get_peft_model(base, LoraConfig(r=2, target_modules=["att_proj"])).save_pretrained(tmp_path / "adapters")
    loaded = BarkHfSemanticModel.from_pretrained(tmp_path / "adapters")
    assert any("lora_" in name for name, _ in loaded.named_parameters())


@pytest.mark.parametrize("text,problem", [("{bad", "is not valid JSON"), ("[1]", "holds a JSON list"),
                                          ('{"semantic_config": {"temperature": 0}}', "temperature must be"),
                                          ('{"semantic_config": [1]}', "has no attribute")])
def test_a_broken_generation_config_is_named_with_its_fix(model, tmp_path, text, problem):
    """A raw JSONDecodeError or AttributeError named neither the file nor what to do."""
    model.save_pretrained(tmp_path)
    (tmp_path / GENERATION_CONFIG_NAME).write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=f"{GENERATION_CONFIG_NAME}.*{problem}.*delete it"):
        BarkHfModel.from_pretrained(tmp_path)


def test_unreadable_weights_are_named_with_the_fix_and_a_pickle_is_never_run(model, tmp_path):
    """A truncated model.safetensors raised safetensors' SafetensorError and a pytorch_model.bin with pickled
    objects torch's UnpicklingError (advising weights_only=False): both a traceback in `bark-hf say`."""
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="cannot be read .*truncated, corrupt .*save the model again"):
        BarkHfModel.from_pretrained(tmp_path)

    class Payload:
        def __reduce__(self):
            return (os.remove, (os.fspath(tmp_path / "config.json"),))

    weights.unlink()
    torch.save({"semantic.lm_head.weight": Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickled Python objects besides tensors, which bark-hf never loads"):
        BarkHfModel.from_pretrained(tmp_path)
    assert (tmp_path / "config.json").exists()


def test_save_pretrained_into_a_file_or_an_empty_path_is_refused_with_the_fix(model, tmp_path):
    """transformers only logged an error for a file, and the save then failed with a NotADirectoryError."""
    (tmp_path / "model").write_text("mine", encoding="utf-8")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder.*choose another save_directory"):
        model.save_pretrained(tmp_path / "model")
    assert (tmp_path / "model").read_text(encoding="utf-8") == "mine"
    with pytest.raises(ValueError, match="empty path"):
        model.save_pretrained("")


def test_composite_generation_config_view_writes_stage_configs_through(model):
    model = copy.deepcopy(model)
    view = model.generation_config
    detached = copy.deepcopy(view)
    view.semantic_config = BarkHfSemanticGenerationConfig(top_k=7)  # a whole stage config, assigned on the view
    model.generation_config.coarse_acoustics_config = BarkHfCoarseGenerationConfig(max_coarse_history=120)
    assert model.semantic.generation_config.top_k == 7
    assert model.coarse_acoustics.generation_config.max_coarse_history == 120
    view.fine_acoustics_config.temperature = 0.25  # a field of a stage config: the stage's own object
    assert model.fine_acoustics.generation_config.temperature == 0.25

    detached.semantic_config = BarkHfSemanticGenerationConfig(top_k=3)  # a copy is tied to no model
    assert model.semantic.generation_config.top_k == 7
    with pytest.raises(TypeError, match="semantic_config must be a BarkHfSemanticGenerationConfig, got "
                                        "BarkHfCoarseGenerationConfig"):
        view.semantic_config = BarkHfCoarseGenerationConfig()
    with pytest.raises(TypeError, match="must be a BarkHfGenerationConfig, got BarkHfSemanticGenerationConfig"):
        model.generation_config = BarkHfSemanticGenerationConfig()
    assert view.sample_rate == model.sampling_rate
    with pytest.raises(AttributeError, match="sample_rate cannot be set: the audio's rate is the codec's"):
        view.sample_rate = 16_000  # it would be lost
    with pytest.raises(ValueError, match="but this model's codec makes 24000 Hz audio"):
        model.generation_config = dataclasses.replace(detached, sample_rate=16_000)
    view._from_model_config = False  # other attributes, as transformers' trainers set, stay settable
    assert model.semantic.generation_config.top_k == 7  # nothing changed by the refused assignments


def test_generation_configs_with_numpy_numbers_save_and_bad_fields_are_refused_before_writing(model, tmp_path):
    model = copy.deepcopy(model)
    model.semantic.generation_config = model.semantic.generation_config.updated(top_k=np.int64(5),
                                                                                temperature=np.float32(0.5),
                                                                                allow_early_stop=np.bool_(True))
    model.save_pretrained(tmp_path)
    reloaded = BarkHfModel.from_pretrained(tmp_path).semantic.generation_config
    assert (reloaded.top_k, reloaded.temperature) == (5, 0.5) and type(reloaded.top_k) is int
    written = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    model.coarse_acoustics.generation_config.temperature = 0  # assigned: no check ran
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        model.save_pretrained(tmp_path)
    model.coarse_acoustics.generation_config.temperature = 0.7
    model.coarse_acoustics.generation_config.top_p = fractions.Fraction(1, 2)  # a valid number JSON cannot hold
    with pytest.raises(TypeError, match="fractions.Fraction .* cannot be saved as JSON"):
        model.save_pretrained(tmp_path)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == written  # refused before writing


@pytest.mark.parametrize("config_cls", [BarkHfSemanticGenerationConfig, BarkHfCoarseGenerationConfig,
                                        BarkHfFineGenerationConfig, BarkHfGenerationConfig])
def test_updated_rejects_unknown_names(config_cls):
    config = config_cls()
    with pytest.raises(ValueError) as error:
        config.updated(temprature=0.5, foo=1)
    message = str(error.value)
    assert f"{config_cls.__name__} has no setting 'foo', 'temprature'" in message
    assert "valid settings are:" in message
    field = "temperature" if config_cls is not BarkHfGenerationConfig else "semantic_config"
    assert field in message.split("valid settings are:")[1]
    assert config == config_cls()  # unchanged


def test_updated_returns_a_changed_copy():
    config = BarkHfSemanticGenerationConfig()
    changed = config.updated(top_k=3)
    assert changed.top_k == 3 and config.top_k is None
    assert BarkHfSemanticGenerationConfig.from_dict(changed.to_dict()) == changed


# --- gradient checkpointing ---------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning")
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradient_checkpointing_gives_the_same_gradients(dropout):
    config = BarkHfConfig(
        semantic_config=dict(TINY, block_size=BLOCK, input_vocab_size=VOCAB_IN, output_vocab_size=VOCAB_OUT,
                             dropout=dropout),
        coarse_acoustics_config=dict(TINY, block_size=BLOCK, input_vocab_size=VOCAB_IN, output_vocab_size=VOCAB_IN),
        fine_acoustics_config=dict(TINY, block_size=BLOCK, input_vocab_size=VOCAB_IN, output_vocab_size=VOCAB_IN),
        codec_config=tiny_codec_config(),
    )
    torch.manual_seed(0)
    model = BarkHfModel(config)
    randomize_(model.semantic, seed=4)
    ids = _ids(2, 12)

    def gradients() -> tuple[dict[str, torch.Tensor], tuple | None]:
        model.semantic.train()
        model.semantic.zero_grad()
        torch.manual_seed(1)  # the same dropout masks in both runs
        output = model.semantic(ids, use_cache=True)
        output.logits.sum().backward()
        return {name: param.grad.clone() for name, param in model.semantic.named_parameters()}, output.cache

    expected, _ = gradients()
    model.semantic.gradient_checkpointing_enable()
    calls = []

    def counted(checkpoint):
        def run(*args, **kwargs):
            calls.append(1)
            return checkpoint(*args, **kwargs)

        return run

    for layer in model.semantic.layers:
        assert layer.gradient_checkpointing
        layer._gradient_checkpointing_func = counted(layer._gradient_checkpointing_func)
    actual, cache = gradients()
    assert len(calls) == TINY["num_layers"]  # checkpointing really ran
    assert cache is None  # and turned the cache off while training
    assert set(actual) == set(expected)
    for name, grad in expected.items():
        # Recomputing a block may round differently (AVX2 CPUs): tolerance on the scale of each gradient.
        torch.testing.assert_close(actual[name], grad, atol=1e-6 * max(1.0, grad.abs().max().item()), rtol=1e-5,
                                   msg=name)
    assert any(grad.abs().sum() > 0 for grad in expected.values())


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_sample_tokens_draws_what_multinomial_draws(device):
    """Same draws and same random numbers used as torch.multinomial(probs, 1), with top-k zeros too."""
    for seed, (batch, vocab) in enumerate([(1, 10_001), (3, 1_024), (32, 1_024)]):
        logits = torch.randn(batch, vocab, device=device) * 4
        for probs in (torch.softmax(logits, dim=-1), modeling.sampling_probabilities(logits, 0.7, top_k=5)):
            torch.manual_seed(seed)
            expected, expected_next = torch.multinomial(probs, 1), torch.rand(4, device=device)
            torch.manual_seed(seed)
            saw_nan = torch.zeros((), dtype=torch.bool, device=device)
            drawn, drawn_next = modeling.sample_tokens(probs, saw_nan), torch.rand(4, device=device)
            assert torch.equal(drawn, expected) and torch.equal(drawn_next, expected_next)
            assert drawn.dtype == torch.long and not saw_nan


def test_top_k_1_takes_the_first_of_tied_logits_whatever_the_random_numbers():
    """Exact ties are common in half precision; greedy decoding must not draw among them."""
    logits = torch.tensor([[1.0, 3.0, 0.5, 3.0], [3.0, 3.0, 3.0, 3.0], [0.0, 1.0, 2.0, -1.0]]).to(torch.bfloat16)
    probs = modeling.sampling_probabilities(logits, 0.7, top_k=1)
    assert torch.equal(probs, torch.eye(4)[[1, 0, 2]])
    for seed in range(20):
        torch.manual_seed(seed)
        drawn = modeling.sample_tokens(probs, torch.zeros((), dtype=torch.bool))
        assert drawn[:, 0].tolist() == [1, 0, 2]
    # Elsewhere top-k keeps ties with the k-th value, as the original does.
    assert (modeling.sampling_probabilities(logits, 0.7, top_k=2)[0] > 0).tolist() == [False, True, False, True]


def test_settings_that_outgrow_the_position_embeddings_are_refused_before_any_work(model):
    block = model.semantic.config.block_size
    with pytest.raises(ValueError, match=f"max_new_tokens={block - 255} after the 257-token prompt needs "
                                         f"{block + 1} positions, but the semantic stage has {block}"):
        model.semantic.generate(INPUT_IDS, ATTENTION_MASK, max_new_tokens=block - 255, **QUIET)
    model.semantic.generate(INPUT_IDS, ATTENTION_MASK, max_new_tokens=2, **QUIET)  # within the limit: fine
    coarse = copy.deepcopy(model.coarse_acoustics)
    coarse.config.block_size = 900  # fewer positions than the default windows need (946)
    with pytest.raises(ValueError, match="max_coarse_history=630 with sliding_window_len=60 needs 946 positions"):
        coarse.generate(torch.zeros(1, 5, dtype=torch.long), **QUIET)
    coarse.generate(torch.zeros(1, 5, dtype=torch.long), max_coarse_history=580, **QUIET)
    with pytest.raises(ValueError, match="max_new_tokens must be a whole number >= 1"):
        model.semantic.generate(INPUT_IDS, ATTENTION_MASK, max_new_tokens=0, **QUIET)
    # A duration limit that stops the loop in time is enough.
    output = model.semantic.generate(INPUT_IDS, ATTENTION_MASK, max_new_tokens=2000, max_gen_duration_s=0.1,
                                     allow_early_stop=False, **QUIET)
    assert output.sequences.shape[1] == 5  # 0.1 s at 49.9 Hz
    with pytest.raises(ValueError, match="max_new_tokens=2000 with max_gen_duration_s=20"):
        model.semantic.generate(INPUT_IDS, ATTENTION_MASK, max_new_tokens=2000, max_gen_duration_s=20, **QUIET)


def test_a_duration_past_the_float_range_in_tokens_is_no_limit(model):
    """max_gen_duration_s=1e308 is finite, but times 49.9 Hz it is inf: flooring it raised an OverflowError."""
    output = model.semantic.generate(INPUT_IDS[:1], ATTENTION_MASK[:1], max_new_tokens=3, max_gen_duration_s=1e308,
                                     allow_early_stop=False, **QUIET)
    assert output.sequences.shape == (1, 3)


def test_nan_probabilities_raise_a_clear_error():
    saw_nan = torch.zeros((), dtype=torch.bool)
    modeling.sample_tokens(torch.tensor([[0.5, 0.5]]), saw_nan)
    modeling.raise_if_nan(saw_nan, "coarse")  # nothing seen yet
    modeling.sample_tokens(torch.tensor([[float("nan"), 0.5]]), saw_nan)
    modeling.sample_tokens(torch.tensor([[0.5, 0.5]]), saw_nan)  # the flag stays set
    with pytest.raises(FloatingPointError, match="coarse stage produced NaN.*bfloat16"):
        modeling.raise_if_nan(saw_nan, "coarse")


@pytest.mark.parametrize("stage", ["semantic", "coarse_acoustics", "fine_acoustics"])
def test_a_stage_whose_logits_turn_nan_raises_a_clear_error(model, stage):
    broken = copy.deepcopy(model)
    module = getattr(broken, stage)
    for head in module.lm_heads if stage == "fine_acoustics" else [module.lm_head]:
        head.weight.data[:, 0] = float("nan")  # every logit of every step becomes NaN
    with pytest.raises(FloatingPointError, match=f"{stage.split('_')[0]} stage produced NaN"):
        broken.generate(INPUT_IDS, ATTENTION_MASK, semantic_max_new_tokens=8, semantic_allow_early_stop=False,
                        **QUIET)


@pytest.mark.parametrize("stage", ["semantic", "coarse_acoustics", "fine_acoustics"])
def test_nan_logits_raise_a_clear_error_with_greedy_decoding_too(model, stage):
    """Greedy decoding takes an argmax, which reads a NaN as the largest logit: the fine stage (temperature=None)
    gave codes from NaN logits, and audio, without an error."""
    broken = copy.deepcopy(model)
    module = getattr(broken, stage)
    for head in module.lm_heads if stage == "fine_acoustics" else [module.lm_head]:
        head.weight.data[:, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=f"{stage.split('_')[0]} stage produced NaN"):
        broken.generate(INPUT_IDS, ATTENTION_MASK, semantic_max_new_tokens=8, semantic_allow_early_stop=False,
                        **GREEDY, **QUIET)


@pytest.mark.parametrize("native", [False, True])
def test_bfloat16_on_a_cpu_without_bfloat16_instructions_warns_once(model, native, monkeypatch, caplog):
    monkeypatch.setattr(modeling, "cpu_has_native_bfloat16", lambda: native)
    logging.Logger.warning_once.cache_clear()  # the warning is shown once per process
    semantic = copy.deepcopy(model.semantic).to(torch.bfloat16)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            semantic.generate(INPUT_IDS, ATTENTION_MASK, max_new_tokens=2, show_progress=False)
    assert caplog.text.count("no bfloat16 instructions") == (0 if native else 1)


def test_numpy_scalars_are_accepted_as_settings(model):
    torch.manual_seed(0)
    expected = model.semantic.generate(INPUT_IDS, ATTENTION_MASK, top_k=5, temperature=0.5, max_new_tokens=4, **QUIET)
    torch.manual_seed(0)
    output = model.semantic.generate(INPUT_IDS, ATTENTION_MASK, top_k=np.int64(5), temperature=np.float32(0.5),
                                     max_new_tokens=np.int32(4), **QUIET)
    assert torch.equal(output.sequences, expected.sequences)
    torch.manual_seed(0)
    output = model.semantic.generate(INPUT_IDS, ATTENTION_MASK, top_k=5.0, temperature=0.5, max_new_tokens=4.0,
                                     **QUIET)
    assert torch.equal(output.sequences, expected.sequences)


def test_probability_settings_of_any_real_number_type_are_accepted(model):
    """top_p and min_eos_p were kept as given: a Fraction (a real number, which the checks accept) failed inside the
    decoding loop with "'>' not supported between instances of 'Tensor' and 'Fraction'"."""
    torch.manual_seed(0)
    expected = model.semantic.generate(INPUT_IDS, ATTENTION_MASK, temperature=1.0, top_p=0.5, min_eos_p=0.25,
                                       max_new_tokens=4, **QUIET)
    torch.manual_seed(0)
    output = model.semantic.generate(INPUT_IDS, ATTENTION_MASK, temperature=1.0, top_p=fractions.Fraction(1, 2),
                                     min_eos_p=np.float16(0.25), max_new_tokens=4, **QUIET)
    assert torch.equal(output.sequences, expected.sequences)
    assert type(BarkHfCoarseGenerationConfig(top_p=fractions.Fraction(1, 2)).top_p) is float
    assert type(BarkHfSemanticGenerationConfig(min_eos_p=np.int64(1)).min_eos_p) is float


def test_top_p_zero_keeps_only_the_likeliest_token(model):
    """The original and transformers take top_p=0 (one token left: greedy decoding); it was refused as outside
    (0, 1]. With the likeliest token alone, sampling at any temperature gives top_k=1's tokens."""
    greedy = model.generate(INPUT_IDS, ATTENTION_MASK, return_dict_in_generate=True, **GREEDY, **QUIET)
    torch.manual_seed(0)
    nucleus = model.generate(INPUT_IDS, ATTENTION_MASK, return_dict_in_generate=True, semantic_top_p=0,
                             coarse_top_p=0.0, fine_temperature=None, **QUIET)
    for name in ("semantic_tokens", "coarse_tokens", "fine_tokens"):
        assert torch.equal(getattr(nucleus, name), getattr(greedy, name)), name


@pytest.mark.parametrize(("settings", "match"), [
    (dict(semantic_temperature=0), r"temperature must be a finite number > 0 \(top_k=1 decodes greedily\); got 0"),
    (dict(coarse_temperature=None), r"temperature must be a finite number > 0 \(top_k=1 decodes greedily\); got No"),
    (dict(fine_temperature=0), r"temperature \(or None\) must be a finite number > 0 \(None takes the argmax\)"),
    (dict(semantic_top_p=1.5), r"top_p must be None or a number within \[0, 1\] \(the probability mass kept"),
    (dict(semantic_min_eos_p=-0.1), r"min_eos_p must be None or a number within \[0, 1\] \(the end-of-speech"),
    # float32 holds no 1e39: the sampling's -inf logits divided by it were NaN, reported as a float16 overflow after
    # the whole stage ran; without a filter every logit / inf is 0, uniform sampling, as in the original.
    (dict(semantic_temperature=1e39, semantic_top_k=5), r"temperature=1e\+39 is larger than float32 can hold .* "
                                                        r"logits that top_k removed \(-inf\) would become NaN"),
    (dict(coarse_temperature=10**40, coarse_top_p=0.9), "the logits that top_p removed"),
])
def test_sampling_settings_that_cannot_work_are_refused_with_the_fix(model, monkeypatch, settings, match):
    monkeypatch.setattr(BarkHfSemanticModel, "generate", lambda *args, **kwargs: pytest.fail("generation started"))
    with pytest.raises(ValueError, match=match):
        model.generate(INPUT_IDS, ATTENTION_MASK, **settings, **QUIET)
    assert BarkHfSemanticGenerationConfig(temperature=1e39).temperature == 1e39  # no filter: the original's result


# --- inputs the stages' generate refuse, or take as documented -----------------------------------------


@pytest.mark.parametrize("input_ids, attention_mask, error, match", [
    (INPUT_IDS.float(), None, TypeError, "input_ids must hold integer ids"),
    (INPUT_IDS[0], None, ValueError, r"input_ids must be \[B, L\]; got shape \(8,\) \(a single item"),
    (INPUT_IDS[:0], None, ValueError, "input_ids holds a batch of 0 items"),
    (INPUT_IDS.numpy(), None, TypeError, "input_ids must be a torch tensor"),
    (INPUT_IDS, ATTENTION_MASK[:, :5], ValueError, r"attention_mask must be a tensor of input_ids' shape \(2, 8\)"),
    (INPUT_IDS, ATTENTION_MASK[:1], ValueError, r"attention_mask must be a tensor of input_ids' shape"),
    (INPUT_IDS, torch.stack([ATTENTION_MASK[0], 0 * ATTENTION_MASK[1]]), ValueError, r"Items \[1\] .* hold no text"),
    (INPUT_IDS[:, :0], None, ValueError, r"Items \[0, 1\] .* hold no text"),
    (INPUT_IDS - 200, ATTENTION_MASK, ValueError, r"input_ids hold values outside \[0, 119547\).*without an offset"),
    (INPUT_IDS + 119_500, ATTENTION_MASK, ValueError, r"input_ids hold values outside \[0, 119547\)"),
])
def test_bad_semantic_inputs_are_refused_with_a_clear_error(model, input_ids, attention_mask, error, match):
    """Negative ids were read as semantic tokens and ids past the vocabulary as the pad and infer tokens, silently;
    the rest failed deep in torch (an embedding IndexError, a stack of nothing, mismatched sizes)."""
    with pytest.raises(error, match=match):
        model.generate(input_ids, attention_mask, semantic_max_new_tokens=2, **QUIET)


def test_without_an_attention_mask_the_tokenizer_pad_is_padding(model):
    """generate(processor(text)["input_ids"]) read the [PAD] ids (0) after each text as text tokens."""
    greedy = dict(top_k=1, max_new_tokens=6, **QUIET)
    expected = model.semantic.generate(INPUT_IDS, ATTENTION_MASK, **greedy).sequences
    assert torch.equal(model.semantic.generate(INPUT_IDS, **greedy).sequences, expected)
    trimmed = model.semantic.generate(INPUT_IDS[1:, :3], **greedy).sequences  # the second text, unpadded
    assert torch.equal(trimmed, expected[1:])
    with pytest.raises(ValueError, match=r"Items \[0\] .* hold no text .*every id is \[PAD\]"):
        model.semantic.generate(torch.zeros((1, 4), dtype=torch.long), **greedy)


def test_semantic_inputs_of_other_integer_dtypes_and_padding_sides_give_the_same_tokens(model):
    """uint8 ids overflowed when shifted, and a left-padded batch put padding before each item's text."""
    expected = model.semantic.generate(INPUT_IDS_3, ATTENTION_MASK_3, top_k=1, max_new_tokens=6, **QUIET).sequences
    small_ids = INPUT_IDS_3 % 100
    assert torch.equal(model.semantic.generate(small_ids.to(torch.uint8), top_k=1, max_new_tokens=6, **QUIET).sequences,
                       model.semantic.generate(small_ids, top_k=1, max_new_tokens=6, **QUIET).sequences)
    shifts = (ATTENTION_MASK_3 == 0).sum(dim=1).tolist()
    left_ids = torch.stack([row.roll(shift) for row, shift in zip(INPUT_IDS_3, shifts, strict=True)])
    left_mask = torch.stack([row.roll(shift) for row, shift in zip(ATTENTION_MASK_3, shifts, strict=True)])
    assert left_mask[:, 0].tolist() == [1, 0, 0]
    for mask in (left_mask, left_mask.bool(), left_mask.float()):
        output = model.semantic.generate(left_ids, mask, top_k=1, max_new_tokens=6, **QUIET)
        assert torch.equal(output.sequences, expected)


SEMANTIC_2 = torch.tensor([[5, 9_999, 17, 3, 0, 42], [8, 1, 2, SEMANTIC_PAD, SEMANTIC_PAD, SEMANTIC_PAD]])
CODES_2 = torch.tensor([[[5, 1_023, 17, 3], [0, 42, 7, 7]], [[8, 1, CODEBOOK_SIZE, CODEBOOK_SIZE]] * 2])


@pytest.mark.parametrize("tokens, lengths, error, match", [
    (SEMANTIC_2.float(), None, TypeError, "semantic_tokens must hold integer ids"),
    (SEMANTIC_2[0], None, ValueError, r"semantic_tokens must be \[B, S\]; got shape \(6,\) \(a single item"),
    (SEMANTIC_2[:0], None, ValueError, "semantic_tokens holds a batch of 0 items"),
    (SEMANTIC_2, None, ValueError, r"semantic_tokens hold values outside \[0, 10000\), e.g. \[10000\].*_lengths"),
    (SEMANTIC_2 - 1, torch.tensor([6, 3]), ValueError, r"outside \[0, 10000\), e.g. \[-1\]"),
    (SEMANTIC_2 + 2_048, torch.tensor([6, 3]), ValueError, r"outside \[0, 10000\), e.g. \[12047\]"),
    (SEMANTIC_2, torch.tensor([6, 7]), ValueError, r"semantic_lengths must be within \[0, 6\].*got \[6, 7\]"),
    (SEMANTIC_2, torch.tensor([6, -2]), ValueError, r"semantic_lengths must be within \[0, 6\]"),
    (SEMANTIC_2, torch.tensor([6.0, 3.0]), ValueError, "semantic_lengths must hold 2 whole numbers"),
    (SEMANTIC_2, torch.tensor([6, 3, 1]), ValueError, "semantic_lengths must hold 2 whole numbers"),
])
def test_bad_coarse_inputs_are_refused_with_a_clear_error(model, tokens, lengths, error, match):
    """Semantic tokens past the vocabulary were read as coarse tokens or failed with an embedding IndexError; a
    length past the tensor was cut to it, a negative one counted from the end and a float one rounded, silently."""
    with pytest.raises(error, match=match):
        model.coarse_acoustics.generate(tokens, lengths, **QUIET)


@pytest.mark.parametrize("tokens, lengths, error, match", [
    (CODES_2.float(), None, TypeError, "coarse_tokens must hold integer ids"),
    (CODES_2[0], None, ValueError, r"coarse_tokens must be \[B, K, T\]; got shape \(2, 4\) \(a single item"),
    (CODES_2[:0], None, ValueError, "coarse_tokens holds a batch of 0 items"),
    (CODES_2[:, :0], None, ValueError, r"coarse_tokens must hold 1 to 8 codebooks .*got K = 0"),
    (torch.zeros(2, 9, 4, dtype=torch.long), None, ValueError, "coarse_tokens must hold 1 to 8 codebooks"),
    (CODES_2, None, ValueError, r"coarse_tokens hold values outside \[0, 1024\), e.g. \[1024\].*coarse_lengths"),
    (CODES_2 + 1_000, torch.tensor([4, 2]), ValueError, r"outside \[0, 1024\), e.g. \[1042, 2023\]"),
    (-CODES_2, torch.tensor([4, 2]), ValueError, r"outside \[0, 1024\), e.g. \[-1023"),
    (CODES_2, torch.tensor([5, 2]), ValueError, r"coarse_lengths must be within \[0, 4\]"),
    (CODES_2, torch.tensor([-1, 2]), ValueError, r"coarse_lengths must be within \[0, 4\]"),
    (CODES_2, torch.tensor([2.5, 2.0]), ValueError, "coarse_lengths must hold 2 whole numbers"),
])
def test_bad_fine_inputs_are_refused_with_a_clear_error(model, tokens, lengths, error, match):
    """Codes of 1024 (the "not predicted yet" id) to 1055 were taken and written to the output, larger ones failed
    with an embedding IndexError; K = 0 or 9 codebooks failed deep inside; lengths as for the coarse stage."""
    with pytest.raises(error, match=match):
        model.fine_acoustics.generate(tokens, lengths, **QUIET)


FINE_2 = torch.cat([CODES_2, CODES_2, CODES_2, CODES_2], dim=1)  # [2, 8, 4]: item 1 valid up to 2


@pytest.mark.parametrize("tokens, lengths, error, match", [
    (FINE_2.float(), None, TypeError, "fine_tokens must hold integer ids"),
    (FINE_2.numpy(), None, TypeError, r"fine_tokens must be a torch tensor \[B, 8, T\]; got ndarray"),
    (FINE_2[0], None, ValueError, r"fine_tokens must be \[B, 8, T\]; got shape \(8, 4\) \(a single item"),
    (torch.zeros(1, 10, 8, dtype=torch.long), None, ValueError, r"1 to 8 codebooks .*got shape \(1, 10, 8\)"),
    (FINE_2, None, ValueError, r"fine_tokens hold values outside \[0, 1024\), e.g. \[1024\].*pass lengths"),
    (-FINE_2, torch.tensor([4, 2]), ValueError, r"outside \[0, 1024\), e.g. \[-1023"),
    (FINE_2, torch.tensor([4]), ValueError, "lengths must hold 2 whole numbers, one per item of fine_tokens"),
    (FINE_2, torch.tensor([5, 2]), ValueError, r"lengths must be within \[0, 4\]"),
    (FINE_2, torch.tensor([-1, 2]), ValueError, r"lengths must be within \[0, 4\]"),
    (FINE_2, torch.tensor([4.0, 2.0]), ValueError, "lengths must hold 2 whole numbers"),
])
def test_bad_codec_decode_inputs_are_refused_with_a_clear_error(model, tokens, lengths, error, match):
    """codec_decode checked nothing: codes past the codebooks failed with an IndexError inside EnCodec, [B, T, 8]
    codes decoded T codebooks and one length too few dropped an item, silently; other lengths failed in torch."""
    with pytest.raises(error, match=match):
        model.codec_decode(tokens, lengths)


def test_codec_decode_takes_lengths_as_a_list(model):
    audio, audio_lengths = model.codec_decode(FINE_2, [4, 2])
    assert torch.equal(audio, model.codec_decode(FINE_2, torch.tensor([4, 2]))[0])
    assert audio_lengths.tolist() == [4 * HOP, 2 * HOP]


def test_codec_decode_takes_a_batch_of_0_with_its_empty_list_of_lengths(model):
    """torch reads [] as float32, which was refused as lengths that are no whole numbers."""
    audio, audio_lengths = model.codec_decode(FINE_2[:0], [])
    assert audio.shape == (0, 0) and audio_lengths.shape == (0,)


def test_token_lengths_may_be_a_list_and_any_integer_dtype(model):
    expected = model.fine_acoustics.generate(CODES_2, torch.tensor([4, 2]), temperature=None, **QUIET)
    for lengths in ([4, 2], torch.tensor([4, 2], dtype=torch.int32)):
        output = model.fine_acoustics.generate(CODES_2.int(), lengths, temperature=None, **QUIET)
        assert torch.equal(output.sequences, expected.sequences) and output.lengths.tolist() == [4, 2]


def _preset(**changes):
    rng = np.random.default_rng(0)
    fine = rng.integers(0, CODEBOOK_SIZE, size=(8, 30))
    return {"semantic_prompt": rng.integers(0, SEMANTIC_PAD, size=20), "coarse_prompt": fine[:2],
            "fine_prompt": fine, **changes}


@pytest.mark.parametrize("changes, match", [
    (dict(semantic_prompt=np.array([5, 10_001])), r"'semantic_prompt' has values in \[5, 10001\]"),
    (dict(semantic_prompt=np.array([-1, 5])), r"'semantic_prompt' has values in \[-1, 5\]"),
    (dict(semantic_prompt=np.array([1.5, 5.0])), "'semantic_prompt' has dtype float64"),
    (dict(semantic_prompt=np.array([[1, 5]])), "'semantic_prompt' has 2 dimension"),
    (dict(coarse_prompt=np.zeros(60, dtype=np.int64)), "'coarse_prompt' has 1 dimension"),
    (dict(coarse_prompt=np.full((2, 30), 2_000)), r"'coarse_prompt' has values in \[2000, 2000\]"),
    (dict(fine_prompt=np.zeros((2, 30), dtype=np.int64)), "'fine_prompt' has 2 codebook rows"),
    (dict(fine_prompt=np.full((8, 30), CODEBOOK_SIZE)), r"'fine_prompt' has values in \[1024, 1024\]"),
    # Checked whole, as the processor checks presets: the original's generate_coarse asserts this ratio.
    (dict(coarse_prompt=np.zeros((2, 60), dtype=np.int64), fine_prompt=np.zeros((8, 60), dtype=np.int64)),
     r"'coarse_prompt' has 60 frames for 20 semantic tokens \(ratio 3.0\); expected a ratio of 1.5"),
    (dict(fine_prompt=np.zeros((8, 29), dtype=np.int64)), "'fine_prompt' has 29 frames but 'coarse_prompt' has 30"),
    (dict(history=np.zeros(3)), "unexpected: history"),
])
def test_presets_passed_to_generate_are_validated(model, changes, match):
    """A preset dict given to generate itself was not checked: semantic tokens >= 10 000 or fine codes of 1024
    were used silently, float tokens rounded down, 1-D coarse codes taken as one row, the rest failed in torch."""
    with pytest.raises(ValueError, match=match):
        model.generate(INPUT_IDS[:1], ATTENTION_MASK[:1], history_prompt=[_preset(**changes)],
                       semantic_max_new_tokens=4, **QUIET)
    model.generate(INPUT_IDS, ATTENTION_MASK, history_prompt=[None, _preset()], semantic_max_new_tokens=4, **QUIET)


@pytest.mark.parametrize("preset", ["v2/en_speaker_1", "voices/en_speaker_1.npz", Path("voices/en_speaker_1.npz"),
                                    ["voices/en_speaker_1.npz"]])
def test_a_preset_name_or_path_given_to_generate_names_the_processor(model, preset):
    """A name or path string was taken for a list of presets, one per letter ("history_prompt has 15 presets for a
    batch of 1"); a Path failed with "'PosixPath' object is not iterable"."""
    with pytest.raises(TypeError, match=r"not the preset name or path .*en_speaker_1.*processor\(text, voice_preset"):
        model.generate(INPUT_IDS[:1], ATTENTION_MASK[:1], history_prompt=preset, semantic_max_new_tokens=4, **QUIET)
    with pytest.raises(TypeError, match="not the preset name or path"):
        model.fine_acoustics.generate(torch.zeros(1, 2, 5, dtype=torch.long), history_prompt=preset)


@pytest.mark.parametrize("preset, match", [
    (3, "history_prompt must be a voice preset .*got int"),
    (torch.zeros(20, dtype=torch.long), "history_prompt must be a voice preset .*got Tensor"),
    (tuple(_preset().values()), r"history_prompt\[0\] is a ndarray; each item's preset is a dict"),
])
def test_a_history_prompt_of_another_kind_is_refused_naming_what_it_takes(model, preset, match):
    """An int failed with "'int' object is not iterable"; a tensor or the three arrays as a tuple were taken for one
    preset per item ("history_prompt has 3 presets for a batch of 1")."""
    with pytest.raises(TypeError, match=match):
        model.generate(INPUT_IDS[:1], ATTENTION_MASK[:1], history_prompt=preset, semantic_max_new_tokens=4, **QUIET)


def test_forward_refuses_masks_and_inputs_of_the_wrong_shape(causal, fine):
    """A `[B, 1]` mask after a cache broadcast over the cached positions and was taken for all ones, silently; a
    1-D input, another mask shape or 7 fine codebooks failed deep in torch."""
    ids = _ids(2, 5)
    cache = causal(ids, use_cache=True).cache
    with pytest.raises(ValueError, match=r"attention_mask must be \[B, past \+ T\] = \(2, 6\): the 5 positions"):
        causal(ids[:, :1], cache=cache, attention_mask=torch.ones(2, 1), use_cache=True)
    with pytest.raises(ValueError, match=r"attention_mask must be \[B, past \+ T\] = \(2, 5\)"):
        causal(ids, attention_mask=torch.ones(5))
    with pytest.raises(ValueError, match=r"input_ids must be \[B, T\]; got shape \(5,\)"):
        causal(ids[0])
    codes = _ids(2, 10 * 8).view(2, 10, 8)
    with pytest.raises(ValueError, match=r"input_ids must be \[B, T, 8\] \(every codebook"):
        fine(2, codes[..., :7])
    with pytest.raises(ValueError, match=r"attention_mask must be \[B, T\] = \(2, 10\)"):
        fine(2, codes, attention_mask=torch.ones(2, 9))


def test_forward_refuses_ids_and_positions_outside_the_embeddings(causal, fine):
    """Before, each failed with a bare `IndexError: index out of range in self` (a device assert on CUDA)."""
    ids = _ids(2, 5)
    for wrong in (VOCAB_IN, -1):
        bad = ids.clone()
        bad[1, 2] = wrong
        with pytest.raises(ValueError, match=rf"input_ids hold values outside \[0, {VOCAB_IN}\), e.g. \[{wrong}\]"):
            causal(bad)
        with pytest.raises(ValueError, match=r"history_input_ids hold values outside"):
            causal(ids, history_input_ids=bad[:, :3])
    with pytest.raises(ValueError, match=rf"position_ids hold values outside \[0, {BLOCK}\).*{BLOCK}-position block"):
        causal(ids, position_ids=torch.arange(BLOCK - 2, BLOCK + 3)[None])
    codes = _ids(2, 10 * 8).view(2, 10, 8)
    fine(2, codes)
    codes[0, 3, 5] = VOCAB_IN
    with pytest.raises(ValueError, match=rf"input_ids hold values outside \[0, {VOCAB_IN}\).*not predicted yet"):
        fine(2, codes)


@pytest.mark.parametrize("stage, settings, greedy", [
    ("semantic", dict(semantic_temperature=1e-300), "top_k=1"),
    ("semantic", dict(semantic_temperature=1e-300, semantic_top_k=1), "top_k=1"),
    ("coarse", dict(coarse_temperature=1e-300), "top_k=1"),
    ("fine", dict(fine_temperature=1e-300), "temperature=None"),  # the fine stage has no top_k
])
def test_a_temperature_so_small_that_logits_overflow_is_named(model, stage, settings, greedy):
    """The NaN this gives was blamed on float16 weights, with advice to load the model in bfloat16."""
    with pytest.raises(FloatingPointError, match=f"The {stage} stage produced NaN .*temperature=1e-300 is so small.*"
                                                 f"For greedy decoding use {greedy};"):
        model.generate(INPUT_IDS, ATTENTION_MASK, semantic_max_new_tokens=4, semantic_allow_early_stop=False,
                       **settings, **QUIET)


def test_generate_takes_a_whole_generation_config(model):
    """transformers' `generate(generation_config=...)` was refused as an unknown stage setting."""
    config = copy.deepcopy(model.generation_config)
    config.semantic_config.top_k = 1
    config.coarse_acoustics_config.top_k = 1
    config.fine_acoustics_config.temperature = None
    torch.manual_seed(1)
    given = model.generate(INPUT_IDS, ATTENTION_MASK, generation_config=config, **QUIET)
    torch.manual_seed(2)
    expected = model.generate(INPUT_IDS, ATTENTION_MASK, **GREEDY, **QUIET)
    torch.testing.assert_close(given, expected, rtol=0, atol=0)
    assert model.generation_config.semantic_config.top_k is None  # the model's own config is untouched
    with pytest.raises(ValueError, match="invalid semantic setting: temperature must be"):
        model.generate(INPUT_IDS, ATTENTION_MASK, generation_config=config, semantic_temperature=-1.0, **QUIET)
    with pytest.raises(TypeError, match="generation_config must be a BarkHfGenerationConfig, got dict"):
        model.generate(INPUT_IDS, ATTENTION_MASK, generation_config={}, **QUIET)


@pytest.mark.parametrize("stage", ["semantic", "coarse_acoustics", "fine_acoustics"])
def test_a_stage_refuses_another_kind_of_generation_config(model, stage):
    """The composite's config (or another stage's) failed with an AttributeError on the first field read."""
    with pytest.raises(TypeError, match="generation_config must be a BarkHf\\w+GenerationConfig, got "
                                        "BarkHfGenerationConfig; pass this stage's own kind"):
        getattr(model, stage).generate(INPUT_IDS, generation_config=copy.deepcopy(model.generation_config))


@pytest.mark.parametrize("stage", ["semantic", "coarse_acoustics", "fine_acoustics"])
@pytest.mark.parametrize("value", [{"temperature": 0.6}, GenerationConfig(), BarkHfGenerationConfig()])
def test_assigning_a_stage_another_kind_of_generation_config_is_refused(model, stage, value):
    """A dict, transformers' GenerationConfig or another stage's config was taken, and the next generate failed with
    "'dict' object has no attribute 'for_call'" (or, for another stage's, named settings the stage never had)."""
    module = getattr(model, stage)
    kept = module.generation_config
    with pytest.raises(TypeError, match=r"generation_config must be a BarkHf\w+GenerationConfig, got "
                                        rf"{type(value).__name__}; set its fields instead"):
        module.generation_config = value
    assert module.generation_config is kept
    module.generation_config = copy.deepcopy(kept)  # its own kind is taken
    assert module.generation_config == kept


def test_generation_config_save_pretrained_and_from_pretrained(model, tmp_path):
    """transformers' GenerationConfig round trip; the configs had no save_pretrained (AttributeError)."""
    config = copy.deepcopy(model.generation_config)
    config.semantic_config.top_k = 5
    config.save_pretrained(tmp_path / "new")
    loaded = BarkHfGenerationConfig.from_pretrained(tmp_path / "new")
    assert loaded == config and loaded.semantic_config.top_k == 5
    assert BarkHfSemanticGenerationConfig.from_pretrained(tmp_path / "new").top_k == 5  # a stage of a whole file
    with pytest.raises(FileNotFoundError, match="holds no generation_config.json; pass a local folder"):
        BarkHfGenerationConfig.from_pretrained(tmp_path)


def test_the_output_full_pair_as_history_prompt_names_its_first_item(model):
    """generate_audio(..., output_full=True)'s (full_generation, audio) read as two presets: "history_prompt[1] is
    a ndarray"; save_as_prompt named the fix, the other entry points did not."""
    pair = (_preset(), np.zeros(100, dtype=np.float32))
    with pytest.raises(TypeError, match=r"not the \(full_generation, audio\) tuple .* pass its first item"):
        model.generate(INPUT_IDS[:1], ATTENTION_MASK[:1], history_prompt=pair, semantic_max_new_tokens=4, **QUIET)
