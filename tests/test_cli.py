"""The `bark-hf say` command end to end on the offline tiny random model."""

from __future__ import annotations

import argparse
import io
import os
import stat
import subprocess
import sys
import wave

import numpy as np
import pytest
import torch
from conftest import TINY_PRESET_NAMES

from bark_hf import BarkHfModel, audio_io
from bark_hf.cli import main, read_text
from bark_hf.longform import split_sentences


def test_say_writes_a_24khz_mono_wav(tmp_path, capsys):
    output = tmp_path / "hello.wav"
    assert main(["say", "Hello world.", "-o", str(output), "--model", "tiny-random", "--seed", "3", "--quiet"]) == 0
    with wave.open(str(output)) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (24_000, 1, 2)
        assert wav.getnframes() > 0 and wav.getnframes() % 320 == 0  # whole EnCodec frames
    assert [p.name for p in tmp_path.iterdir()] == ["hello.wav"]  # no temporary files left


def test_say_writes_the_wav_to_standard_output_with_a_dash(tmp_path, monkeypatch, capsys):
    """-o - wrote a file named '-' into the working folder."""
    monkeypatch.chdir(tmp_path)
    stdout = io.TextIOWrapper(io.BytesIO())
    monkeypatch.setattr("sys.stdout", stdout)
    assert main(["say", "Hello world.", "-o", "-", "--model", "tiny-random", "--seed", "3"]) == 0
    with wave.open(io.BytesIO(stdout.buffer.getvalue())) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (24_000, 1, 2)
        assert wav.getnframes() > 0
    assert "Wrote standard output" in capsys.readouterr().err  # the message stays out of the audio
    assert list(tmp_path.iterdir()) == []


def test_say_into_a_reader_that_stops_early_says_so_in_one_line(monkeypatch, capsys):
    """`bark-hf say ... -o - | head -c 100`: the error read "[Errno 32] Broken pipe"."""
    class ClosedPipe(io.BufferedWriter):
        def write(self, data: bytes) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("sys.stdout", io.TextIOWrapper(ClosedPipe(io.BytesIO())))
    assert main(["say", "Hello world.", "-o", "-", "--model", "tiny-random", "--quiet"]) == 1
    error = capsys.readouterr().err
    assert "reading it stopped early" in error and "-o out.wav" in error and len(error.strip().splitlines()) == 1


def test_say_refuses_a_dash_output_on_a_terminal_before_loading(tmp_path, monkeypatch, capsys):
    class Terminal(io.TextIOWrapper):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stdout", Terminal(io.BytesIO()))
    monkeypatch.setattr("bark_hf.loading.load_bark", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["say", "Hi.", "-o", "-", "--model", "tiny-random", "--quiet"]) == 1
    error = capsys.readouterr().err
    assert "standard output, which is a terminal" in error and len(error.strip().splitlines()) == 1


