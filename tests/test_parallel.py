"""`python -m bark_hf.parallel` on one process and under `accelerate launch` with two CPU processes (gloo).

A 12-chunk script with the tiny model, its semantic stage capped at 0.5 s so each chunk is quick.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import types
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from bark_hf.loading import load_bark
from bark_hf.longform import chunk_text, generate_long_form
from bark_hf.parallel import chunk_seed, join_chunks, main, on_every_process, on_main_process

ROOT = Path(__file__).resolve().parents[1]
N_CHUNKS = 12
# Twelve sentences of ~80 characters: two never fit one chunk's ~10 s (140 characters) estimate.
SCRIPT = " ".join(
    f"Part {number} of the script is here, and it goes on long enough to fill one chunk alone."
    for number in range(1, N_CHUNKS + 1)
)


@pytest.fixture(scope="module")
def short_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model with its presets, its semantic stage capped at 0.5 s (25 tokens)."""
    model, processor = load_bark(tiny_model_dir)
    model.semantic.generation_config.max_gen_duration_s = 0.5
    folder = tmp_path_factory.mktemp("parallel") / "tiny-bark-short"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("script") / "script.txt"
    path.write_text(SCRIPT, encoding="utf-8")
    return path


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as wav:
        return np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")


def to_pcm(audio: np.ndarray) -> np.ndarray:
    """What `write_wav` stores for float audio."""
    return (np.clip(audio, -1.0, 1.0) * 32767.0).round().astype("<i2")


def test_the_script_makes_twelve_chunks(short_model_dir):
    _, processor = load_bark(short_model_dir)
    assert len(chunk_text(SCRIPT, processor.tokenizer)) == N_CHUNKS


