"""The package's build settings."""

from __future__ import annotations

import re
from pathlib import Path

from packaging.version import Version
from transformers.utils.import_utils import ACCELERATE_MIN_VERSION

PYPROJECT = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8")


def test_the_build_requires_a_setuptools_that_reads_the_license_expression():
    """`license = "MIT"` (PEP 639) needs setuptools 77; the declared floor, 68, refused to build ("`project.license`
    must be valid exactly by one definition"). A regex, not tomllib, which Python 3.10 lacks."""
    assert re.search(r'^license = "MIT"$', PYPROJECT, re.MULTILINE)
    floor = re.search(r'"setuptools>=(\d+)', PYPROJECT)
    assert floor is not None and int(floor.group(1)) >= 77


def test_the_accelerate_floor_has_what_device_maps_use():
    """Device maps need accelerate 1.1: `has_offloaded_params` (imported by `_ready_for_device_map`) came in 1.1.0,
    and transformers refuses a device_map with an older accelerate. The floor was 1.0."""
    floor = re.search(r'"accelerate>=([\d.]+)"', PYPROJECT)
    assert floor is not None and Version(floor.group(1)) >= Version(ACCELERATE_MIN_VERSION)
