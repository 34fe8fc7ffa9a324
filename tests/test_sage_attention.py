"""SageAttention dispatch: which passes use it, which do not, and the switch that turns it off.

SageAttention runs on NVIDIA GPUs only, so these tests install a stand-in `sageattention` module
whose kernel records its calls and computes PyTorch's attention, and declare the CPU supported.
"""

import importlib.machinery
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from bark_hf import sage_attention
from bark_hf.tiny_random import tiny_random_bark

QUIET = dict(show_progress=False)


def _install_stand_in(monkeypatch, module: types.ModuleType) -> None:
    module.__spec__ = importlib.machinery.ModuleSpec(module.__name__, None)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(sage_attention, "device_supports_sage", lambda query: True)
    sage_attention.sageattn.cache_clear()


@pytest.fixture
def sage_calls(monkeypatch):
    """The (query length, key length, is_causal) of every call to the stand-in kernel."""
    calls = []

    def sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None):
        assert tensor_layout == "HND" and q.dim() == 4
        calls.append((q.shape[-2], k.shape[-2], is_causal))
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)

    module = types.ModuleType("sageattention")
    module.sageattn = sageattn
    _install_stand_in(monkeypatch, module)
    yield calls
    sage_attention.sageattn.cache_clear()


@pytest.fixture(scope="module")
def tiny():
    return tiny_random_bark(seed=3)[0]


def _semantic(model, **settings):
    text = torch.arange(5, 17)[None]  # [1, 12]
    return model.semantic.generate(text, top_k=1, max_new_tokens=6, allow_early_stop=False, **QUIET, **settings)


def test_prompt_prefill_and_fine_windows_use_sage_and_decoding_steps_do_not(tiny, sage_calls, monkeypatch):
    semantic = _semantic(tiny)
    layers = tiny.config.semantic_config.num_layers
    prompt = tiny.semantic.generation_config.max_input_semantic_length + 1  # the text window and the infer token
    assert sage_calls == [(prompt, prompt, True)] * layers  # the prefill only: no call for the 5 decoding steps

    sage_calls.clear()
    coarse = tiny.coarse_acoustics.generate(semantic.sequences, semantic.lengths, top_k=1, **QUIET)
    assert sage_calls and all(causal and query == keys > 1 for query, keys, causal in sage_calls)
    assert len(sage_calls) % tiny.config.coarse_acoustics_config.num_layers == 0  # one prefill per window

    sage_calls.clear()
    fine = tiny.fine_acoustics.generate(coarse.sequences, coarse.lengths, temperature=None, **QUIET)
    window = tiny.fine_acoustics.generation_config.max_fine_input_length
    assert sage_calls and set(sage_calls) == {(window, window, False)}

    # The stand-in computes PyTorch's attention, so the tokens are those of the SDPA path.
    monkeypatch.setenv(sage_attention.SAGE_ATTENTION_ENV_VAR, "0")
    assert torch.equal(_semantic(tiny).sequences, semantic.sequences)
    assert torch.equal(tiny.fine_acoustics.generate(coarse.sequences, coarse.lengths, temperature=None,
                                                    **QUIET).sequences, fine.sequences)


def test_the_switch_turns_sage_off(tiny, sage_calls, monkeypatch):
    monkeypatch.setenv(sage_attention.SAGE_ATTENTION_ENV_VAR, "0")
    _semantic(tiny)
    assert sage_calls == []


def test_padded_batches_and_gradients_do_not_use_sage(tiny, sage_calls):
    # Two coarse items, one with a voice preset: contexts of different lengths, left-padded with a mask.
    fine_prompt = torch.randint(0, 1024, (8, 40))
    preset = {"semantic_prompt": torch.randint(0, 10_000, (27,)), "coarse_prompt": fine_prompt[:2],
              "fine_prompt": fine_prompt}
    semantic = torch.randint(0, 10_000, (2, 30))
    tiny.coarse_acoustics.generate(semantic, None, [preset, None], top_k=1, **QUIET)
    assert sage_calls == []

    # A forward pass that needs gradients (training): SageAttention has no backward.
    ids = torch.randint(0, 100, (1, 8))
    tiny.semantic.train()
    try:
        tiny.semantic(ids, use_cache=False).logits.sum().backward()
    finally:
        tiny.semantic.eval()
        tiny.semantic.zero_grad(set_to_none=True)
    assert sage_calls == []


def test_an_install_that_fails_to_import_falls_back_to_pytorch(tiny, monkeypatch):
    _install_stand_in(monkeypatch, types.ModuleType("sageattention"))  # has no `sageattn`: the import fails
    try:
        assert sage_attention.sageattn() is None
        assert _semantic(tiny).sequences.shape == (1, 6)
    finally:
        sage_attention.sageattn.cache_clear()


def test_device_support_needs_a_half_precision_cuda_tensor():
    assert not sage_attention.device_supports_sage(torch.zeros(1, 2, 4, 64))
    assert not sage_attention.device_supports_sage(torch.zeros(1, 2, 4, 64, dtype=torch.bfloat16))
    if torch.cuda.is_available():
        query = torch.zeros(1, 2, 4, 64, dtype=torch.bfloat16, device="cuda")
        expected = torch.cuda.get_device_capability() >= sage_attention.SAGE_MIN_CAPABILITY
        assert sage_attention.device_supports_sage(query) == expected
        assert not sage_attention.device_supports_sage(query[..., :48])  # no kernel for head size 48
