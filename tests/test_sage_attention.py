"""SageAttention dispatch: which passes use it, which do not, the switch that turns it off, and the
fallbacks. SageAttention runs on NVIDIA GPUs only, so these tests install a stand-in
`sageattention` module whose kernel records its calls, and declare the CPU supported.
"""

import importlib.machinery
import importlib.util
import logging
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from bark_hf import sage_attention
from bark_hf.modeling_bark_hf import BarkHfBlock, _one_query_attention
from bark_hf.tiny_random import tiny_random_bark

QUIET = dict(show_progress=False)


def _install_stand_in(monkeypatch, kernel=None) -> None:
    """A `sageattention` module with `kernel` as its `sageattn` (none: importing it fails)."""
    module = types.ModuleType("sageattention")
    module.__spec__ = importlib.machinery.ModuleSpec("sageattention", None)
    if kernel is not None:
        module.sageattn = kernel
    monkeypatch.setitem(sys.modules, "sageattention", module)
    monkeypatch.setattr(sage_attention, "device_supports_sage", lambda query: True)
    monkeypatch.setattr(sage_attention, "_kernel_failed", False)
    sage_attention.load_sage_kernel.cache_clear()


@pytest.fixture(autouse=True)
def fresh_kernel_cache():
    yield
    sage_attention.load_sage_kernel.cache_clear()


