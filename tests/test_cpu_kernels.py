"""bark-hf's CPU kernels (products and block steps): their values, batch and thread invariance, where they run,
their build."""

import copy
import logging
import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_
from transformers.utils import logging as hf_logging

import bark_hf.modeling_bark_hf as modeling
from bark_hf import cpu_kernels

needs_kernel = pytest.mark.skipif(isinstance(cpu_kernels._load(), cpu_kernels.CpuKernelsUnavailable),
                                  reason="bark-hf's CPU kernels cannot be built here")


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """An empty build cache at the returned path, the loaded kernel forgotten (and restored afterwards)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cpu_kernels._load.cache_clear()
    hf_logging.get_logger(cpu_kernels.__name__).warning_once.cache_clear()
    yield tmp_path / "bark_hf"
    cpu_kernels._load.cache_clear()


@needs_kernel
@pytest.mark.parametrize("out_features", [1, 7, 8, 13, 64])
@pytest.mark.parametrize("in_features", [1, 5, 8, 37, 64])
@pytest.mark.parametrize("leading", [(), (1,), (3,), (2, 1), (16,)])
@pytest.mark.parametrize("bias", [False, True])
def test_the_kernel_computes_linear(out_features, in_features, leading, bias):
    """Short blocks of weight rows, sums with a tail shorter than a vector, 1 to 16 input rows."""
    generator = torch.Generator().manual_seed(out_features * 100 + in_features)
    inputs = torch.randn(*leading, in_features, generator=generator)
    weight = torch.randn(out_features, in_features, generator=generator)
    bias_values = torch.randn(out_features, generator=generator) if bias else None
    output = cpu_kernels.cpu_matvec()(inputs, weight, bias_values)
    expected = F.linear(inputs.double(), weight.double(), None if bias_values is None else bias_values.double())
    assert output.shape == (*leading, out_features) and output.dtype == torch.float32
    torch.testing.assert_close(output.double(), expected, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize(("inputs", "weight", "bias"), [
    (torch.randn(2, 5), torch.randn(3, 4), None),  # inputs' width is not the weight's
    (torch.randn(2, 4), torch.randn(4, 3).t(), None),  # a transposed weight
    (torch.randn(2, 4), torch.randn(3, 4), torch.randn(4)),  # a bias of another length
    (torch.randn(2, 4), torch.randn(3, 4, dtype=torch.float64), None),
])
def test_the_product_refuses_what_it_would_misread(inputs, weight, bias):
    with pytest.raises(ValueError, match="matvec takes float32 CPU tensors"):
        cpu_kernels.cpu_matvec()(inputs, weight, bias)


@needs_kernel
def test_each_output_is_the_same_whatever_the_batch_or_the_threads():
    """Every output is one thread's sum in one order: an item of a batch gets its values alone, bit for bit."""
    kernel = cpu_kernels.cpu_matvec()
    weight, batch = torch.randn(1031, 768), torch.randn(16, 768)
    together = kernel(batch, weight, None)
    for row in range(16):
        assert torch.equal(kernel(batch[row : row + 1], weight, None), together[row : row + 1])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = kernel(batch, weight, None)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(alone, together)


