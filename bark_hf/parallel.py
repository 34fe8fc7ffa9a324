"""A long script over many processes: `accelerate launch -m bark_hf.parallel --input script.txt -o out.wav`.

The script is cut into chunks (`longform.chunk_text`), and the chunks are grouped in order into
batches of `--batch-size`. The batches are spread over the processes (accelerate's
`split_between_processes`). Each batch is generated with its own seed, derived from `--seed` and
the index of its first chunk, so the audio does not depend on how many processes share the work.
Process 0 gathers the chunks, puts them back in numeric order, joins them with `--silence` seconds
of silence, optionally normalises the integrated loudness to `--loudness` LUFS, and writes one WAV.

The voice stays the same across chunks, as in `longform.generate_long_form(history="first")`: every
chunk is conditioned on `--voice`, or without one on the first chunk's own generation (process 0 makes
it before the others start). Chaining each chunk to the one before would leave nothing to spread.

    python -m bark_hf.parallel --input script.txt -o out.wav                    # one process
    accelerate launch --multi_gpu --num_processes 4 -m bark_hf.parallel ...     # four GPUs
    torchrun --nproc_per_node 2 -m bark_hf.parallel --cpu ...                   # two CPU processes

See docs/devices.md, also for several machines.
"""

from __future__ import annotations

import argparse
import math
import os
import secrets
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from transformers.utils import logging

from .audio_io import check_output_path, write_wav
from .checks import checked_whole_number
from .cli import DTYPES, quiet_output
from .loading import DEFAULT_MODEL, load_bark
from .longform import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_SILENCE_S,
    checked_silence,
    chunk_text,
    generate_long_form,
    join_with_silence,
)
from .processing_bark_hf import gives_tokens, validate_voice_preset

logger = logging.get_logger(__name__)

LOUDNESS_EXTRA = "loudness"
"""The optional extra that installs pyloudnorm for `--loudness`."""
USER_ERRORS = (ValueError, TypeError, OSError, ImportError)
"""Errors that end the command with one line on stderr (exit status 1), not a traceback."""
LOUDNESS_RANGE_LUFS = (-70.0, 0.0)
"""`--loudness` targets: below -70 LUFS BS.1770's gate measures audio as silence; above 0 speech clips."""

T = TypeVar("T")


@dataclass
class Job:
    """What process 0 decides and every process needs."""

    chunks: list[str]
    voice: dict[str, np.ndarray] | None  # the preset's arrays, or None until the first chunk gives one
    seed: int


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bark_hf.parallel",
        description="Speak a long script: chunks spread over the processes of `accelerate launch`, one WAV out.",
    )
    parser.add_argument("--input", required=True, type=os.path.expanduser, help="the script, a UTF-8 text file")
    parser.add_argument("-o", "--output", required=True, type=os.path.expanduser,
                        help="WAV file to write (24 kHz mono, 16-bit)")
    parser.add_argument("--voice", help="voice preset: a name such as v2/en_speaker_1, or a path to an .npz")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"model folder or Hub id (default {DEFAULT_MODEL}); 'tiny-random' for a test model")
    parser.add_argument("--dtype", choices=[dtype for dtype in DTYPES if dtype != "int8"], default="float32",
                        help="weights' precision for the GPT stages; the codec stays float32")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even where a GPU is present")
    parser.add_argument("--seed", type=int, help="random seed; the same seed gives the same file for any process count")
    parser.add_argument("--loudness", type=float, metavar="LUFS",
                        help=f"normalise the integrated loudness to this target, e.g. -16 "
                             f"(needs bark-hf[{LOUDNESS_EXTRA}])")
    parser.add_argument("--silence", type=float, default=DEFAULT_SILENCE_S,
                        help=f"seconds of silence between chunks (default {DEFAULT_SILENCE_S})")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help=f"chunks per generation (default {DEFAULT_BATCH_SIZE}); part of what the seed fixes")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or messages")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return parser


def chunk_seed(seed: int, first_chunk: int) -> int:
    """The seed of the generation that starts at chunk `first_chunk`: independent streams per chunk index."""
    return int(np.random.SeedSequence([seed, first_chunk]).generate_state(1)[0])


