"""Conversion of Suno's original release into a bark-hf folder: the script, `bark-hf convert`,
checkpoint variants, and clear refusals that leave nothing behind.

Two full conversions carry the 271 real presets (the script as a subprocess and the command
in-process); the other cases fail before anything is written or convert without presets.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL_ARGS, random_voice_preset, write_original_checkpoint
from huggingface_hub import ModelCard
from safetensors import safe_open
from transformers import BertTokenizer

from bark_hf.cli import main as cli_main
from bark_hf.conversion.convert_suno import _replace, convert_suno_checkpoint, load_bark_tokenizer
from bark_hf.conversion.suno_checkpoint import (
    STAGES,
    CheckpointError,
    convert_stage,
    find_stage_files,
    rename_state_dict,
)
from bark_hf.model_card import BARK_LANGUAGES
from bark_hf.processing_bark_hf import BarkHfProcessor

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "conversion/convert_suno_checkpoint.py"
N_SHARED_PRESETS = 271
COMPOSITE_PREFIXES = {"text": "semantic.", "coarse": "coarse_acoustics.", "fine": "fine_acoustics."}


def _flags(checkpoint_dir, codec, tokenizer, output_dir, *extra, voice_presets=None) -> list[str]:
    flags = ["--checkpoint-dir", str(checkpoint_dir), "--codec", str(codec), "--tokenizer", str(tokenizer),
             "--output-dir", str(output_dir)]
    if voice_presets is not None:
        flags += ["--voice-presets", str(voice_presets)]
    return flags + list(extra)


def _run_cli(capsys, *flags) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli_main(["convert", *flags])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def tiny_codec_model():
    from transformers import EncodecModel

    from bark_hf.configuration_bark_hf import bark_codec_config

    return EncodecModel(bark_codec_config(num_filters=4, hidden_size=16, codebook_dim=16, num_lstm_layers=1)).eval()


@pytest.fixture()
def tiny_codec(monkeypatch, tiny_codec_model):
    """Conversion with a tiny stand-in codec, for tests whose subject is not the codec (fast)."""
    from bark_hf.conversion import convert_suno

    monkeypatch.setattr(convert_suno, "load_codec", lambda path: tiny_codec_model)
    return tiny_codec_model


def _assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("bark-hf convert: error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]


# --- checkpoint variants ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def originals(original_checkpoint_dir) -> dict[str, dict]:
    """The session's original checkpoints as loaded dicts, to derive variants from."""
    return {stage: torch.load(original_checkpoint_dir / f"{stage}.pt", weights_only=True) for stage in STAGES}


def _without_prefix(state: dict) -> dict:
    return {key.removeprefix("_orig_mod."): value for key, value in state.items()}


def _without_masks(state: dict) -> dict:
    return {key: value for key, value in state.items() if not key.endswith(".attn.bias")}


def _with_legacy_vocab_size(args: dict) -> dict:
    args = dict(args)
    assert args["input_vocab_size"] == args["output_vocab_size"]
    args["vocab_size"] = args.pop("input_vocab_size")
    del args["output_vocab_size"]
    return args


