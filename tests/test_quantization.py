"""int8 weights for CPU inference: the model still generates every stage; errors name the fix."""

from __future__ import annotations

import logging

import pytest
import torch

import bark_hf.hub
from bark_hf import cpu_kernels
from bark_hf import modeling_bark_hf as modeling
from bark_hf.modeling_bark_hf import holds_int8_layers
from bark_hf.pipeline_bark_hf import BarkPipeline
from bark_hf.tiny_random import tiny_random_bark

GREEDY = {"semantic_top_k": 1, "coarse_top_k": 1, "fine_temperature": None, "semantic_max_new_tokens": 30}


def test_int8_model_generates_and_keeps_the_codec_float32():
    model, processor = tiny_random_bark()
    inputs = processor(["Hello there.", "Hi!"])
    reference = model.generate(**inputs, return_dict_in_generate=True, show_progress=False, **GREEDY)
    model.quantize_int8()
    for stage in (model.semantic, model.coarse_acoustics, model.fine_acoustics):
        float_layers = [name for name, module in stage.named_modules() if type(module) is torch.nn.Linear]
        # All quantised but the coarse head: a step reads one codebook's rows of it, in float32.
        assert float_layers == (["lm_head"] if stage is model.coarse_acoustics else [])
    assert all(parameter.dtype == torch.float32 for parameter in model.codec_model.parameters())
    output = model.generate(**inputs, return_dict_in_generate=True, show_progress=False, **GREEDY)
    assert output.fine_tokens.shape[:2] == reference.fine_tokens.shape[:2]
    assert output.audio.dtype == torch.float32 and (output.audio_lengths > 0).all()
    # Tokens may differ from float32 ones: random tiny weights give near-ties everywhere (see performance.md).
    assert (output.semantic_tokens < 10_000).all() and (output.fine_tokens <= 1024).all()


@pytest.mark.skipif(isinstance(cpu_kernels._load(), cpu_kernels.CpuKernelsUnavailable),
                    reason="bark-hf's CPU kernels cannot be built here")
@pytest.mark.parametrize(("int8", "batch", "kernels", "storage"), [
    (True, 2, "1", torch.float16),  # the kernel's steps read half the bytes
    (True, cpu_kernels.BLOCK_STEP_MAX_ITEMS + 1, "1", None),  # PyTorch's steps: it would convert the cache every step
    (True, 2, "0", None),
    (False, 2, "1", None),  # float32 stays exact
])
def test_an_int8_model_keeps_its_cache_in_float16_where_the_kernel_steps(monkeypatch, int8, batch, kernels, storage):
    monkeypatch.setenv(cpu_kernels.CPU_KERNELS_ENV_VAR, kernels)
    caches, steps = [], []
    monkeypatch.setattr(modeling.BarkHfKVCache, "__init__", _recorded(modeling.BarkHfKVCache.__init__, caches))
    cpu_step = modeling.BarkHfBlock.cpu_step
    monkeypatch.setattr(modeling.BarkHfBlock, "cpu_step", lambda *args: steps.append(cpu_step(*args)) or steps[-1])
    model, processor = tiny_random_bark()
    if int8:
        model.quantize_int8()
    inputs = processor(["Hello there.", "Hi!", "Bark."] * batch)
    inputs = {name: tensor[:batch] for name, tensor in inputs.items()}
    output = model.generate(**inputs, return_dict_in_generate=True, show_progress=False,
                            **{**GREEDY, "semantic_max_new_tokens": 12})
    assert output.audio.shape[0] == batch and (output.audio_lengths > 0).all()
    stage_caches = [cache for cache in caches if cache.max_length]  # the others hold one item's prefill
    assert len(stage_caches) == 2 and all(cache.storage_dtype == storage for cache in caches)  # semantic, coarse
    assert all(cache[0][0].dtype == (storage or torch.float32) for cache in caches)
    assert (len(steps) > 0 and all(steps)) == (kernels == "1" and batch <= cpu_kernels.BLOCK_STEP_MAX_ITEMS)