@pytest.mark.parametrize("arguments,message", [
    (["   ", "-o", "{dir}/out.wav"], "empty"),
    (["Hi.", "-o", "{dir}/missing/out.wav"], "does not exist"),
    (["Hi.", "-o", "{dir}/out.wav", "--voice", "v2/en_speakr_1"], "voice preset"),
    (["Hi.", "-o", "{dir}/out.wav", "--voice", "{dir}/nope.npz"], "nope.npz"),
    (["-o", "{dir}/out.wav", "--file", "{dir}"], "is a folder; give the text file in it"),
])
def test_say_bad_input_is_one_line_and_no_file(tmp_path, capsys, arguments, message):
    arguments = [a.format(dir=tmp_path) for a in arguments]
    assert main(["say", *arguments, "--model", "tiny-random", "--quiet"]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("bark-hf say: error:") and message in error.lower() or message in error
    assert "Traceback" not in capsys.readouterr().err
    assert not list(tmp_path.glob("*.wav")) and not list(tmp_path.glob(".*"))


def test_say_refuses_an_unknown_voice_name_before_loading_the_weights(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """A name can only be checked against the model's presets: before, the error came after the whole model loaded."""
    monkeypatch.setattr(BarkHfModel, "from_pretrained", lambda *a, **k: pytest.fail("the weights were loaded"))
    output = tmp_path / "out.wav"
    arguments = ["say", "Hi.", "-o", str(output), "--model", str(tiny_model_dir), "--voice", "v2/en_speakr_0"]
    assert main([*arguments, "--quiet"]) == 1
    assert "Unknown voice preset 'v2/en_speakr_0'" in capsys.readouterr().err and not output.exists()


def test_say_expands_a_tilde_the_shell_left_in_the_paths(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "words.txt").write_text("Hi.")
    assert main(["say", "--file=~/words.txt", "-o=~/out.wav", "--model", "tiny-random", "--quiet"]) == 0
    assert (tmp_path / "out.wav").read_bytes().startswith(b"RIFF")


def test_say_refuses_to_overwrite(tmp_path, capsys):
    output = tmp_path / "taken.wav"
    output.write_bytes(b"keep me")
    assert main(["say", "Hi.", "-o", str(output), "--model", "tiny-random", "--quiet"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert output.read_bytes() == b"keep me"


def _no_hard_links(*args) -> None:
    raise PermissionError("this file system has no hard links")


@pytest.mark.parametrize("overwrite,hard_links", [(False, True), (True, True), (False, False)])
def test_a_file_made_while_the_wav_is_written_is_kept_unless_overwriting(tmp_path, monkeypatch, overwrite,
                                                                        hard_links):
    """The existence check ran before the audio was written and the rename replaced whatever appeared since."""
    output = tmp_path / "race.wav"
    if not hard_links:  # as on file systems without them: the existence is checked again just before the rename
        monkeypatch.setattr(os, "link", _no_hard_links)
    real_wav_bytes = audio_io.wav_bytes

    def wav_bytes_while_another_writer_wins(audio, sample_rate):
        output.write_bytes(b"the other writer's file")
        return real_wav_bytes(audio, sample_rate)

    monkeypatch.setattr(audio_io, "wav_bytes", wav_bytes_while_another_writer_wins)
    audio = np.zeros(320, dtype=np.float32)
    if overwrite:
        audio_io.write_wav(output, audio, 24_000, overwrite=True)
        assert output.read_bytes().startswith(b"RIFF")
    else:
        with pytest.raises(FileExistsError, match="race.wav was created by something else .* it was kept"):
            audio_io.write_wav(output, audio, 24_000)
        assert output.read_bytes() == b"the other writer's file"
    assert [path.name for path in tmp_path.iterdir()] == ["race.wav"]  # no temporary file left


def test_unreachable_model_names_the_fix(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["say", "Hi.", "-o", str(tmp_path / "x.wav"), "--model", "nobody/no-such-bark", "--quiet"]) == 1
    assert "--model" in capsys.readouterr().err


def test_missing_model_folder_is_named(tmp_path, capsys):
    assert main(["say", "Hi.", "-o", str(tmp_path / "x.wav"), "--model", str(tmp_path / "bark-small"), "--quiet"]) == 1
    error = capsys.readouterr().err
    assert f"No model folder at '{tmp_path / 'bark-small'}'" in error and "Repo id" not in error
    assert not list(tmp_path.iterdir())


def test_a_model_file_or_a_folder_without_config_is_named_without_hub_advice(tmp_path, tiny_model_dir, capsys,
                                                                            monkeypatch):
    """load_bark wrapped these local errors in advice for an unreachable Hub."""
    monkeypatch.chdir(tiny_model_dir)
    folder = tmp_path / "no-config"
    folder.mkdir()
    for name in ("model.safetensors", "tokenizer.json"):
        (folder / name).write_bytes((tiny_model_dir / name).read_bytes())
    for model, message in ((folder, f"'{folder}' holds no config.json"),
                           ("config.json", "'config.json' is a file; pass the")):  # the processor's, read first
        assert main(["say", "Hi.", "-o", str(tmp_path / "x.wav"), "--model", str(model), "--quiet"]) == 1
        error = capsys.readouterr().err
        assert message in error and "Hub" not in error and error.count("\n") == 1


def _wav_samples(path) -> np.ndarray:
    with wave.open(str(path)) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (24_000, 1, 2)
        return np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")


def test_say_from_a_folder_with_a_preset_is_repeatable(tmp_path, tiny_model_dir):
    common = ["--model", str(tiny_model_dir), "--voice", "v2/en_speaker_1", "--seed", "5", "--quiet"]
    assert main(["say", "Hello there.", "-o", str(tmp_path / "a.wav"), *common]) == 0
    assert main(["say", "Hello there.", "-o", str(tmp_path / "b.wav"), *common]) == 0
    np.testing.assert_array_equal(_wav_samples(tmp_path / "a.wav"), _wav_samples(tmp_path / "b.wav"))


def test_say_reads_a_file_and_stdin(tmp_path, tiny_model_dir, monkeypatch):
    (tmp_path / "text.txt").write_text("Hello there.", encoding="utf-8")
    common = ["--model", str(tiny_model_dir), "--seed", "1", "--quiet"]
    assert main(["say", "--file", str(tmp_path / "text.txt"), "-o", str(tmp_path / "file.wav"), *common]) == 0
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO("\ufeffHello there.".encode())))  # with a BOM
    assert main(["say", "-", "-o", str(tmp_path / "stdin.wav"), *common]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there."))  # text only, as in a notebook
    assert main(["say", "-", "-o", str(tmp_path / "stdin-text.wav"), *common]) == 0
    np.testing.assert_array_equal(_wav_samples(tmp_path / "stdin.wav"), _wav_samples(tmp_path / "stdin-text.wav"))
    assert main(["say", "Hello there.", "-o", str(tmp_path / "arg.wav"), *common]) == 0
    np.testing.assert_array_equal(_wav_samples(tmp_path / "file.wav"), _wav_samples(tmp_path / "stdin.wav"))
    np.testing.assert_array_equal(_wav_samples(tmp_path / "file.wav"), _wav_samples(tmp_path / "arg.wav"))


def test_say_drops_the_bom_of_a_file(tmp_path, capsys):
    """A file of only a BOM is empty, as on standard input (it was spoken as the text '\ufeff', which has no tokens)."""
    (tmp_path / "bom.txt").write_bytes("\ufeff\r\n".encode())
    assert main(["say", "--file", str(tmp_path / "bom.txt"), "-o", str(tmp_path / "x.wav"), "--model", "tiny-random",
                 "--quiet"]) == 1
    assert f"The text file {tmp_path / 'bom.txt'} is empty" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["\u200b\u200b", "\u200b \u200d\n\u2060\u00ad", "\u200e\ufeff"])
@pytest.mark.parametrize("source", ["argument", "file", "stdin"])
def test_say_refuses_invisible_text_before_loading_and_names_its_input(tmp_path, monkeypatch, capsys, text, source):
    """Zero-width characters alone were refused only after the model had loaded, as "Text 0 ... gives no tokens"
    from the pipeline, which named no input."""
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
    monkeypatch.setattr("bark_hf.loading.load_bark", lambda *a, **k: pytest.fail("the model was loaded"))
    given = {"argument": [text], "file": ["--file", str(tmp_path / "text.txt")], "stdin": ["-"]}[source]
    assert main(["say", *given, "-o", str(tmp_path / "x.wav"), "--model", "tiny-random", "--quiet"]) == 1
    error = capsys.readouterr().err
    named = {"argument": "The text argument has", "file": f"The text file {tmp_path / 'text.txt'} has",
             "stdin": "The text on standard input has"}[source]
    assert f"error: {named} nothing to say: it holds only invisible characters" in error
    assert "give the words to speak" in error and len(error.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*.wav"))


def test_say_speaks_a_text_with_a_zero_width_character_inside(tmp_path):
    """The invisible-text check looks at the whole text: one zero-width space among words is spoken."""
    output = tmp_path / "x.wav"
    assert main(["say", "Hello\u200b world.", "-o", str(output), "--model", "tiny-random", "--seed", "3",
                 "--quiet"]) == 0
    with wave.open(str(output)) as wav:
        assert wav.getnframes() > 0


@pytest.mark.parametrize("data,message", [
    ("Hello there.\r\n".encode("utf-16"), "is UTF-16 text"),  # Notepad's "Unicode", PowerShell's >: with a BOM
    ("Hello there.".encode("utf-16-be"), "holds NUL bytes"),  # without one, ASCII text is valid UTF-8
    (b"caf\xe9 au lait", "byte 3 is 0xe9"),
])
@pytest.mark.parametrize("source", ["file", "stdin"])
def test_say_names_utf16_and_other_non_utf8_text_and_the_fix(tmp_path, monkeypatch, capsys, data, message, source):
    """UTF-16 text was "not UTF-8 text" with no fix, or, without a BOM, spoken with a NUL after every letter."""
    (tmp_path / "text.txt").write_bytes(data)
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data)))
    monkeypatch.setattr("bark_hf.loading.load_bark", lambda *a, **k: pytest.fail("the model was loaded"))
    text = ["--file", str(tmp_path / "text.txt")] if source == "file" else ["-"]
    assert main(["say", *text, "-o", str(tmp_path / "x.wav"), "--model", "tiny-random", "--quiet"]) == 1
    error = capsys.readouterr().err
    assert message in error and "save it as UTF-8" in error and len(error.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*.wav"))


def test_say_drops_the_bom_of_every_file_joined_on_standard_input(monkeypatch):
    """`cat intro.txt list.txt | bark-hf say -`: the second file's BOM stayed in the text, before its first list
    item, which was then not cut from the line before."""
    joined = "\ufeffIntro line\r\n".encode() + "\ufeff- item one\r\n- item two\r\n".encode()
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(joined)))
    text = read_text(argparse.Namespace(file=None, text="-"))
    assert "\ufeff" not in text
    assert split_sentences(text) == ["Intro line", "- item one", "- item two"]


