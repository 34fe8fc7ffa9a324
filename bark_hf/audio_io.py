"""Writing audio files atomically: a temporary file in the target folder, then a rename."""

from __future__ import annotations

import io
import os
import wave
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .atomic import atomic_path, check_replaceable, check_writable_folder, link_target
from .checks import is_number

# Names that promise another format than the WAV data written (any other name is taken as given).
_OTHER_AUDIO_SUFFIXES = (".mp3", ".flac", ".ogg", ".oga", ".opus", ".m4a", ".mp4", ".aac", ".aif", ".aiff", ".wma",
                         ".webm")


def check_output_path(path: str | os.PathLike, overwrite: bool = False,
                      inputs: Sequence[str | os.PathLike | None] = (), overwrite_fix: str = "pass --overwrite") -> Path:
    """Fail early, before any generation, on an output path that cannot be written or that names one of `inputs`
    (the text file or voice preset the command reads: `--overwrite` would replace it with audio).
    A symlink is written through: the file it points to is the output, and the link stays.
    `overwrite_fix` is how the caller's user asks to replace a file (a flag of the commands, an argument in Python)."""
    if not str(path).strip():
        raise ValueError("The output path is empty; give a file name such as out.wav.")
    if str(path).endswith(("/", os.sep)):  # Path() would drop the slash and write a file of the folder's name
        raise IsADirectoryError(f"{path} names a folder; give a file path such as {Path(path) / 'out.wav'}.")
    path = link_target(path)
    if any(source is not None and path.resolve() == Path(source).resolve() for source in inputs):
        raise ValueError(f"{path} is also an input of this command, which writing the audio would destroy; "
                         "choose another output path.")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file path such as {path / 'out.wav'}.")
    check_replaceable(path)
    if path.suffix.lower() in _OTHER_AUDIO_SUFFIXES:
        raise ValueError(f"{path}: bark-hf writes WAV files only; give the output a .wav name.")
    if path.parent.exists() and not path.parent.is_dir():
        raise NotADirectoryError(f"{path.parent} is a file, not a folder, so {path} cannot be written there; "
                                 "choose another output path.")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"The folder {path.parent} does not exist; create it or choose another output path.")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; {overwrite_fix} to replace it.")
    check_writable_folder(path)
    return path


def wav_bytes(audio: np.ndarray, sample_rate: int) -> bytes:
    """Mono float audio in [-1, 1] as the bytes of a 16-bit PCM WAV file."""
    samples = np.clip(np.asarray(audio, dtype=np.float32).reshape(-1), -1.0, 1.0)
    pcm = (samples * 32767.0).round().astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(sample_rate)
        wav.writeframes(pcm.tobytes())
    return buffer.getvalue()


def write_wav(path: str | os.PathLike, audio: np.ndarray, sample_rate: int, overwrite: bool = False) -> Path:
    """Write mono float audio in [-1, 1] as 16-bit PCM WAV; never leaves a partial file."""
    if not is_number(sample_rate):
        # scipy.io.wavfile.write, which Suno's README uses, takes (path, rate, data): the rate comes first there
        fix = ("the audio comes before the rate here: write_wav(path, audio, sample_rate), not scipy's "
               "write(path, rate, data)") if is_number(audio) else "pass the rate in Hz, e.g. SAMPLE_RATE"
        raise TypeError(f"sample_rate must be a number of Hz; got {type(sample_rate).__name__}: {fix}.")
    if not sample_rate > 0:
        raise ValueError(f"sample_rate must be > 0 Hz; got {sample_rate!r}.")
    path = check_output_path(path, overwrite, overwrite_fix="pass overwrite=True")
    data = wav_bytes(audio, sample_rate)
    with atomic_path(path, replace=overwrite) as temporary, open(temporary, "wb") as file:
        file.write(data)
    return path
