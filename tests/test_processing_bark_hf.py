"""BarkHfProcessor: text ids equal the original's, voice presets load, validate and round-trip."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import sys
import unicodedata
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from bark.generation import _normalize_whitespace, _tokenize  # conftest has stubbed torchaudio
from conftest import TEXTS
from huggingface_hub.errors import LocalEntryNotFoundError
from transformers import BarkProcessor, BertTokenizer
from transformers.utils import PaddingStrategy

from bark_hf import processing_bark_hf
from bark_hf.conversion.voice_presets import read_original_presets
from bark_hf.generation_configuration_bark_hf import (
    CODEBOOK_SIZE,
    N_COARSE_CODEBOOKS,
    N_FINE_CODEBOOKS,
    SEMANTIC_VOCAB_SIZE,
    BarkHfSemanticGenerationConfig,
)
from bark_hf.processing_bark_hf import BarkHfProcessor, gives_tokens, has_visible_text, validate_voice_preset

WINDOW = BarkHfSemanticGenerationConfig().max_input_semantic_length


def make_preset(n_semantic: int = 10, seed: int = 0) -> dict[str, np.ndarray]:
    """A valid random preset: 1.5 coarse frames per semantic token, as real presets have."""
    rng = np.random.default_rng(seed)
    frames = round(n_semantic * 1.5)
    return {
        "semantic_prompt": rng.integers(0, SEMANTIC_VOCAB_SIZE, n_semantic),
        "coarse_prompt": rng.integers(0, CODEBOOK_SIZE, (N_COARSE_CODEBOOKS, frames)),
        "fine_prompt": rng.integers(0, CODEBOOK_SIZE, (N_FINE_CODEBOOKS, frames)),
    }


def assert_presets_equal(actual, expected) -> None:
    assert set(actual) == set(expected)
    for key in expected:
        np.testing.assert_array_equal(np.asarray(actual[key]), np.asarray(expected[key]))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir) -> BertTokenizer:
    return BertTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture()
def processor(tokenizer) -> BarkHfProcessor:
    return BarkHfProcessor(tokenizer, {"v2/en_speaker_1": make_preset(seed=1), "announcer": make_preset(seed=2)})


@pytest.fixture(scope="module")
def real_presets(shared_presets_dir) -> dict[str, dict[str, np.ndarray]]:
    return read_original_presets(shared_presets_dir)


# --- text ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text", [*TEXTS.values(), "  Hello,\n\tmy   name is\u3000Suno.  ", "[laughs] — ♪ THE END ♪ [laughs]"]
)
def test_ids_equal_original_tokenize(processor, tokenizer, text):
    expected = _tokenize(tokenizer, _normalize_whitespace(text))
    out = processor(text)
    assert out["input_ids"].dtype == torch.long
    assert out["input_ids"].shape == (1, WINDOW)
    assert out["input_ids"][0, : len(expected)].tolist() == expected
    assert out["attention_mask"][0].tolist() == [1] * len(expected) + [0] * (WINDOW - len(expected))
    assert (out["input_ids"][0, len(expected) :] == tokenizer.pad_token_id).all()


def test_whitespace_normalised_and_cues_untouched(processor, tokenizer):
    messy = processor("\n  Hello,   my \t name\n\nis Suno. [laughs]  ♪ THE   END ♪ — ")
    clean = processor("Hello, my name is Suno. [laughs] ♪ THE END ♪ —")
    assert torch.equal(messy["input_ids"], clean["input_ids"])
    tokens = tokenizer.convert_ids_to_tokens(clean["input_ids"][0][clean["attention_mask"][0] == 1].tolist())
    for cue in ("[", "laughs", "]", "♪", "THE", "END", "—"):
        assert cue in tokens  # cased, and the cue brackets are kept as text
    assert "[UNK]" not in tokens


def test_batch_pads_each_text(processor, tokenizer):
    texts = ["Hello", TEXTS["de"], TEXTS["zh"]]
    out = processor(texts)
    assert out["input_ids"].shape == out["attention_mask"].shape == (3, WINDOW)
    for row, text in enumerate(texts):
        ids = _tokenize(tokenizer, _normalize_whitespace(text))
        assert out["input_ids"][row, : len(ids)].tolist() == ids
        assert int(out["attention_mask"][row].sum()) == len(ids)
    assert "history_prompt" not in out


def test_long_text_keeps_first_window_and_warns(processor, tokenizer, caplog):
    text = " ".join(["pizza"] * 300)
    ids = _tokenize(tokenizer, text)
    assert len(ids) == 300
    with caplog.at_level(logging.WARNING):
        out = processor(text)
    assert out["input_ids"][0].tolist() == ids[:WINDOW]
    assert bool(out["attention_mask"].all())
    percent = round((300 - WINDOW) / 300 * 100, 1)
    assert any(f"{percent}%" in record.getMessage() for record in caplog.records)


def test_numpy_output_and_shorter_window(processor):
    out = processor(["Hello", "I like pizza"], return_tensors="np", max_length=8, voice_preset="announcer")
    assert isinstance(out["input_ids"], np.ndarray) and out["input_ids"].dtype == np.int64
    assert out["input_ids"].shape == (2, 8)
    assert isinstance(out["history_prompt"]["semantic_prompt"], np.ndarray)


@pytest.mark.parametrize(
    ("text", "error", "match"),
    [
        ("", ValueError, "at least one word"),
        (" \n\t ", ValueError, "at least one word"),
        (["Hello", "   "], ValueError, r"text\[1\] is empty or whitespace only.*at least one word"),
        ("\u200b", ValueError, r"^Text \('.*'\) gives no tokens"),
        ([], ValueError, "at least one string"),
        (42, TypeError, "string or a list of strings"),
        (["Hello", 3], TypeError, r"text\[1\].*str\(\)"),
        (b"Hello", TypeError, "string or a list of strings"),
    ],
)
def test_bad_text(processor, text, error, match):
    with pytest.raises(error, match=match):
        processor(text)


def test_text_the_cli_refuses_as_invisible_has_no_word_for_the_tokenizer(tokenizer):
    """has_visible_text, the CLI's check before a model loads, must refuse no text with a word in it. Bark's BERT
    tokenizer drops the Unicode format characters (category Cf), alone or among whitespace, but for the few its
    Unicode tables predate (U+0890, Egyptian hieroglyph format controls, ...), which it reads as [UNK]."""
    format_characters = "".join(c for c in map(chr, range(sys.maxunicode + 1)) if unicodedata.category(c) == "Cf")
    assert "\u200b" in format_characters and "\ufeff" in format_characters
    for text in [*format_characters, f" \n{format_characters}\u3000"]:
        assert not has_visible_text(text)
        assert set(tokenizer.tokenize(text)) <= {tokenizer.unk_token}, repr(text)
    assert not gives_tokens(tokenizer, "\u200b\u200d \u2060\u00ad\u200e\ufeff")
    for text in ["Hello\u200b world", "\u200bHi", "[laughs]", "\u00e9"]:
        assert has_visible_text(text)


def test_max_length_takes_numpy_integers(processor):
    """As every count bark-hf takes (bark_hf.checks); np.int64 used to be refused."""
    assert processor("Hello", max_length=np.int64(5))["input_ids"].shape == (1, 5)


@pytest.mark.parametrize("kwargs", [{"max_length": WINDOW + 1}, {"max_length": 0}, {"return_tensors": "tf"},
                                    {"max_length": True}, {"max_length": 5.0}])
def test_bad_options(processor, kwargs):
    with pytest.raises(ValueError, match="max_length|return_tensors"):
        processor("Hello", **kwargs)


def test_transformers_tokenizer_settings_with_barks_values(processor):
    """Code written for transformers' BarkProcessor passes these; with Bark's own values they change nothing."""
    plain = processor(["Hello there", "Hi"], max_length=12)
    settings = dict(add_special_tokens=False, return_attention_mask=True, return_token_type_ids=False,
                    padding=PaddingStrategy.MAX_LENGTH, truncation=np.bool_(True))
    same = processor(["Hello there", "Hi"], max_length=12, **settings)
    assert set(same) == set(plain)
    for key in plain:
        assert torch.equal(same[key], plain[key])


@pytest.mark.parametrize("setting, error, match", [
    ({"add_special_tokens": True}, ValueError, "add_special_tokens=False, as the original"),
    ({"padding": "longest"}, ValueError, "padding='max_length'"),
    ({"return_attention_mask": 1}, ValueError, "return_attention_mask=True"),
    ({"return_token_type_ids": True}, ValueError, "return_token_type_ids=False"),
    ({"truncation": "only_first"}, ValueError, "truncation=True"),
    ({"voice_presets": "v2/en_speaker_1"}, TypeError, "unknown setting 'voice_presets'.*add_special_tokens"),
])
def test_other_tokenizer_settings_refused(processor, setting, error, match):
    with pytest.raises(error, match=match):
        processor("Hello", **setting)


# --- voice presets: sources ---------------------------------------------------------------------


def test_preset_by_name(processor):
    out = processor("Hello", voice_preset="v2/en_speaker_1")
    history = out["history_prompt"]
    assert set(history) == {"semantic_prompt", "coarse_prompt", "fine_prompt"}
    assert history["semantic_prompt"].dtype == torch.long and history["semantic_prompt"].dim() == 1
    assert history["coarse_prompt"].shape[0] == N_COARSE_CODEBOOKS
    assert history["fine_prompt"].shape[0] == N_FINE_CODEBOOKS
    assert_presets_equal({k: v.numpy() for k, v in history.items()}, make_preset(seed=1))


def test_preset_from_npz_path(processor, tmp_path):
    preset = make_preset(seed=3)
    path = tmp_path / "my_voice.npz"
    np.savez(path, **{key: value.astype(np.uint16) for key, value in preset.items()})
    for source in (path, str(path)):
        history = processor("Hello", voice_preset=source)["history_prompt"]
        assert_presets_equal({k: v.numpy() for k, v in history.items()}, preset)
        assert history["fine_prompt"].dtype == torch.long


def test_preset_from_dicts(processor):
    preset = make_preset(seed=4)
    as_torch = {key: torch.from_numpy(value).to(torch.int32) for key, value in preset.items()}
    for source in (preset, as_torch):
        history = processor("Hello", voice_preset=source)["history_prompt"]
        assert_presets_equal({k: v.numpy() for k, v in history.items()}, preset)


def test_one_preset_per_text(processor):
    own = make_preset(seed=5)
    out = processor(["Hello", "I like pizza", "Hello"], voice_preset=["announcer", None, own])
    history = out["history_prompt"]
    assert isinstance(history, list) and len(history) == 3
    assert history[1] is None
    assert_presets_equal({k: v.numpy() for k, v in history[0].items()}, make_preset(seed=2))
    assert_presets_equal({k: v.numpy() for k, v in history[2].items()}, own)


def test_preset_list_must_match_texts(processor):
    with pytest.raises(ValueError, match="same length"):
        processor(["Hello", "pizza"], voice_preset=["announcer"])
    with pytest.raises(ValueError, match="same length"):
        processor("Hello", voice_preset=["announcer"])


def test_a_folder_given_as_a_preset_file_is_named_as_a_folder(processor, tmp_path):
    """It was reported as "No voice preset file at ...", though something is there."""
    (tmp_path / "voice.npz").mkdir()
    with pytest.raises(IsADirectoryError, match=r"voice\.npz' is a folder; give the path of an \.npz file"):
        processor.load_voice_preset(str(tmp_path / "voice.npz"))


def test_unknown_name_lists_close_matches(processor):
    with pytest.raises(ValueError, match=r"v2/en_speaker_1.*\.npz") as info:
        processor("Hello", voice_preset="v2/en_speakr_1")
    assert "Close matches" in str(info.value)
    with pytest.raises(ValueError, match="No stored preset has a similar name"):
        processor.load_voice_preset("zzzzzzzzzzzzz")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        processor.load_voice_preset("missing.npz")
    with pytest.raises(TypeError, match="preset name"):
        processor.load_voice_preset(3)


def test_a_path_object_with_a_stored_name_says_to_pass_a_string(processor):
    """It was called unknown, with itself as the first close match."""
    with pytest.raises(ValueError, match="Path, read as a file.*pass it as a string: 'v2/en_speaker_1'"):
        processor("Hi", voice_preset=Path("v2/en_speaker_1"))


@pytest.mark.parametrize("name", ["", "../evil", "v2/../../evil", "/abs/voice", "v2\\voice", "a//b", "./a",
                                  "C:voice", "repo_or_path", 5])
def test_bad_preset_names_refused(processor, name):
    with pytest.raises(ValueError, match="name|reserved"):
        processor.add_voice_preset(name, make_preset())


def test_add_voice_preset(processor):
    processor.add_voice_preset("mine/voice", make_preset(seed=7))
    processor.add_voice_preset("copy", "announcer")
    assert processor.available_voice_presets == ["announcer", "copy", "mine/voice", "v2/en_speaker_1"]
    assert_presets_equal(processor.load_voice_preset("copy"), make_preset(seed=2))
    with pytest.raises(ValueError, match="semantic_prompt"):
        processor.add_voice_preset("broken", {**make_preset(), "semantic_prompt": np.array([], dtype=np.int64)})
    assert "broken" not in processor.available_voice_presets


def test_returned_presets_are_copies(processor):
    processor.load_voice_preset("announcer")["semantic_prompt"][:] = 0
    assert_presets_equal(processor.load_voice_preset("announcer"), make_preset(seed=2))


# --- voice presets: validation ------------------------------------------------------------------


def _with(key, value, **extra):
    return {**make_preset(), key: value, **extra}


@pytest.mark.parametrize(
    ("preset", "match"),
    [
        ({k: v for k, v in make_preset().items() if k != "fine_prompt"}, "missing: fine_prompt"),
        ({**make_preset(), "speaker": np.zeros(3, np.int64)}, "unexpected: speaker"),
        (_with("semantic_prompt", np.zeros((1, 10), np.int64)), "'semantic_prompt' has 2 dimension"),
        (_with("coarse_prompt", np.zeros(15, np.int64)), "'coarse_prompt' has 1 dimension"),
        (_with("semantic_prompt", np.zeros(10, np.float32)), "'semantic_prompt' has dtype float32"),
        (_with("fine_prompt", np.zeros((8, 15), bool)), "'fine_prompt' has dtype bool"),
        # What numpy cannot convert: each used to raise numpy's or torch's own error, naming no key.
        (_with("semantic_prompt", torch.zeros(10, dtype=torch.bfloat16)), "'semantic_prompt' has dtype torch.bfloat16"),
        (_with("semantic_prompt", torch.zeros(10, dtype=torch.long, device="meta")),
         "'semantic_prompt' cannot be read as an integer array"),
        (_with("coarse_prompt", torch.zeros((2, 15), dtype=torch.long).to_sparse()),
         "'coarse_prompt' cannot be read as an integer array"),
        (_with("coarse_prompt", [list(range(15)), list(range(14))]), "'coarse_prompt' cannot be read"),
        (_with("semantic_prompt", np.zeros(0, np.int64)), "'semantic_prompt' is empty"),
        (_with("semantic_prompt", np.full(10, SEMANTIC_VOCAB_SIZE)), r"\[10000, 10000\].*\[0, 10000\)"),
        (_with("semantic_prompt", np.full(10, -1)), r"'semantic_prompt' has values in \[-1, -1\]"),
        (_with("coarse_prompt", np.full((2, 15), CODEBOOK_SIZE)), r"'coarse_prompt' has values.*\[0, 1024\)"),
        (_with("fine_prompt", np.full((8, 15), -3)), r"'fine_prompt' has values in \[-3, -3\]"),
        (_with("coarse_prompt", np.zeros((3, 15), np.int64)), "'coarse_prompt' has 3 codebook rows.*expected 2"),
        (_with("fine_prompt", np.zeros((2, 15), np.int64)), "'fine_prompt' has 2 codebook rows.*expected 8"),
        (_with("fine_prompt", np.zeros((8, 14), np.int64)), "'fine_prompt' has 14 frames.*'coarse_prompt' has 15"),
        (
            _with("coarse_prompt", np.zeros((2, 30), np.int64), fine_prompt=np.zeros((8, 30), np.int64)),
            r"30 frames for 10 semantic tokens \(ratio 3.0\).*ratio of 1.5",
        ),
    ],
)
def test_validation_failures(preset, match):
    with pytest.raises(ValueError, match=match):
        validate_voice_preset(preset)


def test_validation_refuses_non_mapping():
    with pytest.raises(TypeError, match="mapping"):
        validate_voice_preset([np.zeros(3)])


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64, np.uint16, np.uint32, np.uint64])
def test_validation_accepts_any_integer_dtype(dtype):
    preset = {"semantic_prompt": np.arange(2, dtype=dtype), "coarse_prompt": np.ones((2, 3), dtype),
              "fine_prompt": np.ones((8, 3), dtype)}
    checked = validate_voice_preset(preset)
    assert all(array.dtype == np.int64 for array in checked.values())
    assert_presets_equal(checked, preset)


def test_invalid_preset_in_call_names_the_problem(processor):
    with pytest.raises(ValueError, match="fine_prompt"):
        processor("Hello", voice_preset={**make_preset(), "fine_prompt": np.zeros((8, 3), np.int64)})


# --- save / load --------------------------------------------------------------------------------


def test_save_load_round_trip(processor, tmp_path):
    files = processor.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "speaker_embeddings_path.json").read_text())
    assert str(tmp_path / "speaker_embeddings_path.json") in files
    assert index["repo_or_path"] == "."
    assert index["v2/en_speaker_1"] == {
        key: f"speaker_embeddings/v2/en_speaker_1_{key}.npy" for key in ("semantic_prompt", "coarse_prompt",
                                                                           "fine_prompt")
    }
    assert (tmp_path / "speaker_embeddings" / "announcer_fine_prompt.npy").is_file()
    loaded = BarkHfProcessor.from_pretrained(tmp_path)
    assert loaded.available_voice_presets == processor.available_voice_presets
    for name in processor.available_voice_presets:
        assert_presets_equal(loaded.load_voice_preset(name), processor.load_voice_preset(name))
    for key in ("input_ids", "attention_mask"):
        assert torch.equal(loaded(TEXTS["en"])[key], processor(TEXTS["en"])[key])


def test_speaker_embeddings_dict_path_none_loads_no_presets(processor, tmp_path):
    """transformers' BarkProcessor.from_pretrained(..., speaker_embeddings_dict_path=None); it was a TypeError."""
    processor.save_pretrained(tmp_path)
    loaded = BarkHfProcessor.from_pretrained(tmp_path, speaker_embeddings_dict_path=None)
    assert loaded.available_voice_presets == []
    assert torch.equal(loaded(TEXTS["en"])["input_ids"], processor(TEXTS["en"])["input_ids"])


