"""benchmarks/bench.py: a `--quick` run end to end (all three peers, tiny model), its argument
checks, and the floor arithmetic of benchmarks/roofline.py. Nothing here asserts a timing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
STAGES = ("semantic", "coarse", "fine", "codec")
PEERS = ("ours", "transformers", "original")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    """`bench.py --quick --batch 2` in a fresh interpreter, as a user runs it, with this checkout's bark_hf."""
    out = tmp_path_factory.mktemp("bench") / "results.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench.py"), "--quick", "--device", "cpu", "--batch", "2",
         "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return completed, json.loads(out.read_text())


def test_quick_run_times_every_stage_of_every_peer(quick_run):
    _, results = quick_run
    assert results["settings"]["peers"] == list(PEERS)
    # 24 semantic tokens -> floor(24 * 75 / 49.9) = 36 frames of 320 samples at 24 kHz.
    assert results["settings"]["semantic_tokens"] == 24 and results["settings"]["frames"] == 36
    assert results["settings"]["audio_s_per_item"] == pytest.approx(36 * 320 / 24_000)
    batch = results["batches"]["2"]
    work = {stage: batch["work"][stage]["units_per_item"] for stage in STAGES}
    assert work == {"semantic": 24, "coarse": 72, "fine": 36 * 6, "codec": 36}
    for stage in (*STAGES, "total"):
        rows = batch["stages"][stage]
        assert set(rows) == set(PEERS)
        for name, row in rows.items():
            assert len(row["seconds"]) == 1 and row["median_s"] > 0
            assert row["rtf"] == pytest.approx(row["median_s"] / (2 * results["settings"]["audio_s_per_item"]))
            assert row["floor_s"] > 0
            assert row["floor_fraction"] == pytest.approx(row["floor_s"] / row["median_s"])
            if name != "ours":
                assert row["ours_speedup"] == pytest.approx(row["median_s"] / rows["ours"]["median_s"])
    total = batch["stages"]["total"]["original"]
    assert total["median_s"] == pytest.approx(sum(batch["stages"][s]["original"]["median_s"] for s in STAGES))
    assert results["floor"]["bandwidth_gb_s"] > 0 and results["floor"]["gemm_gflop_s"] > 0
    assert results["machine"]["cpu_threads"] == 1


def test_quick_run_prints_a_table_per_batch(quick_run):
    completed, _ = quick_run
    assert "tiny shape (32 wide, 2 layers, 2 heads), float32" in completed.stdout
    assert "\nbatch 2\n" in completed.stdout
    table_rows = [line.split() for line in completed.stdout.splitlines() if line.split()[:1] in (["coarse"], ["fine"])]
    assert [row[:2] for row in table_rows] == [["coarse", "72"], ["fine", "216"]]
    for name in PEERS:
        assert f"{name}: batch 2, " in completed.stdout
    assert "furthest from its floor:" in completed.stdout


