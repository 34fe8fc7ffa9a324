"""The suno-compatible API (`bark_hf.api`) on tiny models, and its parity with the original `bark.api`."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import torch
from conftest import TEXTS, random_voice_preset
from test_parity_original import original  # noqa: F401  (the original `bark.generation`, models filled)

from bark_hf import BarkHfModel, api, loading
from bark_hf.processing_bark_hf import read_voice_preset_file
from bark_hf.tiny_random import tiny_random_bark

TEXT = "Hello world."
SEMANTIC_SECONDS = 1.0  # shorter than the tiny model's 3 s cap, to keep each generation quick


@pytest.fixture(autouse=True)
def fresh_api(monkeypatch):
    """Every test starts with nothing loaded and without the original's environment flags."""
    monkeypatch.setattr(api, "_loaded", None)
    monkeypatch.delenv(api.USE_SMALL_MODELS_ENV, raising=False)
    monkeypatch.delenv(api.OFFLOAD_CPU_ENV, raising=False)


@pytest.fixture(scope="module")
def tiny_loaded(tiny_model_dir):
    """The tiny saved model (presets v2/en_speaker_0, v2/en_speaker_1, v2/de_speaker_3), loaded once."""
    api._loaded = None
    api.preload_models(model=str(tiny_model_dir), device="cpu")
    loaded = api._loaded
    loaded.model.semantic.generation_config.max_gen_duration_s = SEMANTIC_SECONDS
    api._loaded = None
    return loaded


@pytest.fixture
def tiny(monkeypatch, tiny_loaded):
    monkeypatch.setattr(api, "_loaded", tiny_loaded)
    return tiny_loaded


class FakeBark:
    """Stands in for a loaded model where only `preload_models`' choices are checked."""

    def __init__(self):
        for stage in api._STAGES:
            setattr(self, stage, torch.nn.Linear(1, 1))
        self.offloaded_to, self.offloaded_stages = None, None

    def enable_cpu_offload(self, accelerator_device=None, stages=api._STAGES):
        self.offloaded_to, self.offloaded_stages = torch.device(accelerator_device), list(stages)


@pytest.fixture
def fake_loader(monkeypatch):
    """Records the arguments `load_bark` gets; returns a `FakeBark`."""
    calls = []

    def fake_load_bark(name, device=None, dtype=None):
        calls.append(name)
        return FakeBark(), object()

    monkeypatch.setattr(loading, "load_bark", fake_load_bark)
    return calls


def stage_devices():
    return {stage: getattr(api._loaded.model, stage).weight.device.type for stage in api._STAGES}


# --- generation ---------------------------------------------------------------------------------------------


def test_generate_audio_is_float32_24khz(tiny):
    full, audio = api.generate_audio(TEXT, seed=0, silent=True, output_full=True)
    assert api.SAMPLE_RATE == 24_000
    assert audio.dtype == np.float32 and audio.ndim == 1
    n_semantic = full["semantic_prompt"].shape[0]
    assert 0 < n_semantic <= round(SEMANTIC_SECONDS * 49.9) + 1
    n_frames = int(np.floor(n_semantic * 75 / 49.9))
    assert full["coarse_prompt"].shape == (2, n_frames) and full["fine_prompt"].shape == (8, n_frames)
    assert all(array.dtype == np.int64 for array in full.values())
    np.testing.assert_array_equal(full["fine_prompt"][:2], full["coarse_prompt"])
    assert audio.shape == (n_frames * 320,)
    assert np.isfinite(audio).all() and np.abs(audio).max() > 0


def test_seed_makes_generation_repeatable(tiny):
    first_full, first = api.generate_audio(TEXT, seed=3, silent=True, output_full=True)
    second_full, second = api.generate_audio(TEXT, seed=3, silent=True, output_full=True)
    other_full, other = api.generate_audio(TEXT, seed=4, silent=True, output_full=True)
    for key in first_full:
        np.testing.assert_array_equal(first_full[key], second_full[key])
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first_full["semantic_prompt"], other_full["semantic_prompt"])
    assert first.shape != other.shape or not np.array_equal(first, other)