def test_single_process_joins_seeded_chunks_in_numeric_order(short_model_dir, script, tmp_path):
    output = tmp_path / "out.wav"
    arguments = ["--input", str(script), "-o", str(output), "--model", str(short_model_dir), "--cpu",
                 "--voice", "v2/en_speaker_0", "--seed", "3", "--batch-size", "1", "--silence", "0.1", "--quiet"]
    assert main(arguments) == 0

    # Each chunk alone, with the seed derived from its index: chunk 10 must follow chunk 9, not chunk 1.
    model, processor = load_bark(short_model_dir)
    chunks = chunk_text(SCRIPT, processor.tokenizer)
    expected = [
        (index, generate_long_form(model, processor, chunks=[chunk], voice_preset="v2/en_speaker_0",
                                   seed=chunk_seed(3, index), show_progress=False).audio)
        for index, chunk in enumerate(chunks)
    ]
    joined = join_chunks(expected[::-1], N_CHUNKS, round(0.1 * model.sampling_rate))  # any arrival order
    np.testing.assert_array_equal(read_wav(output), to_pcm(joined))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_two_processes(arguments: list[str]) -> subprocess.CompletedProcess:
    """`accelerate launch` of bark_hf.parallel on two CPU processes (gloo)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port()), "-m", "bark_hf.parallel"]
    return subprocess.run([*launch, *arguments], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow  # two fresh interpreters load torch and the model: about 40 s on two cores
def test_two_processes_write_the_single_process_file(short_model_dir, script, tmp_path):
    """No voice (process 0 makes it from chunk 0), batches of 2, loudness normalised: same bytes either way."""
    pyloudnorm = pytest.importorskip("pyloudnorm")  # the optional extra bark-hf[loudness]
    arguments = ["--input", str(script), "--model", str(short_model_dir), "--cpu", "--seed", "5",
                 "--batch-size", "2", "--loudness", "-30", "--quiet"]
    single, double = tmp_path / "single.wav", tmp_path / "double.wav"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the launched processes: another thread count rounds sums differently
    try:
        assert main([*arguments, "-o", str(single)]) == 0
    finally:
        torch.set_num_threads(threads)

    completed = launch_two_processes([*arguments, "-o", str(double)])
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert double.read_bytes() == single.read_bytes()

    audio = read_wav(double) / 32767.0
    assert pyloudnorm.Meter(24_000).integrated_loudness(audio) == pytest.approx(-30.0, abs=0.1)


def test_user_errors_are_one_line_before_any_generation(short_model_dir, script, tmp_path, capsys, monkeypatch):
    existing = tmp_path / "taken.wav"
    existing.write_bytes(b"")
    bom_only = tmp_path / "bom.txt"
    bom_only.write_bytes("\ufeff \r\n".encode())
    no_tokens = tmp_path / "zero_width.txt"  # not whitespace, yet nothing to tokenise: found before generation,
    no_tokens.write_text("\u200b\u200b\n", encoding="utf-8")  # where the other processes would be left waiting
    cases = [
        (["--input", str(tmp_path / "missing.txt"), "-o", str(tmp_path / "a.wav")], "script"),
        (["--input", str(tmp_path), "-o", str(tmp_path / "a.wav")], "is a folder; give the path of a text file"),
        (["--input", str(script), "-o", str(existing)], "pass --overwrite"),
        (["--input", str(script), "-o", str(tmp_path / "b.wav"), "--batch-size", "0"], "--batch-size"),
        (["--input", str(script), "-o", str(tmp_path / "c.wav"), "--voice", "v2/xx_speaker_9"], "Unknown voice"),
        *[(["--input", str(script), "-o", str(tmp_path / "a.wav"), "--silence", value], "--silence must be a finite")
          for value in ("nan", "inf", "-1")],
        *[(["--input", str(script), "-o", str(tmp_path / "a.wav"), f"--loudness={value}"], "--loudness must be finite")
          for value in ("nan", "inf", "-inf")],
        *[(["--input", str(script), "-o", str(tmp_path / "a.wav"), f"--loudness={value}"], "between -70 and 0 LUFS")
          for value in ("1e308", "1000", "-1e308")],  # NaN audio, clipped noise, silence: written with exit status 0
        (["--input", str(script), "-o", str(tmp_path / "a.wav"), "--seed", "-1"], "--seed must be a whole number"),
        (["--input", str(bom_only), "-o", str(tmp_path / "a.wav")], "is empty"),
        (["--input", str(no_tokens), "-o", str(tmp_path / "a.wav")], "has no words the model can read"),
        (["--input", str(script), "-o", str(script), "--overwrite"], "is also an input"),
    ]
    for arguments, message in cases:
        assert main([*arguments, "--model", str(short_model_dir), "--cpu", "--quiet"]) == 1
        error = capsys.readouterr().err
        assert error.startswith("bark_hf.parallel: error:") and message in error
        assert error.count("\n") == 1

    monkeypatch.setitem(sys.modules, "pyloudnorm", None)  # as if the optional extra were not installed
    assert main(["--input", str(script), "-o", str(tmp_path / "d.wav"), "--loudness", "-16", "--cpu"]) == 1
    assert "pip install 'bark-hf[loudness]'" in capsys.readouterr().err
    assert not any(tmp_path.glob("[abcd].wav"))


@pytest.mark.parametrize("error", [ValueError("a user error"), RuntimeError("a bug")])
def test_any_error_on_process_0_is_raised_there_and_tells_the_others_to_stop(monkeypatch, error):
    """A bug on process 0 (not only a user error) must still tell the others, or they die in gloo."""
    import accelerate.utils

    broadcast = []
    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", lambda objects: broadcast.append(list(objects)))

    def fail():
        raise error

    with pytest.raises(type(error), match=str(error)):
        on_main_process(types.SimpleNamespace(is_main_process=True), fail)
    assert broadcast == [[(False, None)]]

    def process_0_failed(objects):
        objects[0] = (False, None)

    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", process_0_failed)
    with pytest.raises(SystemExit) as stopped:  # another process: process 0 reports the error
        on_main_process(types.SimpleNamespace(is_main_process=False), fail)
    assert stopped.value.code == 1


def test_an_error_on_any_process_is_raised_there_and_stops_the_others(monkeypatch):
    """Loading and generating run on every process: one that failed there (a model missing on a second machine,
    say) left the others waiting in the next collective, to die in gloo with a traceback that hid the error."""
    import accelerate.utils

    def gather_with(flags_elsewhere):  # the other process's flag, then this one's: as if this were process 1
        return lambda flags: [*flags_elsewhere, *flags]

    monkeypatch.setattr(accelerate.utils, "gather_object", gather_with([False]))
    assert on_every_process(lambda: "loaded") == "loaded"

    def fail():
        raise FileNotFoundError("no model here")

    with pytest.raises(FileNotFoundError, match="no model here"):  # raised where it happened, after the agreement
        on_every_process(fail)
    monkeypatch.setattr(accelerate.utils, "gather_object", gather_with([True]))  # the other process failed
    with pytest.raises(SystemExit) as stopped:
        on_every_process(lambda: "loaded")
    assert stopped.value.code == 1


@pytest.mark.slow  # two fresh interpreters load torch and the model: about 20 s on two cores
def test_a_user_error_on_process_0_ends_the_others_without_a_traceback(short_model_dir, script, tmp_path):
    """An unknown --voice is found on process 0 after loading; the other process waited in a collective and died
    with gloo's "Connection reset by peer" traceback."""
    completed = launch_two_processes(["--input", str(script), "-o", str(tmp_path / "out.wav"), "--model",
                                      str(short_model_dir), "--cpu", "--voice", "v2/xx_speaker_9", "--quiet"])
    assert completed.returncode != 0
    assert "bark_hf.parallel: error: Unknown voice preset 'v2/xx_speaker_9'" in completed.stderr
    assert "[rank1]" not in completed.stderr and "Connection reset" not in completed.stderr, completed.stderr[-4000:]
    assert not (tmp_path / "out.wav").exists()


