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
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from huggingface_hub import ModelCard, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import is_torch_bf16_gpu_available

from bark_hf.atomic import check_writable_folder, default_mode, holds_any
from bark_hf.configuration_bark_hf import BarkHfCoarseConfig, BarkHfFineConfig, BarkHfSemanticConfig
from bark_hf.hub import push_folder_to_hub
from bark_hf.loading import DEFAULT_MODEL, load_bark
from bark_hf.model_card import bark_model_card, save_model_card
from bark_hf.modeling_bark_hf import BarkHfCoarseModel, BarkHfFineModel, BarkHfSemanticModel
from bark_hf.processing_bark_hf import looks_like_local_path
from bark_hf.tiny_random import TINY_RANDOM
from bark_hf.training import (
    FINE_TOKENS_COLUMN,
    SEMANTIC_TOKENS_COLUMN,
    TEXT_COLUMN,
    collator_for,
    import_train_extra,
    prepare_dataset,
)

STAGE_ATTRIBUTES = {"semantic": "semantic", "coarse": "coarse_acoustics", "fine": "fine_acoustics"}
STAGE_CLASSES = {"semantic": (BarkHfSemanticModel, BarkHfSemanticConfig),
                 "coarse": (BarkHfCoarseModel, BarkHfCoarseConfig), "fine": (BarkHfFineModel, BarkHfFineConfig)}
LORA_TARGETS = "att_proj,in_proj,out_proj"
"""The attention and MLP projections of every block (`out_proj` names both)."""
LORA_LAYERS = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d,
               torch.nn.MultiheadAttention)
"""The layer types peft's LoRA adapts (transformers' Conv1D aside, which Bark does not use)."""
SEED_RANGE = (0, 2**32 - 1)
"""The seeds the Trainer can use: it seeds numpy too, which refuses others (after the model loaded)."""


def _user_path(value: str) -> Path:
    """A path argument with "~" expanded (the shell leaves it in `--output-dir=~/out`)."""
    return Path(value).expanduser()


def _count(minimum: int, maximum: int | None = None):
    """An argparse type for a whole number of at least `minimum` (and at most `maximum`): a batch of 0 failed deep
    in torch after the model loaded, and a negative --lora-rank silently trained every weight."""
    def parse(value: str) -> int:
        number = int(value)
        if number < minimum or (maximum is not None and number > maximum):
            within = f"of at least {minimum}" if maximum is None else f"from {minimum} to {maximum}"
            raise argparse.ArgumentTypeError(f"must be a whole number {within}, got {value}")
        return number

    parse.__name__ = "whole number"  # argparse names the type in its error for a value int() cannot read
    return parse


def _positive_number(value: str) -> float:
    """An argparse type for a finite number > 0: --epochs 0 wrote an untrained model as if trained, a negative or
    NaN --learning-rate failed in torch's optimizer after the model loaded."""
    number = float(value)
    if not math.isfinite(number) or number <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {value}")
    return number


_positive_number.__name__ = "number"


def _module_names(value: str) -> list[str]:
    """An argparse type for a comma-separated list of module names, none empty."""
    names = [name.strip() for name in value.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"must be module names separated by commas, e.g. {LORA_TARGETS}; got "
                                         f"{value!r}")
    return names


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
    parser.add_argument("--max-steps", type=_count(1), help="optimizer steps; replaces --epochs (default: --epochs)")
    parser.add_argument("--epochs", type=_positive_number, default=3.0, help="passes over the data (default 3)")
    parser.add_argument("--batch-size", type=_count(1), default=8)
    parser.add_argument("--gradient-accumulation", type=_count(1), default=1)
    parser.add_argument("--learning-rate", type=_positive_number, default=1e-4)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations: less memory")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision")
    parser.add_argument("--seed", type=_count(*SEED_RANGE), default=0)
    parser.add_argument("--checkpoint-dir", type=_user_path, help="write Trainer checkpoints here (default: none)")
    parser.add_argument("--save-steps", type=_count(1),
                        help="steps between checkpoints (with --checkpoint-dir; default 500)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the last checkpoint in --checkpoint-dir (without it, a run starts afresh)")
    parser.add_argument("--lora-rank", type=_count(0), default=0,
                        help="train LoRA adapters of this rank (0: all weights)")
    parser.add_argument("--lora-alpha", type=_positive_number, help="LoRA scale numerator (default: 2 x rank)")
    parser.add_argument("--lora-targets", type=_module_names,
                        help=f"modules to adapt, separated by commas (default {LORA_TARGETS})")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the output folder to this Hub model repo")
    return parser