@pytest.mark.parametrize("history_prompt", [None, "v2/en_speaker_1"])
def test_generate_audio_equals_its_two_stages(tiny, history_prompt):
    full, audio = api.generate_audio(TEXT, history_prompt, text_temp=0.9, waveform_temp=0.6, silent=True,
                                     output_full=True, seed=11)
    torch.manual_seed(11)
    semantic = api.text_to_semantic(TEXT, history_prompt, temp=0.9, silent=True)
    full_two_step, audio_two_step = api.semantic_to_waveform(semantic, history_prompt, temp=0.6, silent=True,
                                                             output_full=True)
    for key in full:
        np.testing.assert_array_equal(full_two_step[key], full[key])
    np.testing.assert_array_equal(audio_two_step, audio)


def test_temperatures_reach_their_stages(tiny, monkeypatch):
    seen = {}
    model = tiny.model
    for name, stage in (("semantic", model.semantic), ("coarse", model.coarse_acoustics),
                        ("fine", model.fine_acoustics)):
        def spy(*args, _name=name, _generate=stage.generate, **kwargs):
            seen[_name] = (kwargs.get("temperature"), kwargs.get("show_progress"))
            return _generate(*args, **kwargs)

        monkeypatch.setattr(stage, "generate", spy)
    api.generate_audio(TEXT, text_temp=0.9, waveform_temp=0.4, silent=True, seed=0)
    assert seen == {"semantic": (0.9, False), "coarse": (0.4, False), "fine": (0.5, None)}


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_numpy_float32_temperatures_are_taken_without_a_warning(tiny):
    """The range check compared a float32 with the largest float64, which warned 'overflow encountered in cast'."""
    audio = api.generate_audio(TEXT, text_temp=np.float32(0.6), waveform_temp=np.float16(0.6), silent=True, seed=0)
    assert audio.dtype == np.float32 and audio.shape[0] > 0
    with pytest.raises(ValueError, match="finite number > 0"):
        api.generate_audio(TEXT, text_temp=10**400, silent=True)


def test_preset_by_name_equals_its_arrays(tiny):
    preset = tiny.processor.load_voice_preset("v2/en_speaker_1")
    by_name = api.generate_audio(TEXT, "v2/en_speaker_1", seed=2, silent=True)
    by_dict = api.generate_audio(TEXT, preset, seed=2, silent=True)
    without = api.generate_audio(TEXT, seed=2, silent=True)
    np.testing.assert_array_equal(by_name, by_dict)
    assert by_name.shape != without.shape or not np.array_equal(by_name, without)


def test_full_generation_saved_as_prompt_loads_back(tiny, tmp_path):
    full, _ = api.generate_audio(TEXT, "v2/de_speaker_3", seed=5, silent=True, output_full=True)
    path = tmp_path / "my_voice.npz"
    assert api.save_as_prompt(str(path), full) is None
    assert [p.name for p in tmp_path.iterdir()] == ["my_voice.npz"]  # no temporary file left
    with np.load(path, allow_pickle=False) as saved:
        assert sorted(saved.files) == sorted(full)
        for key in full:
            np.testing.assert_array_equal(saved[key], full[key])
    from_file = api.generate_audio("Next sentence.", str(path), seed=6, silent=True, output_full=True)
    from_dict = api.generate_audio("Next sentence.", full, seed=6, silent=True, output_full=True)
    for key in full:
        np.testing.assert_array_equal(from_file[0][key], from_dict[0][key])
    np.testing.assert_array_equal(from_file[1], from_dict[1])


def test_save_as_prompt_refuses_to_overwrite_unless_asked(tmp_path):
    path = tmp_path / "voice.npz"
    path.write_bytes(b"keep me")
    first, second = random_voice_preset(0), random_voice_preset(1)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        api.save_as_prompt(path, first)
    assert path.read_bytes() == b"keep me"
    api.save_as_prompt(path, second, overwrite=True)
    with np.load(path, allow_pickle=False) as saved:
        np.testing.assert_array_equal(saved["semantic_prompt"], second["semantic_prompt"])
    assert [p.name for p in tmp_path.iterdir()] == ["voice.npz"]


def test_save_as_prompt_keeps_a_replaced_files_permissions(tmp_path):
    """overwrite=True made a private (0600) preset readable by everyone (0644 under the usual umask)."""
    private, fresh = tmp_path / "private.npz", tmp_path / "fresh.npz"
    api.save_as_prompt(private, random_voice_preset(0))
    private.chmod(0o600)
    api.save_as_prompt(private, random_voice_preset(1), overwrite=True)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    previous = os.umask(0o022)
    try:
        api.save_as_prompt(fresh, random_voice_preset(2))
    finally:
        os.umask(previous)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o644  # a new file: the umask's mode, not mkstemp's 0600


