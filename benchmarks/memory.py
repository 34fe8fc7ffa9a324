"""Peak memory of each way to place Bark: whole, stage offload, a device map with a budget, half precision.

Builds random weights of the bark-small and bark shapes (nothing is downloaded), saves them once
per shape, then loads and runs one short greedy generation per mode, each in a fresh process so
that its peak is its own:

    full          all stages on the device, float32
    offload       `enable_cpu_offload(device)`: only the running stage on the accelerator
    device-map    `from_pretrained(device_map="auto", max_memory={device: --budget, ...})`; on the CPU
                  the rest of the model waits on disk (`offload_folder`)
    fp16, bf16    `from_pretrained(dtype=...)` (the codec stays float32)
    offload-fp16  both

Reported: the process's peak anonymous resident memory (what must stay in RAM: copies, casts,
activations; sampled every 5 ms) with what it held after the imports, its peak resident set
(which also counts weight files read through mmap, pages the kernel can drop), and with CUDA
the allocator's peak (`torch.cuda.max_memory_allocated`) over loading and generation. Token
check: each mode's greedy tokens against the same precision without placement tricks (`full`, or
`fp16` for `offload-fp16`), which must be equal; half precision modes also give their agreement
with float32 (random weights have near-tied logits, so greedy choices flip easily).

    python benchmarks/memory.py                                  # CPU: full, device-map, fp16, bf16
    python benchmarks/memory.py --device cuda --json memory.json # all six modes, both shapes
    python benchmarks/memory.py --quick                          # tiny model, every mode: seconds
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from accelerate.utils import convert_file_size_to_int
from peers import SHAPES, bark_config, random_preset

from bark_hf import BarkHfSemanticGenerationConfig
from bark_hf.atomic import atomic_path, check_new_file

logger = logging.getLogger("memory")

MODES = ("full", "offload", "device-map", "fp16", "bf16", "offload-fp16")
DEFAULT_MODES = {"cpu": ("full", "device-map", "fp16", "bf16"), "cuda": MODES}
MODE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "offload-fp16": torch.float16}
# Each mode's tokens must equal those of this mode: the same precision, placed plainly.
REFERENCE = {"full": "full", "offload": "full", "device-map": "full", "fp16": "fp16", "bf16": "bf16",
             "offload-fp16": "fp16"}
TOKEN_FIELDS = ("semantic_tokens", "coarse_tokens", "fine_tokens")
SEED = 0
QUICK_SEMANTIC_TOKENS = 8
DEFAULT_SEMANTIC_TOKENS = 16  # 24 frames; the fine stage runs one full 1024-frame window either way
DEFAULT_BUDGET = "1GiB"
QUICK_BUDGET = "40MB"  # the tiny model's codec alone is 59 MB: part of it goes to disk
MB = 2**20


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default="small,large", help="comma-separated: small (bark-small), large (bark)")
    parser.add_argument("--modes", default=None,
                        help=f"comma-separated from {', '.join(MODES)}, or 'all' (default: every mode the device "
                             "makes sense for; offload needs an accelerator)")
    parser.add_argument("--budget", default=None,
                        help=f"the device's max_memory in the device-map mode (default {DEFAULT_BUDGET}, "
                             f"{QUICK_BUDGET} with --quick)")
    parser.add_argument("--semantic-tokens", type=int, default=None,
                        help=f"semantic tokens generated, early stop off (default {DEFAULT_SEMANTIC_TOKENS})")
    parser.add_argument("--quick", action="store_true", help="tiny model, every mode, few tokens: a smoke run")
    parser.add_argument("--json", type=Path, help="also write the results to this new file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one mode, as JSON
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes, args.modes = "tiny", args.modes or "all"
        args.semantic_tokens = QUICK_SEMANTIC_TOKENS if args.semantic_tokens is None else args.semantic_tokens
        args.budget = args.budget or QUICK_BUDGET
    args.budget = args.budget or DEFAULT_BUDGET
    args.semantic_tokens = DEFAULT_SEMANTIC_TOKENS if args.semantic_tokens is None else args.semantic_tokens
    most = BarkHfSemanticGenerationConfig().max_new_tokens
    if not 1 <= args.semantic_tokens <= most:
        parser.error(f"--semantic-tokens must be in 1..{most} (the semantic stage's cap); got {args.semantic_tokens}.")
    try:
        convert_file_size_to_int(args.budget)
    except ValueError:
        parser.error(f"--budget takes a size such as 1GiB or 500MB; got {args.budget!r}.")
    args.shapes = args.shapes.split(",")
    if args.modes in (None, ""):
        args.modes = list(DEFAULT_MODES[args.device])
    else:
        args.modes = list(MODES) if args.modes == "all" else args.modes.split(",")
    unknown = [name for name in args.shapes if name not in SHAPES] + [name for name in args.modes if name not in MODES]
    if unknown:
        parser.error(f"unknown shape or mode: {', '.join(unknown)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    if args.json is not None:
        try:
            check_new_file(args.json)
        except OSError as error:
            parser.error(f"--json: {error}")
    return args


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def anonymous_rss_bytes() -> int | None:
    """Resident memory not backed by a file (Linux; None where /proc does not tell, as under gVisor).
    Weights read through mmap count as file pages, which the kernel can drop and read again;
    anonymous pages (copies, casts, activations) must stay in RAM."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["RssAnon"].split()[0]) * 1024 if "RssAnon" in fields else None