@pytest.fixture(scope="module")
def modules():
    """bench.py and its helper modules, imported the way the script imports them (from benchmarks/)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCHMARKS))
        import bench
        import peers
        import roofline

        yield SimpleNamespace(bench=bench, peers=peers, roofline=roofline)


@pytest.mark.parametrize("argv,message", [
    (["--peers", "ours,espnet"], "--peers takes distinct names"),
    (["--peers", "ours,ours"], "--peers takes distinct names"),
    (["--batch", "1,x"], "--batch takes comma-separated positive integers"),
    (["--batch", "0"], "--batch sizes must be at least 1"),
    (["--batch", "1,8,1"], "--batch sizes must be distinct; got [1, 8, 1]"),
    (["--quick", "--shape", "large"], "--quick times a tiny model, not the large shape; leave out --shape or --quick"),
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--warmup", "-1"], "--warmup must be 0 or more"),
    (["--semantic-tokens", "769"], "--semantic-tokens must be in 1..768"),
    (["--peers", "ours,ours-int8", "--dtype", "bfloat16"], "use --device cpu --dtype float32"),
    (["--json", "{file}/results.json"], "a folder on that path is a file"),
    (["--json", "/proc/new/results.json"], "Cannot create files in the folder /proc"),
])
def test_bad_arguments_are_refused_with_the_fix(modules, capsys, tmp_path, argv, message):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as raised:
        modules.bench.parse_args(["--device", "cpu", *[arg.format(file=tmp_path / "file") for arg in argv]])
    assert raised.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--semantic-tokens", "0"], "--semantic-tokens must be in 1..768"),
    (["--budget", "lots"], "--budget takes a size such as 1GiB"),
    (["--json", "{file}/memory.json"], "a folder on that path is a file"),
    (["--json", "/proc/new/memory.json"], "Cannot create files in the folder /proc"),
])
def test_memory_benchmark_refuses_bad_arguments_before_measuring(modules, capsys, tmp_path, argv, message):
    import memory

    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as raised:
        memory.parse_args(["--device", "cpu", "--quick", *[arg.format(file=tmp_path / "file") for arg in argv]])
    assert raised.value.code == 2
    assert message in capsys.readouterr().err


def test_cpu_clock_needs_a_single_threaded_cpu_run(modules, capsys, monkeypatch):
    monkeypatch.setattr(modules.bench.torch, "get_num_threads", lambda: 2)
    with pytest.raises(SystemExit):
        modules.bench.parse_args(["--device", "cpu", "--clock", "cpu"])
    assert "set OMP_NUM_THREADS=1" in capsys.readouterr().err


def test_existing_json_is_never_overwritten(modules, capsys, tmp_path):
    existing = tmp_path / "results.json"
    existing.write_text("{}")
    with pytest.raises(SystemExit):
        modules.bench.parse_args(["--device", "cpu", "--json", str(existing)])
    assert "results.json exists; choose a new path (results are never overwritten)" in capsys.readouterr().err
    assert existing.read_text() == "{}"


@pytest.mark.parametrize("peer_names", [["transformers", "ours"], ["ours-int8", "ours"], ["ours", "a-long-name-x"]])
def test_table_columns_stay_apart_whatever_the_peers_are_called(modules, peer_names):
    bench = modules.bench
    work = {stage: bench.StageWork("tok", 10, 1.0) for stage in STAGES}
    samples = {stage: {name: [bench.Sample(2.0 + index, None)] for index, name in enumerate(peer_names)}
               for stage in STAGES}
    table = bench.format_table(bench.summarize(samples, work, 1, 1.0, peer_names), work, 1, peer_names)
    header, rule, *rows = table.splitlines()
    assert header.split()[-4:] == ["of", "floor", peer_names[0], "speed-up"]
    assert len(rule) == len(header)
    assert all(len(row) == len(header) for row in rows if row.startswith(("semantic", "coarse", "fine", "codec", " ")))
    assert rows[1].split()[-1] == "1.50x"  # the second peer's semantic row: 3 s against 2 s


def test_small_rates_keep_their_digits(modules):
    assert [modules.bench._rate(rate) for rate in (0.0192, 5.0, 123.45)] == ["0.0192", "5.00", "123.5"]  # was "0.0"


@pytest.mark.parametrize("stage,output,message", [
    ("coarse", torch.tensor([[[0, 1061]]]), "codes outside [0, 1024) (from 0 to 1061)"),
    ("fine", torch.tensor([[[-1, 3]]]), "codes outside [0, 1024) (from -1 to 3)"),
    ("semantic", torch.zeros(1, 4), "gave shape (1, 4), expected (1, 5)"),
])
def test_a_stage_output_that_would_change_the_work_is_refused(modules, stage, output, message):
    shape = (1, 5) if stage == "semantic" else tuple(output.shape)
    with pytest.raises(RuntimeError, match=re.escape(message)):
        modules.bench.check_output("transformers", stage, output, shape)
    modules.bench.check_output("ours", "coarse", torch.tensor([[[0, 1023]]]), (1, 1, 2))


# --- The floor arithmetic ---


def test_decode_step_reads_the_weights_and_the_cache(modules):
    roofline = modules.roofline
    coarse = roofline.GptShape(hidden=768, layers=12, vocab_out=12_096, itemsize=4)  # bark-small's coarse GPT
    flops, nbytes = coarse.forward(batch=1, new=1, past=0, causal=True, logit_positions=1)
    assert nbytes == (12 * 768**2 * 12 + 768 * 12_096) * 4  # ~377 MB, the figure in issue 6
    assert flops == 2 * (12 * 768**2 * 12 + 768 * 12_096 + 2 * 12 * 768)
    _, with_cache = coarse.forward(batch=8, new=1, past=100, causal=True, logit_positions=1)
    assert with_cache - nbytes == 2 * 8 * 12 * 100 * 768 * 4  # keys and values of 8 items
    machine = roofline.Machine(bandwidth=1e10, gemm_rate=1e11, float32_gemm_rate=1e11)
    assert machine.seconds([(flops, nbytes)]) == pytest.approx(nbytes / 1e10)  # bandwidth-bound
    prefill = coarse.forward(batch=1, new=887, past=0, causal=True, logit_positions=1)
    assert machine.seconds([prefill]) == pytest.approx(prefill[0] / 1e11)  # compute-bound
    emulated_half = roofline.Machine(bandwidth=1e10, gemm_rate=1e9, float32_gemm_rate=1e11)
    assert emulated_half.seconds([prefill]) == pytest.approx(prefill[0] / 1e11)  # products can run in float32
    assert emulated_half.seconds([prefill], gemm_rate=1e9) == pytest.approx(prefill[0] / 1e9)


def test_a_pass_costs_the_last_block_at_the_positions_read(modules):
    """Every block but the last at every position; the last one's keys and values (2C x C each) at every position,
    the rest of it (10C x C, and its attention) at the positions whose logits are read alone."""
    shape = modules.roofline.GptShape(hidden=8, layers=3, vocab_out=5, itemsize=4)
    flops, _ = shape.forward(batch=2, new=6, past=4, causal=True, logit_positions=2)
    blocks = 6 * 2 * 12 * 8**2 + 6 * 2 * 8**2 + 2 * 10 * 8**2
    pairs = 2 * sum(4 + i + 1 for i in range(6)) + sum(4 + i + 1 for i in (4, 5))  # causal: query i sees past + i + 1
    assert flops == 2 * 2 * (blocks + 2 * 8 * 5 + 2 * pairs * 8)
    every_position, _ = shape.forward(batch=1, new=6, past=0, causal=False, logit_positions=6)  # a fine pass
    assert every_position == 2 * (6 * 3 * 12 * 8**2 + 6 * 8 * 5 + 2 * 3 * 6 * 6 * 8)


def test_stage_passes_follow_the_algorithm(modules):
    from bark_hf import BarkHfModel

    roofline = modules.roofline
    model = BarkHfModel(modules.peers.bark_config("tiny")).eval()  # the pass counts depend on the generation configs
    dtype = model.dtype
    # 650 semantic tokens: one prompt pass of 256 + 1 positions, then one pass per further token.
    semantic = roofline.semantic_passes(model, 1, 650, dtype)
    assert len(semantic) == 650
    assert semantic[0] == roofline.GptShape(32, 2, 10_048, 4).forward(1, 257, 0, causal=True, logit_positions=1)
    # 976 frames = 1952 coarse tokens in 33 windows of 60; each window's first token comes from its prefill, except
    # in windows 1 to 10, whose input is the last window's sequence: their first token comes from one step.
    assert roofline.coarse_steps(model, 650) == 1952
    coarse = roofline.coarse_passes(model, 1, 650, None, dtype)
    shape = roofline.GptShape(32, 2, 12_096, 4)
    assert len(coarse) == 1952
    assert coarse[0] == shape.forward(1, 257, 0, causal=True, logit_positions=1)
    assert coarse[60 * 10] == shape.forward(1, 1, 257 + 600 - 1, causal=True, logit_positions=1)
    assert coarse[60 * 11] == shape.forward(1, 257 + 630, 0, causal=True, logit_positions=1)
    step = shape.forward(1, 1, 257 + 630 + 59, causal=True, logit_positions=1)[0]  # the costliest step
    assert sum(flops > step for flops, _ in coarse) == 23  # prefills
    # Fine: one 1024-frame window without a preset, two after 512 preset frames; six codebooks each.
    assert len(roofline.fine_passes(model, 1, 976, None, dtype)) == 6
    preset = modules.peers.random_preset(0)
    assert len(roofline.fine_passes(model, 1, 976, preset, dtype)) == 12
    # Preset history in the first coarse window: 209 semantic tokens' worth (630 / 3.006 rounded down),
    # round(209 * 3.006) = 628 coarse tokens, less the frame the original drops. Every window is prefilled.
    assert roofline.coarse_histories(model, preset) == (209, 626)
    assert sum(flops > step for flops, _ in roofline.coarse_passes(model, 1, 650, preset, dtype)) == 33


@pytest.mark.parametrize("stage", ["semantic", "coarse"])
def test_profile_decoding_smoke_run(stage, tmp_path):
    """benchmarks/profile_decoding.py on a tiny model: it reports the step time, the operator table, a trace."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    trace = tmp_path / "trace.json"
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / "profile_decoding.py"), "--shape", "tiny", "--device", "cpu",
         "--stage", stage, "--steps", "70", "--rows", "5", "--trace", str(trace)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    steps = 69 if stage == "semantic" else 66  # coarse: 68 tokens in 2 windows, each opened by a prefill
    assert f"for {steps} decoding steps" in completed.stdout and "ms per step" in completed.stdout
    assert "By time on the host" in completed.stdout and "aten::" in completed.stdout
    assert json.loads(trace.read_text())["traceEvents"]
    again = subprocess.run([sys.executable, str(BENCHMARKS / "profile_decoding.py"), "--trace", str(trace)],
                           capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 2 and "exists" in again.stderr


def test_profile_decoding_int8(tmp_path):
    """--int8 profiles the quantised stage (quantize_int8): its products are the int8 operator."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    script = [sys.executable, str(BENCHMARKS / "profile_decoding.py"), "--shape", "tiny", "--device", "cpu"]
    completed = subprocess.run([*script, "--stage", "coarse", "--steps", "20", "--rows", "40", "--int8"],
                               capture_output=True, text=True, env=env, timeout=300)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "int8 linear layers" in completed.stdout and "quantized::linear_dynamic" in completed.stdout
    refused = subprocess.run([*script, "--int8", "--dtype", "bfloat16"], capture_output=True, text=True, env=env,
                             timeout=300)
    assert refused.returncode == 2 and "--int8 runs eager, on the CPU, in float32" in refused.stderr


def test_gpu_checks_writes_a_relative_output_folder_where_it_was_run(tmp_path):
    """The script changes to the repository before its steps, so a relative OUTPUT_FOLDER was made where it was run
    but written under the repository (where it did not exist: every log and JSON was lost). python3, nvidia-smi
    and git are stand-ins here: nothing runs on a GPU."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("python3", "nvidia-smi", "git"):
        (bin_dir / tool).write_text("#!/bin/sh\necho stand-in \"$@\"\n")
        (bin_dir / tool).chmod(0o755)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    completed = subprocess.run(["bash", str(BENCHMARKS / "gpu_checks.sh"), "out"], cwd=run_dir, env=env,
                               capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    written = sorted(path.name for path in (run_dir / "out").iterdir())
    assert written == ["bench_b1.log", "bench_b32.log", "bench_b32_sage.log", "machine.txt", "tests.log"]
    assert not (ROOT / "out").exists()