def normalize_loudness(audio: np.ndarray, sample_rate: int, target_lufs: float) -> np.ndarray:
    """`audio` scaled to an integrated loudness (ITU-R BS.1770, gated) of `target_lufs`.

    Silent audio, or audio shorter than the 0.4 s measuring block, is returned unchanged with a warning.
    """
    pyloudnorm = _import_pyloudnorm()
    meter = pyloudnorm.Meter(sample_rate)
    if audio.shape[0] < meter.block_size * sample_rate:
        logger.warning(f"The audio is shorter than {meter.block_size} s; its loudness cannot be measured, "
                       "so it is left as it is.")
        return audio
    loudness = meter.integrated_loudness(audio.astype(np.float64))
    if not np.isfinite(loudness):
        logger.warning("The audio is silent; there is no loudness to normalise.")
        return audio
    scaled = (audio * 10.0 ** ((target_lufs - loudness) / 20.0)).astype(np.float32)
    peak = float(np.abs(scaled).max())
    if peak > 1.0:
        logger.warning(f"At {target_lufs} LUFS the peak is {peak:.2f} (above full scale) and will clip; "
                       "choose a lower --loudness target.")
    return scaled


def _import_pyloudnorm() -> Any:
    try:
        import pyloudnorm
    except ImportError:
        raise ImportError(
            f"--loudness needs pyloudnorm, an optional extra: pip install 'bark-hf[{LOUDNESS_EXTRA}]'."
        ) from None
    return pyloudnorm


def read_script(path: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # a BOM is no part of the words
    except FileNotFoundError:
        raise FileNotFoundError(f"The script {path} does not exist.") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"The script {path} is a folder; give the path of a text file.") from None
    except UnicodeDecodeError:
        raise ValueError(f"The script {path} is not UTF-8 text.") from None
    if not text.strip():
        raise ValueError(f"The script {path} is empty; give it the words to speak.")
    return text


def _speak(model: Any, processor: Any, chunks: list[str], voice: dict[str, np.ndarray] | None,
           seed: int) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """Audio of each chunk (one batch, one seed) and the first chunk's full generation."""
    output = generate_long_form(model, processor, chunks=chunks, voice_preset=voice, history="first",
                                batch_size=len(chunks), seed=seed, silence_s=0.0, show_progress=False)
    ends = np.cumsum(output.chunk_lengths)
    return np.split(output.audio, ends[:-1]), output.generations[0]


def generate_chunks(model: Any, processor: Any, job: Job, batch_size: int, show_progress: bool = False
                    ) -> list[tuple[int, np.ndarray]]:
    """This process's share of the chunks as `(chunk index, audio)` pairs; all of them on one process.

    Without a voice, process 0 first generates chunks alone until one gives a usable voice
    history, and shares it; the rest are batched and split between the processes.
    """
    from accelerate import PartialState

    state = PartialState()
    results: list[tuple[int, np.ndarray]] = []  # process 0 keeps the chunks it speaks to find a voice
    first, voice = 0, job.voice
    if voice is None:
        first, voice = on_main_process(state, lambda: _find_voice(model, processor, job, results))

    def speak_my_batches() -> list[tuple[int, np.ndarray]]:
        spoken = []
        starts = list(range(first, len(job.chunks), batch_size))
        with state.split_between_processes(starts) as my_starts:
            show = show_progress and state.is_main_process
            for start in logging.tqdm(my_starts, desc="batches", disable=not show):
                audios, _ = _speak(model, processor, job.chunks[start : start + batch_size], voice,
                                   chunk_seed(job.seed, start))
                spoken.extend(zip(range(start, start + len(audios)), audios, strict=True))
        return spoken

    return results + on_every_process(speak_my_batches)


def _find_voice(model: Any, processor: Any, job: Job, results: list[tuple[int, np.ndarray]]
                ) -> tuple[int, dict[str, np.ndarray] | None]:
    """Speak chunks alone from the first until one gives a usable voice history; append their audio to
    `results`. Returns the next chunk's index and the voice (None if no chunk gave one)."""
    first, voice = 0, None
    while voice is None and first < len(job.chunks):
        (audio,), generation = _speak(model, processor, job.chunks[first : first + 1], None,
                                      chunk_seed(job.seed, first))
        results.append((first, audio))
        first += 1
        try:
            voice = validate_voice_preset(generation)
        except ValueError:  # too short to be a voice (generate_long_form has warned): try the next
            voice = None
    return first, voice


def join_chunks(results: list[tuple[int, np.ndarray]], n_chunks: int, silence_samples: int) -> np.ndarray:
    """The chunks' audio in chunk order (numeric, whatever order they arrived in), silence between them."""
    ordered = sorted(results, key=lambda result: result[0])
    indices = [index for index, _ in ordered]
    if indices != list(range(n_chunks)):
        raise RuntimeError(f"Gathered chunks {indices}, expected 0..{n_chunks - 1} once each.")
    return join_with_silence([audio for _, audio in ordered], silence_samples)