def check_arguments(args: argparse.Namespace) -> Path:
    """Refuse, before the data or the model loads, settings the run cannot use; returns the output folder."""
    output_dir = args.output_dir.resolve()
    if output_dir.exists() and not output_dir.is_dir():
        raise SystemExit(f"{output_dir} is a file, not a model folder; choose another --output-dir.")
    if output_dir.exists() and not args.overwrite:
        raise SystemExit(f"{output_dir} already exists; pass --overwrite to replace it.")
    if not output_dir.parent.is_dir():
        raise SystemExit(f"The folder {output_dir.parent} does not exist; create it first.")
    try:  # else the folder is refused when written, after training
        check_writable_folder(output_dir)
    except PermissionError as error:
        raise SystemExit(f"--output-dir: {error}") from None
    # The folder is written whole at the end, replacing what is there: nothing the run reads or keeps may be inside.
    kept = [path for path in (args.dataset, args.model) if os.path.isdir(path)]
    if args.checkpoint_dir is not None:  # the run makes it, so it may not exist yet
        kept.append(args.checkpoint_dir)
    if holds_any(output_dir, kept):
        raise SystemExit(f"--output-dir {output_dir} holds the dataset, the --model folder or --checkpoint-dir, which "
                         "writing the model folder would destroy or collide with; choose a folder outside them.")
    if args.checkpoint_dir is not None and args.checkpoint_dir.exists() and not args.checkpoint_dir.is_dir():
        raise SystemExit(f"--checkpoint-dir {args.checkpoint_dir} is a file; choose a folder (it is created if "
                         "missing).")
    if args.resume and (args.checkpoint_dir is None or not args.checkpoint_dir.is_dir()
                        or get_last_checkpoint(str(args.checkpoint_dir)) is None):
        where = "add --checkpoint-dir" if args.checkpoint_dir is None else f"{args.checkpoint_dir} holds none"
        raise SystemExit(f"--resume continues from the last checkpoint (a checkpoint-N folder) in --checkpoint-dir, "
                         f"and {where}; drop --resume to start afresh.")
    if args.save_steps is not None and args.checkpoint_dir is None:
        raise SystemExit("--save-steps sets how often checkpoints are written, and there are none without "
                         "--checkpoint-dir; add --checkpoint-dir or drop --save-steps.")
    if args.model != TINY_RANDOM and os.path.exists(args.model) and not os.path.isdir(args.model):
        raise SystemExit(f"--model {args.model} is a file; pass the model folder, a Hub id or 'tiny-random'.")
    if args.model != TINY_RANDOM and looks_like_local_path(args.model) and not os.path.isdir(args.model):
        raise SystemExit(f"No model folder at {args.model!r}; pass --model a folder made with `bark-hf convert` or "
                         "`save_pretrained`, a Hub id, or 'tiny-random'.")
    if args.lora_rank == 0:
        given = [flag for flag, value in (("--lora-alpha", args.lora_alpha), ("--lora-targets", args.lora_targets))
                 if value is not None]
        if given:
            raise SystemExit(f"{' and '.join(given)} only {'apply' if len(given) > 1 else 'applies'} to LoRA "
                             "training; add --lora-rank (e.g. 16) or drop it.")
    else:
        try:
            import peft  # noqa: F401
        except ImportError:
            raise SystemExit("--lora-rank needs peft: pip install 'bark-hf[train]'") from None
        check_lora_targets(args.stage, lora_settings(args)["target_modules"])
    if args.resume:
        check_resumable(Path(get_last_checkpoint(str(args.checkpoint_dir))), args)
    if args.push_to_hub is not None:  # else the upload fails after training
        try:
            validate_repo_id(args.push_to_hub)
        except HFValidationError:
            raise SystemExit(f"--push-to-hub {args.push_to_hub!r} is not a Hub repo id; use 'name' or 'user/name' "
                             "(letters, digits, '-', '_', '.').") from None
        if get_token() is None:
            raise SystemExit("--push-to-hub needs a Hugging Face token with write access; log in with `hf auth "
                             "login` or set HF_TOKEN.")
    return output_dir