@pytest.mark.slow  # two fresh interpreters load torch: about 20 s on two cores
def test_a_model_missing_on_another_machine_ends_every_process_with_its_error(script, tmp_path):
    """Two launchers of one process each, as on two machines; the second cannot load the model. The first's process
    waited in the next collective and died with a gloo traceback (on one machine the launcher hides that by
    killing it)."""
    patches = tmp_path / "patches"
    patches.mkdir()
    (patches / "sitecustomize.py").write_text(  # runs at start-up, before bark_hf.parallel imports load_bark
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import bark_hf.loading\n"
        "    def missing(*args, **kwargs):\n"
        "        raise FileNotFoundError('The model folder /elsewhere does not exist on this machine.')\n"
        "    bark_hf.loading.load_bark = missing\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(patches), str(ROOT), os.environ.get("PYTHONPATH")]))}
    port = free_port()
    machines = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--node_rank",
         str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "bark_hf.parallel", "--input",
         str(script), "-o", str(tmp_path / "out.wav"), "--model", "tiny-random", "--cpu", "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for rank in (0, 1)]
    (_, first), (_, second) = (machine.communicate(timeout=300) for machine in machines)
    assert [machine.returncode for machine in machines] == [1, 1]
    assert second.count("bark_hf.parallel: error: The model folder /elsewhere does not exist") == 1
    for stderr in (first, second):  # the launchers' own ChildFailedError tracebacks stay; no process's own
        assert "[rank" not in stderr and "bark_hf/parallel.py" not in stderr, stderr[-4000:]
    assert not (tmp_path / "out.wav").exists()


@pytest.mark.slow  # two fresh interpreters load torch: about 15 s on two cores
def test_a_bad_option_is_one_error_line_not_one_per_process(script, tmp_path):
    """Every process checked the options itself, so each printed the same error line."""
    completed = launch_two_processes(["--input", str(script), "-o", str(tmp_path / "out.wav"), "--model", "tiny-random",
                                      "--cpu", "--batch-size", "0", "--quiet"])
    assert completed.returncode != 0
    assert completed.stderr.count("bark_hf.parallel: error: --batch-size must be a whole number") == 1, completed.stderr
    assert not (tmp_path / "out.wav").exists()