@pytest.fixture
def sage_calls(monkeypatch):
    """The (query length, key length, is_causal) of every call to a stand-in kernel that, like
    SageAttention 1.x, shifts its keys in place, and otherwise computes PyTorch's attention."""
    calls = []

    def sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None):
        assert tensor_layout == "HND" and q.dim() == 4
        calls.append((q.shape[-2], k.shape[-2], is_causal))
        output = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
        k -= k.mean(dim=2, keepdim=True)  # softmax does not see the shift; a cache holding these keys would
        return output

    _install_stand_in(monkeypatch, sageattn)
    return calls


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
    # The prefill only, no call for the 5 decoding steps; and not its last block, which attends from the one position
    # whose logits are read (`BarkHfBlock.forward(queries=1)`).
    assert sage_calls == [(prompt, prompt, True)] * (layers - 1)

    sage_calls.clear()
    last_blocks = []  # the length of each prefill whose last block attends from its kept position alone
    block_forward = BarkHfBlock.forward

    def spied(block, hidden_states, *args, queries=0, **kwargs):
        if queries:
            last_blocks.append(hidden_states.shape[1])
        return block_forward(block, hidden_states, *args, queries=queries, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(BarkHfBlock, "forward", spied)
        coarse = tiny.coarse_acoustics.generate(semantic.sequences, semantic.lengths, top_k=1, **QUIET)
    assert sage_calls and all(causal and query == keys > 1 for query, keys, causal in sage_calls)
    layers = tiny.config.coarse_acoustics_config.num_layers
    assert sorted(sage_calls) == sorted((length, length, True) for length in last_blocks for _ in range(layers - 1))

    sage_calls.clear()
    fine = tiny.fine_acoustics.generate(coarse.sequences, coarse.lengths, temperature=None, **QUIET)
    window = tiny.fine_acoustics.generation_config.max_fine_input_length
    assert sage_calls and set(sage_calls) == {(window, window, False)}

    # The stand-in computes PyTorch's attention, so the tokens are those of the SDPA path.
    monkeypatch.setenv(sage_attention.SAGE_ATTENTION_ENV_VAR, "0")
    assert torch.equal(_semantic(tiny).sequences, semantic.sequences)
    assert torch.equal(tiny.fine_acoustics.generate(coarse.sequences, coarse.lengths, temperature=None,
                                                    **QUIET).sequences, fine.sequences)


def test_the_kv_cache_keeps_the_keys_a_kernel_shifts_in_place(tiny, sage_calls, monkeypatch):
    ids = torch.randint(0, 100, (1, 9))
    with torch.no_grad():
        with_sage = tiny.semantic(ids, use_cache=True).cache
        assert sage_calls
        monkeypatch.setenv(sage_attention.SAGE_ATTENTION_ENV_VAR, "0")
        without = tiny.semantic(ids, use_cache=True).cache
    for (key, value), (expected_key, expected_value) in zip(with_sage, without, strict=True):
        assert torch.equal(key, expected_key) and torch.equal(value, expected_value)


@pytest.mark.parametrize("value", ["0", "false", "Off", " no "])
def test_the_switch_turns_sage_off(tiny, sage_calls, monkeypatch, value):
    """Read as "not 0", false left SageAttention on."""
    monkeypatch.setenv(sage_attention.SAGE_ATTENTION_ENV_VAR, value)
    _semantic(tiny)
    assert sage_calls == []


@pytest.mark.parametrize("value", ["1", "true", "", "ON"])
def test_the_switch_left_on_uses_sage(tiny, sage_calls, monkeypatch, value):
    monkeypatch.setenv(sage_attention.SAGE_ATTENTION_ENV_VAR, value)
    _semantic(tiny)
    assert sage_calls


def test_a_switch_value_that_is_neither_on_nor_off_is_refused(tiny, sage_calls, monkeypatch):
    monkeypatch.setenv(sage_attention.SAGE_ATTENTION_ENV_VAR, "disabled")
    with pytest.raises(ValueError, match="BARK_HF_SAGE_ATTENTION is 'disabled'; set it to 1 .* or 0"):
        _semantic(tiny)
    assert sage_calls == []


def test_padded_batches_and_passes_that_need_gradients_do_not_use_sage(tiny, sage_calls):
    # A left-padded pass, with a mask (which SageAttention does not take).
    ids = torch.randint(0, 100, (2, 8))
    tiny.coarse_acoustics(ids, attention_mask=torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [1] * 8]), use_cache=False)
    assert sage_calls == []
    # Two coarse items, one with a voice preset: contexts of different lengths. On a CPU a batch's prefills run
    # item by item without padding, so SageAttention sees each item's own prefill, as in the item's own run.
    fine_prompt = torch.randint(0, 1024, (8, 40))
    preset = {"semantic_prompt": torch.randint(0, 10_000, (27,)), "coarse_prompt": fine_prompt[:2],
              "fine_prompt": fine_prompt}
    semantic = torch.randint(0, 10_000, (2, 30))
    tiny.coarse_acoustics.generate(semantic, None, [preset, None], top_k=1, **QUIET)
    batch_calls = sage_calls[:]
    sage_calls.clear()
    for item, item_preset in zip(semantic, [preset, None], strict=True):
        tiny.coarse_acoustics.generate(item[None], None, item_preset, top_k=1, **QUIET)
    assert batch_calls == sage_calls and len({length for length, _, _ in batch_calls}) == 2
    sage_calls.clear()

    # In eval mode, but with gradients (SageAttention has no backward pass), and in training mode.
    ids = torch.randint(0, 100, (1, 8))
    tiny.semantic(ids, use_cache=False).logits.sum().backward()
    tiny.semantic.train()
    try:
        tiny.semantic(ids, use_cache=False).logits.sum().backward()
    finally:
        tiny.semantic.eval()
        tiny.semantic.zero_grad(set_to_none=True)
    assert sage_calls == []


def test_an_install_that_fails_to_import_falls_back_to_pytorch(tiny, monkeypatch, caplog):
    expected = _semantic(tiny).sequences
    _install_stand_in(monkeypatch)  # the module has no `sageattn`: the import fails
    with caplog.at_level(logging.WARNING):
        assert torch.equal(_semantic(tiny).sequences, expected)
    assert "failed to import" in caplog.text