def lora_settings(args: argparse.Namespace) -> dict:
    """The LoRA settings of a run with --lora-rank, as peft's LoraConfig (and its adapter_config.json) names them."""
    return {"r": args.lora_rank, "lora_alpha": args.lora_alpha or 2 * args.lora_rank,
            "target_modules": sorted(set(args.lora_targets or LORA_TARGETS.split(",")))}  # peft keeps a set


def check_resumable(checkpoint: Path, args: argparse.Namespace) -> None:
    """Refuse, before the model loads, a checkpoint that another kind of run wrote: the Trainer failed on it deep
    inside (no weights index, an optimizer group of another size, a state_dict size mismatch)."""
    fix = "or drop --resume to start afresh"
    adapter_config = checkpoint / "adapter_config.json"
    if not adapter_config.is_file():
        if args.lora_rank > 0:
            raise SystemExit(f"--resume: {checkpoint} holds a whole stage's weights, but --lora-rank trains LoRA "
                             f"adapters; drop --lora-rank to continue that run, {fix}.")
        found = _json_file(checkpoint / "config.json").get("model_type")
        wanted = STAGE_CLASSES[args.stage][1].model_type
        if found != wanted:
            raise SystemExit(f"--resume: {checkpoint} holds a {found} checkpoint, not one of the {args.stage} stage "
                             f"({wanted}); pass that run's --stage, {fix}.")
        return
    if args.lora_rank == 0:
        raise SystemExit(f"--resume: {checkpoint} holds LoRA adapters, but this run trains the whole stage; add that "
                         f"run's --lora-rank (and --lora-alpha, --lora-targets), {fix}.")
    saved = _json_file(adapter_config)
    saved = {"r": saved.get("r"), "lora_alpha": saved.get("lora_alpha"),
             "target_modules": sorted(saved.get("target_modules") or [])}
    differ = [name for name, value in lora_settings(args).items() if saved[name] != value]
    if differ:
        flags = {"r": "--lora-rank", "lora_alpha": "--lora-alpha", "target_modules": "--lora-targets"}
        saved["target_modules"] = ",".join(saved["target_modules"])  # as the flag takes them
        raise SystemExit(f"--resume: the adapters in {checkpoint} were made with "
                         f"{', '.join(f'{flags[name]} {saved[name]}' for name in differ)}; pass the same, {fix}.")


def _json_file(path: Path) -> dict:
    """A checkpoint's JSON settings; an unreadable file is a one-line refusal."""
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise SystemExit(f"--resume: cannot read {path} ({error}); resume from an intact checkpoint, or drop "
                         "--resume to start afresh.") from None
    if not isinstance(values, dict):
        raise SystemExit(f"--resume: {path} holds no JSON object; resume from an intact checkpoint, or drop --resume.")
    return values


def stage_modules(stage: str) -> tuple[dict[str, torch.nn.Module], set[str]]:
    """The modules of a `stage` by name, as peft matches them, and the names of those that share their weight with
    another (the fine stage's heads and embeddings). Built small on the meta device: the names do not depend on the
    sizes, so --lora-targets is checked before the model loads (and peft's own check, after it, raised a traceback,
    or ignored a wrong name given beside a right one)."""
    model_class, config_class = STAGE_CLASSES[stage]
    with torch.device("meta"):
        model = model_class(config_class(num_layers=1, num_heads=1, hidden_size=8))
    tied = {name.rsplit(".", 1)[0] for pair in model.all_tied_weights_keys.items() for name in pair}
    return dict(model.named_modules()), tied


