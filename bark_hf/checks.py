"""Checks of the plain numbers and flags users pass (counts, seconds, temperatures, seeds), in one place.

Any real or integral number is accepted, numpy scalars included; booleans are not numbers here.
Each check returns the value as a Python number or raises a `ValueError` (`TypeError` for seeds)
that names the setting and what it takes.
"""

from __future__ import annotations

import math
import numbers
import os
import sys
from typing import Any

import numpy as np
import torch

_LARGEST_FLOAT = sys.float_info.max  # a larger int has no float
# The seeds torch.manual_seed accepts.
_SEED_RANGE = (-(2**63), 2**64 - 1)


def is_number(value: Any, kind: type = numbers.Real) -> bool:
    """Whether `value` is a number of `kind` (numpy scalars too), not a bool."""
    return isinstance(value, kind) and not isinstance(value, bool)


def _is_finite(value: numbers.Real) -> bool:
    return isinstance(value, numbers.Integral) or math.isfinite(value)  # isfinite overflows on huge ints


def checked_whole_number(value: Any, name: str, minimum: int = 1) -> int:
    """`value` as an int >= `minimum`."""
    if not is_number(value, numbers.Real) or not _is_finite(value) or int(value) != value or value < minimum:
        raise ValueError(f"{name} must be a whole number >= {minimum}; got {value!r}.")
    return int(value)


def checked_seconds(value: Any, name: str, allow_zero: bool = True) -> float:
    """`value` as a finite float, >= 0 (or > 0 with `allow_zero=False`)."""
    if not is_number(value, numbers.Real) or not _is_finite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number of seconds {'>=' if allow_zero else '>'} 0; got {value!r}.")
    return float(value)


def checked_positive_number(value: Any, name: str, hint: str = "") -> float:
    """`value` as a finite float > 0. Only an int can exceed the largest float: comparing a numpy float32 with it
    casts the bound to float32 and warns of an overflow."""
    too_large = isinstance(value, numbers.Integral) and value > _LARGEST_FLOAT
    if not is_number(value, numbers.Real) or not _is_finite(value) or value <= 0 or too_large:
        raise ValueError(f"{name} must be a finite number > 0{hint}; got {value!r}.")
    return float(value)


def checked_flag(value: Any, name: str, none_means: str | None = None) -> bool | None:
    """`value` as True or False (numpy bools too), or None where `none_means` says what None does."""
    if value is None and none_means is not None:
        return None
    if not isinstance(value, (bool, np.bool_)):
        allowed = f"True, False or None ({none_means})" if none_means is not None else "True or False"
        raise ValueError(f"{name} must be {allowed}, got {value!r}.")
    return bool(value)


_ON_WORDS = ("1", "true", "yes", "on")
_OFF_WORDS = ("0", "false", "no", "off")


def env_flag(name: str, default: bool) -> bool:
    """The on/off environment variable `name`: 1, true, yes or on; 0, false, no or off (any case); unset or empty:
    `default`. Any other value is refused, naming the variable: read as "not 1" (or "not 0"), `false` turned a
    switch on and `true` left one off, silently."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in _ON_WORDS or value in _OFF_WORDS:
        return value in _ON_WORDS
    raise ValueError(f"The environment variable {name} is {os.environ[name]!r}; set it to 1 (on) or 0 (off), "
                     "or unset it for the default.")


def checked_seed(value: Any, name: str = "seed") -> int | None:
    """`value` as an int that torch can seed with, or None; `name` is what the user wrote (`--seed` in the CLI)."""
    if value is None:
        return None
    if not is_number(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer or None; got {type(value).__name__}.")
    low, high = _SEED_RANGE
    if not low <= value <= high:
        raise ValueError(f"{name} must be within [{low}, {high}] (what torch can seed with); got {value}.")
    return int(value)


def checked_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str | None:
    """`dtype` with a name ("float16", as from_pretrained takes them) resolved, refused before any loading if
    it is no torch dtype or not floating-point. None and "auto" (the stored dtype) pass, as do other forms,
    which from_pretrained judges."""
    if not isinstance(dtype, (str, torch.dtype)) or dtype == "auto":
        return dtype
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"dtype {dtype!r} is not a torch dtype; use e.g. torch.float16 or 'bfloat16'.")
    if not resolved.is_floating_point:
        raise ValueError(f"dtype {dtype!r} is not a floating-point dtype; use e.g. torch.float16 or 'bfloat16'. For "
                         "int8 weights on the CPU, load in float32 and call quantize_int8() on the model.")
    return resolved


def checked_device(device: str | torch.device | int, name: str, fix: str) -> torch.device:
    """`device` as a torch device that can hold the model, checked before any loading or moving: a GPU this torch
    cannot use failed deep inside torch with an AssertionError or RuntimeError (after the load, where one came
    first). `name` is the argument's, `fix` says what to pass instead."""
    try:
        checked = torch.device(device)
        if checked.type == "meta":
            raise ValueError("the meta device holds no data")
        torch.empty(0, device=checked)
    except Exception as error:  # RuntimeError, AssertionError, ModuleNotFoundError, NotImplementedError, ...
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{name}={device!r} cannot hold the model here ({reason}); {fix}.") from None
    return checked