def test_say_refuses_to_write_over_its_input(tmp_path, capsys):
    """`--file text.txt -o text.txt --overwrite` replaced the text with audio."""
    (tmp_path / "text.txt").write_text("Hello there.", encoding="utf-8")
    assert main(["say", "--file", str(tmp_path / "text.txt"), "-o", str(tmp_path / "text.txt"), "--overwrite",
                 "--model", "tiny-random", "--quiet"]) == 1
    assert "is also an input" in capsys.readouterr().err
    assert (tmp_path / "text.txt").read_text(encoding="utf-8") == "Hello there."


def test_say_long_text_is_one_wav_of_joined_chunks(tmp_path, tiny_model_dir):
    text = " ".join(f"Sentence number {i} is here, and it goes on for a while." for i in range(8))
    output = tmp_path / "long.wav"
    assert main(["say", text, "-o", str(output), "--model", str(tiny_model_dir), "--voice", "v2/en_speaker_0",
                 "--silence", "0.5", "--quiet"]) == 0
    samples = _wav_samples(output)
    silence = np.flatnonzero(samples == 0)
    assert samples.shape[0] > 3 * 24_000 and silence.shape[0] >= 12_000  # at least one 0.5 s gap


def test_say_history_previous_reaches_the_long_form_generator(tmp_path, tiny_model_dir, monkeypatch):
    import bark_hf.pipeline_bark_hf as pipeline_module

    histories = []
    real = pipeline_module.generate_long_form
    monkeypatch.setattr(pipeline_module, "generate_long_form",
                        lambda *args, **kwargs: histories.append(kwargs["history"]) or real(*args, **kwargs))
    output = tmp_path / "chained.wav"
    assert main(["say", "One sentence. Another one.", "-o", str(output), "--model", str(tiny_model_dir),
                 "--long-form", "on", "--history", "previous", "--quiet"]) == 0
    assert histories == ["previous"] and _wav_samples(output).shape[0] > 0