@needs_kernel
def test_linear_takes_the_kernel_only_for_a_few_rows_in_generation(monkeypatch):
    monkeypatch.setenv(cpu_kernels.CPU_KERNELS_ENV_VAR, "1")
    calls = []
    kernel = cpu_kernels.cpu_matvec()
    monkeypatch.setattr(modeling, "cpu_matvec", lambda: lambda *args: calls.append(args[0].shape) or kernel(*args))
    layer = torch.nn.Linear(16, 24)
    few, many = torch.randn(2, 1, 16), torch.randn(cpu_kernels.MATVEC_MAX_ROWS + 1, 16)
    with torch.no_grad():
        modeling.project(layer, few)  # evaluation, scoring: PyTorch's own
        with modeling.generation_kernels():
            torch.testing.assert_close(modeling.project(layer, few), layer(few))
            torch.testing.assert_close(modeling.project(layer, many), layer(many))  # a prefill: a GEMM
            torch.testing.assert_close(modeling.linear(few, layer.weight.t().contiguous().t(), None),
                                       few @ layer.weight.t())  # a transposed weight: not the kernel's layout
            with pytest.raises(RuntimeError, match="cannot be multiplied"):
                modeling.linear(torch.randn(1, 15), layer.weight, None)  # PyTorch's error, not a wrong read
            assert calls == [(2, 1, 16)]
            torch.testing.assert_close(modeling.linear(few, layer.weight[3:9], layer.bias[3:9]),
                                       F.linear(few, layer.weight[3:9], layer.bias[3:9]))  # rows at an offset
            assert modeling.linear(torch.randn(0, 16), layer.weight, layer.bias).shape == (0, 24)
            sparse = layer.weight.detach().to_sparse()  # not a strided tensor: PyTorch's own
            torch.testing.assert_close(modeling.linear(few[0], sparse, None), F.linear(few[0], layer.weight))
            spaced_bias = torch.randn(48)[::2]
            torch.testing.assert_close(modeling.linear(few, layer.weight, spaced_bias),
                                       F.linear(few, layer.weight, spaced_bias))  # a strided bias: PyTorch's own
    assert calls == [(2, 1, 16), (2, 1, 16), (0, 16)]
    with modeling.generation_kernels():
        modeling.project(layer, few).sum().backward()  # autograd: PyTorch's own
    assert len(calls) == 3 and layer.weight.grad is not None
    monkeypatch.setenv(cpu_kernels.CPU_KERNELS_ENV_VAR, "0")
    with torch.no_grad(), modeling.generation_kernels():
        modeling.project(layer, few)
    assert len(calls) == 3


def test_an_unknown_switch_value_is_named_at_generate(monkeypatch):
    monkeypatch.setenv(cpu_kernels.CPU_KERNELS_ENV_VAR, "fast")
    with pytest.raises(ValueError, match="BARK_HF_CPU_KERNELS is 'fast'"), modeling.generation_kernels():
        pass


@needs_kernel
def test_the_build_is_cached_and_leaves_no_partial_file(fresh_build):
    assert cpu_kernels.cpu_matvec() is not None
    (library,) = fresh_build.iterdir()
    assert library.name.startswith("cpu_kernels-") and library.suffix == ".so"
    built = library.stat().st_mtime_ns
    cpu_kernels._load.cache_clear()
    assert cpu_kernels.cpu_matvec() is not None
    assert [path.name for path in fresh_build.iterdir()] == [library.name]
    assert library.stat().st_mtime_ns == built


@pytest.mark.parametrize("compiler", ["/nonexistent/cc", "false"])  # not there; there, and failing
def test_a_failed_build_falls_back_with_one_warning_or_fails_when_asked_for(fresh_build, monkeypatch, caplog, compiler):
    reason = "building it failed"
    monkeypatch.setattr(cpu_kernels, "_compiled", _failing_compiled(compiler))
    monkeypatch.delenv(cpu_kernels.CPU_KERNELS_ENV_VAR, raising=False)
    with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
        assert cpu_kernels.cpu_matvec() is None
        assert cpu_kernels.cpu_matvec() is None
    warnings = [record.getMessage() for record in caplog.records if record.name == cpu_kernels.__name__]
    assert len(warnings) == 1 and reason in warnings[0] and "BARK_HF_CPU_KERNELS=0" in warnings[0]
    monkeypatch.setenv(cpu_kernels.CPU_KERNELS_ENV_VAR, "1")
    with pytest.raises(cpu_kernels.CpuKernelsUnavailable, match=f"BARK_HF_CPU_KERNELS is 1, but {reason}"):
        cpu_kernels.cpu_matvec()
    if fresh_build.exists():
        assert list(fresh_build.iterdir()) == []  # no partial library left behind