@pytest.mark.skipif(isinstance(cpu_kernels._load(), cpu_kernels.CpuKernelsUnavailable),
                    reason="bark-hf's CPU kernels cannot be built here")
def test_quantize_int8_unpacks_the_decoding_stages_once_not_at_every_generate(monkeypatch):
    unpacked = []
    weight_bias = torch.ao.nn.quantized.dynamic.Linear._weight_bias
    monkeypatch.setattr(torch.ao.nn.quantized.dynamic.Linear, "_weight_bias",
                        lambda layer: unpacked.append(layer) or weight_bias(layer))
    model, processor = tiny_random_bark()
    model.quantize_int8()
    decoding_blocks = [*model.semantic.layers, *model.coarse_acoustics.layers]
    assert len(unpacked) == 4 * len(decoding_blocks)  # each block's four products, the fine stage's none
    unpacked.clear()
    for _ in range(2):
        model.generate(**processor(["Hello there."]), show_progress=False, **GREEDY)
    assert unpacked == []


@pytest.mark.parametrize("reason", ["kernels off", "no kernel here"])
def test_quantize_int8_keeps_no_tiles_where_the_kernel_does_not_run(monkeypatch, reason):
    if reason == "kernels off":
        monkeypatch.setenv(cpu_kernels.CPU_KERNELS_ENV_VAR, "0")
    else:
        monkeypatch.setattr(modeling, "cpu_block_step", lambda: None)
    unpacked = []
    weight_bias = torch.ao.nn.quantized.dynamic.Linear._weight_bias
    monkeypatch.setattr(torch.ao.nn.quantized.dynamic.Linear, "_weight_bias",
                        lambda layer: unpacked.append(layer) or weight_bias(layer))
    tiny_random_bark()[0].quantize_int8()
    assert unpacked == []


@pytest.mark.skipif(isinstance(cpu_kernels._load(), cpu_kernels.CpuKernelsUnavailable),
                    reason="bark-hf's CPU kernels cannot be built here")
def test_an_int8_stage_whose_blocks_the_kernel_does_not_step_keeps_a_float32_cache(monkeypatch):
    """A block with a hook steps through PyTorch, which would convert a float16 cache at every step."""
    caches = []
    monkeypatch.setattr(modeling.BarkHfKVCache, "__init__", _recorded(modeling.BarkHfKVCache.__init__, caches))
    model, processor = tiny_random_bark()
    model.quantize_int8()
    model.semantic.layers[-1].register_forward_pre_hook(lambda module, args: None)
    model.generate(**processor(["Hello there."]), show_progress=False, **GREEDY)
    assert [cache.storage_dtype for cache in caches] == [None, torch.float16]  # semantic, coarse


@pytest.mark.skipif(isinstance(cpu_kernels._load(), cpu_kernels.CpuKernelsUnavailable),
                    reason="bark-hf's CPU kernels cannot be built here")
def test_a_cpu_without_f16c_keeps_int8_caches_in_float32_and_its_kernel_refuses_float16_ones(monkeypatch):
    """Every AVX2 CPU has F16C, but a virtual machine may hide it: the kernels still run, over float32 caches."""
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: "fpu sse2 avx avx2 fma")
    cpu_kernels.reads_float16_caches.cache_clear()
    try:
        caches, steps = [], []
        monkeypatch.setattr(modeling.BarkHfKVCache, "__init__", _recorded(modeling.BarkHfKVCache.__init__, caches))
        cpu_step = modeling.BarkHfBlock.cpu_step
        monkeypatch.setattr(modeling.BarkHfBlock, "cpu_step", lambda *args: steps.append(cpu_step(*args)) or steps[-1])
        model, processor = tiny_random_bark()
        model.quantize_int8()
        model.generate(**processor(["Hello there."]), show_progress=False, **GREEDY)
        assert [cache.storage_dtype for cache in caches] == [None, None] and steps and all(steps)
        block = model.semantic.layers[0]
        half = torch.zeros(1, block.attn.num_heads, 4, block.attn.hidden_size // block.attn.num_heads,
                           dtype=torch.float16)
        prepared = block.prepared_for_cpu_steps({})
        assert not cpu_kernels.cpu_block_step()(torch.zeros(1, 1, block.attn.hidden_size), prepared, half,
                                                half.clone(), 0, None)
    finally:
        cpu_kernels.reads_float16_caches.cache_clear()


