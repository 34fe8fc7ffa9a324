"""A tiny random Bark, built offline: exercises the whole path, and its audio is noise."""

from __future__ import annotations

import string
import tempfile
from pathlib import Path

import torch
from transformers import BertTokenizer

from .configuration_bark_hf import BarkHfCoarseConfig, BarkHfConfig, BarkHfFineConfig, BarkHfSemanticConfig
from .modeling_bark_hf import BarkHfModel
from .processing_bark_hf import BarkHfProcessor

TINY_RANDOM = "tiny-random"
"""The model name that selects this model in the CLI."""
TINY_RANDOM_MAX_SECONDS = 3.0


def tiny_random_vocab() -> list[str]:
    """BERT's special tokens, printable ASCII characters and their word-piece continuations."""
    characters = [c for c in string.printable if not c.isspace()]
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *characters, *("##" + c for c in characters if c.isalnum())]


def tiny_random_bark(seed: int = 0) -> tuple[BarkHfModel, BarkHfProcessor]:
    """A randomly initialised 2-layer Bark and a processor with an ASCII vocabulary."""
    torch.manual_seed(seed)
    stage = dict(num_layers=2, num_heads=2, hidden_size=32)
    config = BarkHfConfig(
        semantic_config=BarkHfSemanticConfig(**stage),
        coarse_acoustics_config=BarkHfCoarseConfig(**stage),
        fine_acoustics_config=BarkHfFineConfig(**stage),
    )
    model = BarkHfModel(config).eval()
    # EnCodec's codebooks start as zeros (they are learned by k-means): without random ones every
    # token would decode to the same audio.
    with torch.no_grad():
        for layer in model.codec_model.quantizer.layers:
            layer.codebook.embed.normal_()
    # Random weights rarely produce end-of-speech; cap the length so a trial run stays short.
    model.semantic.generation_config.max_gen_duration_s = TINY_RANDOM_MAX_SECONDS
    with tempfile.TemporaryDirectory() as folder:
        vocab = Path(folder) / "vocab.txt"
        vocab.write_text("\n".join(tiny_random_vocab()) + "\n", encoding="utf-8")
        tokenizer = BertTokenizer.from_pretrained(folder, do_lower_case=False)
    return model, BarkHfProcessor(tokenizer)
