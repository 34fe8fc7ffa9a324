"""The `bark-hf say` command end to end on the offline tiny random model."""

from __future__ import annotations

import wave

import pytest

from bark_hf.cli import main


def test_say_writes_a_24khz_mono_wav(tmp_path, capsys):
    output = tmp_path / "hello.wav"
    assert main(["say", "Hello world.", "-o", str(output), "--model", "tiny-random", "--seed", "3", "--quiet"]) == 0
    with wave.open(str(output)) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (24_000, 1, 2)
        assert wav.getnframes() > 0 and wav.getnframes() % 320 == 0  # whole EnCodec frames
    assert [p.name for p in tmp_path.iterdir()] == ["hello.wav"]  # no temporary files left


@pytest.mark.parametrize("arguments,message", [
    (["   ", "-o", "{dir}/out.wav"], "empty"),
    (["Hi.", "-o", "{dir}/missing/out.wav"], "does not exist"),
    (["Hi.", "-o", "{dir}/out.wav", "--voice", "v2/en_speakr_1"], "voice preset"),
    (["Hi.", "-o", "{dir}/out.wav", "--voice", "{dir}/nope.npz"], "nope.npz"),
])
def test_say_bad_input_is_one_line_and_no_file(tmp_path, capsys, arguments, message):
    arguments = [a.format(dir=tmp_path) for a in arguments]
    assert main(["say", *arguments, "--model", "tiny-random", "--quiet"]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("bark-hf say: error:") and message in error.lower() or message in error
    assert "Traceback" not in capsys.readouterr().err
    assert not list(tmp_path.glob("*.wav")) and not list(tmp_path.glob(".*"))


def test_say_refuses_to_overwrite(tmp_path, capsys):
    output = tmp_path / "taken.wav"
    output.write_bytes(b"keep me")
    assert main(["say", "Hi.", "-o", str(output), "--model", "tiny-random", "--quiet"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert output.read_bytes() == b"keep me"


def test_unreachable_model_names_the_fix(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["say", "Hi.", "-o", str(tmp_path / "x.wav"), "--model", "nobody/no-such-bark", "--quiet"]) == 1
    assert "--model" in capsys.readouterr().err
