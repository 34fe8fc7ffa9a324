"""The three implementations the benchmark compares, on one set of random weights.

`build_peers` makes our `BarkHfModel` with random weights, then hands the very same tensors
(`load_state_dict(assign=True)`: shared storage, no copy) to transformers' `BarkModel` and to
the original `bark` package's nanoGPT models and `encodec` codec. Each peer then offers the
same four calls, one per stage, on CPU tensors in a common layout:

    semantic(texts, n_tokens) -> [B, n_tokens]   semantic tokens, early stop off
    coarse(semantic)          -> [B, 2, T]       codes 0..1023
    fine(coarse)              -> [B, 8, T]
    codec(fine)               -> [B, T * 320]    float32 audio

so the benchmark can feed every peer the same input at every stage. Sampling uses Bark's
default temperatures (read from our generation configs) in all three.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.machinery
import sys
import types
from collections.abc import Mapping

import numpy as np
import torch

from bark_hf import BarkHfCoarseConfig, BarkHfConfig, BarkHfFineConfig, BarkHfModel, BarkHfSemanticConfig
from bark_hf.conversion.codec import convert_encodec_state_dict
from bark_hf.conversion.suno_checkpoint import MODEL_ARG_NAMES, rename_state_dict
from bark_hf.tiny_random import tiny_random_bark

PEER_NAMES = ("ours", "transformers", "original")
OPTIONAL_PEER_NAMES = ("ours-int8",)  # CPU only; not in the default set

SHAPES = {
    # name: (hidden size, layers, heads) of each GPT stage
    "tiny": (32, 2, 2),
    "small": (768, 12, 12),  # suno/bark-small
    "large": (1024, 24, 16),  # suno/bark
}

# A voice preset: int64 arrays semantic_prompt [n], coarse_prompt [2, m], fine_prompt [8, m].
Preset = Mapping[str, np.ndarray]


def random_preset(seed: int = 0, n_semantic: int = 341, n_frames: int = 512) -> dict[str, np.ndarray]:
    """Random arrays shaped like Suno's `v2/en_speaker_0` (341 semantic tokens, 512 frames)."""
    rng = np.random.default_rng(seed)
    fine = rng.integers(0, 1024, size=(8, n_frames), dtype=np.int64)
    return {"semantic_prompt": rng.integers(0, 10_000, size=n_semantic, dtype=np.int64),
            "coarse_prompt": fine[:2].copy(), "fine_prompt": fine}


def bark_config(shape: str) -> BarkHfConfig:
    """Our config with the real vocabularies and codec, and GPT stages of the named size without biases."""
    hidden_size, num_layers, num_heads = SHAPES[shape]
    stage = dict(hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads, bias=False)
    return BarkHfConfig(
        semantic_config=BarkHfSemanticConfig(**stage),
        coarse_acoustics_config=BarkHfCoarseConfig(**stage),
        fine_acoustics_config=BarkHfFineConfig(**stage),
    )


