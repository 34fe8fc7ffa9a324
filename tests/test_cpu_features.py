"""Reading the CPU's bfloat16 support from /proc/cpuinfo."""

import pytest

from bark_hf import cpu_features


@pytest.fixture
def cpuinfo(tmp_path, monkeypatch):
    """A stand-in /proc/cpuinfo at the returned path (missing until written); the cached answer is dropped."""
    path = tmp_path / "cpuinfo"
    monkeypatch.setattr(cpu_features, "CPUINFO", path)
    cpu_features.cpu_has_native_bfloat16.cache_clear()
    yield path
    cpu_features.cpu_has_native_bfloat16.cache_clear()


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