def _recorded(init, caches):
    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        caches.append(self)
    return recording_init


def test_int8_needs_a_float32_cpu_model():
    model, _ = tiny_random_bark()
    model.semantic.to(torch.bfloat16)
    with pytest.raises(ValueError, match="float32"):
        model.quantize_int8()


def test_int8_model_refuses_to_be_saved_moved_or_cast(tmp_path):
    model, _ = tiny_random_bark()
    model.quantize_int8()
    with pytest.raises(ValueError, match="int8.*Save the float32 model"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything was written
    for move in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.to("meta"),
                 lambda m: m.semantic.to(torch.float16)):
        with pytest.raises(ValueError, match="int8.*Move or cast"):
            move(model)
    assert model.semantic.input_embeds_layer.weight.dtype == torch.float32  # nothing was half-moved
    model.to("cpu").float()  # no change: allowed


def test_compile_with_int8_is_refused_and_the_environment_variable_falls_back(monkeypatch, caplog):
    model, processor = tiny_random_bark()
    model.quantize_int8()
    inputs = processor("Hello there.")
    with pytest.raises(ValueError, match="compile=True cannot decode the semantic stage: .*int8"):
        model.semantic.generate(inputs["input_ids"], compile=True, max_new_tokens=3, show_progress=False)
    eager = model.semantic.generate(inputs["input_ids"], top_k=1, max_new_tokens=5, show_progress=False)
    monkeypatch.setenv("BARK_HF_COMPILE", "1")
    logging.Logger.warning_once.cache_clear()  # the warning is shown once per process
    with caplog.at_level(logging.WARNING):
        output = model.semantic.generate(inputs["input_ids"], top_k=1, max_new_tokens=5, show_progress=False)
    assert torch.equal(output.sequences, eager.sequences)
    assert "BARK_HF_COMPILE=1 is ignored for the semantic stage" in caplog.text


def test_int8_model_refuses_training():
    """int8 layers get no gradients: a Trainer would silently update only the embeddings and layer norms."""
    model, _ = tiny_random_bark()
    model.quantize_int8()
    for stage in (model, model.semantic, model.fine_acoustics):
        with pytest.raises(ValueError, match="int8.*no gradients.*Train the float32 model"):
            stage.train()
    assert not model.training and not model.semantic.training
    model.eval()  # allowed


def test_an_int8_loss_with_autograd_on_is_refused_and_scores_without_it():
    """In eval mode nothing stopped a loss whose backward pass left the int8 layers without gradients."""
    model, _ = tiny_random_bark()
    model.quantize_int8()
    labels = torch.full((1, 6), -100)
    labels[0, -1] = 5
    calls = [lambda: model.semantic(input_ids=torch.randint(0, 100, (1, 6)), labels=labels),
             lambda: model.coarse_acoustics(input_ids=torch.randint(0, 100, (1, 6)),
                                            labels=labels + torch.where(labels >= 0, 10_000, 0)),
             lambda: model.fine_acoustics(2, torch.randint(0, 1024, (1, 6, 8)), labels=labels)]
    for call in calls:  # each stage
        with pytest.raises(ValueError, match=r"int8.*Train the float32 model.*compute the loss under torch\.no_grad"):
            call()
        with torch.no_grad():
            assert torch.isfinite(call().loss)


def test_int8_and_cpu_offload_are_refused_in_either_order():
    """Offload moves stages to an accelerator, where int8 layers cannot run (the CLI refuses the pair too)."""
    model, _ = tiny_random_bark()
    model.enable_cpu_offload("cpu:0")  # "cpu:0" stands in for an accelerator
    with pytest.raises(ValueError, match=r"quantize_int8\(\): enable_cpu_offload\(\) moves .* CPU only"):
        model.quantize_int8()
    assert not holds_int8_layers(model)
    model, _ = tiny_random_bark()
    model.quantize_int8()
    with pytest.raises(ValueError, match=r"enable_cpu_offload\(\): .* int8"):
        model.enable_cpu_offload("cpu:0")
    assert model.offload_device is None