def test_save_as_prompt_writes_through_a_symlink(tmp_path):
    """A symlinked file name was replaced by a plain file (the link lost), a dangling one without overwrite=True."""
    target, link = tmp_path / "target.npz", tmp_path / "link.npz"
    link.symlink_to(target)
    api.save_as_prompt(link, random_voice_preset(0))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        api.save_as_prompt(link, random_voice_preset(1))
    api.save_as_prompt(link, random_voice_preset(1), overwrite=True)
    assert link.is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == ["link.npz", "target.npz"]
    with np.load(target, allow_pickle=False) as saved:
        np.testing.assert_array_equal(saved["semantic_prompt"], random_voice_preset(1)["semantic_prompt"])


def test_save_as_prompt_leaves_a_pipe_in_place(tmp_path):
    pipe = tmp_path / "voice.npz"
    os.mkfifo(pipe)  # as a device such as /dev/null would be, the rename must not replace it with a plain file
    with pytest.raises(ValueError, match="not a regular file"):
        api.save_as_prompt(pipe, random_voice_preset(0), overwrite=True)
    assert stat.S_ISFIFO(pipe.stat().st_mode) and [p.name for p in tmp_path.iterdir()] == ["voice.npz"]


@pytest.mark.parametrize("name,full,error,match", [
    ("voice.wav", random_voice_preset(0), ValueError, "'.npz'"),
    ("voice.npz", [1, 2, 3], TypeError, "mapping"),
    ("voice.npz", {"semantic_prompt": np.arange(3)}, ValueError, "missing: coarse_prompt, fine_prompt"),
    ("voice.npz", {**random_voice_preset(0), "semantic_prompt": np.full(40, 10_000)}, ValueError, "values in"),
    ("missing/voice.npz", random_voice_preset(0), FileNotFoundError, "does not exist"),
])
def test_save_as_prompt_bad_input(tmp_path, name, full, error, match):
    with pytest.raises(error, match=match):
        api.save_as_prompt(tmp_path / name, full)
    assert not list(tmp_path.rglob("*.*"))


def test_save_as_prompt_with_its_arguments_mixed_up_names_the_fix(tmp_path):
    """Swapped arguments failed in os.fspath ("expected str, bytes or os.PathLike object, not dict"); the
    (full_generation, audio) tuple of output_full=True was refused only as "not a mapping"."""
    full = random_voice_preset(0)
    with pytest.raises(TypeError, match=r"filepath must be a path ending in '.npz', got dict; the path comes first"):
        api.save_as_prompt(full, tmp_path / "voice.npz")
    with pytest.raises(TypeError, match=r"pass its first item: full_generation, audio = generate_audio"):
        api.save_as_prompt(tmp_path / "voice.npz", (full, np.zeros(8, dtype=np.float32)))
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("overwrite", [False, True])
def test_save_as_prompt_onto_a_folder_says_it_is_a_folder(tmp_path, overwrite):
    """Without overwrite=True it advised passing overwrite=True, which then failed with another error."""
    (tmp_path / "voice.npz").mkdir()
    with pytest.raises(ValueError, match="not a regular file"):
        api.save_as_prompt(tmp_path / "voice.npz", random_voice_preset(0), overwrite=overwrite)
    assert (tmp_path / "voice.npz").is_dir()


def test_save_as_prompt_under_a_file_names_the_file(tmp_path):
    """A file in a folder's place was reported as a folder that 'does not exist'."""
    (tmp_path / "notes.txt").write_text("keep")
    with pytest.raises(NotADirectoryError, match="notes.txt is a file, not a folder"):
        api.save_as_prompt(tmp_path / "notes.txt" / "voice.npz", random_voice_preset(0))
    assert (tmp_path / "notes.txt").read_text() == "keep"


