"""Fine-tune one stage of Bark with transformers' Trainer, optionally through LoRA, and save a model folder.

    python examples/finetune.py --model suno/bark-small --dataset ./prepared --stage coarse --output-dir ./bark-ft
    python examples/finetune.py --model suno/bark-small --dataset user/speech --stage semantic \\
        --semantic-column semantic_tokens --lora-rank 16 --output-dir ./bark-ft

--dataset is a folder written by `datasets.Dataset.save_to_disk` or a Hub dataset id. Rows need the
columns of `bark_hf.training.prepare_dataset` (`text`, `semantic_tokens`, `fine_tokens`); a dataset
with an audio column instead is prepared here first (semantic tokens then come from
--semantic-column: bark-hf cannot make them from audio; --stage fine needs none). The output folder
holds the whole model (the trained stage, the others as loaded), the processor and its voice
presets, and a model card: `BarkHfModel.from_pretrained` and `pipeline("text-to-audio", model=...)`
load it. See docs/training.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import torch
from huggingface_hub import ModelCard
from transformers import Trainer, TrainingArguments
from transformers.utils import is_torch_bf16_gpu_available

from bark_hf.atomic import holds_any
from bark_hf.hub import push_folder_to_hub
from bark_hf.loading import DEFAULT_MODEL, load_bark
from bark_hf.model_card import bark_model_card, save_model_card
from bark_hf.tiny_random import TINY_RANDOM
from bark_hf.training import FINE_TOKENS_COLUMN, SEMANTIC_TOKENS_COLUMN, TEXT_COLUMN, collator_for, prepare_dataset

STAGE_ATTRIBUTES = {"semantic": "semantic", "coarse": "coarse_acoustics", "fine": "fine_acoustics"}
LORA_TARGETS = "att_proj,in_proj,out_proj"
"""The attention and MLP projections of every block (`out_proj` names both)."""


def _user_path(value: str) -> Path:
    """A path argument with "~" expanded (the shell leaves it in `--output-dir=~/out`)."""
    return Path(value).expanduser()


def _count(minimum: int):
    """An argparse type for a whole number of at least `minimum`: a batch of 0 failed deep in torch after the model
    loaded, and a negative --lora-rank silently trained every weight."""
    def parse(value: str) -> int:
        number = int(value)
        if number < minimum:
            raise argparse.ArgumentTypeError(f"must be a whole number of at least {minimum}, got {value}")
        return number

    parse.__name__ = "whole number"  # argparse names the type in its error for a value int() cannot read
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, type=os.path.expanduser,
                        help=f"folder, Hub id or 'tiny-random' ({DEFAULT_MODEL})")
    parser.add_argument("--dataset", required=True, type=os.path.expanduser,
                        help="save_to_disk folder or Hub dataset id")
    parser.add_argument("--split", default="train", help="split of a Hub dataset or DatasetDict folder (default train)")
    parser.add_argument("--stage", required=True, choices=sorted(STAGE_ATTRIBUTES), help="the stage to train")
    parser.add_argument("--output-dir", required=True, type=_user_path, help="model folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--audio-column", default="audio", help="audio column of an unprepared dataset")
    parser.add_argument("--semantic-column", help="column of semantic tokens of an unprepared dataset")
    parser.add_argument("--max-steps", type=int, default=-1, help="optimizer steps (default: --epochs)")
    parser.add_argument("--epochs", type=float, default=3.0, help="passes over the data (default 3)")
    parser.add_argument("--batch-size", type=_count(1), default=8)
    parser.add_argument("--gradient-accumulation", type=_count(1), default=1)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations: less memory")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-dir", type=_user_path, help="write Trainer checkpoints here (default: none)")
    parser.add_argument("--save-steps", type=_count(1), default=500,
                        help="steps between checkpoints (with --checkpoint-dir)")
    parser.add_argument("--lora-rank", type=_count(0), default=0,
                        help="train LoRA adapters of this rank (0: all weights)")
    parser.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator (default: 2 x rank)")
    parser.add_argument("--lora-targets", default=LORA_TARGETS, help=f"modules to adapt (default {LORA_TARGETS})")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the output folder to this Hub model repo")
    return parser


def load_training_data(name: str, split: str):
    import datasets

    if os.path.isdir(name):
        loaded = datasets.load_from_disk(name)
        if isinstance(loaded, datasets.DatasetDict) and split not in loaded:
            raise SystemExit(f"The dataset folder {name} has no split {split!r}; its splits are {sorted(loaded)}. "
                             "Choose one with --split.")
        return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    return datasets.load_dataset(name, split=split)


def check_training_data(dataset, args: argparse.Namespace) -> None:
    """Refuse, before loading the model or preparing anything, data that the stage cannot train on."""
    columns = dataset.column_names
    prepared = FINE_TOKENS_COLUMN in columns
    if not prepared:  # prepare_dataset reads these; say so before the model loads
        for flag, column in (("--audio-column", args.audio_column), ("--semantic-column", args.semantic_column)):
            if column is not None and column not in columns:
                raise SystemExit(f"{flag} {column}: the dataset has no such column; its columns are {columns}.")
    if args.stage != "fine" and SEMANTIC_TOKENS_COLUMN not in columns and (prepared or not args.semantic_column):
        given = (f"a prepared dataset (it has {FINE_TOKENS_COLUMN!r}) without {SEMANTIC_TOKENS_COLUMN!r}" if prepared
                 else "an audio dataset without --semantic-column")
        raise SystemExit(
            f"--stage {args.stage} trains on semantic tokens, and this is {given}. bark-hf cannot make semantic "
            "tokens from audio (Suno's tokenizer was never released): add a column of tokens made beforehand (e.g. "
            "by a HuBERT tokenizer) to the audio dataset and pass --semantic-column, or prepare it in Python with "
            "bark_hf.training.prepare_dataset(..., semantic_tokenizer=...). See docs/training.md. --stage fine "
            "needs none."
        )
    if args.stage == "semantic":
        if TEXT_COLUMN not in columns:
            raise SystemExit(f"--stage semantic needs a {TEXT_COLUMN!r} column; the dataset has {columns}.")
        blank = [row for row, text in enumerate(dataset[TEXT_COLUMN]) if not isinstance(text, str) or not text.strip()]
        if blank:
            raise SystemExit(f"Rows {blank[:10]}{' and more' if len(blank) > 10 else ''} have no text to speak; drop "
                             "them first, e.g. dataset.filter(lambda row: (row['text'] or '').strip()).")


def with_lora(stage, args: argparse.Namespace):
    """`stage` with LoRA adapters on `--lora-targets`; only the adapters train."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise SystemExit("--lora-rank needs peft: pip install 'bark-hf[train]'") from None
    config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha or 2 * args.lora_rank,
                        target_modules=args.lora_targets.split(","), lora_dropout=0.0)
    return get_peft_model(stage, config)