class PeakAnonymousMemory:
    """The highest anonymous resident memory while it runs, sampled on a thread every 5 ms."""

    def __init__(self, interval_s: float = 0.005):
        self.peak, self.interval_s = anonymous_rss_bytes(), interval_s
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        if self.peak is not None:
            self.thread.start()

    def _sample(self) -> None:
        while not self.done.wait(self.interval_s):
            self.peak = max(self.peak, anonymous_rss_bytes())

    def stop(self) -> int | None:
        if self.peak is None:
            return None
        self.done.set()
        self.thread.join()
        return max(self.peak, anonymous_rss_bytes())


def run_mode(folder: str, mode: str, device: str, budget: str, semantic_tokens: int) -> dict:
    """Load the saved model as `mode` places it, generate greedily, report memory and tokens (in this process)."""
    from bark_hf import BarkHfModel

    anonymous_after_imports = anonymous_rss_bytes()
    sampler = PeakAnonymousMemory()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    kwargs = {"dtype": MODE_DTYPES[mode]} if mode in MODE_DTYPES else {}
    with tempfile.TemporaryDirectory() as offload_folder:
        if mode == "device-map":
            max_memory = {0: budget, "cpu": "1024GiB"} if device == "cuda" else {"cpu": budget}
            model = BarkHfModel.from_pretrained(folder, device_map="auto", max_memory=max_memory,
                                                offload_folder=offload_folder)
        else:
            model = BarkHfModel.from_pretrained(folder, **kwargs)
            if mode.startswith("offload"):
                model.enable_cpu_offload(device)
            else:
                model.to(device)
        loaded = time.perf_counter()
        torch.manual_seed(SEED)
        input_ids = torch.randint(0, 100_000, (1, 32))  # any ids below the tokenizer's vocabulary
        output = model.generate(input_ids, history_prompt=random_preset(SEED), return_dict_in_generate=True,
                                show_progress=False, semantic_top_k=1, semantic_allow_early_stop=False,
                                semantic_max_new_tokens=semantic_tokens, coarse_top_k=1, fine_temperature=None)
        generated = time.perf_counter()
    peak_anonymous = sampler.stop()
    return {
        "mode": mode,
        "device_map": {key: str(value) for key, value in getattr(model, "hf_device_map", {}).items()},
        "anonymous_after_imports_mb": None if anonymous_after_imports is None else anonymous_after_imports / MB,
        "peak_anonymous_mb": None if peak_anonymous is None else peak_anonymous / MB,
        "peak_rss_mb": peak_rss_bytes() / MB,
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / MB if device == "cuda" else None,
        "load_s": loaded - started,
        "generate_s": generated - loaded,
        "tokens": {field: getattr(output, field).cpu().tolist() for field in TOKEN_FIELDS},
    }