VARIANTS = {
    "no_compile_prefix": ("text", lambda ck: {**ck, "model": _without_prefix(ck["model"])}),
    "no_legacy_masks": ("coarse", lambda ck: {**ck, "model": _without_masks(ck["model"])}),
    "neither": ("text", lambda ck: {**ck, "model": _without_masks(_without_prefix(ck["model"]))}),
    "legacy_vocab_size": ("coarse", lambda ck: {**ck, "model_args": _with_legacy_vocab_size(ck["model_args"])}),
    "legacy_vocab_size_fine": ("fine", lambda ck: {**ck, "model_args": _with_legacy_vocab_size(ck["model_args"])}),
    # numpy numbers, which the original's configs take as they are; the config's JSON could not hold them.
    "numpy_model_args": ("coarse", lambda ck: {**ck, "model_args": {key: np.array(value)[()] for key, value in
                                                                    ck["model_args"].items()}}),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_checkpoint_variants_convert_to_the_same_model(variant, originals, original_checkpoint_dir, tmp_path):
    stage, change = VARIANTS[variant]
    path = tmp_path / f"{stage}.pt"
    torch.save(change(originals[stage]), path)
    reference = convert_stage(stage, original_checkpoint_dir / f"{stage}.pt")
    converted = convert_stage(stage, path)
    assert not converted.training
    assert converted.config.to_dict() == reference.config.to_dict()
    converted.config.to_json_string()
    state, expected = converted.state_dict(), reference.state_dict()
    assert set(state) == set(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def test_numpy_scalars_of_the_released_checkpoints_load(originals, original_checkpoint_dir, tmp_path):
    """Suno's files hold a numpy float64 pickled under numpy 1 (`numpy.core.multiarray.scalar`); they were refused
    as a pickle payload, so the real release did not convert."""
    staged, path = tmp_path / "staged.pt", tmp_path / "text.pt"
    torch.save({**originals["text"], "best_val_loss": np.float64(1.25)}, staged)
    with zipfile.ZipFile(staged) as source, zipfile.ZipFile(path, "w") as target:
        for item in source.infolist():
            data = source.read(item.filename)
            if item.filename.endswith("/data.pkl"):
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            target.writestr(item, data)
    assert b"numpy.core.multiarray\nscalar" in zipfile.ZipFile(path).read("staged/data.pkl")
    converted, reference = convert_stage("text", path), convert_stage("text", original_checkpoint_dir / "text.pt")
    for key, value in reference.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key


def test_fine_heads_tie_as_the_original_when_more_codebooks_are_given(tmp_path):
    """The original FineGPT (and transformers' Bark) ties head i to embedding i + 1 whatever n_codes_given is; ours
    tied it to embedding i + n_codes_given, so a checkpoint with n_codes_given 2 was refused as 'weights differ'."""
    from bark.model_fine import FineGPT, FineGPTConfig
    from transformers import BarkFineConfig, BarkFineModel

    args = {**TINY_MODEL_ARGS["fine"], "n_codes_given": 2}
    path = write_original_checkpoint(tmp_path / "fine.pt", "fine", seed=4, model_args=args)
    converted = convert_stage("fine", path)
    original = FineGPT(FineGPTConfig(**args)).eval()
    original.load_state_dict(_without_prefix(torch.load(path, weights_only=True)["model"]))
    codes = torch.randint(0, 1024, (1, 50, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for codebook in range(2, 8):
            torch.testing.assert_close(converted(codebook, codes).logits, original(codebook, codes), rtol=1e-5,
                                       atol=1e-5)
    theirs = BarkFineModel(BarkFineConfig(**{**converted.config.to_dict(), "model_type": "fine_acoustics"}))
    assert converted._tied_weights_keys == theirs._tied_weights_keys


def test_a_plain_key_beside_its_prefixed_twin_with_the_same_tensor_converts(tmp_path):
    """The original loads a checkpoint holding both x and _orig_mod.x (it keeps the prefixed one); with equal
    tensors nothing is lost, so only differing ones are refused (see the prefixed_and_plain_key bad case)."""
    path = write_original_checkpoint(tmp_path / "coarse.pt", "coarse", seed=2)
    checkpoint = torch.load(path, weights_only=True)
    state = checkpoint["model"]
    state["transformer.wpe.weight"] = state["_orig_mod.transformer.wpe.weight"].clone()
    torch.save(checkpoint, path)
    converted = convert_stage("coarse", path)
    assert torch.equal(converted.position_embeds_layer.weight, state["transformer.wpe.weight"])


@pytest.fixture(scope="module")
def small_and_large_dir(tmp_path_factory, original_checkpoint_dir, originals) -> Path:
    """Both releases side by side. The large one (`*_2.pt`) has other weights and the plain layout:
    no `_orig_mod.` prefix, no mask buffers, and the coarse model_args name one `vocab_size`."""
    folder = tmp_path_factory.mktemp("both_sizes")
    for stage in STAGES:
        (folder / f"{stage}.pt").symlink_to(original_checkpoint_dir / f"{stage}.pt")
        checkpoint = originals[stage]
        state = {key: value * 2 if value.is_floating_point() else value
                 for key, value in _without_masks(_without_prefix(checkpoint["model"])).items()}
        args = _with_legacy_vocab_size(checkpoint["model_args"]) if stage == "coarse" else checkpoint["model_args"]
        torch.save({"model_args": args, "model": state}, folder / f"{stage}_2.pt")
    return folder


def test_find_stage_files(small_and_large_dir, original_checkpoint_dir, tmp_path):
    assert find_stage_files(original_checkpoint_dir) == {s: original_checkpoint_dir / f"{s}.pt" for s in STAGES}
    assert find_stage_files(small_and_large_dir, "small") == {s: small_and_large_dir / f"{s}.pt" for s in STAGES}
    assert find_stage_files(small_and_large_dir, "large") == {s: small_and_large_dir / f"{s}_2.pt" for s in STAGES}
    large_only = tmp_path / "large_only"
    large_only.mkdir()
    for stage in STAGES:
        (large_only / f"{stage}_2.pt").symlink_to(small_and_large_dir / f"{stage}_2.pt")
    assert find_stage_files(large_only) == {s: large_only / f"{s}_2.pt" for s in STAGES}
    with pytest.raises(ValueError, match="holds both small and large checkpoints; choose one with --size"):
        find_stage_files(small_and_large_dir)
    with pytest.raises(FileNotFoundError, match="lacks the large checkpoints: text_2.pt, coarse_2.pt, fine_2.pt"):
        find_stage_files(original_checkpoint_dir, "large")
    with pytest.raises(ValueError, match="size must be 'small' or 'large'"):
        find_stage_files(original_checkpoint_dir, "medium")


def test_both_sizes_without_size_is_refused(small_and_large_dir, original_codec_path, tokenizer_dir, tmp_path,
                                            capsys):
    output = tmp_path / "bark"
    code, _, err = _run_cli(capsys, *_flags(small_and_large_dir, original_codec_path, tokenizer_dir, output))
    _assert_one_line_error(code, err, "holds both small and large checkpoints", "--size small|large")
    assert list(tmp_path.iterdir()) == []


# --- the two full conversions with the real presets ---------------------------------------------


@pytest.fixture(scope="module")
def preset_conversions(tmp_path_factory, original_checkpoint_dir, small_and_large_dir, original_codec_path,
                       tokenizer_dir, shared_presets_dir) -> dict[str, tuple[Path, dict[str, Path]]]:
    """The script (a subprocess) and `bark-hf convert` (in-process), run concurrently.

    The script converts the small files; the command converts the large variants (`--size large`)
    with `--overwrite` over an existing folder holding a stale file. Returns, per route, the
    output folder and the stage files it came from.
    """
    script_out = tmp_path_factory.mktemp("script") / "bark-script"
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, SCRIPT, *_flags(original_checkpoint_dir, original_codec_path, tokenizer_dir, script_out,
                                               voice_presets=shared_presets_dir)]
    script = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        cli_out = tmp_path_factory.mktemp("cli") / "bark-cli"
        cli_out.mkdir()
        (cli_out / "stale.txt").write_text("from an earlier conversion")
        code = cli_main(["convert", *_flags(small_and_large_dir, original_codec_path, tokenizer_dir, cli_out,
                                            "--size", "large", "--overwrite", voice_presets=shared_presets_dir)])
        assert code == 0
        stdout, stderr = script.communicate(timeout=300)
    finally:
        if script.poll() is None:
            script.kill()
            script.wait()
    assert script.returncode == 0, stderr
    assert f"Wrote {script_out}" in stdout
    return {
        "script": (script_out, {stage: original_checkpoint_dir / f"{stage}.pt" for stage in STAGES}),
        "cli": (cli_out, {stage: small_and_large_dir / f"{stage}_2.pt" for stage in STAGES}),
    }


@pytest.fixture(params=["script", "cli"])
def converted(request, preset_conversions) -> tuple[Path, dict[str, Path]]:
    return preset_conversions[request.param]


def test_folder_contents(converted, tokenizer_dir):
    folder, _ = converted
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer_config.json",
                 "speaker_embeddings_path.json", "README.md"):
        assert (folder / name).is_file(), name
    assert json.loads((folder / "config.json").read_text())["model_type"] == "bark_hf"
    generation = json.loads((folder / "generation_config.json").read_text())
    assert set(generation) >= {"semantic_config", "coarse_acoustics_config", "fine_acoustics_config"}
    # The tokenizer round-trips: the same ids as the source vocabulary.
    processor = BarkHfProcessor.from_pretrained(folder)
    source = BarkHfProcessor(BertTokenizer.from_pretrained(tokenizer_dir))
    text = "Hello, my name is Suno. [laughs] ♪ Guten Tag!"
    assert processor(text)["input_ids"].tolist() == source(text)["input_ids"].tolist()
    # Nothing left over next to the output: no staging (`.name.*`) or backup folder.
    assert [path.name for path in folder.parent.iterdir()] == [folder.name]


def test_overwrite_replaced_the_old_folder(preset_conversions):
    folder, _ = preset_conversions["cli"]
    assert not (folder / "stale.txt").exists()


def test_weights_equal_the_source_without_masks(converted):
    folder, files = converted
    with safe_open(folder / "model.safetensors", framework="pt") as weights:
        stored = {key: weights.get_tensor(key) for key in weights.keys()}  # noqa: SIM118 (safe_open is no dict)
    assert not [key for key in stored if "attn.bias" in key or "_orig_mod" in key]
    for stage, path in files.items():
        prefix = COMPOSITE_PREFIXES[stage]
        expected = rename_state_dict(torch.load(path, map_location="cpu", weights_only=True)["model"])
        assert expected, stage
        for key, value in expected.items():
            # The fine heads are tied to embeddings 1..7 and stored once, under the embedding's name.
            tied = re.fullmatch(r"lm_heads\.(\d+)\.weight", key) if stage == "fine" else None
            name = f"{prefix}input_embeds_layers.{int(tied[1]) + 1}.weight" if tied else prefix + key
            assert torch.equal(stored[name], value), f"{stage}: {key}"
        ours = {key for key in stored if key.startswith(prefix)}
        assert ours <= {prefix + key for key in expected}, stage


def test_model_card_metadata(converted):
    folder, files = converted
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "bark-hf"
    assert card.data.pipeline_tag == "text-to-audio"
    assert card.data.license == "mit"
    assert card.data.language == BARK_LANGUAGES
    assert f"{N_SHARED_PRESETS} presets" in card.text
    assert ", ".join(path.name for path in files.values()) in card.text


def test_every_preset_round_trips(converted, shared_presets_dir):
    folder, _ = converted
    sources = {path.relative_to(shared_presets_dir).with_suffix("").as_posix(): path
               for path in sorted(shared_presets_dir.rglob("*.npz"))}
    assert len(sources) == N_SHARED_PRESETS
    index = json.loads((folder / "speaker_embeddings_path.json").read_text())
    assert set(index) - {"repo_or_path"} == set(sources)
    processor = BarkHfProcessor.from_pretrained(folder)
    assert processor.available_voice_presets == sorted(sources)
    for name, path in sources.items():
        loaded = processor.load_voice_preset(name)
        with np.load(path) as source:
            assert set(loaded) == set(source.files), name
            for key in source.files:
                assert loaded[key].dtype == np.int64
                np.testing.assert_array_equal(loaded[key], source[key], err_msg=f"{name}: {key}")


# --- refusals -----------------------------------------------------------------------------------


class CodeOnLoad:
    """A pickle payload: unpickling it runs code that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


class SystemCallOnLoad:
    """A pickle payload through `os.system`, whose module torch's safe loader blocks (a different error message)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _checkpoint_dir(tmp_path: Path, source: Path, replace: dict[str, object] | None = None,
                    omit: tuple[str, ...] = ()) -> Path:
    """The session's checkpoints (linked), with some stages replaced by objects or raw bytes."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for stage in STAGES:
        if stage in omit:
            continue
        target = folder / f"{stage}.pt"
        value = (replace or {}).get(stage)
        if value is None:
            target.symlink_to(source / f"{stage}.pt")
        elif isinstance(value, bytes):
            target.write_bytes(value)
        else:
            torch.save(value, target)
    return folder


def _drop_key(state: dict, key: str) -> dict:
    assert key in state
    return {k: v for k, v in state.items() if k != key}


def _with_value(state: dict, key: str, value: float) -> dict:
    """`state` with one entry of `key` set to `value` (NaN, inf), the source tensor left as it was."""
    tensor = state[key].clone()
    tensor.view(-1)[1] = value
    return {**state, key: tensor}


def _bad_cases(originals, source: Path, marker: Path) -> dict[str, tuple[dict, tuple[str, ...], type]]:
    """name -> (how to build the checkpoint folder, message fragments, exception type)."""
    text, coarse, fine = originals["text"], originals["coarse"], originals["fine"]
    return {
        "truncated": (dict(replace={"fine": (source / "fine.pt").read_bytes()[:50_000]}),
                      ("fine.pt", "truncated or corrupt"), ValueError),
        "not_a_pytorch_file": (dict(replace={"coarse": b"these are not the weights you are looking for"}),
                               ("coarse.pt", "could not be read as a PyTorch file"), ValueError),
        "pickle_payload": (dict(replace={"text": {**text, "optimizer": CodeOnLoad(marker)}}),
                           ("text.pt", "refuses to unpickle arbitrary objects"), ValueError),
        "pickle_payload_blocked_module": (dict(replace={"coarse": {**coarse, "optimizer": SystemCallOnLoad(marker)}}),
                                          ("coarse.pt", "refuses to unpickle arbitrary objects"), ValueError),
        "not_a_checkpoint": (dict(replace={"text": [torch.zeros(3)]}),
                             ("text.pt", "is not a Suno Bark checkpoint", "'model_args' and 'model'"), CheckpointError),
        "wrong_shapes": (dict(replace={"coarse": {**coarse, "model_args": {**coarse["model_args"], "n_embd": 64}}}),
                         ("coarse.pt", "wrong shape for its model_args", "input_embeds_layer.weight: (12096, 32) vs "
                          "(12096, 64)"), CheckpointError),
        "wrong_block_size": (dict(replace={"text": {**text, "model_args": {**text["model_args"], "block_size": 512}}}),
                             ("text.pt", "position_embeds_layer.weight: (1024, 32) vs (512, 32)"), CheckpointError),
        "bad_model_args": (dict(replace={"fine": {**fine, "model_args": {**fine["model_args"], "n_head": 3}}}),
                           ("fine.pt", "model_args do not describe a Bark fine model",
                            "must be a multiple of num_heads"), CheckpointError),
        "missing_key": (dict(replace={"fine": {**fine, "model": _drop_key(
                            fine["model"], "_orig_mod.transformer.h.1.mlp.c_fc.weight")}}),
                        ("fine.pt", "missing keys ['layers.1.mlp.in_proj.weight']", "unexpected keys []"),
                        CheckpointError),
        "unexpected_key": (dict(replace={"text": {**text, "model": {
                               **text["model"], "_orig_mod.transformer.h.2.attn.c_attn.weight": torch.zeros(96, 32)}}}),
                           ("text.pt", "missing keys []", "unexpected keys ['layers.2.attn.att_proj.weight']"),
                           CheckpointError),
        # NaN was reported as "Converted weights differ" (NaN never equals itself) and inf was converted silently.
        "nan_weight": (dict(replace={"coarse": {**coarse, "model": _with_value(
                           coarse["model"], "_orig_mod.transformer.h.0.mlp.c_fc.weight", float("nan"))}}),
                       ("coarse.pt", "NaN or infinite weights at layers.0.mlp.in_proj.weight (1 NaN, 0 inf)"),
                       CheckpointError),
        "inf_weight": (dict(replace={"fine": {**fine, "model": _with_value(
                           fine["model"], "_orig_mod.transformer.ln_f.weight", -float("inf"))}}),
                       ("fine.pt", "NaN or infinite weights at layernorm_final.weight (0 NaN, 1 inf)"),
                       CheckpointError),
        # The original keeps the prefixed tensor; the plain one, renamed last here, silently replaced it.
        "prefixed_and_plain_key": (dict(replace={"coarse": {**coarse, "model": {
                                       **coarse["model"], "transformer.wpe.weight": torch.zeros(1024, 32)}}}),
                                   ("coarse.pt holds both '_orig_mod.transformer.wpe.weight' and "
                                    "'transformer.wpe.weight'", "same weight 'position_embeds_layer.weight'"),
                                   CheckpointError),
        # Reported only as "Converted weights differ ... at ['input_embeds_layers.1.weight']".
        "fine_head_untied": (dict(replace={"fine": {**fine, "model": _with_value(
                                 fine["model"], "_orig_mod.lm_heads.0.weight", 5.0)}}),
                             ("fine.pt holds different values for lm_heads.0.weight and input_embeds_layers.1.weight",
                              "ties into one tensor"), CheckpointError),
        "missing_stage_file": (dict(omit=("fine",)), ("must hold text.pt, coarse.pt, fine.pt",), FileNotFoundError),
        "model_args_not_a_dict": (dict(replace={"coarse": {**coarse, "model_args": [1, 2]}}),
                                  ("coarse.pt",), CheckpointError),
        "model_not_a_dict": (dict(replace={"coarse": {**coarse, "model": torch.zeros(3)}}),
                             ("coarse.pt",), CheckpointError),
        "non_tensor_weight": (dict(replace={"coarse": {**coarse, "model": {
                                  **coarse["model"], "_orig_mod.transformer.wpe.weight": 3}}}),
                              ("coarse.pt",), CheckpointError),
        # Same layout, other vocabularies: converted, this model would fail only when generating (IndexError).
        "text_and_coarse_swapped": (dict(replace={"text": coarse, "coarse": text}),
                                    ("text.pt", "is not a Bark text checkpoint", "input_vocab_size 12096"),
                                    CheckpointError),
        "fine_with_four_codebooks": (dict(replace={"fine": {**fine, "model_args": {
                                         **fine["model_args"], "n_codes_total": 4}}}),
                                     ("fine.pt", "n_codes_total 4 (needs at least 8)"), CheckpointError),
        "model_args_of_wrong_type": (dict(replace={"coarse": {**coarse, "model_args": {
                                         **coarse["model_args"], "n_layer": "2"}}}),
                                     ("coarse.pt", "model_args"), CheckpointError),
    }


BAD_CASE_NAMES = ["truncated", "not_a_pytorch_file", "pickle_payload", "pickle_payload_blocked_module",
                  "not_a_checkpoint", "wrong_shapes", "wrong_block_size", "bad_model_args", "missing_key",
                  "unexpected_key", "nan_weight", "inf_weight", "prefixed_and_plain_key", "fine_head_untied",
                  "missing_stage_file", "model_args_not_a_dict", "model_not_a_dict", "non_tensor_weight",
                  "model_args_of_wrong_type", "text_and_coarse_swapped", "fine_with_four_codebooks"]


@pytest.mark.parametrize("case", BAD_CASE_NAMES)
def test_bad_checkpoints_are_refused_and_leave_nothing(case, originals, original_checkpoint_dir, original_codec_path,
                                                       tokenizer_dir, tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    cases = _bad_cases(originals, original_checkpoint_dir, marker)
    assert sorted(cases) == sorted(BAD_CASE_NAMES)
    build, fragments, error_type = cases[case]
    checkpoint_dir = _checkpoint_dir(tmp_path, original_checkpoint_dir, **build)
    parent = tmp_path / "models"
    parent.mkdir()
    output = parent / "bark"

    with pytest.raises(error_type) as error:
        convert_suno_checkpoint(checkpoint_dir, original_codec_path, tokenizer_dir, output)
    for fragment in fragments:
        assert fragment in str(error.value)
    assert list(parent.iterdir()) == []

    code, _, err = _run_cli(capsys, *_flags(checkpoint_dir, original_codec_path, tokenizer_dir, output))
    _assert_one_line_error(code, err, *fragments)
    assert list(parent.iterdir()) == []
    assert not marker.exists()


def test_pickle_payload_is_live_but_never_run(originals, original_checkpoint_dir, tmp_path):
    """The refused file really would run code: an unsafe `torch.load` creates the marker."""
    marker = tmp_path / "payload-ran"
    path = tmp_path / "text.pt"
    torch.save({**originals["text"], "optimizer": CodeOnLoad(marker)}, path)
    with pytest.raises(ValueError, match="refuses to unpickle"):
        convert_stage("text", path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # what bark-hf must never do
    assert marker.exists()


def test_tokenizer_folder_without_vocab(original_checkpoint_dir, original_codec_path, tokenizer_dir, tmp_path,
                                        capsys):
    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(tokenizer_dir, tokenizer)
    (tokenizer / "vocab.txt").unlink()
    parent = tmp_path / "models"
    parent.mkdir()
    output = parent / "bark"
    with pytest.raises(FileNotFoundError, match="must be a folder holding the tokenizer's vocab.txt"):
        convert_suno_checkpoint(original_checkpoint_dir, original_codec_path, tokenizer, output)
    code, _, err = _run_cli(capsys, *_flags(original_checkpoint_dir, original_codec_path, tokenizer, output))
    _assert_one_line_error(code, err, "vocab.txt")
    assert list(parent.iterdir()) == []


def test_a_bare_vocab_txt_loads_as_the_cased_tokenizer(tokenizer_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tokenizer_dir / "vocab.txt", bare / "vocab.txt")  # no tokenizer_config.json saying "cased"
    text = "Hello THE END hello the"
    expected = BertTokenizer.from_pretrained(tokenizer_dir).encode(text, add_special_tokens=False)
    assert load_bark_tokenizer(bare).encode(text, add_special_tokens=False) == expected
    assert BertTokenizer.from_pretrained(bare).encode(text, add_special_tokens=False) != expected  # lowercases


def test_a_vocab_txt_that_is_not_utf8_is_named_with_the_fix(tokenizer_dir, tmp_path):
    """A bare UnicodeDecodeError named neither the file nor what to give instead."""
    folder = tmp_path / "latin1"
    shutil.copytree(tokenizer_dir, folder)
    with (folder / "vocab.txt").open("ab") as vocab:
        vocab.write("\ncaf\u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1/vocab\.txt is not UTF-8 text .*bert-base-multilingual-cased"):
        load_bark_tokenizer(folder)


def _without_unk(folder: Path) -> None:
    vocab = (folder / "vocab.txt").read_text(encoding="utf-8").splitlines()
    (folder / "vocab.txt").write_text("\n".join(token for token in vocab if token != "[UNK]"), encoding="utf-8")


UNUSABLE_TOKENIZERS = {
    "empty-vocab": (lambda folder: (folder / "vocab.txt").write_text(""), "has no [UNK] token (0 tokens in all)"),
    "vocab-without-unk": (_without_unk, "has no [UNK] token"),
    "too-large-vocab": (lambda folder: (folder / "vocab.txt").write_text(
        "\n".join(["[UNK]", *map(str, range(119_547))])), "holds 119548 tokens, more than Bark's 119547 text ids"),
    "broken-tokenizer-json": (lambda folder: (folder / "tokenizer.json").write_text('{"version": "1.0"}'),
                              "cannot be read (KeyError"),
}


@pytest.mark.parametrize("case", sorted(UNUSABLE_TOKENIZERS))
def test_unusable_tokenizers_are_refused_and_leave_nothing(case, original_checkpoint_dir, original_codec_path,
                                                           tokenizer_dir, tmp_path, capsys):
    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(tokenizer_dir, tokenizer)
    spoil, message = UNUSABLE_TOKENIZERS[case]
    spoil(tokenizer)
    parent = tmp_path / "models"
    parent.mkdir()
    code, _, err = _run_cli(capsys, *_flags(original_checkpoint_dir, original_codec_path, tokenizer, parent / "bark"))
    _assert_one_line_error(code, err, message, "bert-base-multilingual-cased")
    assert list(parent.iterdir()) == []


def test_an_output_dir_holding_an_input_is_refused_even_with_overwrite(original_checkpoint_dir, original_codec_path,
                                                                      tokenizer_dir, tmp_path, capsys):
    release = tmp_path / "release"
    shutil.copytree(original_checkpoint_dir, release)
    before = sorted(path.name for path in release.iterdir())
    for output in (release, tmp_path):  # the inputs' own folder, and a folder above them
        code, _, err = _run_cli(capsys, *_flags(release, original_codec_path, tokenizer_dir, output, "--overwrite"))
        _assert_one_line_error(code, err, f"--output-dir {output} holds an input of the conversion")
    assert sorted(path.name for path in release.iterdir()) == before


def test_attention_dropout_in_a_checkpoint_is_warned_about(originals, tmp_path, caplog):
    path = tmp_path / "coarse.pt"
    torch.save({**originals["coarse"], "model_args": {**originals["coarse"]["model_args"], "dropout": 0.1}}, path)
    with caplog.at_level(logging.WARNING):
        model = convert_stage("coarse", path)
    assert model.config.dropout == 0.1
    assert "applies it even when generating" in caplog.text


MISSING_INPUTS = {
    "checkpoint_dir": "nowhere does not exist",
    "codec": "nowhere.th",
    "voice_presets": "no-presets",
    "output_parent": "does not exist; create it first",
}


@pytest.mark.parametrize("what", sorted(MISSING_INPUTS))
def test_missing_inputs(what, request, original_checkpoint_dir, original_codec_path, tokenizer_dir, tmp_path, capsys):
    paths = dict(checkpoint_dir=original_checkpoint_dir, codec=original_codec_path, output=tmp_path / "bark")
    presets = None
    if what == "checkpoint_dir":
        paths["checkpoint_dir"] = tmp_path / "nowhere"
    elif what == "codec":
        paths["codec"] = tmp_path / "nowhere.th"
    elif what == "voice_presets":
        request.getfixturevalue("tiny_codec")  # presets are read after the codec
        presets = tmp_path / "no-presets"
    else:
        paths["output"] = tmp_path / "no-parent" / "bark"
    code, _, err = _run_cli(capsys, *_flags(paths["checkpoint_dir"], paths["codec"], tokenizer_dir, paths["output"],
                                            voice_presets=presets))
    _assert_one_line_error(code, err, MISSING_INPUTS[what])
    assert list(tmp_path.iterdir()) == []


def test_a_preset_file_as_the_preset_folder_is_named(original_checkpoint_dir, original_codec_path, tokenizer_dir,
                                                     tmp_path, capsys):
    preset = tmp_path / "en_speaker_6.npz"
    np.savez(preset, **random_voice_preset(0))
    code, _, err = _run_cli(capsys, *_flags(original_checkpoint_dir, original_codec_path, tokenizer_dir,
                                            tmp_path / "bark", voice_presets=preset))
    _assert_one_line_error(code, err, "en_speaker_6.npz is a file; pass the folder")  # it did say "does not exist"
    assert list(tmp_path.iterdir()) == [preset]


def test_a_checkpoint_file_as_the_checkpoint_folder_is_named(original_checkpoint_dir, original_codec_path,
                                                             tokenizer_dir, tmp_path, capsys):
    code, _, err = _run_cli(capsys, *_flags(original_checkpoint_dir / "text.pt", original_codec_path, tokenizer_dir,
                                            tmp_path / "bark"))
    _assert_one_line_error(code, err, "text.pt is a file; pass the folder")  # it said "does not exist"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag", ["--output-dir", "--checkpoint-dir", "--codec", "--tokenizer", "--voice-presets"])
def test_an_empty_path_is_refused_even_with_overwrite(flag, original_checkpoint_dir, original_codec_path,
                                                      tokenizer_dir, tmp_path, monkeypatch, capsys):
    """An empty --output-dir (an unset shell variable) was the current folder: with --overwrite, it was replaced."""
    cwd = tmp_path / "work"
    cwd.mkdir()
    (cwd / "keep.txt").write_text("mine")
    monkeypatch.chdir(cwd)
    flags = _flags(original_checkpoint_dir, original_codec_path, tokenizer_dir, tmp_path / "bark",
                   "--overwrite", voice_presets=tmp_path)
    flags[flags.index(flag) + 1] = ""
    code, _, err = _run_cli(capsys, *flags)
    _assert_one_line_error(code, err, f"{flag} is an empty path")
    assert [path.name for path in tmp_path.iterdir()] == ["work"]
    assert [path.name for path in cwd.iterdir()] == ["keep.txt"]


def test_existing_output_is_refused_without_overwrite(original_checkpoint_dir, original_codec_path, tokenizer_dir,
                                                      tmp_path, capsys):
    output = tmp_path / "bark"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    code, out, err = _run_cli(capsys, *_flags(original_checkpoint_dir, original_codec_path, tokenizer_dir, output))
    _assert_one_line_error(code, err, str(output), "already exists", "--overwrite")
    assert out == ""
    assert [path.name for path in output.iterdir()] == ["keep.txt"]
    assert (output / "keep.txt").read_text() == "mine"
    assert [path.name for path in tmp_path.iterdir()] == ["bark"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_every_file_is_readable_as_a_plain_open_would_leave_it(tiny_codec, original_checkpoint_dir,
                                                                original_codec_path, tokenizer_dir, tmp_path):
    previous = os.umask(0o022)
    try:
        output = convert_suno_checkpoint(original_checkpoint_dir, original_codec_path, tokenizer_dir, tmp_path / "bark")
    finally:
        os.umask(previous)
    modes = {path.relative_to(output).as_posix(): oct(path.stat().st_mode & 0o777)
             for path in output.rglob("*") if path.is_file()}
    assert "model.safetensors" in modes
    assert set(modes.values()) == {oct(0o644)}, modes


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_file_in_the_way_is_named_with_or_without_overwrite(overwrite, original_checkpoint_dir, original_codec_path,
                                                              tokenizer_dir, tmp_path, capsys):
    output = tmp_path / "bark"
    output.write_text("mine")
    flags = _flags(original_checkpoint_dir, original_codec_path, tokenizer_dir, output, *(["--overwrite"] * overwrite))
    code, _, err = _run_cli(capsys, *flags)
    _assert_one_line_error(code, err, str(output), "is a file, not a model folder")  # not "pass --overwrite"
    assert output.read_text() == "mine"
    assert list(tmp_path.iterdir()) == [output]


def test_output_dir_dot_is_the_current_folder(monkeypatch, tiny_codec, original_checkpoint_dir, original_codec_path,
                                              tokenizer_dir, tmp_path):
    """`--output-dir . --overwrite` failed after converting with "PosixPath('.') has an empty name"."""
    output = tmp_path / "bark"
    output.mkdir()
    monkeypatch.chdir(output)
    convert_suno_checkpoint(original_checkpoint_dir, original_codec_path, tokenizer_dir, ".", overwrite=True)
    assert (output / "config.json").is_file()
    assert [path.name for path in tmp_path.iterdir()] == ["bark"]


def test_overwrite_through_a_symlink_replaces_its_target_and_keeps_the_link(
        tiny_codec, original_checkpoint_dir, original_codec_path, tokenizer_dir, tmp_path):
    """The link itself was renamed aside and left behind as `.current.old`, and replaced by a real folder."""
    target = tmp_path / "v1"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    link = tmp_path / "current"
    link.symlink_to(target)
    convert_suno_checkpoint(original_checkpoint_dir, original_codec_path, tokenizer_dir, link, overwrite=True)
    assert link.is_symlink() and link.resolve() == target
    assert (target / "config.json").is_file() and not (target / "stale.txt").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["current", "v1"]


def test_a_symlink_into_its_own_folder_is_refused(tiny_codec, original_checkpoint_dir, original_codec_path,
                                                 tokenizer_dir, tmp_path, capsys):
    """`work/out -> work` (or `-> .`): replacing where the link points replaced `work`, the link and its neighbours
    with it."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("mine")
    for target in (work, Path(".")):
        link = work / "out"
        link.unlink(missing_ok=True)
        link.symlink_to(target)
        code, _, err = _run_cli(capsys, *_flags(original_checkpoint_dir, original_codec_path, tokenizer_dir, link,
                                                "--overwrite"))
        _assert_one_line_error(code, err, "holds the link itself")
        assert (work / "keep.txt").read_text() == "mine" and link.is_symlink()
        assert sorted(path.name for path in tmp_path.iterdir()) == ["work"]


def test_failed_overwrite_keeps_the_old_folder(originals, original_checkpoint_dir, original_codec_path, tokenizer_dir,
                                               tmp_path):
    checkpoint_dir = _checkpoint_dir(tmp_path, original_checkpoint_dir, omit=("coarse",))
    parent = tmp_path / "models"
    output = parent / "bark"
    output.mkdir(parents=True)
    (output / "keep.txt").write_text("mine")
    with pytest.raises(FileNotFoundError):
        convert_suno_checkpoint(checkpoint_dir, original_codec_path, tokenizer_dir, output, overwrite=True)
    assert [path.name for path in parent.iterdir()] == ["bark"]
    assert [path.name for path in output.iterdir()] == ["keep.txt"]


def test_failure_after_writing_removes_the_staging_folder(monkeypatch, tiny_codec, original_checkpoint_dir,
                                                          original_codec_path, tokenizer_dir, tmp_path):
    """A failure in the final check (after the files are written) leaves neither output nor staging."""
    from bark_hf.conversion import convert_suno

    written = []

    def failing_verify(folder, *args):
        written.extend(path.name for path in folder.iterdir())
        raise CheckpointError("simulated verification failure")

    monkeypatch.setattr(convert_suno, "_verify_folder", failing_verify)
    output = tmp_path / "bark"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="simulated"):
        convert_suno_checkpoint(original_checkpoint_dir, original_codec_path, tokenizer_dir, output, overwrite=True)
    assert "model.safetensors" in written
    assert [path.name for path in tmp_path.iterdir()] == ["bark"]
    assert [path.name for path in output.iterdir()] == ["keep.txt"]


