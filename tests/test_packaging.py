"""The package's build settings."""

from __future__ import annotations

import re
from pathlib import Path

PYPROJECT = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8")


def test_the_build_requires_a_setuptools_that_reads_the_license_expression():
    """`license = "MIT"` (PEP 639) needs setuptools 77; the declared floor, 68, refused to build ("`project.license`
    must be valid exactly by one definition"). A regex, not tomllib, which Python 3.10 lacks."""
    assert re.search(r'^license = "MIT"$', PYPROJECT, re.MULTILINE)
    floor = re.search(r'"setuptools>=(\d+)', PYPROJECT)
    assert floor is not None and int(floor.group(1)) >= 77
