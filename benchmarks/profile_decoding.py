"""Where a decoding step's time goes: the semantic or coarse stage under torch.profiler.

bench.py tells how far each stage is from its floor; this tells why. It builds random weights of a
shape (nothing is downloaded), runs the stage once untimed (with --compile that compiles the step
and captures its CUDA graph), times a second run, and profiles a third. It prints the time per
decoding step, the kernel launches and CUDA graph replays per step, and the operators that took
the most time on the host and on the device.

    python benchmarks/profile_decoding.py --shape large --device cuda --dtype bfloat16 --compile
    python benchmarks/profile_decoding.py --shape small --stage coarse --int8   # int8 on the CPU
    python benchmarks/profile_decoding.py --shape tiny --steps 16      # a smoke run on the CPU
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from peers import SHAPES, bark_config

from bark_hf import BarkHfModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TEXT_LENGTH = 32  # tokenizer ids per item: any ids below the vocabulary size do
LAUNCH_EVENTS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")
GRAPH_EVENTS = ("cudaGraphLaunch",)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--stage", choices=["semantic", "coarse"], default="semantic")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=120, help="decoding steps per run (coarse: about this many)")
    parser.add_argument("--compile", action="store_true", help="compiled steps (on CUDA: CUDA graphs too)")
    parser.add_argument("--int8", action="store_true", help="int8 linear layers (quantize_int8(); CPU, float32)")
    parser.add_argument("--rows", type=int, default=15, help="operators shown per table")
    parser.add_argument("--trace", type=Path, help="also write a Chrome trace of the profiled run to this new file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    if args.int8 and (args.device != "cpu" or args.dtype != "float32" or args.compile):
        parser.error("--int8 runs eager, on the CPU, in float32")
    if args.batch < 1 or args.steps < 2:
        parser.error("--batch must be at least 1 and --steps at least 2")
    if args.trace is not None and args.trace.exists():
        parser.error(f"{args.trace} exists; choose a new path for --trace")
    return args


def stage_run(args: argparse.Namespace) -> tuple[Callable[[], None], int]:
    """A call that runs the stage once, and the decoding steps it makes."""
    torch.manual_seed(0)
    model = BarkHfModel(bark_config(args.shape)).eval()
    stage = model.semantic if args.stage == "semantic" else model.coarse_acoustics
    stage.to(args.device, DTYPES[args.dtype])
    if args.int8:
        model.quantize_int8()
    settings = dict(compile=args.compile, show_progress=False)
    if args.stage == "semantic":
        text = torch.randint(0, 100_000, (args.batch, TEXT_LENGTH))

        def run() -> None:
            stage.generate(text, max_new_tokens=args.steps, allow_early_stop=False, **settings)

        return run, args.steps - 1  # the first token comes from the prompt's prefill
    ratio = stage.generation_config.semantic_to_coarse_ratio
    semantic = torch.randint(0, 10_000, (args.batch, max(1, round(args.steps / ratio))))
    n_tokens = 2 * int(semantic.shape[1] * ratio / 2)
    n_windows = -(-n_tokens // stage.generation_config.sliding_window_len)

    def run() -> None:
        stage.generate(semantic, **settings)

    return run, n_tokens - n_windows  # every window starts with a prefill


def synchronized(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run, n_steps = stage_run(args)
    run()  # untimed: first-use costs, compilation, graph capture
    synchronized(args.device)
    started = time.perf_counter()
    run()
    synchronized(args.device)
    seconds = time.perf_counter() - started

    activities = [torch.profiler.ProfilerActivity.CPU]
    if args.device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profile:
        run()
        synchronized(args.device)
    if args.trace is not None:
        profile.export_chrome_trace(str(args.trace))

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    dtype = "int8 linear layers" if args.int8 else args.dtype
    print(f"{args.stage} stage, {args.shape} shape, {dtype}, batch {args.batch}, "
          f"{'compiled' if args.compile else 'eager'}, on {device_name}, torch {torch.__version__}")
    print(f"{seconds:.3f} s for {n_steps} decoding steps and their prefills: {seconds / n_steps * 1e3:.2f} ms per step")
    events = profile.key_averages()
    if args.device == "cuda":
        launches = sum(event.count for event in events if event.key in LAUNCH_EVENTS)
        replays = sum(event.count for event in events if event.key in GRAPH_EVENTS)
        print(f"per step: {launches / n_steps:.1f} kernel launches, {replays / n_steps:.2f} CUDA graph replays")
        print("\nBy time on the device:")
        print(events.table(sort_by="self_device_time_total", row_limit=args.rows))
    print("\nBy time on the host:")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
