"""The `bark-hf` command (also `python -m bark_hf`): say, voices, convert."""

from __future__ import annotations

import argparse
import codecs
import contextlib
import logging as stdlib_logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers.utils import logging

from .checks import checked_positive_number, checked_seed
from .conversion import convert_suno
from .generation_configuration_bark_hf import BarkHfCoarseGenerationConfig, BarkHfSemanticGenerationConfig
from .loading import DEFAULT_MODEL
from .longform import DEFAULT_HISTORY, DEFAULT_SILENCE_S, HISTORY_MODES, checked_silence
from .processing_bark_hf import has_visible_text

DTYPES = ("float32", "float16", "bfloat16", "int8")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bark-hf", description="Suno's Bark text-to-audio, Hugging Face native.")
    commands = parser.add_subparsers(dest="command", required=True)

    say = commands.add_parser("say", help="generate speech from text into a WAV file",
                              description="Generate speech from text into a 24 kHz mono WAV file. Text longer than "
                                          "one generation (~15 s) is split into sentences and joined.")
    say.add_argument("text", nargs="?", help="the text to speak; - (or nothing, with --file unset) reads stdin")
    # Expanded here as well as by shells: `-o=~/out.wav` and quoted paths reach us with the `~`.
    say.add_argument("-f", "--file", type=os.path.expanduser, help="read the text from this UTF-8 file")
    say.add_argument("-o", "--output", required=True, type=os.path.expanduser,
                     help="WAV file to write (24 kHz mono, 16-bit); - writes it to standard output")
    _add_model_arguments(say)
    say.add_argument("--voice", help="voice preset: a name such as v2/en_speaker_1, or a path to an .npz")
    say.add_argument("--seed", type=int, help="random seed, for a repeatable generation")
    say.add_argument("--text-temp", type=float, help="semantic stage temperature (default: the model's generation "
                     f"config, {BarkHfSemanticGenerationConfig.temperature} in Bark's)")
    say.add_argument("--waveform-temp", type=float, help="coarse stage temperature (default: the model's generation "
                     f"config, {BarkHfCoarseGenerationConfig.temperature} in Bark's)")
    say.add_argument("--long-form", choices=("auto", "on", "off"), default="auto",
                     help="split the text into sentences: auto (default) does so when it is too long for one go")
    say.add_argument("--history", choices=HISTORY_MODES, default=DEFAULT_HISTORY,
                     help="what long-form chunks are conditioned on: auto (default; the voice for every chunk, "
                          "batched, or without one each chunk continues the one before), first (without a voice, the "
                          "first chunk for every other, batched) or previous (each chunk continues the one before)")
    say.add_argument("--silence", type=float, default=DEFAULT_SILENCE_S,
                     help=f"seconds of silence between long-form chunks (default {DEFAULT_SILENCE_S})")
    say.add_argument("--quiet", action="store_true", help="no progress bars or messages")
    say.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    say.set_defaults(run=run_say)

    voices = commands.add_parser("voices", help="list the voice presets of a model")
    voices.add_argument("--model", default=DEFAULT_MODEL, help=f"model folder or Hub id (default {DEFAULT_MODEL})")
    voices.set_defaults(run=run_voices)

    convert = commands.add_parser("convert", help="convert Suno's original checkpoints into a bark-hf model folder",
                                  description=convert_suno.__doc__.split("\n\n")[0])
    convert_suno.add_arguments(convert)
    convert.set_defaults(run=convert_suno.run)
    return parser


def _add_model_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("--model", default=DEFAULT_MODEL,
                         help=f"model folder or Hub id (default {DEFAULT_MODEL}); 'tiny-random' builds an offline "
                              "random model whose audio is noise")
    command.add_argument("--device", default="auto", help="torch device: auto (default: cuda if present), cpu, cuda")
    command.add_argument("--dtype", choices=DTYPES, default="float32",
                         help="weights' precision for the GPT stages (int8: CPU only, about 2x faster there); "
                              "the codec stays float32")
    command.add_argument("--offload", action="store_true",
                         help="keep the model on the CPU and move each stage to the GPU only while it runs "
                              "(for GPUs with little memory)")


def text_source(args: argparse.Namespace) -> str:
    """Which input the text comes from, as errors about it start: "The text file notes.txt", "The text on
    standard input", or "The text argument"."""
    if args.file is not None:
        return f"The text file {args.file}"
    if args.text is None or args.text == "-":
        return "The text on standard input"
    return "The text argument"


