"""The machine's floor for each stage: the least time its arithmetic and memory traffic allow here.

Two rates are measured: memory bandwidth (a large tensor copy, bytes read + written per second)
and the rate of a large matrix product in the benchmark's dtype (or float32, where that is faster).
Each forward pass a stage must make is then costed as a roofline, max(bytes read / bandwidth,
FLOPs / GEMM rate), and the stage's floor is the sum over its passes:

* a one-token decoding step reads every weight of the blocks and the head once, plus the KV
  cache, for little arithmetic: it sits on the bandwidth side (decode floor = bytes / bandwidth);
* the semantic prompt, each coarse window (re-read from scratch every 60 tokens, except where its
  input is the last window's sequence) and the fine stage's 1024-frame passes are long matrix
  products: they sit on the compute side (floor = FLOPs / GEMM rate);
* the codec is convolutions and an LSTM, costed by its FLOPs.

The passes follow the original algorithm, which all three peers share, with the coarse prefills that
bark-hf skips left out: the floor is the least work any peer does, except that a decoding step
reads the whole head (bark-hf's coarse steps on a CPU read one codebook's rows of it). Embedding
lookups, LayerNorms, biases and sampling are left out.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from bark_hf import BarkHfModel

Pass = tuple[float, float]
"""FLOPs and bytes read of one forward pass (for the whole batch)."""


@dataclass(frozen=True)
class Machine:
    bandwidth: float  # bytes per second, a large copy counting bytes read and written
    gemm_rate: float  # FLOPs per second of a large matrix product in the benchmark's dtype
    float32_gemm_rate: float  # the same in float32, the codec's dtype

    def seconds(self, passes: list[Pass], gemm_rate: float | None = None) -> float:
        """The passes' floor at `gemm_rate`, or by default at the faster of the dtype's and float32's rates: a
        half-precision product can always be computed in float32 (as on CPUs without half-precision instructions,
        where the dtype's own products are far slower than what the models' kernels reach)."""
        rate = max(self.gemm_rate, self.float32_gemm_rate) if gemm_rate is None else gemm_rate
        return sum(max(nbytes / self.bandwidth, flops / rate) for flops, nbytes in passes)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
"""Wall-clock time, or the process's CPU time: on a shared machine a single-threaded CPU run's CPU
time leaves out the time other processes held the core."""


def _best_seconds(run: Callable[[], object], device: torch.device, clock: Callable[[], float],
                  repeats: int = 5) -> float:
    """Shortest of `repeats` timed calls after one untimed one: a floor wants the machine at its best."""
    run()
    best = math.inf
    for _ in range(repeats):
        synchronize(device)
        start = clock()
        run()
        synchronize(device)
        best = min(best, clock() - start)
    return best


def measure_machine(device: torch.device, dtype: torch.dtype, clock: Callable[[], float] = time.perf_counter,
                    quick: bool = False) -> Machine:
    """Copy bandwidth and matrix-product rates on `device`; `quick` uses small sizes (a smoke run)."""
    on_gpu = device.type == "cuda"
    n_bytes = (2**31 if on_gpu else 2**28) if not quick else 2**24
    size = (8192 if on_gpu else 2048) if not quick else 256
    float32_rate = _gemm_rate(device, torch.float32, size, clock)
    return Machine(bandwidth=_copy_bandwidth(device, n_bytes, clock),
                   gemm_rate=float32_rate if dtype == torch.float32 else _gemm_rate(device, dtype, size, clock),
                   float32_gemm_rate=float32_rate)


def _copy_bandwidth(device: torch.device, n_bytes: int, clock: Callable[[], float]) -> float:
    source = torch.ones(n_bytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    return 2 * n_bytes / _best_seconds(lambda: target.copy_(source), device, clock)


def _gemm_rate(device: torch.device, dtype: torch.dtype, size: int, clock: Callable[[], float]) -> float:
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    return 2 * size**3 / _best_seconds(lambda: a @ b, device, clock)


@dataclass(frozen=True)
class GptShape:
    hidden: int
    layers: int
    vocab_out: int
    itemsize: int  # bytes per weight

    @property
    def block_weights(self) -> int:
        """Matrix entries of the blocks: attention in (3C x C) and out (C x C), MLP in (4C x C) and out."""
        return 12 * self.hidden**2 * self.layers

    def forward(self, batch: int, new: int, past: int, causal: bool, logit_positions: int) -> Pass:
        """One pass over `new` positions of each of `batch` items after `past` cached ones, whose last
        `logit_positions` have their logits read. The last block needs every position's keys and values (2C x C
        each), but its queries, attention and the rest only at those positions: no later block reads the others."""
        layer_weights, key_value_weights = self.block_weights // self.layers, 2 * self.hidden**2
        matrix = (new * (self.block_weights - layer_weights) + new * key_value_weights
                  + logit_positions * (layer_weights - key_value_weights))  # weights x positions they multiply
        pairs = ((self.layers - 1) * self._pairs(new, past, new, causal)
                 + self._pairs(new, past, logit_positions, causal))  # query-key pairs attended
        flops = 2 * batch * (matrix + logit_positions * self.hidden * self.vocab_out
                             + 2 * pairs * self.hidden)  # QK^T and AV: 2 x 2C per query-key pair
        weight_bytes = (self.block_weights + self.hidden * self.vocab_out) * self.itemsize
        cache_bytes = 2 * batch * self.layers * past * self.hidden * self.itemsize  # keys and values read
        return flops, weight_bytes + cache_bytes

    @staticmethod
    def _pairs(new: int, past: int, queries: int, causal: bool) -> int:
        """Query-key pairs a layer attends for the last `queries` of `new` positions after `past` cached ones."""
        if not causal:
            return queries * (past + new)
        return queries * past + queries * (2 * new - queries + 1) // 2  # query i of new sees past + i + 1 keys


def _shape(stage, dtype: torch.dtype) -> GptShape:
    config = stage.config
    return GptShape(config.hidden_size, config.num_layers, config.output_vocab_size, dtype.itemsize)


def semantic_passes(model: BarkHfModel, batch: int, n_tokens: int, dtype: torch.dtype) -> list[Pass]:
    """The prompt (text and history windows summed, plus the infer token), then one token per step."""
    shape = _shape(model.semantic, dtype)
    prompt = model.semantic.generation_config.max_input_semantic_length + 1
    steps = [shape.forward(batch, 1, prompt + index, causal=True, logit_positions=1) for index in range(n_tokens - 1)]
    return [shape.forward(batch, prompt, 0, causal=True, logit_positions=1), *steps]


def coarse_steps(model: BarkHfModel, n_semantic: int) -> int:
    """Coarse tokens (two per frame) generated for `n_semantic` semantic tokens."""
    config = model.coarse_acoustics.generation_config
    n_codebooks = config.n_coarse_codebooks
    return int(round(math.floor(n_semantic * config.semantic_to_coarse_ratio / n_codebooks) * n_codebooks))


def coarse_histories(model: BarkHfModel, preset: dict | None) -> tuple[int, int]:
    """Semantic and coarse tokens of preset history in the first window, trimmed as `BarkHfCoarseModel` does."""
    if preset is None:
        return 0, 0
    config = model.coarse_acoustics.generation_config
    ratio = config.semantic_to_coarse_ratio
    n_semantic_prompt = len(preset["semantic_prompt"])
    n_semantic = min(math.floor(config.max_coarse_history / ratio), n_semantic_prompt - n_semantic_prompt % 2,
                     math.floor(preset["coarse_prompt"].size / ratio))
    return n_semantic, round(n_semantic * ratio) - 2  # the original drops the last frame


def coarse_passes(model: BarkHfModel, batch: int, n_semantic: int, preset: dict | None,
                  dtype: torch.dtype) -> list[Pass]:
    """Every window: a prefill of semantic window + infer token + coarse history, then one token per step. A window
    whose input is the last window's sequence (the semantic window has not moved, the coarse history is not cut)
    needs no prefill: one step of the last window's last token (bark-hf's `_CoarseWindow`)."""
    config = model.coarse_acoustics.generation_config
    shape = _shape(model.coarse_acoustics, dtype)
    ratio, window_len = config.semantic_to_coarse_ratio, config.sliding_window_len
    n_steps, (semantic_history, history) = coarse_steps(model, n_semantic), coarse_histories(model, preset)
    max_semantic_history = math.floor(config.max_coarse_history / ratio)

    def semantic_window_start(step: int) -> int:
        return max(0, semantic_history + round(step / ratio) - max_semantic_history)

    passes: list[Pass] = []
    for step in range(0, n_steps, window_len):
        window_steps = min(window_len, n_steps - step)
        context = config.max_coarse_input_length + 1 + min(config.max_coarse_history, history + step)
        goes_on = (step > 0 and semantic_window_start(step) == semantic_window_start(step - window_len)
                   and history + step <= config.max_coarse_history)
        if goes_on:
            passes.append(shape.forward(batch, 1, context - 1, causal=True, logit_positions=1))
        else:
            passes.append(shape.forward(batch, context, 0, causal=True, logit_positions=1))
        passes += [shape.forward(batch, 1, context + index, causal=True, logit_positions=1)
                   for index in range(window_steps - 1)]
    return passes


def fine_passes(model: BarkHfModel, batch: int, n_frames: int, preset: dict | None, dtype: torch.dtype) -> list[Pass]:
    """Per 1024-frame window, one non-causal pass per predicted codebook, with logits at every frame."""
    config = model.fine_acoustics.generation_config
    window, hop = config.max_fine_input_length, config.fine_window_hop
    n_history = 0 if preset is None else min(config.max_fine_history_length, preset["fine_prompt"].shape[1])
    n_windows = max(0, math.ceil((n_frames - (window - n_history)) / hop)) + 1
    n_predicted = config.n_fine_codebooks - model.coarse_acoustics.generation_config.n_coarse_codebooks
    one = _shape(model.fine_acoustics, dtype).forward(batch, window, 0, causal=False, logit_positions=window)
    return [one] * (n_windows * n_predicted)


def codec_passes(model: BarkHfModel, batch: int, n_frames: int) -> list[Pass]:
    """FLOPs of decoding `n_frames` frames per item: counted on one second, scaled (the decoder is
    convolutional, so linear in length); the LSTM, which the counter does not see, is added by hand."""
    codec = model.codec_model
    sample_frames = model.config.codec_config.frame_rate
    codes = torch.randint(0, model.config.codec_config.codebook_size, (8, 1, sample_frames), device=codec.device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        codec.decoder(codec.quantizer.decode(codes))
    lstm_flops_per_frame = sum(
        2 * 4 * lstm.hidden_size * ((lstm.input_size if layer == 0 else lstm.hidden_size) + lstm.hidden_size)
        for lstm in codec.decoder.modules() if isinstance(lstm, torch.nn.LSTM) for layer in range(lstm.num_layers)
    )
    flops = (counter.get_total_flops() / sample_frames + lstm_flops_per_frame) * n_frames * batch
    weight_bytes = sum(p.numel() * p.element_size() for p in codec.decoder.parameters())
    return [(flops, weight_bytes)]