def test_a_failed_final_rename_puts_the_old_folder_back(monkeypatch, tiny_codec, original_checkpoint_dir,
                                                        original_codec_path, tokenizer_dir, tmp_path):
    output = tmp_path / "bark"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    rename = Path.rename

    def failing_rename(self, target):
        if Path(target) == output and not self.name.endswith(".old"):  # the staging folder's move, not the backup's
            raise OSError("simulated rename failure")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", failing_rename)
    with pytest.raises(OSError, match="simulated"):
        convert_suno_checkpoint(original_checkpoint_dir, original_codec_path, tokenizer_dir, output, overwrite=True)
    assert [path.name for path in tmp_path.iterdir()] == ["bark"]
    assert [path.name for path in output.iterdir()] == ["keep.txt"]


def test_cli_usage_errors_exit_two(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["convert", "--checkpoint-dir", "x"])
    assert exit_info.value.code == 2
    assert "required" in capsys.readouterr().err


def test_replacing_an_output_folder_leaves_other_hidden_folders_alone(tmp_path):
    """The old folder was moved aside to the fixed name .NAME.old, deleting whatever a user kept there first."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old", encoding="utf-8")
    (tmp_path / ".out.old").mkdir()
    (tmp_path / ".out.old" / "mine.txt").write_text("mine", encoding="utf-8")
    staging = tmp_path / ".out.abc123"
    staging.mkdir()
    (staging / "new.txt").write_text("new", encoding="utf-8")
    _replace(staging, tmp_path / "out")
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["new.txt"]
    assert (tmp_path / ".out.old" / "mine.txt").read_text(encoding="utf-8") == "mine"
    assert sorted(path.name for path in tmp_path.iterdir()) == [".out.old", "out"]
