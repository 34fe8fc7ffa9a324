"""Suno's original release -> one ready bark-hf model folder.

    python conversion/convert_suno_checkpoint.py --checkpoint-dir DIR --codec PATH \
        --tokenizer DIR [--voice-presets DIR] --output-dir OUT [--overwrite]

The folder is built in a temporary sibling, reloaded and checked against the source weights,
and only then renamed into place, so a failure never leaves a half-written model behind.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import BertTokenizer
from transformers.utils import logging

from ..atomic import default_mode, holds_any
from ..configuration_bark_hf import BarkHfConfig
from ..generation_configuration_bark_hf import BarkHfSemanticGenerationConfig
from ..model_card import bark_model_card
from ..modeling_bark_hf import BarkHfModel
from ..processing_bark_hf import BarkHfProcessor
from .codec import load_codec
from .suno_checkpoint import STAGES, CheckpointError, convert_stage, find_stage_files, verify_weights
from .voice_presets import read_original_presets

logger = logging.get_logger(__name__)

# Original stage name -> attribute of the composite model.
COMPOSITE_ATTRIBUTES = {"text": "semantic", "coarse": "coarse_acoustics", "fine": "fine_acoustics"}


def convert_suno_checkpoint(
    checkpoint_dir: str | os.PathLike,
    codec: str | os.PathLike,
    tokenizer: str | os.PathLike,
    output_dir: str | os.PathLike,
    voice_presets: str | os.PathLike | None = None,
    overwrite: bool = False,
    size: str | None = None,
) -> Path:
    """Convert and write the model folder; returns its path. See the module docstring."""
    flags = {"--checkpoint-dir": checkpoint_dir, "--codec": codec, "--tokenizer": tokenizer,
             "--output-dir": output_dir, "--voice-presets": voice_presets}
    empty = [flag for flag, value in flags.items() if value is not None and not os.fspath(value)]
    if empty:  # Path("") is the current folder: an unset shell variable would convert into (or replace) it
        raise ValueError(f"{', '.join(empty)} is an empty path; name the file or folder (use '.' for the current "
                         "folder).")
    # Absolute: '.' or 'x/..' have no name to stage and rename by. Real: a symlinked folder is replaced where
    # the link points (the link stays), not by renaming the link itself.
    named = Path(os.path.abspath(output_dir))
    output_dir = Path(os.path.realpath(output_dir))
    if os.path.islink(named) and holds_any(output_dir, [named.parent]):
        raise ValueError(f"--output-dir {named} is a link to {output_dir}, a folder that holds the link itself: "
                         f"replacing {output_dir} would delete the link and everything beside it. Name {output_dir} "
                         "itself to replace it.")
    if output_dir.exists() and not output_dir.is_dir():  # said first: --overwrite would not help
        raise FileExistsError(f"{output_dir} is a file, not a model folder; choose another --output-dir.")
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"{output_dir} already exists; pass --overwrite to replace it.")
    if voice_presets is not None and not Path(voice_presets).is_dir():
        if Path(voice_presets).exists():  # one preset file, say, where its folder is meant
            raise ValueError(f"--voice-presets {voice_presets} is a file; pass the folder that holds the .npz presets "
                             "(laid out like Bark's bark/assets/prompts).")
        raise FileNotFoundError(f"The voice preset folder {voice_presets} does not exist.")
    if not output_dir.parent.is_dir():
        raise FileNotFoundError(f"The parent folder of {output_dir} does not exist; create it first.")

    inputs = [path for path in (checkpoint_dir, codec, tokenizer, voice_presets) if path is not None]
    if holds_any(output_dir, inputs):
        raise ValueError(f"--output-dir {output_dir} holds an input of the conversion, which writing it would "
                         "destroy; choose a folder outside the inputs.")
    tokenizer_dir = Path(tokenizer)
    if not (tokenizer_dir / "vocab.txt").is_file():
        raise FileNotFoundError(f"{tokenizer_dir} must be a folder holding the tokenizer's vocab.txt.")
    bark_tokenizer = load_bark_tokenizer(tokenizer_dir)

    files = find_stage_files(checkpoint_dir, size)
    stages = {}
    for stage in STAGES:
        logger.info(f"Converting {files[stage]}")
        stages[stage] = convert_stage(stage, files[stage])
    codec_model = load_codec(codec)
    presets = read_original_presets(voice_presets) if voice_presets is not None else {}

    config = BarkHfConfig(
        semantic_config=stages["text"].config,
        coarse_acoustics_config=stages["coarse"].config,
        fine_acoustics_config=stages["fine"].config,
        codec_config=codec_model.config,
    )
    model = BarkHfModel(config)
    for stage, attribute in COMPOSITE_ATTRIBUTES.items():
        getattr(model, attribute).load_state_dict(stages[stage].state_dict())
    model.codec_model.load_state_dict(codec_model.state_dict())
    processor = BarkHfProcessor(bark_tokenizer, voice_presets=presets)

    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    staging.chmod(default_mode(directory=True))  # mkdtemp's folder is owner-only
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        sources = ", ".join(path.name for path in files.values())
        card = bark_model_card(config, model_id=output_dir.name, voice_presets=processor.available_voice_presets,
                               provenance=f"Converted from Suno's original checkpoints ({sources}).")
        card.save(staging / "README.md")
        file_mode = default_mode()  # safetensors writes weights owner-only; a model folder is often shared
        for path in staging.rglob("*"):
            if path.is_file():
                path.chmod(file_mode)
        _verify_folder(staging, stages, codec_model, processor)
        _replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


def load_bark_tokenizer(folder: Path) -> BertTokenizer:
    """Bark's tokenizer, bert-base-multilingual-cased, from `folder`, checked to fit Bark's text ids.

    Always cased: a folder with only `vocab.txt` would otherwise load as a lowercasing tokenizer,
    which gives other ids than the original's.
    """
    vocab_file = folder / "vocab.txt"
    fix = "give bert-base-multilingual-cased's vocab.txt (119 547 tokens)"
    try:
        vocab = [line for line in vocab_file.read_text(encoding="utf-8").splitlines() if line]
    except UnicodeDecodeError as error:  # its message names neither the file nor the fix
        raise ValueError(f"{vocab_file} is not UTF-8 text ({error}); {fix}.") from error
    text = BarkHfSemanticGenerationConfig()
    room = text.text_pad_token - text.text_encoding_offset  # text ids sit between the offset and the pad token
    if "[UNK]" not in vocab:
        raise ValueError(f"{vocab_file} has no [UNK] token ({len(vocab)} tokens in all); {fix}.")
    if len(vocab) > room:
        raise ValueError(f"{vocab_file} holds {len(vocab)} tokens, more than Bark's {room} text ids; {fix}.")
    try:
        tokenizer = BertTokenizer.from_pretrained(folder, do_lower_case=False)
        tokenizer("Hello")  # some broken files fail only when used
    except Exception as error:  # a malformed tokenizer.json or config fails in many ways inside tokenizers
        reason = " ".join(f"{type(error).__name__}: {error}".split())  # one line, for the CLI
        raise ValueError(f"The tokenizer in {folder} cannot be read ({reason}); {fix}, and its other tokenizer "
                         "files, if any, unchanged.") from error
    return tokenizer


def _verify_folder(folder: Path, stages: dict, codec_model: torch.nn.Module, processor: BarkHfProcessor) -> None:
    """Reload what was written and compare every tensor and preset with the source."""
    reloaded = BarkHfModel.from_pretrained(folder)
    for stage, attribute in COMPOSITE_ATTRIBUTES.items():
        verify_weights(getattr(reloaded, attribute), stages[stage].state_dict(), source=f"the {stage} checkpoint")
    verify_weights(reloaded.codec_model, codec_model.state_dict(), source="the codec")
    reloaded_processor = BarkHfProcessor.from_pretrained(folder)
    names = processor.available_voice_presets
    if reloaded_processor.available_voice_presets != names:
        raise CheckpointError("The written voice presets differ from the source presets.")
    for name in names:
        written, source = reloaded_processor.load_voice_preset(name), processor.load_voice_preset(name)
        if not all(np.array_equal(written[key], source[key]) for key in source):
            raise CheckpointError(f"The written voice preset {name!r} differs from its source.")


def _replace(staging: Path, output_dir: Path) -> None:
    """Move `staging` to `output_dir`, replacing an existing folder only after the move succeeds."""
    if not output_dir.exists():
        staging.rename(output_dir)
        return
    backup = staging.with_name(f"{staging.name}.old")  # unique as staging is: a fixed name deleted whatever held it
    output_dir.rename(backup)
    try:
        staging.rename(output_dir)
    except BaseException:  # else the old folder is left hidden under the backup's name
        backup.rename(output_dir)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--checkpoint-dir", required=True, help="folder with text.pt, coarse.pt, fine.pt (or *_2.pt)")
    parser.add_argument("--codec", required=True,
                        help="EnCodec 24 kHz: the encodec package's state-dict file, or a transformers EnCodec folder")
    parser.add_argument("--tokenizer", required=True, help="folder with the bert-base-multilingual-cased vocab.txt")
    parser.add_argument("--voice-presets", help="folder of original .npz voice presets (e.g. v2/en_speaker_1.npz)")
    parser.add_argument("--output-dir", required=True, help="model folder to write")
    parser.add_argument("--size", choices=("small", "large"), help="which checkpoints, when the folder has both")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run a parsed conversion; user errors become one line on stderr and exit status 1."""
    try:
        path = convert_suno_checkpoint(
            checkpoint_dir=args.checkpoint_dir,
            codec=args.codec,
            tokenizer=args.tokenizer,
            output_dir=args.output_dir,
            voice_presets=args.voice_presets,
            overwrite=args.overwrite,
            size=args.size,
        )
    except (ValueError, OSError) as error:
        print(f"bark-hf convert: error: {error}", file=sys.stderr)
        return 1
    print(f"Wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bark-hf convert", description=__doc__.split("\n\n")[0])
    return run(add_arguments(parser).parse_args(argv))
