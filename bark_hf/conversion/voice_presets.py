"""Read Suno's original voice presets (`.npz` files) for conversion to the processor's layout."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..processing_bark_hf import read_voice_preset_file


def read_original_presets(folder: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
    """Every `*.npz` under `folder`, validated, named by its relative path without `.npz`.

    Names use `/` on every platform (`v2/en_speaker_1`), the form the original and transformers
    use to refer to presets, so they can be passed to `BarkHfProcessor.add_voice_preset` as is.
    """
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"No folder at {os.fspath(folder)!r}; pass the folder that holds the .npz presets.")
    presets = {}
    for path in sorted(root.rglob("*.npz")):
        if path.is_file():
            presets[path.relative_to(root).with_suffix("").as_posix()] = read_voice_preset_file(path)
    if not presets:
        raise ValueError(f"No .npz voice presets under {os.fspath(folder)!r}; pass the folder of Bark's presets.")
    return presets
