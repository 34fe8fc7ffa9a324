"""The `bark-hf` command (also `python -m bark_hf`)."""

from __future__ import annotations

import argparse

from .conversion import convert_suno


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bark-hf", description="Suno's Bark text-to-audio, Hugging Face native.")
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="convert Suno's original checkpoints into a bark-hf model folder",
                                  description=convert_suno.__doc__.split("\n\n")[0])
    convert_suno.add_arguments(convert)
    convert.set_defaults(run=convert_suno.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)