def read_text(args: argparse.Namespace) -> str:
    """The text to speak from the argument, --file, or standard input."""
    if args.file is not None:
        if args.text is not None:
            raise ValueError("Give the text either as an argument or with --file, not both.")
        try:
            return decode_text(Path(args.file).read_bytes(), text_source(args))
        except FileNotFoundError:
            raise FileNotFoundError(f"The text file {args.file} does not exist.") from None
        except IsADirectoryError:
            raise IsADirectoryError(f"--file {args.file} is a folder; give the text file in it.") from None
    if args.text is None or args.text == "-":
        if sys.stdin.isatty():
            raise ValueError("No text given: pass it as an argument, with --file, or through standard input.")
        raw = getattr(sys.stdin, "buffer", None)  # None where stdin is text only (a notebook, a test)
        if raw is None:
            return sys.stdin.read().replace(BOM, "")
        # As bytes, decoded strictly: under a C.UTF-8 locale sys.stdin would keep undecodable bytes as surrogates.
        return decode_text(raw.read(), text_source(args))
    return args.text


BOM = "\ufeff"


def decode_text(data: bytes, source: str) -> str:
    """`data` as UTF-8 text without byte order marks: each file joined with `cat` brings its own, which the
    sentence splitter would take for a letter (a list item after one was not seen as one).
    UTF-16 (Windows' "Unicode" save, PowerShell's `>`) is named, with or without its BOM: without one, its
    ASCII text is valid UTF-8, and was spoken with a NUL after every letter."""
    fix = "save it as UTF-8 (in Notepad: Save As, Encoding: UTF-8) and try again"
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise ValueError(f"{source} is UTF-16 text (a Windows \"Unicode\" save), not UTF-8; {fix}.")
    if b"\x00" in data:
        raise ValueError(f"{source} holds NUL bytes: it is UTF-16 text without a BOM, or no text at all; {fix}.")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{source} is not UTF-8 text (byte {error.start} is {data[error.start]:#04x}); {fix}."
                         ) from None
    return text.replace(BOM, "")


def check_text(text: str, source: str) -> None:
    """Refuse a text with nothing to speak before the model loads. Zero-width characters alone (pasted from a web
    page, say) were refused only after loading, by the pipeline's tokenizer check, as "Text 0", which names no
    input; that check stays, for what only the tokenizer drops. `source` is `text_source`'s name for the input."""
    if not text.strip():
        raise ValueError(f"{source} is empty; give the words to speak.")
    if not has_visible_text(text):
        raise ValueError(f"{source} has nothing to say: it holds only invisible characters (such as zero-width "
                         "spaces or joiners) and whitespace; give the words to speak.")


def run_say(args: argparse.Namespace) -> int:
    with quiet_output(args.quiet):
        return _say(args)


@contextlib.contextmanager
def quiet_output(enabled: bool) -> Iterator[None]:
    """Silence progress bars and warnings (transformers' and ours) for one command, then restore them."""
    if not enabled:
        yield
        return
    bars_were_on, verbosity = logging.is_progress_bar_enabled(), logging.get_verbosity()
    ours = stdlib_logging.getLogger("bark_hf")
    our_level = ours.level
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    ours.setLevel(stdlib_logging.ERROR)
    try:
        yield
    finally:
        ours.setLevel(our_level)
        logging.set_verbosity(verbosity)
        if bars_were_on:
            logging.enable_progress_bar()


def _say(args: argparse.Namespace) -> int:
    from .audio_io import check_output_path, wav_bytes, write_wav
    from .loading import load_bark
    from .pipeline_bark_hf import BarkPipeline

    try:
        # Everything the user can get wrong is checked before a model (maybe gigabytes) is loaded.
        text = read_text(args)
        check_text(text, text_source(args))
        to_stdout = args.output == STDOUT
        if to_stdout:  # "-" was written as a file of that name
            check_stdout()
        else:
            check_output_path(args.output, args.overwrite, inputs=(args.file, args.voice))
        checked_silence(args.silence, "--silence")
        checked_seed(args.seed, "--seed")
        if args.voice is not None:
            check_voice_argument(args.voice)
        generate_kwargs = {}
        # Checked here, not by the stage configs, whose error names "temperature", not which of the two flags.
        if args.text_temp is not None:
            generate_kwargs["semantic_temperature"] = checked_positive_number(args.text_temp, "--text-temp")
        if args.waveform_temp is not None:
            generate_kwargs["coarse_temperature"] = checked_positive_number(args.waveform_temp, "--waveform-temp")
        if args.device == "auto":
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            device = _checked_device(args.device)
        if args.offload and device.type == "cpu":
            raise ValueError("--offload moves stages to a GPU one at a time; none was found (or --device cpu).")
        if args.dtype == "int8" and (device.type != "cpu" or args.offload):
            raise ValueError("--dtype int8 runs on the CPU only; add --device cpu (and no --offload).")
        dtype = torch.float32 if args.dtype == "int8" else getattr(torch, args.dtype)
        model, processor = load_bark(args.model, device=None if args.offload else device, dtype=dtype,
                                     voice_preset=args.voice)
        if args.dtype == "int8":
            model.quantize_int8()
        if args.offload:
            model.enable_cpu_offload(device)
        speaker = BarkPipeline(model=model, processor=processor, device=model.device)
        long_form = {"auto": None, "on": True, "off": False}[args.long_form]
        output = speaker(text, voice_preset=args.voice, generate_kwargs=generate_kwargs, seed=args.seed,
                         long_form=long_form, history=args.history, silence_s=args.silence,
                         show_progress=not args.quiet)
        if to_stdout:
            write_stdout(wav_bytes(output["audio"], output["sampling_rate"]))
            path = "standard output"
        else:
            path = write_wav(args.output, output["audio"], output["sampling_rate"], overwrite=args.overwrite)
    except (ValueError, TypeError, OSError, RuntimeError) as error:
        print(f"bark-hf say: error: {_one_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bark-hf say: interrupted; nothing written.", file=sys.stderr)
        return 130
    if not args.quiet:  # beside the audio, not in it, when the audio goes to standard output
        print(f"Wrote {path} ({output['audio'].shape[0] / output['sampling_rate']:.2f} s)",
              file=sys.stderr if to_stdout else sys.stdout)
    return 0


STDOUT = "-"
"""The `--output` that writes the WAV to standard output."""


def check_stdout() -> None:
    """Refuse `-o -` where standard output cannot take the WAV's bytes, before the model loads."""
    if getattr(sys.stdout, "buffer", None) is None:
        raise ValueError("-o - writes the WAV to standard output, which takes only text here; give a file name.")
    if sys.stdout.isatty():
        raise ValueError("-o - writes the WAV to standard output, which is a terminal; redirect it "
                         "(-o - > out.wav, or | a player) or give a file name.")


def _discard_stdout() -> None:
    """Point standard output at os.devnull once its reader has closed the pipe, so that what is still buffered goes
    nowhere instead of into a BrokenPipeError when Python exits."""
    with contextlib.suppress(OSError, ValueError):  # ValueError: a stream without a file descriptor (a test)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def write_stdout(data: bytes) -> None:
    """Write the WAV's bytes to standard output. A reader that stops early (`| head -c 100`, a player that failed)
    closes the pipe: that is said in words ("[Errno 32] Broken pipe" was)."""
    try:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    except BrokenPipeError:
        _discard_stdout()
        raise BrokenPipeError("standard output was closed before the whole WAV was written: the program reading it "
                              "stopped early (or failed); write the audio to a file with -o out.wav to keep it."
                              ) from None


def check_voice_argument(voice: str) -> None:
    """Refuse a `--voice` that can be no preset before the model loads: a preset file, unlike a name, needs no
    processor to check, and an existing file with another suffix (a .wav, say) was only refused after loading.
    A name without a suffix is left to the processor, whose stored presets come first even if such a file exists."""
    from .processing_bark_hf import read_voice_preset_file

    if voice.endswith(".npz"):
        read_voice_preset_file(voice)
    elif Path(voice).suffix and os.path.isfile(voice):
        raise ValueError(f"--voice {voice} is a {Path(voice).suffix} file, not a voice preset: voice presets are .npz "
                         "files (Bark's semantic_prompt, coarse_prompt and fine_prompt) or preset names such as "
                         "v2/en_speaker_6 (see `bark-hf voices`). Pass one of those.")


def run_voices(args: argparse.Namespace) -> int:
    from .processing_bark_hf import BarkHfProcessor
    from .tiny_random import TINY_RANDOM

    if args.model == TINY_RANDOM:
        names: list[str] = []
    else:
        try:
            names = BarkHfProcessor.from_pretrained(args.model).available_voice_presets
        except (ValueError, OSError) as error:
            print(f"bark-hf voices: error: {_one_line(error)}", file=sys.stderr)
            return 1
    if not names:
        print(f"The model {args.model} has no voice presets; pass --voice a path to an .npz instead.", file=sys.stderr)
        return 0
    try:
        print("\n".join(names))
        sys.stdout.flush()  # a reader that stopped early (`| head`) fails the write here, not at exit
    except BrokenPipeError:
        _discard_stdout()  # stop quietly, as `ls | head` does
    return 0


def _checked_device(name: str) -> torch.device:
    """`--device` checked before the model loads: a torch device this machine has, that can hold weights."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a torch device; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "meta":
        raise ValueError("--device meta holds no data and cannot generate; use auto, cpu or cuda.")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: this torch sees no CUDA GPU; use --device cpu (or auto).")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                             "numbered from 0.")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: this torch has no usable MPS device; use --device cpu (or auto).")
    elif device.type not in ("cpu", "cuda", "mps"):
        try:  # xpu, hpu, xla, ...: torch raises AssertionError, ModuleNotFoundError or NotImplementedError
            torch.empty(0, device=device)
        except Exception:
            raise ValueError(f"--device {name}: this torch cannot place tensors there; use --device cpu (or auto)."
                             ) from None
    return device


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)
