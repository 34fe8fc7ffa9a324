"""The `bark-hf` command (also `python -m bark_hf`)."""

from __future__ import annotations

import argparse
import sys

from transformers.utils import logging

from .conversion import convert_suno
from .loading import DEFAULT_MODEL


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bark-hf", description="Suno's Bark text-to-audio, Hugging Face native.")
    commands = parser.add_subparsers(dest="command", required=True)

    say = commands.add_parser("say", help="generate speech from text into a WAV file")
    say.add_argument("text", help="the text to speak, or - to read it from standard input")
    say.add_argument("-o", "--output", required=True, help="WAV file to write (24 kHz mono)")
    say.add_argument("--voice", help="voice preset: a name such as v2/en_speaker_1, or a path to an .npz")
    say.add_argument("--model", default=DEFAULT_MODEL,
                     help=f"model folder or Hub id (default {DEFAULT_MODEL}); 'tiny-random' builds an offline "
                          "random model whose audio is noise")
    say.add_argument("--seed", type=int, help="random seed, for a repeatable generation")
    say.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    say.add_argument("--quiet", action="store_true", help="no progress bars")
    say.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    say.set_defaults(run=run_say)

    convert = commands.add_parser("convert", help="convert Suno's original checkpoints into a bark-hf model folder",
                                  description=convert_suno.__doc__.split("\n\n")[0])
    convert_suno.add_arguments(convert)
    convert.set_defaults(run=convert_suno.run)
    return parser


def run_say(args: argparse.Namespace) -> int:
    import torch

    from .audio_io import check_output_path, write_wav
    from .loading import load_bark

    text = sys.stdin.read() if args.text == "-" else args.text
    if args.quiet:
        logging.disable_progress_bar()
    try:
        check_output_path(args.output, args.overwrite)
        model, processor = load_bark(args.model, args.device)
        inputs = processor(text, voice_preset=args.voice)
        if args.seed is not None:
            torch.manual_seed(args.seed)
        output = model.generate(**inputs, return_dict_in_generate=True, show_progress=not args.quiet)
        audio = output.audio[0, : output.audio_lengths[0]].cpu().numpy()
        path = write_wav(args.output, audio, model.sampling_rate, overwrite=args.overwrite)
    except (ValueError, TypeError, OSError) as error:
        print(f"bark-hf say: error: {error}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"Wrote {path} ({audio.shape[0] / model.sampling_rate:.2f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)
