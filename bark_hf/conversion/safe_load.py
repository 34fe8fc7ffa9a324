"""Reading `.pt` files without ever running the code a pickle can carry."""

from __future__ import annotations

import contextlib
import os
import pickle
import re
from typing import Any

import numpy as np
import torch


def _numpy_scalar_globals() -> contextlib.AbstractContextManager:
    """Allow the numpy scalars (`best_val_loss`) that Suno's released checkpoints carry: plain numbers, no code.

    The files were pickled under numpy 1 (`numpy.core.multiarray.scalar`); numpy 2 names the same function
    `numpy._core.multiarray.scalar`, so both names are listed.
    """
    scalar = np.float64(0).__reduce__()[0]
    codes = "?" + np.typecodes["AllInteger"] + np.typecodes["AllFloat"]
    dtype_classes = {type(np.dtype(code)) for code in codes}
    names = [(scalar, f"{module}.multiarray.scalar") for module in ("numpy.core", "numpy._core")]
    return torch.serialization.safe_globals([*names, np.dtype, *dtype_classes])


def load_torch_file(path: str | os.PathLike) -> Any:
    """`torch.load(path, weights_only=True)` on CPU, with each failure turned into a clear `ValueError`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist.")
    try:
        with _numpy_scalar_globals():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch words it "Unsupported global: GLOBAL x", or "unsupported GLOBAL x whose module is blocked" for os,
        # sys, ... (the usual payloads), and names the allowlist for objects it cannot build.
        if re.search(r"unsupported global|allowlisted|unrecognized function", str(error), re.IGNORECASE):
            raise ValueError(
                f"{path} holds pickled Python objects besides tensors; bark-hf refuses to unpickle arbitrary "
                "objects (that can run code). Use the original file, saved with `torch.save` of tensors only."
            ) from None
        raise ValueError(f"{path} could not be read as a PyTorch file: it is corrupt or not a checkpoint.") from None
    except PermissionError:
        raise
    except Exception as error:  # RuntimeError, EOFError, OSError; garbage can also give IndexError, KeyError, ...
        raise ValueError(
            f"{path} could not be read as a PyTorch file; it is truncated or corrupt ({type(error).__name__}: {error})."
        ) from None
