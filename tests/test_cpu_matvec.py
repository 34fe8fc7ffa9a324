"""bark-hf's CPU matrix-vector kernel: its values, its batch and thread invariance, where it runs, its build."""

import logging
import os

import pytest
import torch
import torch.nn.functional as F
from transformers.utils import logging as hf_logging

import bark_hf.modeling_bark_hf as modeling
from bark_hf import cpu_matvec

needs_kernel = pytest.mark.skipif(isinstance(cpu_matvec._load(), cpu_matvec.MatvecUnavailable),
                                  reason="bark-hf's CPU matrix-vector kernel cannot be built here")


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """An empty build cache at the returned path, the loaded kernel forgotten (and restored afterwards)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cpu_matvec._load.cache_clear()
    hf_logging.get_logger(cpu_matvec.__name__).warning_once.cache_clear()
    yield tmp_path / "bark_hf"
    cpu_matvec._load.cache_clear()


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
    output = cpu_matvec.cpu_matvec()(inputs, weight, bias_values)
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
        cpu_matvec.cpu_matvec()(inputs, weight, bias)


@needs_kernel
def test_each_output_is_the_same_whatever_the_batch_or_the_threads():
    """Every output is one thread's sum in one order: an item of a batch gets its values alone, bit for bit."""
    kernel = cpu_matvec.cpu_matvec()
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
    monkeypatch.setenv(cpu_matvec.MATVEC_ENV_VAR, "1")
    calls = []
    kernel = cpu_matvec.cpu_matvec()
    monkeypatch.setattr(modeling, "cpu_matvec", lambda: lambda *args: calls.append(args[0].shape) or kernel(*args))
    layer = torch.nn.Linear(16, 24)
    few, many = torch.randn(2, 1, 16), torch.randn(cpu_matvec.MATVEC_MAX_ROWS + 1, 16)
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
    monkeypatch.setenv(cpu_matvec.MATVEC_ENV_VAR, "0")
    with torch.no_grad(), modeling.generation_kernels():
        modeling.project(layer, few)
    assert len(calls) == 3


def test_an_unknown_switch_value_is_named_at_generate(monkeypatch):
    monkeypatch.setenv(cpu_matvec.MATVEC_ENV_VAR, "fast")
    with pytest.raises(ValueError, match="BARK_HF_CPU_MATVEC is 'fast'"), modeling.generation_kernels():
        pass


@needs_kernel
def test_the_build_is_cached_and_leaves_no_partial_file(fresh_build):
    assert cpu_matvec.cpu_matvec() is not None
    (library,) = fresh_build.iterdir()
    assert library.name.startswith("matvec-") and library.suffix == ".so"
    built = library.stat().st_mtime_ns
    cpu_matvec._load.cache_clear()
    assert cpu_matvec.cpu_matvec() is not None
    assert [path.name for path in fresh_build.iterdir()] == [library.name]
    assert library.stat().st_mtime_ns == built


@pytest.mark.parametrize("compiler", ["/nonexistent/cc", "false"])  # not there; there, and failing
def test_a_failed_build_falls_back_with_one_warning_or_fails_when_asked_for(fresh_build, monkeypatch, caplog, compiler):
    reason = "building it failed"
    monkeypatch.setattr(cpu_matvec, "_compiled", _failing_compiled(compiler))
    monkeypatch.delenv(cpu_matvec.MATVEC_ENV_VAR, raising=False)
    with caplog.at_level(logging.WARNING, logger=cpu_matvec.__name__):
        assert cpu_matvec.cpu_matvec() is None
        assert cpu_matvec.cpu_matvec() is None
    warnings = [record.getMessage() for record in caplog.records if record.name == cpu_matvec.__name__]
    assert len(warnings) == 1 and reason in warnings[0] and "BARK_HF_CPU_MATVEC=0" in warnings[0]
    monkeypatch.setenv(cpu_matvec.MATVEC_ENV_VAR, "1")
    with pytest.raises(cpu_matvec.MatvecUnavailable, match=f"BARK_HF_CPU_MATVEC is 1, but {reason}"):
        cpu_matvec.cpu_matvec()
    if fresh_build.exists():
        assert list(fresh_build.iterdir()) == []  # no partial library left behind