def run(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    state = PartialState(cpu=args.cpu or not torch.cuda.is_available())
    with quiet_output(args.quiet or not state.is_main_process):
        return _run(args, state)


def on_main_process(state: Any, make: Callable[[], T]) -> T:
    """`make()` run on process 0, its result given to every process.

    An error there is raised on process 0 (one line for a user error, a traceback for any other) and
    ends the other processes with exit status 1: left waiting in the next collective, they would fail
    with a traceback of their own ("Connection reset by peer") that hides process 0's.
    """
    from accelerate.utils import broadcast_object_list

    shared: list[Any] = [None]
    error = None
    if state.is_main_process:
        try:
            shared = [(True, make())]
        except Exception as caught:
            error, shared = caught, [(False, None)]
    broadcast_object_list(shared)
    if error is not None:
        raise error
    succeeded, value = shared[0]
    if not succeeded:
        raise SystemExit(1)  # process 0 reports the error
    return value


def on_every_process(make: Callable[[], T]) -> T:
    """`make()` run on every process, which then agree on whether all of them succeeded.

    A process whose `make()` failed raises its error (one line for a user error, a traceback for any
    other); the others end with exit status 1. Without the agreement they would wait for it in the
    next collective and fail with a traceback of their own (a model missing on a second machine, say).
    """
    from accelerate.utils import gather_object

    value, error = None, None
    try:
        value = make()
    except Exception as caught:
        error = caught
    failed = gather_object([error is not None])  # one flag per process, on every process
    if error is not None:
        raise error
    if any(failed):
        raise SystemExit(1)  # the process that failed reports its error
    return value


def _run(args: argparse.Namespace, state: Any) -> int:
    from accelerate.utils import gather_object

    text = on_main_process(state, lambda: _script_and_output(args))
    model, processor = on_every_process(lambda: load_bark(args.model, device=state.device,
                                                         dtype=getattr(torch, args.dtype), voice_preset=args.voice))
    job = on_main_process(state, lambda: _job(args, text, processor))
    if state.is_main_process and not args.quiet:
        print(f"{len(job.chunks)} chunks over {state.num_processes} process(es)", file=sys.stderr)

    results = generate_chunks(model, processor, job, args.batch_size, show_progress=not args.quiet)
    results = gather_object(results)
    if not state.is_main_process:
        return 0
    audio = join_chunks(results, len(job.chunks), round(args.silence * model.sampling_rate))
    if args.loudness is not None:
        audio = normalize_loudness(audio, model.sampling_rate, args.loudness)
    path = write_wav(args.output, audio, model.sampling_rate, overwrite=args.overwrite)
    if not args.quiet:
        print(f"Wrote {path} ({audio.shape[0] / model.sampling_rate:.2f} s, {len(job.chunks)} chunks)")
    return 0


def _check_options(args: argparse.Namespace) -> None:
    """Run on process 0 only, so a bad option is one error line, not one per process."""
    checked_whole_number(args.batch_size, "--batch-size")
    checked_silence(args.silence, "--silence")
    if args.seed is not None:  # SeedSequence takes no negative seeds
        checked_whole_number(args.seed, "--seed", minimum=0)
    if args.loudness is not None:
        if not math.isfinite(args.loudness):
            raise ValueError(f"--loudness must be finite: a target in LUFS, such as -16; got {args.loudness}.")
        if not LOUDNESS_RANGE_LUFS[0] <= args.loudness <= LOUDNESS_RANGE_LUFS[1]:
            low, high = LOUDNESS_RANGE_LUFS
            raise ValueError(f"--loudness must be between {low:g} and {high:g} LUFS, such as -16; got {args.loudness}.")
        _import_pyloudnorm()  # before any generation


def _script_and_output(args: argparse.Namespace) -> str:
    """The script's text, once the output path is known to be writable."""
    _check_options(args)
    text = read_script(args.input)
    check_output_path(args.output, args.overwrite, inputs=(args.input, args.voice))
    return text


def _job(args: argparse.Namespace, text: str, processor: Any) -> Job:
    voice = None if args.voice is None else processor.load_voice_preset(args.voice)
    seed = secrets.randbits(32) if args.seed is None else args.seed
    chunks = chunk_text(text, processor.tokenizer)
    for chunk in chunks:  # found here, not in generation, where the other processes would be left waiting
        if not gives_tokens(processor.tokenizer, chunk):
            raise ValueError(f"The script {args.input} has no words the model can read in {chunk!r}; "
                             "give it words to speak.")
    return Job(chunks=chunks, voice=voice, seed=seed)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except USER_ERRORS as error:
        print(f"bark_hf.parallel: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