def test_a_subfolder_gives_its_own_presets(processor, tmp_path):
    processor.save_pretrained(tmp_path / "repo" / "voices")
    loaded = BarkHfProcessor.from_pretrained(tmp_path / "repo", subfolder="voices")
    assert loaded.available_voice_presets == processor.available_voice_presets != []
    assert BarkHfProcessor.from_pretrained(tmp_path / "repo" / "voices", subfolder=None).available_voice_presets


def test_a_missing_subfolder_is_named(processor, tmp_path):
    processor.save_pretrained(tmp_path / "sub")
    with pytest.raises(FileNotFoundError, match="has no subfolder 'other'"):
        BarkHfProcessor.from_pretrained(tmp_path, subfolder="other")


def test_presets_read_lazily(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = BarkHfProcessor.from_pretrained(tmp_path)
    (tmp_path / "speaker_embeddings" / "announcer_coarse_prompt.npy").unlink()
    assert_presets_equal(loaded.load_voice_preset("v2/en_speaker_1"), make_preset(seed=1))
    with pytest.raises(FileNotFoundError, match="announcer.*coarse_prompt"):
        loaded("Hello", voice_preset="announcer")
    (tmp_path / "speaker_embeddings" / "v2" / "en_speaker_1_fine_prompt.npy").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(ValueError, match="v2/en_speaker_1.*not a NumPy .npy file") as info:
        BarkHfProcessor.from_pretrained(tmp_path).load_voice_preset("v2/en_speaker_1")
    assert "allow_pickle" not in str(info.value)


def test_pickled_object_arrays_are_refused_without_pointing_to_allow_pickle(processor, tmp_path):
    """numpy's own message ('... when allow_pickle=False') reads as advice to unlock the pickle; bark-hf never will."""
    objects = np.array([{"tokens": [1, 2]}], dtype=object)
    np.savez(tmp_path / "voice.npz", **{**make_preset(), "semantic_prompt": objects})
    with pytest.raises(ValueError, match=r"voice\.npz.*pickled object array.*never loads") as info:
        processor("Hello", voice_preset=str(tmp_path / "voice.npz"))
    assert "allow_pickle" not in str(info.value)
    processor.save_pretrained(tmp_path / "saved")
    np.save(tmp_path / "saved" / "speaker_embeddings" / "announcer_fine_prompt.npy", objects, allow_pickle=True)
    with pytest.raises(ValueError, match="announcer.*pickled object array.*never loads") as info:
        BarkHfProcessor.from_pretrained(tmp_path / "saved").load_voice_preset("announcer")
    assert "allow_pickle" not in str(info.value)


def test_an_npz_whose_members_are_not_npy_data_is_named(processor, tmp_path):
    """numpy returns such a member as raw bytes, which the shape checks reported as "shape ()"."""
    with zipfile.ZipFile(tmp_path / "voice.npz", "w") as archive:
        for key, array in make_preset().items():
            buffer = io.BytesIO()
            np.save(buffer, array)
            archive.writestr(f"{key}.npy", buffer.getvalue() if key != "coarse_prompt" else b"not numpy data")
    with pytest.raises(ValueError, match=r"voice\.npz.*member\(s\) coarse_prompt are not \.npy arrays"):
        processor("Hello", voice_preset=str(tmp_path / "voice.npz"))


def test_folder_without_presets(tokenizer, tmp_path):
    BarkHfProcessor(tokenizer).save_pretrained(tmp_path)
    (tmp_path / "speaker_embeddings_path.json").unlink()
    assert BarkHfProcessor.from_pretrained(tmp_path).available_voice_presets == []


@pytest.mark.parametrize("bad_path", ["../outside.npy", "speaker_embeddings/../../outside.npy", "/etc/passwd"])
def test_index_paths_may_not_leave_folder(processor, tmp_path, bad_path):
    folder = tmp_path / "saved"
    processor.save_pretrained(folder)
    index = json.loads((folder / "speaker_embeddings_path.json").read_text())
    index["announcer"]["fine_prompt"] = bad_path
    (folder / "speaker_embeddings_path.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="outside"):
        BarkHfProcessor.from_pretrained(folder)


def test_index_names_checked(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "speaker_embeddings_path.json").read_text())
    index["../evil"] = index["announcer"]
    (tmp_path / "speaker_embeddings_path.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="speaker_embeddings_path.json.*'\\.\\.'"):
        BarkHfProcessor.from_pretrained(tmp_path)


def test_an_index_that_is_not_utf8_is_named(processor, tmp_path):
    """A raw UnicodeDecodeError named neither the file nor that it is the preset index."""
    processor.save_pretrained(tmp_path)
    (tmp_path / "speaker_embeddings_path.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(ValueError, match="speaker_embeddings_path.json is not valid JSON"):
        BarkHfProcessor.from_pretrained(tmp_path)


def test_save_pretrained_into_a_file_is_refused_with_the_fix(processor, tmp_path):
    """os.makedirs failed with a bare FileExistsError."""
    (tmp_path / "saved").write_text("mine", encoding="utf-8")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder.*choose another save_directory"):
        processor.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved").read_text(encoding="utf-8") == "mine"


def test_save_pretrained_with_push_to_hub_points_to_push_to_hub(processor, tmp_path):
    with pytest.raises(ValueError, match=r"call processor.push_to_hub\(repo_id\)"):
        processor.save_pretrained(tmp_path, push_to_hub=True)


@pytest.mark.parametrize("setting", ["speaker_embeddings_dict_path", "speaker_embeddings_directory"])
def test_save_pretrained_refuses_other_preset_file_names(processor, tmp_path, setting):
    """transformers' BarkProcessor.save_pretrained takes other names; they were silently ignored."""
    default = {"speaker_embeddings_dict_path": "speaker_embeddings_path.json",
               "speaker_embeddings_directory": "speaker_embeddings"}[setting]
    processor.save_pretrained(tmp_path / "default", **{setting: default})
    assert (tmp_path / "default" / "speaker_embeddings_path.json").is_file()
    with pytest.raises(ValueError, match=f"always writes the presets' {setting} as '{default}'"):
        processor.save_pretrained(tmp_path / "other", **{setting: "mine"})
    assert not (tmp_path / "other").exists()


def test_a_save_that_fails_part_way_leaves_the_earlier_files_whole(processor, tmp_path, monkeypatch):
    """Presets and their index were written in place: a failure mid-file left a truncated .npy that the old
    index still named."""
    processor.save_pretrained(tmp_path)
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    real_save = np.save

    def full_disk(file, array, **kwargs):
        real_save(file, array[: len(array) // 2], **kwargs)  # some bytes out, then the failure
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(processing_bark_hf.np, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        BarkHfProcessor(processor.tokenizer, {name: make_preset(seed=7) for name in ("announcer", "v2/en_speaker_1")}
                        ).save_pretrained(tmp_path)
    assert {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()} == before
    monkeypatch.undo()
    assert_presets_equal(BarkHfProcessor.from_pretrained(tmp_path).load_voice_preset("announcer"), make_preset(seed=2))


def test_a_second_save_with_fewer_presets_removes_the_files_it_no_longer_indexes(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    (tmp_path / "speaker_embeddings" / "notes.npy").write_bytes(b"not ours")  # a file no index named
    BarkHfProcessor(processor.tokenizer, {"announcer": make_preset(seed=7)}).save_pretrained(tmp_path)
    left = sorted(path.relative_to(tmp_path).as_posix() for path in (tmp_path / "speaker_embeddings").rglob("*.npy"))
    assert left == [f"speaker_embeddings/{name}" for name in
                    ("announcer_coarse_prompt.npy", "announcer_fine_prompt.npy", "announcer_semantic_prompt.npy",
                     "notes.npy")]
    loaded = BarkHfProcessor.from_pretrained(tmp_path)
    assert loaded.available_voice_presets == ["announcer"]
    assert_presets_equal(loaded.load_voice_preset("announcer"), make_preset(seed=7))


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00 not text"])
def test_an_unreadable_tokenizer_config_names_the_folder(processor, tmp_path, content):
    """A bare JSONDecodeError or UnicodeDecodeError from deep inside transformers named no file."""
    processor.save_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_bytes(content)
    with pytest.raises(ValueError, match=rf"tokenizer files in '{re.escape(str(tmp_path))}/?'.*cannot be read"):
        BarkHfProcessor.from_pretrained(tmp_path)


def test_missing_local_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="No folder"):
        BarkHfProcessor.from_pretrained(tmp_path / "nowhere")


def test_unreachable_hub_is_explained(tmp_path, monkeypatch):
    with pytest.raises(ConnectionError, match="Could not reach the Hugging Face Hub.*local folder"):
        BarkHfProcessor.from_pretrained("nobody/no-such-bark", local_files_only=True, cache_dir=tmp_path)

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("connection refused")

    monkeypatch.setattr(processing_bark_hf, "snapshot_download", offline)
    with pytest.raises(ConnectionError, match="Could not reach the Hugging Face Hub.*local folder"):
        BarkHfProcessor.from_pretrained("suno/bark")


def test_a_hub_repo_without_a_tokenizer_is_named_not_its_download_cache(tmp_path, monkeypatch):
    """The message named the snapshot folder in the download cache and said to save a processor there."""
    snapshot = tmp_path / "models--someone--bark-weights" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    monkeypatch.setattr(processing_bark_hf, "snapshot_download", lambda *args, **kwargs: str(snapshot))
    with pytest.raises(FileNotFoundError, match=r"^'someone/bark-weights' holds no tokenizer") as error:
        BarkHfProcessor.from_pretrained("someone/bark-weights")
    assert "push_to_hub" in str(error.value)
    assert str(snapshot) not in str(error.value)
    (snapshot / "voices").mkdir()
    with pytest.raises(FileNotFoundError, match=r"^'someone/bark-weights' \(subfolder 'voices'\) holds no tokenizer"):
        BarkHfProcessor.from_pretrained("someone/bark-weights", subfolder="voices")


# --- real presets and transformers interop ------------------------------------------------------


def test_all_real_presets_convert_save_and_load(real_presets, tokenizer, shared_presets_dir, tmp_path):
    assert len(real_presets) == len(list(Path(shared_presets_dir).rglob("*.npz")))
    assert {"v2/en_speaker_1", "en_speaker_1", "announcer", "speaker_0"} <= set(real_presets)
    original = np.load(shared_presets_dir / "v2" / "en_speaker_1.npz", allow_pickle=False)
    assert_presets_equal(real_presets["v2/en_speaker_1"], {key: original[key] for key in original.files})

    processor = BarkHfProcessor(tokenizer)
    for name, preset in real_presets.items():
        processor.add_voice_preset(name, preset)
    processor.save_pretrained(tmp_path)
    loaded = BarkHfProcessor.from_pretrained(tmp_path)
    assert loaded.available_voice_presets == sorted(real_presets)
    for name, preset in real_presets.items():
        assert_presets_equal(loaded.load_voice_preset(name), preset)


def test_read_original_presets_errors(tmp_path):
    with pytest.raises(ValueError, match="No .npz voice presets"):
        read_original_presets(tmp_path)
    with pytest.raises(ValueError, match="No folder"):
        read_original_presets(tmp_path / "nowhere")
    (tmp_path / "v2").mkdir()
    np.savez(tmp_path / "v2" / "good.npz", **make_preset())
    np.savez(tmp_path / "v2" / "bad.npz", **{**make_preset(), "coarse_prompt": np.zeros((2, 3), np.int64)})
    with pytest.raises(ValueError, match=r"bad\.npz.*fine_prompt"):
        read_original_presets(tmp_path)
    for not_an_npz in (b"not a zip", b"\x80\x04K\x01.", b"\x93NUMPY"):  # text, a pickle, a bare .npy header
        (tmp_path / "v2" / "bad.npz").write_bytes(not_an_npz)
        with pytest.raises(ValueError, match=r"bad\.npz' is not an \.npz archive") as info:
            read_original_presets(tmp_path)
        assert "allow_pickle" not in str(info.value)
    (tmp_path / "v2" / "bad.npz").unlink()
    assert list(read_original_presets(tmp_path)) == ["v2/good"]


def test_transformers_reads_our_folder(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    theirs = BarkProcessor.from_pretrained(str(tmp_path))
    assert sorted(theirs.available_voice_presets) == processor.available_voice_presets
    for name in processor.available_voice_presets:
        history = theirs("Hello", voice_preset=name)["history_prompt"]
        assert_presets_equal({k: v.numpy() for k, v in history.items()}, processor.load_voice_preset(name))
    assert theirs("Hello")["input_ids"].tolist() == processor("Hello")["input_ids"].tolist()


def test_we_read_transformers_folder(tokenizer, tmp_path):
    ours = BarkHfProcessor(tokenizer, {"v2/en_speaker_1": make_preset(seed=8), "announcer": make_preset(seed=9)})
    ours.save_pretrained(tmp_path / "ours")
    theirs = BarkProcessor.from_pretrained(str(tmp_path / "ours"))  # a Path breaks its save
    theirs.save_pretrained(str(tmp_path / "theirs"))
    index = json.loads((tmp_path / "theirs" / "speaker_embeddings_path.json").read_text())
    assert os.path.isabs(index["repo_or_path"])
    # The index names its folder by absolute path; moving the folder must not break it.
    (tmp_path / "theirs").rename(tmp_path / "moved")
    loaded = BarkHfProcessor.from_pretrained(tmp_path / "moved")
    assert loaded.available_voice_presets == ["announcer", "v2/en_speaker_1"]
    assert_presets_equal(loaded.load_voice_preset("v2/en_speaker_1"), make_preset(seed=8))
    assert torch.equal(loaded(TEXTS["ko"])["input_ids"], ours(TEXTS["ko"])["input_ids"])


@pytest.mark.parametrize("value", [np.zeros(10, np.float64), torch.zeros(10), torch.zeros(10, dtype=torch.bfloat16)])
def test_float_preset_arrays_name_the_conversion(value):
    """The original casts float presets to integers; the refusal here named no fix."""
    with pytest.raises(ValueError, match=r"has dtype .*float.* convert them first: array.astype\(np.int64\)"):
        validate_voice_preset(_with("semantic_prompt", value))
    with pytest.raises(ValueError, match="has dtype bool.*\\)\\.$"):  # no cast to suggest for flags
        validate_voice_preset(_with("semantic_prompt", np.zeros(10, bool)))


# --- how users name presets ---------------------------------------------------------------------


def test_close_matches_ignore_case_and_backslashes(processor):
    """'V2/EN_SPEAKER_1' and the original's Windows spelling 'v2\\en_speaker_1' were called unlike any stored name."""
    for name in ("V2/EN_SPEAKER_1", "Announcer", "v2\\en_speaker_1"):
        with pytest.raises(ValueError, match="Close matches: (v2/en_speaker_1|announcer)") as info:
            processor.load_voice_preset(name)
        assert "No stored preset" not in str(info.value)


def test_a_stored_name_with_npz_and_no_such_file_names_the_stored_preset(processor, tmp_path, monkeypatch):
    """'v2/en_speaker_1.npz', Suno's asset file name, only said "No voice preset file at ...", naming no fix."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"stored preset 'v2/en_speaker_1'.*voice_preset='v2/en_speaker_1'"):
        processor.load_voice_preset("v2/en_speaker_1.npz")
    with pytest.raises(FileNotFoundError, match=r"Close matches: v2/en_speaker_1"):
        processor.load_voice_preset("v2/en_speakr_1.npz")
    (tmp_path / "v2").mkdir()
    np.savez(tmp_path / "v2" / "en_speaker_1.npz", **make_preset(seed=11))  # a file of that name is read, as before
    assert_presets_equal(processor.load_voice_preset("v2/en_speaker_1.npz"), make_preset(seed=11))


def test_a_path_without_npz_reads_the_npz_file_as_transformers_does(processor, tmp_path, monkeypatch):
    """transformers' BarkProcessor adds '.npz' to a name it does not hold; here such a path was an unknown preset."""
    np.savez(tmp_path / "voice.npz", **make_preset(seed=12))
    monkeypatch.setenv("HOME", str(tmp_path))
    for source in (str(tmp_path / "voice"), tmp_path / "voice", "~/voice"):
        assert_presets_equal(processor.load_voice_preset(source), make_preset(seed=12))
    processor.add_voice_preset("voice", make_preset(seed=13))  # a stored name still comes first
    monkeypatch.chdir(tmp_path)
    assert_presets_equal(processor.load_voice_preset("voice"), make_preset(seed=13))


def test_the_output_full_pair_or_a_whole_processor_output_as_a_preset_names_the_fix(processor):
    """The (full_generation, audio) pair of generate_audio(..., output_full=True) was read as one preset per text
    ("got 2 presets for one text"); a processor's whole output only listed its keys."""
    pair = (make_preset(), np.zeros(100, dtype=np.float32))
    for call in (lambda: processor("Hello", voice_preset=pair), lambda: processor.load_voice_preset(pair),
                 lambda: validate_voice_preset(pair)):
        with pytest.raises(TypeError, match=r"not the \(full_generation, audio\) tuple .* pass its first item"):
            call()
    with pytest.raises(ValueError, match=r"processor's output; pass its \['history_prompt'\]"):
        processor("Hello", voice_preset=processor("Hello", voice_preset="announcer"))


def test_a_tuple_of_a_preset_and_a_name_or_none_is_one_preset_per_text(processor):
    """Any 2-tuple starting with a dict was taken for the (full_generation, audio) pair: (preset, "announcer") and
    (preset, None), one preset per text, were refused."""
    for second in ("announcer", None):
        history = processor(["Hi.", "Bye."], voice_preset=(make_preset(seed=3), second))["history_prompt"]
        assert len(history) == 2 and (history[1] is None) == (second is None)
        assert_presets_equal(history[0], make_preset(seed=3))