def build_peers(shape: str, names: list[str], device: torch.device, dtype: torch.dtype, seed: int,
                preset: Preset | None) -> tuple[BarkHfModel, list]:
    """Our randomly initialised model, and the named peers, all reading its tensors. The codec
    stays float32 in every peer (the original's `codec_decode` cannot return bfloat16 audio)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = BarkHfModel(bark_config(shape)).eval()
    for stage in (model.semantic, model.coarse_acoustics, model.fine_acoustics):
        stage.to(dtype)
    processor = tiny_random_bark(seed)[1]  # an ASCII vocabulary is enough to feed the text window
    classes = {"ours": OursPeer, "ours-int8": OursInt8Peer, "transformers": TransformersPeer, "original": OriginalPeer}
    return model, [classes[name](model, processor, preset) for name in names]


def _stage_temperatures(model: BarkHfModel) -> tuple[float, float, float]:
    config = model.generation_config
    return (config.semantic_config.temperature, config.coarse_acoustics_config.temperature,
            config.fine_acoustics_config.temperature)


class OursPeer:
    """bark-hf through its public stage methods."""

    name = "ours"

    def __init__(self, model: BarkHfModel, processor, preset: Preset | None):
        self.model, self.processor, self.preset = model, processor, preset
        self.device = model.device

    def semantic(self, texts: list[str], n_tokens: int) -> torch.Tensor:
        inputs = self.processor(texts)
        output = self.model.semantic.generate(
            inputs["input_ids"].to(self.device), inputs["attention_mask"].to(self.device), self.preset,
            allow_early_stop=False, max_new_tokens=n_tokens, show_progress=False)
        return output.sequences.cpu()

    def coarse(self, semantic: torch.Tensor) -> torch.Tensor:
        output = self.model.coarse_acoustics.generate(semantic.to(self.device), None, self.preset,
                                                      show_progress=False)
        return output.sequences.cpu()

    def fine(self, coarse: torch.Tensor) -> torch.Tensor:
        return self.model.fine_acoustics.generate(coarse.to(self.device), None, self.preset).sequences.cpu()

    def codec(self, fine: torch.Tensor) -> torch.Tensor:
        return self.model.codec_decode(fine.to(self.device))[0].cpu()


class OursInt8Peer(OursPeer):
    """bark-hf on a copy of the weights with int8 linear layers (`BarkHfModel.quantize_int8`, CPU only)."""

    name = "ours-int8"

    def __init__(self, model: BarkHfModel, processor, preset: Preset | None):
        super().__init__(copy.deepcopy(model).quantize_int8(), processor, preset)


class TransformersPeer:
    """transformers' `BarkModel`, each stage through its sub-model's `generate` as `BarkModel.generate` chains them."""

    name = "transformers"

    def __init__(self, model: BarkHfModel, processor, preset: Preset | None):
        from transformers import BarkConfig, BarkModel
        from transformers.initialization import no_init_weights
        from transformers.models.bark.generation_configuration_bark import (
            BarkCoarseGenerationConfig,
            BarkFineGenerationConfig,
            BarkSemanticGenerationConfig,
        )

        config = model.config
        stage_dicts = {name: _stage_dict(getattr(config, name))
                       for name in ("semantic_config", "coarse_acoustics_config", "fine_acoustics_config")}
        with no_init_weights(), torch.device(model.device):
            bark = BarkModel(BarkConfig(**stage_dicts, codec_config=config.codec_config.to_dict()))
        report = bark.load_state_dict(model.state_dict(), strict=False, assign=True)
        # transformers keeps causal-mask buffers (`attn.bias`) that our weights do not have.
        if report.unexpected_keys or any(not key.endswith(".attn.bias") for key in report.missing_keys):
            raise RuntimeError(f"transformers' BarkModel does not take our weights: {report}")
        self.model = bark.eval()
        self.processor, self.device = processor, model.device
        self.preset = None if preset is None else {k: torch.from_numpy(v).to(self.device) for k, v in preset.items()}
        semantic_t, coarse_t, fine_t = _stage_temperatures(model)
        coarse_defaults = model.coarse_acoustics.generation_config
        self.semantic_config = BarkSemanticGenerationConfig(temperature=semantic_t, do_sample=True)
        self.coarse_config = BarkCoarseGenerationConfig(
            temperature=coarse_t, do_sample=True, max_coarse_history=coarse_defaults.max_coarse_history,
            sliding_window_len=coarse_defaults.sliding_window_len)
        self.fine_config = BarkFineGenerationConfig(temperature=fine_t)
        self.codebook_size = coarse_defaults.codebook_size
        self.offsets = coarse_defaults.semantic_vocab_size + self.codebook_size * torch.arange(2)  # [2]
        # transformers' AlternatingCodebooksLogitsProcessor leaves the coarse vocabulary's special tokens (past both
        # codebooks) open at second-codebook steps, which the original never samples from; random weights pick them.
        first_special = coarse_defaults.semantic_vocab_size + 2 * self.codebook_size
        self.special_coarse_tokens = list(range(first_special, config.coarse_acoustics_config.output_vocab_size))

    @torch.no_grad()
    def semantic(self, texts: list[str], n_tokens: int) -> torch.Tensor:
        inputs = self.processor(texts)
        # End of speech stays possible in transformers; min_new_tokens masks it until n_tokens are out.
        tokens = self.model.semantic.generate(
            inputs["input_ids"].to(self.device), semantic_generation_config=self.semantic_config,
            history_prompt=self.preset, attention_mask=inputs["attention_mask"].to(self.device),
            min_new_tokens=n_tokens, max_new_tokens=n_tokens)
        return tokens.cpu()

    @torch.no_grad()
    def coarse(self, semantic: torch.Tensor) -> torch.Tensor:
        # [B, 2T]: interleaved codebooks, offset like the coarse vocabulary
        flat = self.model.coarse_acoustics.generate(
            semantic.clone().to(self.device),  # it rewrites pad tokens in place
            semantic_generation_config=self.semantic_config,
            coarse_generation_config=self.coarse_config, codebook_size=self.codebook_size,
            history_prompt=self.preset, suppress_tokens=self.special_coarse_tokens)
        return flat.cpu().view(flat.shape[0], -1, 2).transpose(1, 2) - self.offsets[:, None]  # [B, 2, T]

    @torch.no_grad()
    def fine(self, coarse: torch.Tensor) -> torch.Tensor:
        flat = (coarse + self.offsets[:, None]).transpose(1, 2).reshape(coarse.shape[0], -1)  # [B, 2T]
        return self.model.fine_acoustics.generate(
            flat.to(self.device), semantic_generation_config=self.semantic_config,
            coarse_generation_config=self.coarse_config, fine_generation_config=self.fine_config,
            codebook_size=self.codebook_size, history_prompt=self.preset).cpu()

    @torch.no_grad()
    def codec(self, fine: torch.Tensor) -> torch.Tensor:
        return self.model.codec_decode(fine.to(self.device)).float().cpu()  # equal lengths: one batched decode


def _stage_dict(config) -> dict:
    """One of our stage configs as a dict that transformers' stage configs accept."""
    return {k: v for k, v in config.to_dict().items() if k not in ("model_type", "transformers_version")}