def save_random_model(shape: str, folder: Path) -> int:
    """Random weights of `shape` saved to `folder`; returns the parameter count."""
    from bark_hf import BarkHfModel

    torch.manual_seed(SEED)
    model = BarkHfModel(bark_config(shape)).eval()
    model.save_pretrained(folder)
    return sum(parameter.numel() for parameter in model.parameters())


def agreement(tokens: dict, reference: dict) -> float:
    """Fraction of equal tokens over all stages (positions both have)."""
    equal = total = 0
    for field in TOKEN_FIELDS:
        ours, theirs = torch.tensor(tokens[field]), torch.tensor(reference[field])
        length = min(ours.shape[-1], theirs.shape[-1])
        equal += int((ours[..., :length] == theirs[..., :length]).sum())
        total += theirs[..., :length].numel()
    return equal / max(total, 1)


def format_table(shape: str, parameters: int, results: list[dict]) -> str:
    lines = [f"### {shape}: {parameters / 1e6:.0f} M parameters",
             "", "| mode | peak CUDA MiB | peak anonymous RSS MiB (after imports) | peak RSS MiB | load s | "
                 "generate s | tokens |",
             "|---|---|---|---|---|---|---|"]
    for result in results:
        cuda = "" if result["peak_cuda_mb"] is None else f"{result['peak_cuda_mb']:.0f}"
        anonymous = ("n/a" if result["peak_anonymous_mb"] is None
                     else f"{result['peak_anonymous_mb']:.0f} ({result['anonymous_after_imports_mb']:.0f})")
        lines.append(f"| {result['mode']} | {cuda} | {anonymous} | {result['peak_rss_mb']:.0f} | "
                     f"{result['load_s']:.1f} | {result['generate_s']:.1f} | {result['token_check']} |")
    return "\n".join(lines)


def check_tokens(results: list[dict]) -> bool:
    """Add each result's token check; False when a mode's tokens differ from its reference's."""
    by_mode = {result["mode"]: result for result in results}
    all_equal = True
    for result in results:
        reference = by_mode.get(REFERENCE[result["mode"]])
        if reference is None:
            result["token_check"] = f"no {REFERENCE[result['mode']]} run to compare"
            continue
        equal = result["tokens"] == reference["tokens"]
        all_equal &= equal
        check = f"equal to {reference['mode']}" if equal else f"DIFFER from {reference['mode']}"
        if result["mode"] in MODE_DTYPES and "full" in by_mode:
            check += f"; {agreement(result['tokens'], by_mode['full']['tokens']):.0%} agree with float32"
        result["token_check"] = check
    return all_equal


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        spec = json.loads(args.worker)
        print(json.dumps(run_mode(**spec)))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    report = {"device": device_name, "budget": args.budget, "semantic_tokens": args.semantic_tokens, "shapes": {}}
    all_equal, failures = True, []
    for shape in args.shapes:
        with tempfile.TemporaryDirectory() as folder:
            logger.info(f"{shape}: saving random weights")
            parameters = save_random_model(shape, Path(folder))
            results = []
            for mode in args.modes:
                logger.info(f"{shape}: {mode}")
                spec = dict(folder=folder, mode=mode, device=args.device, budget=args.budget,
                            semantic_tokens=args.semantic_tokens)
                completed = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)],
                                           capture_output=True, text=True)
                if completed.returncode == 0:
                    results.append(json.loads(completed.stdout.strip().splitlines()[-1]))
                else:  # report it and go on: one failing mode should not cost the others' figures
                    logger.error(completed.stderr[-3000:])
                    failures.append(f"{shape} {mode}: {(completed.stderr.strip().splitlines() or ['?'])[-1]}")
        all_equal &= check_tokens(results)
        print(format_table(shape, parameters, results) + "\n")
        report["shapes"][shape] = {"parameters": parameters, "results": results}
        if args.json is not None:  # after every shape, so a run cut short keeps what it measured
            args.json.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(args.json) as temporary:
                temporary.write_text(json.dumps({**report, "failures": failures}, indent=1), encoding="utf-8")
    print(f"Device: {device_name}; {args.semantic_tokens} semantic tokens, greedy; device-map budget {args.budget}.")
    for failure in failures:
        print(f"FAILED {failure}")
    return 1 if failures else 0 if all_equal else 2


if __name__ == "__main__":
    sys.exit(main())