def test_a_kernel_that_refuses_the_gpu_warns_once_and_is_not_tried_again(tiny, monkeypatch, caplog):
    expected = _semantic(tiny).sequences
    calls = []

    def refusing(q, k, v, **settings):
        calls.append(q.shape)
        raise ValueError("Unsupported CUDA architecture: sm100")

    _install_stand_in(monkeypatch, refusing)
    with caplog.at_level(logging.WARNING):
        assert torch.equal(_semantic(tiny).sequences, expected)
        assert torch.equal(_semantic(tiny).sequences, expected)
    assert len(calls) == 1 and caplog.text.count("Unsupported CUDA architecture") == 1


def test_running_out_of_memory_is_raised_and_leaves_sage_on_for_the_next_call(tiny, sage_calls, monkeypatch):
    """An OutOfMemoryError (a RuntimeError) of one call's batch turned SageAttention off for the whole process, so
    every later call's tokens changed; it is raised as PyTorch's attention raises it, and the next call uses Sage."""
    expected = _semantic(tiny).sequences
    used = len(sage_calls)
    working = sys.modules["sageattention"].sageattn

    def out_of_memory(q, k, v, **settings):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(sys.modules["sageattention"], "sageattn", out_of_memory)
    sage_attention.load_sage_kernel.cache_clear()
    with pytest.raises(torch.OutOfMemoryError):
        _semantic(tiny)
    monkeypatch.setattr(sys.modules["sageattention"], "sageattn", working)
    sage_attention.load_sage_kernel.cache_clear()
    assert torch.equal(_semantic(tiny).sequences, expected)
    assert len(sage_calls) == 2 * used > 0


def test_device_support_needs_a_half_precision_cuda_tensor():
    assert not sage_attention.device_supports_sage(torch.zeros(1, 2, 4, 64))
    assert not sage_attention.device_supports_sage(torch.zeros(1, 2, 4, 64, dtype=torch.bfloat16))
    if torch.cuda.is_available():
        query = torch.zeros(1, 2, 4, 64, dtype=torch.bfloat16, device="cuda")
        expected = torch.cuda.get_device_capability() >= sage_attention.SAGE_MIN_CAPABILITY
        assert sage_attention.device_supports_sage(query) == expected
        assert not sage_attention.device_supports_sage(query[..., :48])  # no kernel for head size 48


def test_one_query_attention_equals_sdpa_with_a_padding_mask():
    """The compiled steps' attention over a static cache: positions left of each item's padding and
    right of the last written one are masked out."""
    torch.manual_seed(0)
    query, key, value = torch.randn(2, 3, 1, 8), torch.randn(2, 3, 10, 8), torch.randn(2, 3, 10, 8)
    columns = torch.arange(10)[None]  # [1, S]
    mask = ((columns >= torch.tensor([[0], [4]])) & (columns <= 6))[:, None, None, :]  # [B, 1, 1, S]
    expected = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
    torch.testing.assert_close(_one_query_attention(query, key, value, mask, dropout=0.0), expected)
    half = _one_query_attention(query.bfloat16(), key.bfloat16(), value.bfloat16(), mask, dropout=0.0)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("sageattention") is None,
                    reason="needs a CUDA GPU and the sageattention package")
@pytest.mark.parametrize("batch, heads, length, is_causal",
                         [(1, 16, 887, True), (2, 16, 1024, False), (3, 12, 513, True)])
def test_the_installed_kernel_stays_close_to_pytorch_attention(batch, heads, length, is_causal):
    """The real kernel on this GPU, at the shapes of bark's passes that use it (a coarse window prefill,
    a fine window, a semantic prompt): bfloat16 in and out, and within int8 rounding of float32 SDPA."""
    torch.manual_seed(0)
    query, key, value = (torch.randn(batch, heads, length, 64, dtype=torch.bfloat16, device="cuda") for _ in range(3))
    expected = F.scaled_dot_product_attention(query.float(), key.float(), value.float(), is_causal=is_causal)
    actual = sage_attention.sage_attention(query, key.clone(), value, is_causal)
    assert actual is not None and actual.dtype == torch.bfloat16 and actual.shape == expected.shape
    relative_error = (actual.float() - expected).norm() / expected.norm()
    assert relative_error < 0.05, f"relative error {relative_error:.4f}"