def _short_name(name: str) -> str:
    """A module's name as a target names it: its last part, with its list's name if that is an index."""
    parts = name.split(".")
    return f"{parts[-2]}.<i>" if parts[-1].isdigit() else parts[-1]


def check_lora_targets(stage: str, targets: list[str]) -> None:
    """Refuse a `--lora-targets` name that matches no layer LoRA can adapt in `stage` (peft's suffix match), or a
    layer whose weight is tied to another: merging its adapter changed the twin too, so the saved model was not the
    one trained."""
    modules, tied = stage_modules(stage)
    adaptable = [name for name, module in modules.items() if isinstance(module, LORA_LAYERS) and name not in tied]
    partly_tied = {_short_name(name) for name in tied}  # e.g. only input_embeds_layers.0 may be adapted: name it
    choices = sorted({name if _short_name(name) in partly_tied else _short_name(name) for name in adaptable})
    codebook = " (<i>: a codebook)" if any("<i>" in choice for choice in choices) else ""
    for target in targets:
        names = [name for name in modules if name == target or name.endswith("." + target)]
        matched = [modules[name] for name in names]
        others = sorted({type(module).__name__ for module in matched if not isinstance(module, LORA_LAYERS)})
        if tied.intersection(names):
            raise SystemExit(f"--lora-targets {target}: names {', '.join(sorted(tied.intersection(names)))}, whose "
                             f"weight the {stage} stage ties to another layer (each fine head to a codebook's "
                             "embedding), so merging its adapter would change that layer too; choose from "
                             f"{', '.join(choices)}{codebook}. The default is {LORA_TARGETS}.")
        if not matched or others:
            problem = ("has no module of that name" if not matched
                       else f"names a {' and a '.join(others)}, which LoRA cannot adapt")
            raise SystemExit(f"--lora-targets {target}: the {stage} stage {problem}; choose from "
                             f"{', '.join(choices)}{codebook}. The default is {LORA_TARGETS}.")


def load_training_data(name: str, split: str):
    """The dataset `name` (a save_to_disk folder or a Hub id); a name that is neither is refused in one line."""
    try:
        datasets = import_train_extra("datasets", "--dataset")
    except ImportError as error:
        raise SystemExit(str(error)) from None

    if os.path.isdir(name):
        try:
            loaded = datasets.load_from_disk(name)
        except FileNotFoundError:  # "neither a `Dataset` directory nor a `DatasetDict` directory"
            raise SystemExit(f"--dataset {name} is not a folder written by save_to_disk. For a folder of audio files, "
                             "load it with datasets.load_dataset('audiofolder', data_dir=...) and save_to_disk the "
                             "result (see docs/training.md).") from None
        except IndexError:  # datasets writes no data file for a dataset of no rows, then cannot read it back
            raise SystemExit(f"The dataset folder {name} (or one of its splits) holds no rows, and datasets cannot "
                             "read it back; save a dataset with rows to train on.") from None
        if isinstance(loaded, datasets.DatasetDict) and split not in loaded:
            raise SystemExit(f"The dataset folder {name} has no split {split!r}; its splits are {sorted(loaded)}. "
                             "Choose one with --split.")
        return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    if os.path.exists(name):
        raise SystemExit(f"--dataset {name} is a file; pass a folder written by Dataset.save_to_disk or a Hub "
                         "dataset id.")
    if looks_like_local_path(name):
        raise SystemExit(f"No dataset folder at {name!r}; pass a folder written by Dataset.save_to_disk or a Hub "
                         "dataset id.")
    try:
        return datasets.load_dataset(name, split=split)
    except (OSError, ValueError, HfHubHTTPError) as error:  # not found, unreachable, unknown split
        reason = " ".join(str(error).split()) or type(error).__name__
        raise SystemExit(f"--dataset {name}: there is no folder of that name, and the Hub dataset could not be "
                         f"loaded ({reason}). Pass a folder written by Dataset.save_to_disk, or check the Hub id, "
                         "--split and the connection.") from None


