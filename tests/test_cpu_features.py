"""Reading the CPU's bfloat16 support and vendor from /proc/cpuinfo."""

import pytest
import torch

from bark_hf import cpu_features


@pytest.fixture
def cpuinfo(tmp_path, monkeypatch):
    """A stand-in /proc/cpuinfo at the returned path (missing until written); the cached answer is dropped."""
    path = tmp_path / "cpuinfo"
    monkeypatch.setattr(cpu_features, "CPUINFO", path)
    _forget_cpuinfo()
    yield path
    _forget_cpuinfo()


def _forget_cpuinfo():
    for reader in (cpu_features.cpu_flags, cpu_features.cpu_has_native_bfloat16, cpu_features.cpu_vendor):
        reader.cache_clear()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni\n", False),
        ("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_tile\n", True),
        ("processor\t: 0\nflags\t\t: fpu amx_bf16 amx_tile\n", True),
        ("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n", True),  # Arm
        ("processor\t: 0\nFeatures\t: fp asimd crc32\n", False),
        ("processor\t: 0\n", None),  # no flags line: unknown
    ],
)
def test_native_bfloat16_is_read_from_the_flags(cpuinfo, text, expected):
    cpuinfo.write_text(text, encoding="utf-8")
    assert cpu_features.cpu_has_native_bfloat16() is expected


def test_an_unreadable_cpuinfo_means_unknown(cpuinfo):
    assert cpu_features.cpu_has_native_bfloat16() is None


needs_onednn = pytest.mark.skipif(not cpu_features._onednn_built(), reason="this PyTorch has no oneDNN")


@needs_onednn
@pytest.mark.parametrize(
    ("machine", "vendor", "expected"),
    [
        ("x86_64", "GenuineIntel", False),
        ("x86_64", "AuthenticAMD", True),
        ("x86_64", "HygonGenuine", True),
        ("x86_64", None, False),
        ("s390x", "IBM/S390", False),  # has a vendor_id line, and no MKL to avoid
    ],
)
def test_onednn_linear_is_the_default_on_x86_cpus_not_made_by_intel(cpuinfo, monkeypatch, machine, vendor, expected):
    monkeypatch.delenv(cpu_features.ONEDNN_LINEAR_ENV_VAR, raising=False)
    monkeypatch.setattr(cpu_features.platform, "machine", lambda: machine)
    cpuinfo.write_text("processor\t: 0\n" + (f"vendor_id\t: {vendor}\n" if vendor else "") + "flags\t\t: avx2\n")
    assert cpu_features.cpu_vendor() == vendor
    assert cpu_features.use_onednn_linear() is expected


@needs_onednn
@pytest.mark.parametrize(("vendor", "value", "expected"), [("GenuineIntel", "1", True), ("AuthenticAMD", "off", False)])
def test_the_switch_overrides_the_vendor(cpuinfo, monkeypatch, vendor, value, expected):
    monkeypatch.setattr(cpu_features.platform, "machine", lambda: "x86_64")
    cpuinfo.write_text(f"processor\t: 0\nvendor_id\t: {vendor}\n")
    monkeypatch.setenv(cpu_features.ONEDNN_LINEAR_ENV_VAR, value)
    assert cpu_features.use_onednn_linear() is expected
    with torch.backends.mkldnn.flags(enabled=False):  # PyTorch's own switch wins
        assert cpu_features.use_onednn_linear() is False


def test_an_unknown_switch_value_is_named(monkeypatch):
    monkeypatch.setenv(cpu_features.ONEDNN_LINEAR_ENV_VAR, "fast")
    with pytest.raises(ValueError, match="BARK_HF_ONEDNN_LINEAR is 'fast'"):
        cpu_features.use_onednn_linear()