def test_say_in_int8_on_a_numbered_cpu_device(tmp_path):
    output = tmp_path / "int8.wav"
    arguments = ["say", "Hi.", "-o", str(output), "--model", "tiny-random", "--device", "cpu:0", "--dtype", "int8"]
    assert main([*arguments, "--quiet"]) == 0
    assert _wav_samples(output).shape[0] > 0


def test_say_in_bfloat16(tmp_path):
    output = tmp_path / "bf16.wav"
    assert main(["say", "Hi.", "-o", str(output), "--model", "tiny-random", "--dtype", "bfloat16", "--quiet"]) == 0
    assert _wav_samples(output).shape[0] > 0


def test_a_model_folder_without_its_tokenizer_is_refused(tmp_path, tiny_model_dir, capsys):
    """A folder of weights only (the processor not saved) spoke every word as [UNK], without an error; `voices`
    answered that the model has no presets."""
    folder = tmp_path / "weights-only"
    folder.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        (folder / name).write_bytes((tiny_model_dir / name).read_bytes())
    assert main(["say", "Hello there.", "-o", str(tmp_path / "x.wav"), "--model", str(folder), "--quiet"]) == 1
    assert "holds no tokenizer (tokenizer.json or vocab.txt)" in capsys.readouterr().err
    assert main(["voices", "--model", str(folder)]) == 1
    assert "holds no tokenizer" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.wav"))