def _failing_compiled(compiler: str):
    """`_compiled` with `compiler`, whatever this machine's CPU: the build itself fails."""
    def compiled():
        return cpu_kernels._build([compiler])
    return compiled


def test_a_machine_without_a_compiler_is_named(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", "")
    monkeypatch.setenv("PATH", os.devnull)
    monkeypatch.setenv(cpu_kernels.CPU_KERNELS_ENV_VAR, "1")
    with pytest.raises(cpu_kernels.CpuKernelsUnavailable, match="no C compiler|needs an x86|lacks|without OpenMP"):
        cpu_kernels.cpu_matvec()


def test_a_machine_that_cannot_have_it_gets_no_warning(fresh_build, monkeypatch, caplog):
    monkeypatch.setattr(cpu_kernels.platform, "machine", lambda: "aarch64")
    monkeypatch.delenv(cpu_kernels.CPU_KERNELS_ENV_VAR, raising=False)
    with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
        assert cpu_kernels.cpu_matvec() is None
    assert not [record for record in caplog.records if record.name == cpu_kernels.__name__]
    monkeypatch.setenv(cpu_kernels.CPU_KERNELS_ENV_VAR, "yes")
    with pytest.raises(cpu_kernels.CpuKernelsUnavailable, match="is 1, but it needs an x86 CPU and Linux, not aarch64"):
        cpu_kernels.cpu_matvec()


def test_any_failure_of_the_build_is_a_fallback_not_an_error_in_generate(fresh_build, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_source", lambda: fresh_build / "missing.c")
    monkeypatch.delenv(cpu_kernels.CPU_KERNELS_ENV_VAR, raising=False)
    reason = cpu_kernels._load()
    assert isinstance(reason, cpu_kernels.CpuKernelsUnavailable) and "FileNotFoundError" in str(reason)


@needs_kernel
def test_a_copy_without_the_c_source_takes_an_installed_one_or_quietly_none(fresh_build, monkeypatch, caplog):
    """A model folder's remote code is a copy of the Python files alone: before, every generate warned."""
    installed = cpu_kernels.SOURCE
    monkeypatch.setattr(cpu_kernels, "SOURCE", fresh_build / "remote_code" / "csrc" / "cpu_kernels.c")
    assert cpu_kernels._source() == installed  # bark-hf is installed here: its source serves
    with monkeypatch.context() as other_version:  # whose functions take other arguments than this copy declares
        other_version.setattr(cpu_kernels, "KERNELS_INTERFACE", cpu_kernels.KERNELS_INTERFACE + 1)
        with pytest.raises(cpu_kernels.CpuKernelsUnavailable, match="another version's"):
            cpu_kernels._compiled()
    monkeypatch.setattr(cpu_kernels.importlib.util, "find_spec", lambda name: None)
    monkeypatch.delenv(cpu_kernels.CPU_KERNELS_ENV_VAR, raising=False)
    with caplog.at_level(logging.INFO, logger=cpu_kernels.__name__):
        assert cpu_kernels.cpu_matvec() is None
    assert [record.levelno for record in caplog.records if record.name == cpu_kernels.__name__] == [logging.INFO]
    assert "pip install bark-hf" in caplog.records[-1].getMessage()


@needs_kernel
def test_a_second_openmp_runtime_is_refused(fresh_build, monkeypatch):
    """Linked against another OpenMP runtime than PyTorch's, the kernel's threads would compete with PyTorch's."""
    loaded = iter([{"/torch/lib/libgomp.so.1"}, {"/torch/lib/libgomp.so.1", "/usr/lib/libomp.so.5"}])
    monkeypatch.setattr(cpu_kernels, "_openmp_runtimes", lambda: next(loaded))
    with pytest.raises(cpu_kernels.CpuKernelsUnavailable, match=r"second OpenMP runtime \(/usr/lib/libomp.so.5\)"):
        cpu_kernels._compiled()


@needs_kernel
def test_a_cache_that_cannot_be_written_builds_into_a_folder_removed_at_exit(fresh_build, monkeypatch):
    """Before, every process left a /tmp/bark_hf-* folder behind."""
    fresh_build.parent.joinpath("bark_hf").write_text("a file where the cache folder would be")
    at_exit = []
    monkeypatch.setattr(cpu_kernels.atexit, "register", lambda *call, **options: at_exit.append((call, options)))
    assert cpu_kernels.cpu_matvec() is not None
    ((remove, folder), options), = at_exit
    assert (remove, options) == (cpu_kernels.shutil.rmtree, {"ignore_errors": True})
    assert [path.suffix for path in Path(folder).iterdir()] == [".so"]
    remove(folder, **options)
    assert not Path(folder).exists()


@needs_kernel
def test_a_cached_library_that_others_may_write_is_not_loaded(fresh_build):
    assert cpu_kernels.cpu_matvec() is not None
    (library,) = fresh_build.iterdir()
    assert library.stat().st_mode & 0o777 == 0o755 & ~_umask()
    library.chmod(0o777)
    cpu_kernels._load.cache_clear()
    with pytest.raises(cpu_kernels.CpuKernelsUnavailable, match="may be written by others"):
        cpu_kernels._compiled()


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@needs_kernel
def test_a_compiler_given_with_arguments(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", "env cc")  # as "ccache gcc" is given
    assert cpu_kernels.cpu_matvec() is not None


@needs_kernel
def test_strided_inputs_are_read_as_their_values():
    weight, inputs = torch.randn(24, 16), torch.randn(3, 32)[:, ::2]
    torch.testing.assert_close(cpu_kernels.cpu_matvec()(inputs, weight, None), F.linear(inputs, weight))


def _block(width: int, heads: int, bias: bool, seed: int = 0) -> modeling.BarkHfBlock:
    config = modeling.BarkHfSemanticConfig(hidden_size=width, num_heads=heads, num_layers=1, bias=bias)
    block = modeling.BarkHfBlock(config, is_causal=True).eval()
    randomize_(block, seed)
    return block


def _cache(keys: torch.Tensor, values: torch.Tensor, room: int = 3,
           storage: torch.dtype | None = None) -> modeling.BarkHfKVCache:
    """A one-layer cache holding `keys` and `values` [B, H, past, D], with room for `room` more positions."""
    cache = modeling.BarkHfKVCache(1, max_length=keys.shape[2] + room, storage_dtype=storage)
    cache.update(0, keys.clone(), values.clone())
    return cache


def _random_cache_contents(batch: int, block: modeling.BarkHfBlock, past: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    heads = block.attn.num_heads
    shape = (batch, heads, past, block.attn.hidden_size // heads)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


@needs_kernel
@pytest.mark.parametrize(("width", "heads"), [(32, 2), (48, 4), (40, 5), (64, 1)])  # head widths 16, 12, 8, 64
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("batch", "past"), [(1, 0), (1, 9), (3, 1), (3, 17)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("storage", [None, torch.float16])
def test_the_block_step_computes_the_block(width, heads, bias, batch, past, masked, storage):
    """Values, and the keys and values written into the cache, against the block's own forward pass; a float16
    cache (int8 models') gets the very values that `BarkHfKVCache.update` stores."""
    block = _block(width, heads, bias, seed=width + heads)
    keys, values = _random_cache_contents(batch, block, past, seed=past)
    cache, expected_cache = _cache(keys, values, storage=storage), _cache(keys, values, storage=storage)
    generator = torch.Generator().manual_seed(batch * 100 + past)
    hidden = torch.randn(batch, 1, width, generator=generator)
    key_mask = None
    if masked:
        key_mask = torch.rand(batch, past + 1, generator=generator) > 0.4
        key_mask[:, -1] = True  # an item always sees its new position
    with torch.no_grad():
        expected = block(hidden, None if key_mask is None else key_mask[:, None, None, :], cache=expected_cache)
        stepped = hidden.clone()
        assert block.cpu_step(cpu_kernels.cpu_block_step(), stepped, cache, key_mask)
    torch.testing.assert_close(stepped, expected, rtol=1e-5, atol=1e-5)
    assert cache.length == past + 1
    for got, want in zip(cache[0], expected_cache[0], strict=True):
        assert got.dtype == (storage or torch.float32)
        if storage is None:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        else:  # the new position is rounded from float32 values that differ in their last bits at most
            torch.testing.assert_close(got.float(), want.float(), rtol=1e-3, atol=1e-5)
            assert torch.equal(got[:, :, :past], want[:, :, :past])
    assert (expected - hidden).abs().max() > 0.1  # the block changed its inputs: the comparison has teeth


@needs_kernel
@pytest.mark.parametrize(("width", "heads"), [(48, 4), (64, 2)])  # head widths 12 (8 values and 4 alone) and 32
@pytest.mark.parametrize("nan", [False, True])
def test_the_block_step_stores_a_float16_cache_as_the_cache_does(width, heads, nan):
    """The float32 keys and values the step computes, rounded to nearest (even) and clamped to float16's largest
    value rather than overflowing to infinity, NaN kept: bit for bit what `BarkHfKVCache.update` stores for them."""
    block = _block(width, heads, bias=True, seed=8)
    with torch.no_grad():
        block.attn.att_proj.weight[width:] *= 3e4  # keys and values of up to about 1e5
    keys, values = _random_cache_contents(1, block, 2, seed=9)
    hidden = torch.randn(1, 1, width, generator=torch.Generator().manual_seed(10))
    if nan:
        hidden[0, 0, 3] = float("nan")
    wide, narrow = _cache(keys, values), _cache(keys, values, storage=torch.float16)
    kernel = cpu_kernels.cpu_block_step()
    with torch.no_grad():
        assert block.cpu_step(kernel, hidden.clone(), wide, None)  # the same float32 values, kept as they are
        assert block.cpu_step(kernel, hidden.clone(), narrow, None)
    for stored, computed in zip(narrow[0], wide[0], strict=True):
        stored, computed = stored[:, :, -1], computed[:, :, -1]  # [1, H, D]: the new position
        expected = modeling._in_range_of(computed, torch.float16).half()
        assert torch.equal(stored.isnan(), expected.isnan())
        assert torch.equal(stored[~stored.isnan()], expected[~expected.isnan()])
        if nan:
            assert bool(stored.isnan().all())
        else:  # some values were out of float16's range, and rounding had work to do
            assert computed.abs().max() > 65504 and (stored.abs() == 65504).any() and not torch.equal(
                stored.float(), computed)


@needs_kernel
def test_each_block_step_output_is_the_same_whatever_the_batch_or_the_threads():
    """Every item is computed alone, by one thread per head: an item of a batch gets its values bit for bit."""
    block, kernel = _block(64, 4, bias=True), cpu_kernels.cpu_block_step()
    batch, past = 5, 12
    keys, values = _random_cache_contents(batch, block, past, seed=1)
    key_mask = torch.rand(batch, past + 1, generator=torch.Generator().manual_seed(1)) > 0.3
    key_mask[:, -1] = True
    hidden = torch.randn(batch, 1, 64, generator=torch.Generator().manual_seed(2))
    together = hidden.clone()
    with torch.no_grad():
        assert block.cpu_step(kernel, together, _cache(keys, values), key_mask)
        for item in range(batch):
            alone = hidden[item : item + 1].clone()
            items = slice(item, item + 1)
            assert block.cpu_step(kernel, alone, _cache(keys[items], values[items]), key_mask[items].clone())
            assert torch.equal(alone, together[items])
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one_thread = hidden.clone()
            assert block.cpu_step(kernel, one_thread, _cache(keys, values), key_mask)
        finally:
            torch.set_num_threads(threads)
    assert torch.equal(one_thread, together)


def _tanh_gelu(block):
    block.mlp.gelu = torch.nn.GELU(approximate="tanh")


class _LinearSubclass(torch.nn.Linear):
    pass


def _subclassed_linear(block):
    block.mlp.in_proj.__class__ = _LinearSubclass


def _transposed_weight(block):
    block.mlp.out_proj.weight = torch.nn.Parameter(block.mlp.out_proj.weight.detach().t().contiguous().t())


@needs_kernel
@pytest.mark.parametrize("change", [
    lambda block: block.train(),
    lambda block: block.mlp.dropout.train(),  # a dropout left in training mode alone
    lambda block: block.attn.out_proj.register_forward_hook(lambda *args: None),
    lambda block: block.register_forward_pre_hook(lambda *args: None),
    _tanh_gelu,
    _subclassed_linear,  # peft's and int8 layers are other types
    lambda block: block.double(),  # not float32: not the kernel's kind of tensor
    _transposed_weight,  # not the kernel's layout
])
def test_a_block_that_is_not_the_plain_one_is_left_to_pytorch(change):
    block, kernel = _block(32, 2, bias=True), cpu_kernels.cpu_block_step()
    keys, values = _random_cache_contents(1, block, 4, seed=0)
    change(block)
    dtype = block.attn.att_proj.weight.dtype
    cache, hidden = _cache(keys.to(dtype), values.to(dtype)), torch.randn(1, 1, 32, dtype=dtype)
    before = hidden.clone()
    with torch.no_grad():
        assert not block.cpu_step(kernel, hidden, cache, None)
    assert torch.equal(hidden, before) and cache.length == 4


@needs_kernel
def test_a_cache_the_step_cannot_write_in_place_is_left_to_pytorch():
    block, kernel = _block(32, 2, bias=False), cpu_kernels.cpu_block_step()
    keys, values = _random_cache_contents(2, block, 4, seed=0)
    hidden = torch.randn(2, 1, 32)
    with torch.no_grad():
        assert not block.cpu_step(kernel, hidden, _cache(keys, values, room=0), None)  # full: the block grows it
        assert not block.cpu_step(kernel, hidden[:1].clone(), _cache(keys, values), None)  # another batch size
        assert not block.cpu_step(kernel, hidden, _cache(keys, values), torch.ones(2, 4, dtype=torch.bool))  # short
        blind = torch.ones(2, 5, dtype=torch.bool)
        blind[1, -1] = False  # an item that does not see its new position: its softmax would divide by zero
        assert not block.cpu_step(kernel, hidden, _cache(keys, values), blind)
        with torch.inference_mode():
            assert not block.cpu_step(kernel, hidden.clone(), modeling.BarkHfKVCache(1), None)  # no buffers
        static = _cache(keys, values)
        static.start_static_steps()
        assert not block.cpu_step(kernel, hidden, static, None)
    with torch.inference_mode():
        made_inside = _cache(keys, values)
    with torch.no_grad():
        assert not block.cpu_step(kernel, hidden, made_inside, None)  # written in place, it would break its rule


@needs_kernel
def test_forward_takes_the_block_step_only_for_generation_steps(monkeypatch):
    """A stage's decoding steps, inside `generate` (`generation_kernels`), without autograd, of at most
    BLOCK_STEP_MAX_ITEMS items; not a prefill, not outside generation, not with the kernels switched off."""
    config = modeling.BarkHfSemanticConfig(hidden_size=32, num_heads=2, num_layers=2, block_size=64,
                                           input_vocab_size=50, output_vocab_size=50)
    model = modeling.BarkHfSemanticModel(config).eval()
    randomize_(model, 0)
    calls = []
    kernel = cpu_kernels.cpu_block_step()
    monkeypatch.setattr(modeling, "cpu_block_step", lambda: lambda *args: calls.append(args[0].shape) or kernel(*args))

    def logits(ids, batch_mask=None, grad=False):
        with torch.set_grad_enabled(grad):
            cache = modeling.BarkHfKVCache(2, max_length=8)  # as generation sizes it: room for the steps
            model(ids[:, :-1], cache=cache, attention_mask=None if batch_mask is None else batch_mask[:, :-1])
            return model(ids[:, -1:], cache=cache, attention_mask=batch_mask, use_cache=True).logits

    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    many = torch.randint(0, 50, (cpu_kernels.BLOCK_STEP_MAX_ITEMS, 6), generator=torch.Generator().manual_seed(1))
    expected, expected_many = logits(ids), logits(many)
    assert calls == []  # outside generation
    with modeling.generation_kernels():
        torch.testing.assert_close(logits(ids), expected, rtol=1e-5, atol=1e-5)
        assert calls == [(2, 1, 32)] * 2  # the step, not the prefill; each layer
        mask = torch.ones(2, 6, dtype=torch.long)
        mask[1, :2] = 0
        logits(ids, mask)
        assert len(calls) == 4
        logits(ids, grad=True)
        torch.testing.assert_close(logits(many), expected_many, rtol=1e-5, atol=1e-5)
        assert calls[4:] == [(cpu_kernels.BLOCK_STEP_MAX_ITEMS, 1, 32)] * 2  # more items than the products take
        logits(torch.randint(0, 50, (cpu_kernels.BLOCK_STEP_MAX_ITEMS + 1, 6)))
        assert len(calls) == 6
    monkeypatch.setenv(cpu_kernels.CPU_KERNELS_ENV_VAR, "0")
    with modeling.generation_kernels():
        logits(ids)
    assert len(calls) == 6


def _int8_block(block: modeling.BarkHfBlock, qconfig: str = "default_dynamic_qconfig") -> modeling.BarkHfBlock:
    with warnings.catch_warnings():  # torch.ao is marked deprecated
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(block), {torch.nn.Linear: getattr(torch.ao.quantization, qconfig)}, dtype=torch.qint8).eval()


@needs_kernel
@pytest.mark.parametrize("qconfig", ["default_dynamic_qconfig", "per_channel_dynamic_qconfig"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("width", "heads"), [(48, 4), (64, 2)])  # products of 6 to 32 tiles of columns
def test_the_block_step_reads_int8_layers_as_their_values_times_their_scales(qconfig, bias, width, heads):
    """`quantize_int8`'s layers: the step multiplies float32 inputs with the int8 weights, so it equals the block
    whose weights are the dequantised ones (activations are not quantised, unlike the int8 layers' own call)."""
    block = _block(width, heads, bias, seed=3)
    int8 = _int8_block(block, qconfig)
    dequantized = copy.deepcopy(block)
    for name in ("attn.att_proj", "attn.out_proj", "mlp.in_proj", "mlp.out_proj"):
        dequantized.get_submodule(name).weight.data = int8.get_submodule(name).weight().dequantize()
    keys, values = _random_cache_contents(2, block, 6, seed=4)
    cache, expected_cache = _cache(keys, values), _cache(keys, values)
    hidden = torch.randn(2, 1, width, generator=torch.Generator().manual_seed(5))
    stepped = hidden.clone()
    with torch.no_grad():
        expected = dequantized(hidden, cache=expected_cache)
        assert int8.cpu_step(cpu_kernels.cpu_block_step(), stepped, cache, None)
    torch.testing.assert_close(stepped, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(cache[0], expected_cache[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.equal(dequantized.mlp.in_proj.weight, block.mlp.in_proj.weight)  # int8 rounding: not a no-op


@needs_kernel
def test_an_int8_block_whose_width_the_tiles_do_not_divide_is_left_to_pytorch():
    """The kernel reads int8 weights in tiles of INT8_TILE rows and columns; another width keeps torch's layers."""
    block = _int8_block(_block(36, 4, True, seed=6))
    keys, values = _random_cache_contents(1, block, 3, seed=7)
    cache = _cache(keys, values)
    with torch.no_grad():
        assert not block.cpu_step(cpu_kernels.cpu_block_step(), torch.randn(1, 1, 36), cache, None)
    assert cache.length == 3


def test_int8_layers_are_unpacked_once_and_again_only_after_they_get_new_weights(monkeypatch):
    """Unpacking and tiling took about 0.6 s per bark-small stage at every `generate`; a layer's tiles are kept
    for as long as it holds the same packed weights, and made again from the new ones after `set_weight_bias`."""
    block = _int8_block(_block(48, 4, True, seed=11))
    unpacked = []
    weight_bias = torch.ao.nn.quantized.dynamic.Linear._weight_bias
    monkeypatch.setattr(torch.ao.nn.quantized.dynamic.Linear, "_weight_bias",
                        lambda layer: unpacked.append(layer) or weight_bias(layer))
    first = block._prepared_for_cpu_steps()
    assert len(unpacked) == 4
    second = block._prepared_for_cpu_steps()
    assert len(unpacked) == 4 and second.weights.att_proj_weight is first.weights.att_proj_weight
    layer = block.mlp.in_proj
    weight, bias = weight_bias(layer)
    new_weight = torch.quantize_per_tensor(torch.randn(weight.shape), 0.05, 0, torch.qint8)
    layer.set_weight_bias(new_weight, bias)
    third = block._prepared_for_cpu_steps()
    assert unpacked[4:] == [layer]
    assert torch.equal(third.weights.in_proj_weight, cpu_kernels.int8_tiles(new_weight.int_repr()))
    assert torch.equal(third.scales[2], torch.full(weight.shape[:1], 0.05))
    assert third.weights.att_proj_weight is first.weights.att_proj_weight


def test_prepare_block_takes_int8_weights_in_tiles_as_they_are():
    width, heads, eps = 16, 2, (1e-5, 1e-5)
    generator = torch.Generator().manual_seed(12)
    tensors = {name: torch.randn(shape, generator=generator)
               for name, shape in zip(cpu_kernels.BlockWeights._fields, cpu_kernels._block_shapes(width), strict=True)}
    for name in cpu_kernels._PRODUCT_WEIGHTS:
        tensors[name] = torch.randint(-127, 128, tensors[name].shape, dtype=torch.int8, generator=generator)
    scales = tuple(torch.rand(tensors[name].shape[0], generator=generator) for name in cpu_kernels._PRODUCT_WEIGHTS)
    from_rows = cpu_kernels.prepare_block(cpu_kernels.BlockWeights(**tensors), heads, eps, scales)
    tiles = cpu_kernels.BlockWeights(**{**tensors, **{name: cpu_kernels.int8_tiles(tensors[name])
                                                      for name in cpu_kernels._PRODUCT_WEIGHTS}})
    from_tiles = cpu_kernels.prepare_block(tiles, heads, eps, scales)
    assert from_rows is not None and from_tiles is not None and from_tiles.width == width
    for prepared, given in zip(from_tiles.weights, tiles, strict=True):
        assert prepared is given  # taken as they are, not copied
    for a, b in zip(from_tiles.weights, from_rows.weights, strict=True):
        assert torch.equal(a, b)
    # Tiles of another shape, or scales for the tiles' rather than the weight's rows, are refused.
    wrong = tiles._replace(mlp_out_weight=cpu_kernels.int8_tiles(torch.zeros(width, width, dtype=torch.int8)))
    assert cpu_kernels.prepare_block(wrong, heads, eps, scales) is None
    assert cpu_kernels.prepare_block(tiles, heads, eps, (scales[0][:6], *scales[1:])) is None