def test_int8_push_to_hub_is_refused_before_the_repo_is_created(monkeypatch):
    created = []

    class RecordingHub:
        def __init__(self, **kwargs):
            pass

        def create_repo(self, repo_id, **kwargs):
            created.append(repo_id)
            raise AssertionError("the Hub was reached")

    monkeypatch.setattr(bark_hf.hub, "HfApi", RecordingHub)
    model, processor = tiny_random_bark()
    model.quantize_int8()
    for pushed in (model, model.semantic, BarkPipeline(model=model, processor=processor)):
        with pytest.raises(ValueError, match="int8.*Push the float32 model"):
            pushed.push_to_hub("someone/bark-int8")
    assert created == []


def test_int8_refuses_a_stage_off_the_cpu_before_quantising_any():
    model, _ = tiny_random_bark()
    model.coarse_acoustics.to("meta")  # stands in for a stage moved to a GPU; the first weight is still on the CPU
    with pytest.raises(ValueError, match=r"wholly on the CPU; .*\(model\.to\('cpu'\)\)"):
        model.quantize_int8()
    assert not holds_int8_layers(model)  # the semantic stage was quantised before the coarse one failed


def test_int8_refuses_unmerged_peft_adapters_before_quantising_any():
    """peft's layers read `weight.dtype` of the layers they wrap, a method on an int8 layer: quantising went through
    and the next generate failed deep inside peft."""
    from peft import LoraConfig, get_peft_model

    model, processor = tiny_random_bark()
    lora = get_peft_model(model.coarse_acoustics, LoraConfig(r=2, target_modules=["att_proj"]))
    with pytest.raises(ValueError, match=r"peft adapters that are not merged .*merge_and_unload\(\)"):
        model.quantize_int8()
    assert not holds_int8_layers(model)
    lora.merge_and_unload()
    model.quantize_int8()
    inputs = processor("Hi")
    assert model.generate(**inputs, semantic_max_new_tokens=4, fine_temperature=None, show_progress=False).numel()


def test_int8_leaves_a_model_in_training_mode_in_eval_mode():
    """Left in training mode, a Trainer (or forward with labels) would update only the float32 rest."""
    model, _ = tiny_random_bark()
    model.fine_acoustics.train()
    model.quantize_int8()
    assert not any(module.training for module in model.modules())


def test_int8_and_bfloat16_logits_stay_close_to_float32_at_every_stage():
    """Each GPT stage's logits on the same inputs: a relative error of a few percent at most, and mostly the same
    greedy choice (tiny random weights have many near-ties, so not all)."""
    import copy

    model, _ = tiny_random_bark()
    low_bit = {"bfloat16": copy.deepcopy(model).to(torch.bfloat16), "int8": copy.deepcopy(model).quantize_int8()}
    generator = torch.Generator().manual_seed(0)
    semantic_ids = torch.randint(0, 10_000, (2, 300), generator=generator)
    coarse_ids = torch.randint(0, 12_096, (2, 300), generator=generator)
    fine_ids = torch.randint(0, 1_024, (2, 1_024, 8), generator=generator)
    stages = {"semantic": lambda m: m.semantic(semantic_ids).logits,
              "coarse": lambda m: m.coarse_acoustics(coarse_ids).logits,
              "fine": lambda m: m.fine_acoustics(3, fine_ids).logits}
    with torch.no_grad():
        for stage, logits_of in stages.items():
            reference = logits_of(model)
            for name, other in low_bit.items():
                logits = logits_of(other).float()
                relative_error = float((logits - reference).norm() / reference.norm())
                assert relative_error < (0.02 if name == "bfloat16" else 0.06), (stage, name, relative_error)
                agreement = float((logits.argmax(-1) == reference.argmax(-1)).float().mean())
                assert agreement > 0.9, (stage, name, agreement)