def test_voices_lists_the_presets(tiny_model_dir, capsys):
    assert main(["voices", "--model", str(tiny_model_dir)]) == 0
    assert capsys.readouterr().out.split() == sorted(TINY_PRESET_NAMES)


def test_voices_into_a_reader_that_stops_early_ends_quietly(tiny_model_dir):
    """`bark-hf voices | head -1`: the reader closes the pipe before the names are written; that printed a
    BrokenPipeError traceback."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen([sys.executable, "-m", "bark_hf", "voices", "--model", str(tiny_model_dir)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    process.stdout.close()  # before the child has loaded the processor and written anything
    _, err = process.communicate(timeout=120)
    assert process.returncode == 0, err.decode()
    assert b"BrokenPipeError" not in err and b"Traceback" not in err


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a torch without CUDA")


def _usable(device: str) -> bool:
    try:
        torch.empty(0, device=device)
    except Exception:
        return False
    return True


@pytest.mark.parametrize("arguments,message", [
    (["--file", "{dir}/missing.txt"], "missing.txt"),
    (["Hi.", "--text-temp", "0"], "--text-temp must be a finite number > 0; got 0.0"),
    (["Hi.", "--waveform-temp", "-1"], "--waveform-temp must be a finite number > 0; got -1.0"),  # was "temperature"
    *[(["Hi.", "--silence", value], "--silence must be a finite number of seconds >= 0") for value in
      ("-1", "nan", "inf")],
    (["Hi.", "--silence", "1e308", "--long-form", "on"], "--silence must be at most 60 seconds"),  # overflowed late
    pytest.param(["Hi.", "--device", "cuda"], "sees no CUDA GPU", marks=NO_CUDA),
    pytest.param(["Hi.", "--device", "cuda:0", "--offload"], "sees no CUDA GPU", marks=NO_CUDA),
    (["Hi.", "--device", "meta"], "--device meta holds no data"),
    (["Hi.", "--device", "gpu0"], "--device 'gpu0' is not a torch device"),
    # These were tracebacks (AssertionError, ModuleNotFoundError); vulkan's error came after loading the model.
    *[pytest.param(["Hi.", "--device", device], f"--device {device}: this torch cannot place tensors there",
                   marks=pytest.mark.skipif(_usable(device), reason=f"this torch has {device}"))
      for device in ("xpu", "hpu", "vulkan")],
    (["Hi.", "--text-temp", "inf"], "--text-temp must be a finite number > 0"),
])
def test_say_more_bad_input(tmp_path, capsys, arguments, message):
    arguments = [a.format(dir=tmp_path) for a in arguments]
    assert main(["say", *arguments, "-o", str(tmp_path / "x.wav"), "--model", "tiny-random", "--quiet"]) == 1
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error and len(error.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*.wav"))


def test_say_refuses_an_output_that_is_not_a_wav_before_loading(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("bark_hf.loading.load_bark", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    assert main(["say", "Hi.", "-o", str(tmp_path / "x.mp3"), "--model", "tiny-random", "--quiet"]) == 1
    assert "bark-hf writes WAV files only; give the output a .wav name" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_say_refuses_an_out_of_range_seed_before_loading(tmp_path, monkeypatch, capsys):
    """A --seed torch cannot take (argparse takes any int) was refused only after the model had loaded."""
    monkeypatch.setattr("bark_hf.loading.load_bark", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    assert main(["say", "Hi.", "-o", str(tmp_path / "x.wav"), "--seed", str(2**64), "--quiet"]) == 1
    error = capsys.readouterr().err
    assert "--seed must be within" in error and len(error.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_say_refuses_non_utf8_standard_input(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9 au lait"), errors="surrogateescape"))
    assert main(["say", "-o", str(tmp_path / "x.wav"), "--model", "tiny-random", "--quiet"]) == 1
    error = capsys.readouterr().err
    assert "standard input is not UTF-8" in error and len(error.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("output,message", [("{dir}", "is a folder"), ("", "output path is empty")])
def test_say_refuses_an_output_path_that_is_no_file_before_generating(tmp_path, capsys, output, message):
    for extra in ([], ["--overwrite"]):
        assert main(["say", "Hi.", "-o", output.format(dir=tmp_path), "--model", "tiny-random", "--quiet",
                     *extra]) == 1
        error = capsys.readouterr().err
        assert message in error and len(error.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_say_names_a_folder_output_or_a_file_used_as_a_folder(tmp_path, capsys):
    """`-o new.wav/` wrote a file new.wav (Path drops the slash); `-o notes.txt/x.wav` said notes.txt did not exist."""
    (tmp_path / "notes.txt").write_text("keep")
    for output, message in ((f"{tmp_path}/new.wav/", "names a folder"), (f"{tmp_path}/notes.txt/x.wav",
                                                                          "notes.txt is a file, not a folder")):
        assert main(["say", "Hi.", "-o", output, "--model", "tiny-random", "--quiet"]) == 1
        error = capsys.readouterr().err
        assert message in error and len(error.strip().splitlines()) == 1
    assert [path.name for path in tmp_path.iterdir()] == ["notes.txt"]


def test_say_leaves_a_device_or_pipe_output_in_place(tmp_path, capsys):
    pipe = tmp_path / "out.wav"
    os.mkfifo(pipe)  # stands in for /dev/null, which the rename replaced with a plain file when run as root
    assert main(["say", "Hi.", "-o", str(pipe), "--model", "tiny-random", "--quiet", "--overwrite"]) == 1
    error = capsys.readouterr().err
    assert "not a regular file" in error and len(error.strip().splitlines()) == 1
    assert stat.S_ISFIFO(pipe.stat().st_mode) and [p.name for p in tmp_path.iterdir()] == ["out.wav"]


def test_say_writes_through_a_symlinked_output(tmp_path, capsys):
    """`-o link.wav --overwrite` replaced the link with a plain file, and a dangling link was replaced without
    --overwrite; now the file the link points to is the output, as with a shell's `>`, and the link stays."""
    (tmp_path / "audio").mkdir()
    target, link = tmp_path / "audio" / "take.wav", tmp_path / "link.wav"
    link.symlink_to(target)  # dangling: the target does not exist yet
    common = ["--model", "tiny-random", "--quiet"]
    assert main(["say", "Hi.", "-o", str(link), *common]) == 0
    assert link.is_symlink() and _wav_samples(target).shape[0] > 0
    assert main(["say", "Hi.", "-o", str(link), *common]) == 1
    assert "--overwrite" in capsys.readouterr().err
    target.write_bytes(b"old")
    assert main(["say", "Hi.", "-o", str(link), "--overwrite", *common]) == 0
    assert link.is_symlink() and _wav_samples(target).shape[0] > 0
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["audio", "link.wav", "take.wav"]
    (tmp_path / "gone.wav").symlink_to(tmp_path / "missing" / "x.wav")
    assert main(["say", "Hi.", "-o", str(tmp_path / "gone.wav"), *common]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_say_refuses_an_unwritable_output_folder_before_loading(tmp_path, monkeypatch, capsys):
    """A folder that takes no new files (read-only, no permission) failed only after the whole generation, with an
    error naming a temporary file."""
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("tempfile.mkstemp", refuse)
    monkeypatch.setattr("bark_hf.loading.load_bark", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    assert main(["say", "Hi.", "-o", str(tmp_path / "x.wav"), "--model", "tiny-random", "--quiet"]) == 1
    error = capsys.readouterr().err
    assert f"Cannot create files in the folder {tmp_path} (Permission denied)" in error
    assert len(error.strip().splitlines()) == 1


def test_python_dash_m_runs_the_cli(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bark_hf", "say", "Hi.", "-o", str(tmp_path / "m.wav"),
                             "--model", "tiny-random", "--quiet"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert _wav_samples(tmp_path / "m.wav").shape[0] > 0


@pytest.mark.parametrize("make", [lambda path: None, lambda path: np.savez(path, semantic_prompt=np.arange(5))])
def test_say_checks_a_preset_file_before_loading_the_model(tmp_path, capsys, monkeypatch, make):
    make(tmp_path / "voice.npz")
    monkeypatch.setattr("bark_hf.loading.load_bark", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    assert main(["say", "Hi.", "-o", str(tmp_path / "x.wav"), "--voice", str(tmp_path / "voice.npz"), "--quiet"]) == 1
    error = capsys.readouterr().err
    assert "voice.npz" in error and len(error.strip().splitlines()) == 1


@pytest.mark.parametrize("name", ["take1.wav", "voice.NPZ", "notes.txt"])
def test_say_refuses_a_file_that_is_no_preset_before_loading_the_model(tmp_path, capsys, monkeypatch, name):
    (tmp_path / name).write_bytes(b"RIFF")  # was: refused only after the model loaded
    monkeypatch.setattr("bark_hf.loading.load_bark", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    assert main(["say", "Hi.", "-o", str(tmp_path / "x.wav"), "--voice", str(tmp_path / name), "--quiet"]) == 1
    error = capsys.readouterr().err
    assert "not a voice preset: voice presets are .npz files" in error and "preset names" in error
    assert len(error.strip().splitlines()) == 1 and not (tmp_path / "x.wav").exists()


def test_say_takes_a_preset_name_even_if_a_file_or_folder_of_that_name_exists(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "v2").mkdir()
    (tmp_path / "v2" / "en_speaker_1").write_bytes(b"not a preset")
    (tmp_path / "v2" / "en_speaker_1.wav").write_bytes(b"RIFF")
    (tmp_path / "v2" / "en_speaker_0").mkdir()
    for name in ("v2/en_speaker_1", "v2/en_speaker_0"):
        assert main(["say", "Hi.", "-o", "out.wav", "--model", str(tiny_model_dir), "--voice", name, "--seed", "1",
                     "--quiet", "--overwrite"]) == 0
        assert (tmp_path / "out.wav").stat().st_size > 44


def test_say_refuses_an_invalid_preset_file_and_names_close_preset_names(tmp_path, tiny_model_dir, capsys):
    bad = tmp_path / "bad.npz"
    np.savez(bad, semantic_prompt=np.arange(5))
    common = ["-o", str(tmp_path / "x.wav"), "--model", str(tiny_model_dir), "--quiet"]
    assert main(["say", "Hi.", "--voice", str(bad), *common]) == 1
    assert "coarse_prompt" in capsys.readouterr().err
    assert main(["say", "Hi.", "--voice", "v2/en_speakr_1", *common]) == 1
    error = capsys.readouterr().err
    assert "v2/en_speaker_1" in error and "Traceback" not in error
    assert not list(tmp_path.glob("*.wav"))


def test_write_wav_in_scipys_argument_order_names_the_fix(tmp_path):
    """Suno's README writes with scipy's write(path, rate, data); docs/api.md swaps in write_wav(path, audio, rate),
    where that order failed inside the wave module with "sampling rate not specified"."""
    audio = np.zeros(320, dtype=np.float32)
    with pytest.raises(TypeError, match=r"audio comes before the rate here: write_wav\(path, audio, sample_rate\)"):
        audio_io.write_wav(tmp_path / "x.wav", 24_000, audio)
    with pytest.raises(ValueError, match="sample_rate must be > 0 Hz; got 0"):
        audio_io.write_wav(tmp_path / "x.wav", audio, 0)
    assert list(tmp_path.iterdir()) == []
    audio_io.write_wav(tmp_path / "x.wav", audio, 24_000.0)  # as wave takes it


def test_write_wav_names_its_own_overwrite_argument(tmp_path):
    """A Python caller was told to 'pass --overwrite', the command-line flag."""
    audio = np.zeros(320, dtype=np.float32)
    audio_io.write_wav(tmp_path / "x.wav", audio, 24_000)
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True to replace it"):
        audio_io.write_wav(tmp_path / "x.wav", audio, 24_000)


def test_say_with_a_stored_name_and_npz_names_the_fix_before_loading_the_model(tmp_path, capsys, monkeypatch):
    """`--voice v2/en_speaker_1.npz` (Suno's file name) said only "No voice preset file at ..."."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("bark_hf.loading.load_bark", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    assert main(["say", "Hi.", "-o", "x.wav", "--voice", "v2/en_speaker_1.npz", "--quiet"]) == 1
    error = capsys.readouterr().err
    assert "named without '.npz'" in error and "bark-hf voices" in error and len(error.strip().splitlines()) == 1