def _failing_compiled(compiler: str):
    """`_compiled` with `compiler`, whatever this machine's CPU: the build itself fails."""
    def compiled():
        return cpu_matvec._build([compiler])
    return compiled


def test_a_machine_without_a_compiler_is_named(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", "")
    monkeypatch.setenv("PATH", os.devnull)
    monkeypatch.setenv(cpu_matvec.MATVEC_ENV_VAR, "1")
    with pytest.raises(cpu_matvec.MatvecUnavailable, match="no C compiler|needs an x86|lacks|without OpenMP"):
        cpu_matvec.cpu_matvec()


def test_a_machine_that_cannot_have_it_gets_no_warning(fresh_build, monkeypatch, caplog):
    monkeypatch.setattr(cpu_matvec.platform, "machine", lambda: "aarch64")
    monkeypatch.delenv(cpu_matvec.MATVEC_ENV_VAR, raising=False)
    with caplog.at_level(logging.WARNING, logger=cpu_matvec.__name__):
        assert cpu_matvec.cpu_matvec() is None
    assert not [record for record in caplog.records if record.name == cpu_matvec.__name__]
    monkeypatch.setenv(cpu_matvec.MATVEC_ENV_VAR, "yes")
    with pytest.raises(cpu_matvec.MatvecUnavailable, match="is 1, but it needs an x86 CPU and Linux, not aarch64"):
        cpu_matvec.cpu_matvec()


def test_any_failure_of_the_build_is_a_fallback_not_an_error_in_generate(fresh_build, monkeypatch):
    monkeypatch.setattr(cpu_matvec, "SOURCE", fresh_build / "missing.c")
    monkeypatch.delenv(cpu_matvec.MATVEC_ENV_VAR, raising=False)
    reason = cpu_matvec._load()
    assert isinstance(reason, cpu_matvec.MatvecUnavailable) and "FileNotFoundError" in str(reason)


@needs_kernel
def test_a_second_openmp_runtime_is_refused(fresh_build, monkeypatch):
    """Linked against another OpenMP runtime than PyTorch's, the kernel's threads would compete with PyTorch's."""
    loaded = iter([{"/torch/lib/libgomp.so.1"}, {"/torch/lib/libgomp.so.1", "/usr/lib/libomp.so.5"}])
    monkeypatch.setattr(cpu_matvec, "_openmp_runtimes", lambda: next(loaded))
    with pytest.raises(cpu_matvec.MatvecUnavailable, match=r"second OpenMP runtime \(/usr/lib/libomp.so.5\)"):
        cpu_matvec._compiled()


@needs_kernel
def test_a_cached_library_that_others_may_write_is_not_loaded(fresh_build):
    assert cpu_matvec.cpu_matvec() is not None
    (library,) = fresh_build.iterdir()
    assert library.stat().st_mode & 0o777 == 0o755 & ~_umask()
    library.chmod(0o777)
    cpu_matvec._load.cache_clear()
    with pytest.raises(cpu_matvec.MatvecUnavailable, match="may be written by others"):
        cpu_matvec._compiled()


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@needs_kernel
def test_a_compiler_given_with_arguments(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", "env cc")  # as "ccache gcc" is given
    assert cpu_matvec.cpu_matvec() is not None


@needs_kernel
def test_strided_inputs_are_read_as_their_values():
    weight, inputs = torch.randn(24, 16), torch.randn(3, 32)[:, ::2]
    torch.testing.assert_close(cpu_matvec.cpu_matvec()(inputs, weight, None), F.linear(inputs, weight))