# --- bad input to generation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("call,error,match", [
    (lambda: api.generate_audio(123), TypeError, "text must be a string"),
    (lambda: api.generate_audio(["a", "b"]), TypeError, "text must be a string"),
    (lambda: api.generate_audio("  \n "), ValueError, "empty"),
    (lambda: api.generate_audio(TEXT, text_temp=0), ValueError, "text_temp must be a finite number > 0"),
    (lambda: api.generate_audio(TEXT, waveform_temp=-1.0), ValueError, "waveform_temp"),
    (lambda: api.generate_audio(TEXT, seed="1"), TypeError, "seed must be an integer"),
    (lambda: api.generate_audio(TEXT, "v2/en_speakr_1"), ValueError, "Close matches: v2/en_speaker_1"),
    (lambda: api.generate_audio(TEXT, "no/such/voice.npz"), FileNotFoundError, "voice.npz"),
    (lambda: api.generate_audio(TEXT, 42), TypeError, "voice_preset must be"),
    (lambda: api.generate_audio(TEXT, {"semantic_prompt": np.arange(3)}), ValueError, "missing"),
    (lambda: api.text_to_semantic(None), TypeError, "text must be a string"),
    (lambda: api.semantic_to_waveform(np.zeros((2, 3), dtype=np.int64)), ValueError, r"shape \(2, 3\)"),
    (lambda: api.semantic_to_waveform(np.array([0.5, 1.0])), TypeError, "integers"),
    (lambda: api.semantic_to_waveform(np.array([3, 10_000])), ValueError, r"\[3, 10000\]"),
    (lambda: api.semantic_to_waveform(np.array([3, 4]), temp=None), ValueError, "temp must be"),
    (lambda: api.semantic_to_waveform(None), TypeError, "1-D integer array .* got NoneType"),  # was "shape ()"
    (lambda: api.semantic_to_waveform("abc"), TypeError, "1-D integer array .* got str"),
    # Two texts' tokens in a list: numpy's "inhomogeneous shape" error named neither the argument nor the fix.
    (lambda: api.semantic_to_waveform([np.arange(5), np.arange(3)]), ValueError, "call semantic_to_waveform once per"),
])
def test_bad_input_is_one_clear_error(tiny, call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_no_semantic_tokens_give_empty_audio(tiny):
    full, audio = api.semantic_to_waveform(np.array([]), "v2/en_speaker_0", silent=True, output_full=True)
    assert audio.shape == (0,) and audio.dtype == np.float32
    assert {key: value.shape for key, value in full.items()} == {
        "semantic_prompt": (0,), "coarse_prompt": (2, 0), "fine_prompt": (8, 0)}


def test_unreadable_preset_file_names_it(tiny, tmp_path):
    path = tmp_path / "broken.npz"
    path.write_text("not an archive")
    with pytest.raises(ValueError, match="broken.npz"):
        api.generate_audio(TEXT, str(path))


# --- preload_models ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("env,flags,expected", [
    (None, {}, loading.LARGE_MODEL),
    ("False", {}, loading.LARGE_MODEL),
    ("True", {}, loading.DEFAULT_MODEL),
    ("1", {}, loading.DEFAULT_MODEL),
    (None, {"text_use_small": True}, loading.DEFAULT_MODEL),
    (None, {"fine_use_small": True}, loading.DEFAULT_MODEL),
])
def test_default_model_follows_small_flags(fake_loader, monkeypatch, env, flags, expected):
    if env is not None:
        monkeypatch.setenv(api.USE_SMALL_MODELS_ENV, env)
    api.preload_models(**flags)
    assert fake_loader == [expected]
    assert loading.DEFAULT_MODEL == "suno/bark-small" and loading.LARGE_MODEL == "suno/bark"


def test_named_model_or_path_wins(fake_loader, monkeypatch, tmp_path):
    monkeypatch.setenv(api.USE_SMALL_MODELS_ENV, "1")
    api.preload_models("tiny-random")
    api.preload_models(path=tmp_path)
    assert fake_loader == ["tiny-random", str(tmp_path)]
    with pytest.raises(ValueError, match="only one"):
        api.preload_models("tiny-random", path=tmp_path)