def import_original_generation():
    """`bark.generation`, imported without torchaudio and without changing torch's global settings.

    `encodec` imports torchaudio only for file helpers, so a stand-in serves where it is missing;
    `bark.generation` turns on TF32 at import when CUDA is present, which would change the other
    peers' float32 arithmetic too, so the flags are put back.
    """
    try:
        import torchaudio  # noqa: F401
    except ImportError:
        stub = types.ModuleType("torchaudio")
        stub.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)
        sys.modules["torchaudio"] = stub
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    import bark.generation as generation

    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return generation


class OriginalPeer:
    """Suno's `bark.generation` functions, one item at a time (the original has no batching).

    Its models are put into `bark.generation.models`, the module-level cache its functions read,
    so nothing is downloaded. Its bfloat16 autocast on CUDA is turned off: every peer computes in
    the benchmark's dtype.
    """

    name = "original"

    def __init__(self, model: BarkHfModel, processor, preset: Preset | None):
        generation = import_original_generation()  # first: it makes `encodec` importable
        import encodec
        from bark.model import GPT, GPTConfig
        from bark.model_fine import FineGPT, FineGPTConfig

        generation.autocast = contextlib.nullcontext
        generation.models.update(
            text={"model": _original_gpt(GPT, GPTConfig, model.semantic), "tokenizer": processor.tokenizer},
            coarse=_original_gpt(GPT, GPTConfig, model.coarse_acoustics),
            fine=_original_gpt(FineGPT, FineGPTConfig, model.fine_acoustics),
            codec=_original_codec(encodec, model.codec_model),
        )
        self.generation, self.preset = generation, preset
        self.semantic_rate_hz = model.semantic.generation_config.semantic_rate_hz
        self.temperatures = _stage_temperatures(model)

    def semantic(self, texts: list[str], n_tokens: int) -> torch.Tensor:
        # The original stops once the generated duration exceeds max_gen_duration_s: half a token
        # short of n_tokens makes exactly n_tokens come out.
        duration_s = (n_tokens - 0.5) / self.semantic_rate_hz
        return torch.stack([torch.from_numpy(self.generation.generate_text_semantic(
            text, history_prompt=self.preset, temp=self.temperatures[0], silent=True, allow_early_stop=False,
            max_gen_duration_s=duration_s, use_kv_caching=True).astype(np.int64)) for text in texts])

    def coarse(self, semantic: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.from_numpy(self.generation.generate_coarse(
            item.numpy(), history_prompt=self.preset, temp=self.temperatures[1], silent=True,
            use_kv_caching=True).astype(np.int64)) for item in semantic])

    def fine(self, coarse: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.from_numpy(self.generation.generate_fine(
            item.numpy(), history_prompt=self.preset, temp=self.temperatures[2]).astype(np.int64))
            for item in coarse])

    def codec(self, fine: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.from_numpy(self.generation.codec_decode(item.numpy())).reshape(-1)
                            for item in fine])


def _original_gpt(model_cls: type, config_cls: type, stage) -> torch.nn.Module:
    """The original's nanoGPT for one of our stages, reading the stage's tensors.

    Built on the meta device (no memory, no initialisation), then given our tensors under the
    original's names, which the conversion's own rename table translates.
    """
    fields = {field.name for field in dataclasses.fields(config_cls)}
    args = {theirs: getattr(stage.config, ours) for theirs, ours in MODEL_ARG_NAMES.items() if theirs in fields}
    with torch.device("meta"):
        original = model_cls(config_cls(**args))
    ours = stage.state_dict()
    names = {key: next(iter(rename_state_dict({key: value}))) for key, value in original.state_dict().items()}
    original.load_state_dict({key: ours[name] for key, name in names.items()}, strict=True, assign=True)
    return original.eval()


def _original_codec(encodec, codec_model: torch.nn.Module) -> torch.nn.Module:
    """`encodec`'s 24 kHz model reading our codec's tensors (names through the conversion's table)."""
    original = encodec.EncodecModel.encodec_model_24khz(pretrained=False).to(codec_model.device)
    original_state = original.state_dict()
    converted = convert_encodec_state_dict(original_state)  # renames every key, in order, or raises
    names = dict(zip(original_state, converted, strict=True))
    ours = codec_model.state_dict()
    original.load_state_dict({key: ours[name] for key, name in names.items()}, strict=True, assign=True)
    original.set_target_bandwidth(6.0)
    return original.eval()