def write_model_folder(model, processor, output_dir: Path, overwrite: bool, card: ModelCard) -> Path:
    """Save model, processor and `card` into a temporary folder beside `output_dir`, then rename it."""
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        save_model_card(card, staging, overwrite=True)
        replaced = output_dir.with_name(staging.name + ".old") if output_dir.exists() and overwrite else None
        if replaced is not None:
            output_dir.rename(replaced)
        staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if replaced is not None:
        shutil.rmtree(replaced)
    return output_dir


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    output_dir = args.output_dir.resolve()
    if output_dir.exists() and not output_dir.is_dir():
        raise SystemExit(f"{output_dir} is a file, not a model folder; choose another --output-dir.")
    if output_dir.exists() and not args.overwrite:
        raise SystemExit(f"{output_dir} already exists; pass --overwrite to replace it.")
    if not output_dir.parent.is_dir():
        raise SystemExit(f"The folder {output_dir.parent} does not exist; create it first.")
    # The folder is written whole at the end, replacing what is there: nothing the run reads or keeps may be inside.
    kept = [path for path in (args.dataset, args.model) if os.path.isdir(path)]
    if args.checkpoint_dir is not None:  # the run makes it, so it may not exist yet
        kept.append(args.checkpoint_dir)
    if holds_any(output_dir, kept):
        raise SystemExit(f"--output-dir {output_dir} holds the dataset, the --model folder or --checkpoint-dir, which "
                         "writing the model folder would destroy or collide with; choose a folder outside them.")

    dataset = load_training_data(args.dataset, args.split)
    check_training_data(dataset, args)
    model, processor = load_bark(args.model)
    if FINE_TOKENS_COLUMN not in dataset.column_names:
        dataset = prepare_dataset(dataset, model.codec_model, semantic_column=args.semantic_column,
                                  audio_column=args.audio_column)

    stage = getattr(model, STAGE_ATTRIBUTES[args.stage])
    collator = collator_for(stage, processor)
    trained = with_lora(stage, args) if args.lora_rank > 0 else stage
    with tempfile.TemporaryDirectory() as scratch:
        training_args = TrainingArguments(
            output_dir=str(args.checkpoint_dir or scratch),
            save_strategy="steps" if args.checkpoint_dir else "no",
            save_steps=args.save_steps,
            max_steps=args.max_steps,
            num_train_epochs=args.epochs,
            per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=args.gradient_accumulation,
            learning_rate=args.learning_rate,
            activation_checkpointing=args.gradient_checkpointing,
            bf16=args.bf16,
            # transformers refuses bf16 without a bf16 accelerator unless told to use the CPU (pre-Ampere CUDA
            # keeps that error rather than training on the CPU unasked).
            use_cpu=args.bf16 and not torch.cuda.is_available() and not is_torch_bf16_gpu_available(),
            seed=args.seed,
            remove_unused_columns=False,  # the collator reads columns that are not forward arguments
            report_to="none",
        )
        trained.train()
        Trainer(model=trained, args=training_args, train_dataset=dataset, data_collator=collator).train()
    if args.lora_rank > 0:
        trained.merge_and_unload()  # folds the adapters into `stage`'s own weights
    model.eval()

    training_data = [] if os.path.isdir(args.dataset) else [args.dataset]
    base_model = None if args.model == TINY_RANDOM or os.path.isdir(args.model) else args.model
    def card(model_id: str) -> ModelCard:
        return bark_model_card(model.config, model_id=model_id, voice_presets=processor.available_voice_presets,
                               training_data=training_data, base_model=base_model)

    folder = write_model_folder(model, processor, output_dir, args.overwrite, card(args.push_to_hub or output_dir.name))
    print(f"Wrote the fine-tuned model to {folder}")
    if args.push_to_hub:
        def write(staging: Path, repo_id: str) -> None:  # the folder, with a card that names the repo as resolved
            shutil.copytree(folder, staging, dirs_exist_ok=True)
            save_model_card(card(repo_id), staging, overwrite=True)

        push_folder_to_hub(args.push_to_hub, write, "fine-tuned Bark")
    return folder


if __name__ == "__main__":
    main()