def check_training_data(dataset, args: argparse.Namespace) -> None:
    """Refuse, before loading the model or preparing anything, data that the stage cannot train on."""
    columns = dataset.column_names
    if len(dataset) == 0:  # else an IndexError, or a model written without a step
        raise SystemExit(f"The dataset {args.dataset} (split {args.split!r}) has no rows to train on.")
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
    """`stage` with LoRA adapters on `--lora-targets` (checked by `check_arguments`); only the adapters train."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(**lora_settings(args), lora_dropout=0.0)
    return get_peft_model(stage, config)


def training_arguments(args: argparse.Namespace, scratch: str) -> TrainingArguments:
    """The Trainer's settings, made before the model loads so that transformers' own checks (--bf16 on a GPU
    without bfloat16, say) come first, as one line."""
    try:
        return TrainingArguments(
            output_dir=str(args.checkpoint_dir or scratch),
            save_strategy="steps" if args.checkpoint_dir else "no",
            save_steps=args.save_steps or 500,
            max_steps=args.max_steps or -1,  # -1: --epochs decides
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
    except ValueError as error:
        raise SystemExit(f"These training settings cannot be used: {' '.join(str(error).split())}") from None


def load_model(name: str):
    """`load_bark(name)`, its errors (an unreachable Hub, a folder that is no model) as one line."""
    try:
        return load_bark(name)
    except (OSError, ValueError) as error:
        raise SystemExit(" ".join(str(error).split())) from None


def write_model_folder(model, processor, output_dir: Path, overwrite: bool, card: ModelCard) -> Path:
    """Save model, processor and `card` into a temporary folder beside `output_dir`, then rename it.

    Without `overwrite`, a folder that something created at `output_dir` while training ran is kept, and so is
    the trained model: the error names the folder that holds it.
    """
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        staging.chmod(default_mode(directory=True))  # mkdtemp's folder is owner-only: others could not load the model
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        save_model_card(card, staging, overwrite=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replaced = output_dir.with_name(staging.name + ".old") if output_dir.exists() and overwrite else None
    if replaced is not None:
        output_dir.rename(replaced)
    try:
        staging.rename(output_dir)  # fails over a file or a folder with files in it, replaces an empty folder
    except OSError as error:
        if replaced is not None:
            replaced.rename(output_dir)
        raise SystemExit(f"{output_dir} was created while training ran, so the trained model was not written "
                         f"there ({error.strerror or error}); it is kept in {staging}: rename that folder.") from None
    if replaced is not None:
        shutil.rmtree(replaced)
    return output_dir


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    output_dir = check_arguments(args)
    dataset = load_training_data(args.dataset, args.split)
    check_training_data(dataset, args)
    with tempfile.TemporaryDirectory() as scratch:
        training_args = training_arguments(args, scratch)
        model, processor = load_model(args.model)
        if FINE_TOKENS_COLUMN not in dataset.column_names:
            dataset = prepare_dataset(dataset, model.codec_model, semantic_column=args.semantic_column,
                                      audio_column=args.audio_column)

        stage = getattr(model, STAGE_ATTRIBUTES[args.stage])
        collator = collator_for(stage, processor)
        trained = with_lora(stage, args) if args.lora_rank > 0 else stage
        trained.train()
        trainer = Trainer(model=trained, args=training_args, train_dataset=dataset, data_collator=collator)
        if args.resume:
            trainer.train(resume_from_checkpoint=True)  # the last checkpoint in --checkpoint-dir
        else:
            trainer.train()
    if trainer.state.global_step == 0:  # parsing refuses settings that train nothing; this guards the rest
        raise SystemExit("The training ran no optimizer step, so there is nothing to save; nothing was written. "
                         "Check the dataset's size and --max-steps or --epochs.")
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

        try:
            push_folder_to_hub(args.push_to_hub, write, "fine-tuned Bark")
        except (OSError, ValueError, HfHubHTTPError) as error:  # the model is written: say where, and how to upload
            raise SystemExit(f"Wrote the fine-tuned model to {folder}, but the upload to {args.push_to_hub} failed "
                             f"({' '.join(str(error).split())}). Upload the folder later with `hf upload "
                             f"{args.push_to_hub} {folder}`.") from None
    return folder


if __name__ == "__main__":
    main()