def test_home_relative_model_folders_load(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("HOME", str(tiny_model_dir.parent))  # transformers alone took "~/..." for a Hub id
    home_path = f"~/{tiny_model_dir.name}"
    model, processor = loading.load_bark(home_path)
    assert processor.available_voice_presets and isinstance(BarkHfModel.from_pretrained(home_path), BarkHfModel)
    with pytest.raises(FileNotFoundError, match="No model folder at"):
        loading.load_bark("~/no-such-folder")


def test_home_relative_voice_preset_files_save_and_load(tmp_path, monkeypatch):
    """Model folders took "~/..."; preset files did not: "No voice preset file at '~/voice.npz'"."""
    monkeypatch.setenv("HOME", str(tmp_path))
    preset = random_voice_preset(3)
    api.save_as_prompt("~/voice.npz", preset)
    assert (tmp_path / "voice.npz").is_file()
    loaded = read_voice_preset_file("~/voice.npz")
    for key, values in preset.items():
        np.testing.assert_array_equal(loaded[key], values)


def test_load_bark_refuses_an_integer_dtype_before_loading(tiny_model_dir, monkeypatch):
    """transformers cast the weights to int8 (or failed in torch), with no word of quantize_int8."""
    def no_load(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(BarkHfModel, "from_pretrained", no_load)
    with pytest.raises(ValueError, match="dtype 'int8' is not a floating-point dtype.*quantize_int8"):
        loading.load_bark(tiny_model_dir, dtype="int8")


def test_preload_takes_dtype_names_for_tiny_random_as_for_a_folder(tmp_path):
    api.preload_models("tiny-random", dtype="bfloat16")  # a folder's from_pretrained takes the name too
    model = api._loaded.model
    assert model.semantic.dtype == torch.bfloat16 and model.codec_model.dtype == torch.float32
    api.preload_models("tiny-random", dtype="auto")
    assert api._loaded.model.semantic.dtype == torch.float32
    with pytest.raises(ValueError, match="dtype 'float17' is not a torch dtype"):
        api.preload_models("tiny-random", dtype="float17")
    with pytest.raises(FileNotFoundError, match="No model folder at"):  # not the Hub's repo id syntax
        api.preload_models(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="No model folder at 'missing/'"):  # as shell completion writes it
        api.preload_models("missing/")


def test_preload_keeps_the_loaded_model_unless_forced(fake_loader):
    api.preload_models("tiny-random")
    model = api._loaded.model
    api.preload_models("tiny-random")
    assert api._loaded.model is model and len(fake_loader) == 1
    api.preload_models("tiny-random", force_reload=True)
    assert api._loaded.model is not model and len(fake_loader) == 2
    api.preload_models("other")
    assert fake_loader[-1] == "other"


def test_preload_of_a_missing_folder_keeps_the_loaded_model(fake_loader, tmp_path):
    """The loaded model was dropped first, so the next call silently loaded the default model (suno/bark)."""
    api.preload_models("tiny-random")
    model = api._loaded.model
    with pytest.raises(FileNotFoundError, match="No model folder at"):
        api.preload_models(tmp_path / "no-such-folder")
    assert api._loaded.model is model and fake_loader == ["tiny-random"]


def test_offload_env_flag_enables_cpu_offload(fake_loader, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.nn.Module, "to", lambda module, device: module)
    api.preload_models("tiny-random")
    assert api._loaded.model.offloaded_to is None
    monkeypatch.setenv(api.OFFLOAD_CPU_ENV, "True")
    api.preload_models("tiny-random")  # a changed flag is a new request: reloads
    assert api._loaded.model.offloaded_to == torch.device("cuda") and len(fake_loader) == 2
    assert api._loaded.model.offloaded_stages == list(api._STAGES)
    api.preload_models("tiny-random", text_use_gpu=False, codec_use_gpu=False)  # these stay on the CPU
    assert api._loaded.model.offloaded_stages == ["coarse_acoustics", "fine_acoustics"]
    api.preload_models("tiny-random", device="cpu")  # nothing to offload to: the flag is ignored
    assert api._loaded.model.offloaded_to is None
    with pytest.raises(TypeError, match="flags by keyword here"):
        api.preload_models(True, False)  # the original's positional text_use_gpu, text_use_small


@pytest.mark.parametrize("device", ["gpu0", "meta", "hpu", pytest.param("cuda", marks=pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks a torch without CUDA"))])
def test_preload_refuses_an_unusable_device_before_loading(fake_loader, device):
    """device='cuda' without CUDA raised torch's AssertionError after loading, 'hpu' a ModuleNotFoundError."""
    with pytest.raises(ValueError, match=f"device={device!r} cannot hold the model here"):
        api.preload_models("tiny-random", device=device)
    assert fake_loader == [] and api._loaded is None


@pytest.fixture
def running(tiny, monkeypatch) -> list[str | None]:
    """The stage each `offload_all_but` call keeps on the accelerator (None: the scope's end), offload on."""
    model = tiny.model
    running = []
    offload_all_but = model.offload_all_but

    def spy(stage):
        running.append(next((name for name in api._STAGES if getattr(model, name) is stage), None))
        offload_all_but(stage)

    monkeypatch.setattr(model, "offload_device", torch.device("cpu"))  # what enable_cpu_offload("cpu") sets
    monkeypatch.setattr(model, "offload_all_but", spy)
    return running


def test_api_moves_stages_under_cpu_offload(running):
    """Under enable_cpu_offload each stage is held on the accelerator only while it runs."""
    audio = api.generate_audio(TEXT, silent=True, seed=0)
    assert running == ["semantic", None, "coarse_acoustics", "fine_acoustics", "codec_model", None]
    assert audio.size > 0


def test_devices_follow_use_gpu_flags(fake_loader, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    api.preload_models("tiny-random")
    assert set(stage_devices().values()) == {"cpu"}
    placed = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.nn.Module, "to", lambda module, device: placed.append(torch.device(device).type))
    api.preload_models("tiny-random", text_use_gpu=False, codec_use_gpu=False)
    assert placed == ["cpu", "cuda", "cuda", "cpu"]  # semantic, coarse, fine, codec
    placed.clear()
    api.preload_models("tiny-random", device="cpu")
    assert placed == ["cpu"] * 4


def test_api_functions_load_the_default_model_lazily(monkeypatch):
    names = []

    def tiny_load_bark(name, device=None, dtype=None):
        names.append(name)
        model, processor = tiny_random_bark()
        model.semantic.generation_config.max_gen_duration_s = SEMANTIC_SECONDS
        return model, processor

    monkeypatch.setattr(loading, "load_bark", tiny_load_bark)
    semantic = api.text_to_semantic(TEXT, silent=True)
    audio = api.semantic_to_waveform(semantic, silent=True)
    assert names == [loading.LARGE_MODEL] and audio.dtype == np.float32 and audio.size > 0
    assert api.loaded_model_and_processor()[0] is api._loaded.model


# --- parity with the original `bark.api` ---------------------------------------------------------------------


@pytest.mark.parametrize("seed,with_preset", [(0, True), (5, False)])  # seeds whose speech ends soon
def test_generate_audio_equals_original_api(original, converted_dir, tmp_path, seed, with_preset):  # noqa: F811
    import bark.api

    preset = None
    if with_preset:
        preset = str(tmp_path / "voice.npz")
        np.savez(preset, **random_voice_preset(seed + 10, n_semantic=60))
    settings = dict(text_temp=0.8, waveform_temp=0.6, silent=True, output_full=True)
    torch.manual_seed(seed)
    expected_full, expected_audio = bark.api.generate_audio(TEXTS["en"], history_prompt=preset, **settings)
    api.preload_models(model=str(converted_dir), device="cpu")
    full, audio = api.generate_audio(TEXTS["en"], history_prompt=preset, seed=seed, **settings)
    for key in ("semantic_prompt", "coarse_prompt", "fine_prompt"):
        np.testing.assert_array_equal(full[key], expected_full[key], err_msg=f"{key} differs from the original")
    assert audio.dtype == np.float32 and audio.shape == expected_audio.shape
    np.testing.assert_allclose(audio, expected_audio, atol=1e-5, rtol=0)


# --- long audio ----------------------------------------------------------------------------------------------

LONG_TEXT = " ".join(f"This is sentence number {word}, which goes on for a while to fill some time." for word in
                     ("one", "two"))  # two chunks: each sentence is estimated at over 5 of the 10 s a chunk holds


def test_generate_long_audio_joins_chunks_with_silence(tiny):
    generations, audio = api.generate_long_audio(LONG_TEXT, "v2/en_speaker_0", silence_s=0.5, silent=True,
                                                 output_full=True, seed=0)
    assert len(generations) > 1 and audio.dtype == np.float32
    chunk_samples = [generation["fine_prompt"].shape[1] * 320 for generation in generations]
    assert audio.shape == (sum(chunk_samples) + (len(generations) - 1) * 12_000,)
    silence_start = chunk_samples[0]
    assert not audio[silence_start : silence_start + 12_000].any()


def test_generate_long_audio_passes_its_settings(tiny, monkeypatch):
    calls = []

    def spy(model, processor, text, **kwargs):
        calls.append((model, processor, text, kwargs))
        return type("Result", (), {"audio": np.zeros(3, np.float32), "generations": []})()

    monkeypatch.setattr(api, "generate_long_form", spy)
    assert api.generate_long_audio("Hi.", "v2/en_speaker_1", 0.1, text_temp=0.9, waveform_temp=0.3,
                                   seed=7).shape == (3,)
    model, processor, text, kwargs = calls[0]
    assert (model, processor, text) == (tiny.model, tiny.processor, "Hi.")
    assert kwargs == dict(voice_preset="v2/en_speaker_1", history="auto", silence_s=0.1, seed=7, show_progress=True,
                          generate_kwargs=dict(semantic_temperature=0.9, coarse_temperature=0.3,
                                               fine_temperature=0.5))
    with pytest.raises(ValueError, match="waveform_temp"):
        api.generate_long_audio("Hi.", waveform_temp=0)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(text="  "), ValueError, "text is empty"),
    (dict(text=["Hi.", "Bye."]), TypeError, "text must be a string"),
    (dict(text="Hi.", silence_s=-1), ValueError, "silence_s"),
    (dict(text="Hi.", seed=0.5), TypeError, "seed must be an integer"),
    (dict(text="Hi.", history="last"), ValueError, "history must be one of 'auto', 'first', 'previous'"),
])
def test_generate_long_audio_checks_its_arguments_before_loading_a_model(monkeypatch, kwargs, error, match):
    """With nothing loaded, these were refused only after the default model (suno/bark) was loaded."""
    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(loading, "load_bark", no_load)
    with pytest.raises(error, match=match):
        api.generate_long_audio(silent=True, **kwargs)


@pytest.mark.parametrize("dtype,match", [
    ("int8", "not a floating-point dtype.*quantize_int8"),
    (torch.int64, "not a floating-point dtype"),
    ("float17", "dtype 'float17' is not a torch dtype"),
])
def test_preload_refuses_a_dtype_before_dropping_the_loaded_model(fake_loader, dtype, match):
    """The model loaded before was dropped first; 'int8' then failed in torch's nn.Module.to (tiny-random) or
    transformers, with no word of quantize_int8."""
    api.preload_models("tiny-random")
    loaded = api._loaded
    with pytest.raises(ValueError, match=match):
        api.preload_models("tiny-random", dtype=dtype)
    assert api._loaded is loaded and fake_loader == ["tiny-random"]


# --- the original's low-level functions (bark.generation) -----------------------------------------------------


@pytest.mark.parametrize("use_kv_caching", [False, True])
def test_low_level_functions_equal_the_originals(original, converted_dir, tmp_path, use_kv_caching):  # noqa: F811
    """The original long-form notebook calls bark.generation's generate_text_semantic(..., min_eos_p=0.05); bark_hf.api
    had only the four bark.api functions, so that code failed with an ImportError."""
    preset = str(tmp_path / "voice.npz")
    np.savez(preset, **random_voice_preset(3, n_semantic=60))
    semantic_settings = dict(history_prompt=preset, temp=0.6, min_eos_p=0.05, top_k=50, silent=True,
                             use_kv_caching=use_kv_caching)
    coarse_settings = dict(history_prompt=preset, temp=0.8, top_p=0.9, max_coarse_history=120, sliding_window_len=30,
                           silent=True, use_kv_caching=use_kv_caching)
    torch.manual_seed(1)
    expected = {"semantic": original.generate_text_semantic(TEXTS["de"], **semantic_settings)}
    expected["coarse"] = original.generate_coarse(expected["semantic"], **coarse_settings)
    expected["fine"] = original.generate_fine(expected["coarse"], history_prompt=preset, temp=0.4)
    expected["audio"] = original.codec_decode(expected["fine"])
    api.preload_models(model=str(converted_dir), device="cpu")
    torch.manual_seed(1)
    ours = {"semantic": api.generate_text_semantic(TEXTS["de"], **semantic_settings)}
    ours["coarse"] = api.generate_coarse(ours["semantic"], **coarse_settings)
    ours["fine"] = api.generate_fine(ours["coarse"], history_prompt=preset, temp=0.4)
    ours["audio"] = api.codec_decode(ours["fine"])
    assert expected["coarse"].size > coarse_settings["sliding_window_len"]  # two coarse windows at least
    for key in ("semantic", "coarse", "fine"):
        assert ours[key].dtype == np.int64
        np.testing.assert_array_equal(ours[key], expected[key], err_msg=f"{key} differs from the original")
    assert ours["audio"].dtype == np.float32 and ours["audio"].shape == expected["audio"].shape
    np.testing.assert_allclose(ours["audio"], expected["audio"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("call,error,match", [
    (lambda: api.generate_text_semantic("  "), ValueError, "text is empty"),
    (lambda: api.generate_text_semantic(TEXT, temp=0), ValueError, "temp must be"),
    (lambda: api.generate_text_semantic(TEXT, min_eos_p=2), ValueError, "min_eos_p must be None or a number"),
    (lambda: api.generate_text_semantic(TEXT, use_kv_caching="yes"), ValueError, "use_kv_caching must be True or"),
    (lambda: api.generate_coarse(np.arange(5), use_kv_caching=None), ValueError, "use_kv_caching must be True or"),
    (lambda: api.generate_coarse(np.zeros((2, 3), dtype=np.int64)), ValueError, r"x_semantic must be a 1-D.*\(2, 3\)"),
    (lambda: api.generate_coarse(np.arange(5), max_coarse_history=700), ValueError, "max_coarse_history must be"),
    (lambda: api.generate_fine(np.arange(5)), ValueError, r"x_coarse_gen must be a 2-D array of 1 to 7 codebooks"),
    (lambda: api.generate_fine(np.zeros((8, 4), dtype=np.int64)), ValueError, r"x_coarse_gen .* got shape \(8, 4\)"),
    (lambda: api.generate_fine(np.full((2, 4), 1024)), ValueError, r"x_coarse_gen has values in \[1024, 1024\]"),
    (lambda: api.generate_fine(np.zeros((2, 4), dtype=np.int64), temp=0), ValueError, "None takes the argmax"),
    (lambda: api.codec_decode(np.zeros((2, 4))), TypeError, "fine_tokens must hold integers"),
    (lambda: api.codec_decode("codes"), ValueError, "fine_tokens must be a 2-D array .* got str"),
])
def test_low_level_functions_refuse_bad_input_clearly(tiny, call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_low_level_functions_chain_on_the_loaded_model(tiny):
    torch.manual_seed(0)
    semantic = api.generate_text_semantic(TEXT, "v2/en_speaker_1", silent=True, max_gen_duration_s=SEMANTIC_SECONDS)
    coarse = api.generate_coarse(semantic, "v2/en_speaker_1", silent=True)
    fine = api.generate_fine(torch.from_numpy(coarse), "v2/en_speaker_1", temp=None)  # tensors are taken too
    audio = api.codec_decode(fine)
    assert coarse.shape[0] == 2 and fine.shape == (8, coarse.shape[1]) and np.array_equal(fine[:2], coarse)
    assert audio.dtype == np.float32 and audio.shape == (fine.shape[1] * 320,)


def test_the_originals_other_generation_names_are_here():
    """`from bark.generation import SEMANTIC_RATE_HZ, clean_models, ...` had no bark_hf.api counterpart."""
    import bark.generation

    for name in ("SAMPLE_RATE", "SEMANTIC_RATE_HZ", "SEMANTIC_VOCAB_SIZE", "COARSE_RATE_HZ", "CODEBOOK_SIZE",
                 "N_COARSE_CODEBOOKS", "N_FINE_CODEBOOKS"):
        assert getattr(api, name) == getattr(bark.generation, name) and name in api.__all__


def test_clean_models_drops_the_loaded_model(fake_loader):
    api.preload_models("tiny-random")
    api.clean_models("text")  # the original's stage keys: here the stages are one model
    assert api._loaded is None
    api.preload_models("tiny-random")
    assert len(fake_loader) == 2
    with pytest.raises(ValueError, match="model_key must be None .* 'codec'; got 'semantic'"):
        api.clean_models("semantic")
    assert api._loaded is not None
    api.clean_models()
    assert api._loaded is None


def test_low_level_functions_move_their_stage_under_cpu_offload(running):
    semantic = api.generate_text_semantic(TEXT, silent=True, max_gen_duration_s=SEMANTIC_SECONDS)
    api.codec_decode(api.generate_fine(api.generate_coarse(semantic, silent=True)))
    assert running == ["semantic", None, "coarse_acoustics", None, "fine_acoustics", None, "codec_model", None]


def test_the_output_full_pair_as_history_prompt_names_its_first_item(tiny):
    """It was refused as "voice_preset must be a preset name, a path to an .npz file or a dict of arrays; got tuple";
    save_as_prompt named the fix for the same pair."""
    pair = (random_voice_preset(0), np.zeros(100, dtype=np.float32))
    for call in (lambda: api.generate_audio(TEXT, history_prompt=pair, silent=True),
                 lambda: api.semantic_to_waveform(np.arange(20), history_prompt=pair, silent=True)):
        with pytest.raises(TypeError, match=r"not the \(full_generation, audio\) tuple .* pass its first item"):
            call()
