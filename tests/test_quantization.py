"""int8 weights for CPU inference: the model still generates every stage; errors name the fix."""

from __future__ import annotations

import pytest
import torch

from bark_hf.tiny_random import tiny_random_bark

GREEDY = {"semantic_top_k": 1, "coarse_top_k": 1, "fine_temperature": None, "semantic_max_new_tokens": 30}


def test_int8_model_generates_and_keeps_the_codec_float32():
    model, processor = tiny_random_bark()
    inputs = processor(["Hello there.", "Hi!"])
    reference = model.generate(**inputs, return_dict_in_generate=True, show_progress=False, **GREEDY)
    model.quantize_int8()
    for stage in (model.semantic, model.coarse_acoustics, model.fine_acoustics):
        assert not any(type(module) is torch.nn.Linear for module in stage.modules())  # all quantised
    assert all(parameter.dtype == torch.float32 for parameter in model.codec_model.parameters())
    output = model.generate(**inputs, return_dict_in_generate=True, show_progress=False, **GREEDY)
    assert output.fine_tokens.shape[:2] == reference.fine_tokens.shape[:2]
    assert output.audio.dtype == torch.float32 and (output.audio_lengths > 0).all()
    # Tokens may differ from float32 ones: random tiny weights give near-ties everywhere (see performance.md).
    assert (output.semantic_tokens < 10_000).all() and (output.fine_tokens <= 1024).all()


def test_int8_needs_a_float32_cpu_model():
    model, _ = tiny_random_bark()
    model.semantic.to(torch.bfloat16)
    with pytest.raises(ValueError, match="float32"):
        model.quantize_int8()
