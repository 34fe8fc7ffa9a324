"""Device maps, disk offload, stage offload and half precision, on a tiny saved model (CPU only).

Every placement must give the tokens of the plain model under greedy settings. Offloaded weights
stream from disk at every forward, so generations here are kept short (12 semantic tokens).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import random_voice_preset, randomize_

from bark_hf.configuration_bark_hf import BarkHfConfig, bark_codec_config
from bark_hf.modeling_bark_hf import BarkHfModel, execution_device

TINY = dict(num_layers=2, num_heads=2, hidden_size=16)
GREEDY = dict(semantic_top_k=1, coarse_top_k=1, fine_temperature=None, semantic_max_new_tokens=12,
              return_dict_in_generate=True, show_progress=False)
INPUT_IDS = torch.tensor([[101, 7, 33, 45, 12, 9, 87, 3], [55, 14, 71, 0, 0, 0, 0, 0]])
ATTENTION_MASK = (torch.arange(8)[None] < torch.tensor([[8], [3]])).long()
HISTORY = [random_voice_preset(0, n_semantic=40), None]
TOKEN_FIELDS = ("semantic_tokens", "coarse_tokens", "fine_tokens")

# Explicit maps. The tiny model's stages weigh 9.0 MB (semantic, mostly its embedding), 1.6 MB
# (coarse), 0.6 MB (fine) and 0.7 MB (codec) in float32.
STAGES_ON_DISK = {"semantic": "cpu", "coarse_acoustics": "disk", "fine_acoustics": "disk", "codec_model": "disk"}
LAYERS_ON_DISK = {
    "semantic.input_embeds_layer": "disk",
    "semantic.position_embeds_layer": "cpu",
    "semantic.layers.0": "disk",
    "semantic.layers.1": "cpu",
    "semantic.layernorm_final": "cpu",
    "semantic.lm_head": "disk",
    "coarse_acoustics": "cpu",
    # The fine heads share their weights with embeddings 1..7: both on disk.
    "fine_acoustics.input_embeds_layers": "disk",
    "fine_acoustics.position_embeds_layer": "cpu",
    "fine_acoustics.layers.0": "cpu",
    "fine_acoustics.layers.1": "disk",
    "fine_acoustics.layernorm_final": "cpu",
    "fine_acoustics.lm_heads": "disk",
    "codec_model": "disk",
}
DEVICE_MAPS = {
    "auto": dict(device_map="auto"),
    "balanced": dict(device_map="balanced"),
    "sequential": dict(device_map="sequential"),
    "cpu": dict(device_map="cpu"),
    # Budgets that leave part of the model for the disk (checked below).
    "auto-budget": dict(device_map="auto", max_memory={"cpu": "14MB"}),
    "balanced-budget": dict(device_map="balanced", max_memory={"cpu": "14MB"}),
    # The boundary falls in the fine stage, where transformers' planner used to fail on its tied heads.
    "sequential-budget": dict(device_map="sequential", max_memory={"cpu": "16MB"}),
    "stages-on-disk": dict(device_map=STAGES_ON_DISK),
    # torch.device values, as transformers documents them; safetensors took only names for disk-offloaded weights.
    "torch-devices": dict(device_map={**STAGES_ON_DISK, "semantic": torch.device("cpu")}),
    "layers-on-disk": dict(device_map=LAYERS_ON_DISK),
    "all-on-disk": dict(device_map={"": "disk"}),
}
BUDGETS = ("auto-budget", "balanced-budget", "sequential-budget")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny composite with spread random weights (greedy tokens depend on every weight), saved."""
    torch.manual_seed(0)
    config = BarkHfConfig(
        semantic_config=dict(TINY, bias=True),
        coarse_acoustics_config=dict(TINY),
        fine_acoustics_config=dict(TINY),
        codec_config=bark_codec_config(num_filters=4, hidden_size=16, codebook_dim=16, num_lstm_layers=1),
    )
    model = BarkHfModel(config)
    for seed, stage in enumerate((model.semantic, model.coarse_acoustics, model.fine_acoustics)):
        randomize_(stage, seed=seed)
    folder = tmp_path_factory.mktemp("devices") / "tiny-bark"
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reference(model_dir):
    """Greedy output of the plain model (no device map, float32)."""
    return BarkHfModel.from_pretrained(model_dir).generate(INPUT_IDS, ATTENTION_MASK, history_prompt=HISTORY,
                                                           **GREEDY)


def _generate(model: BarkHfModel):
    return model.generate(INPUT_IDS, ATTENTION_MASK, history_prompt=HISTORY, **GREEDY)


def _plain_output_on(device: torch.device, model_dir, reference):
    """The plain model's output on `device` (kernels differ between devices, so compare like with like)."""
    if device.type == "cpu":
        return reference
    return _generate(BarkHfModel.from_pretrained(model_dir).to(device))


def _assert_same_output(output, reference) -> None:
    for field in TOKEN_FIELDS:
        assert torch.equal(getattr(output, field).cpu(), getattr(reference, field).cpu()), field
    torch.testing.assert_close(output.audio.cpu(), reference.audio.cpu())


@pytest.mark.parametrize("name", sorted(DEVICE_MAPS))
def test_device_map_gives_the_plain_tokens(model_dir, reference, tmp_path, name):
    model = BarkHfModel.from_pretrained(model_dir, offload_folder=tmp_path, **DEVICE_MAPS[name])
    if name in BUDGETS:  # the budget really splits the model between memory and disk
        assert {"cpu", "disk"} <= set(model.hf_device_map.values())
    _assert_same_output(_generate(model), _plain_output_on(model.device, model_dir, reference))


def test_compiled_decoding_with_a_device_map_is_refused_or_falls_back(model_dir, reference, tmp_path, monkeypatch):
    model = BarkHfModel.from_pretrained(model_dir, offload_folder=tmp_path, device_map=LAYERS_ON_DISK)
    with pytest.raises(ValueError, match="compile=True cannot decode the semantic stage: accelerate's hooks"):
        model.generate(INPUT_IDS, ATTENTION_MASK, history_prompt=HISTORY, compile=True, **GREEDY)
    monkeypatch.setenv("BARK_HF_COMPILE", "1")  # the default then: decode eagerly
    _assert_same_output(_generate(model), reference)


def test_disk_offload_keeps_weights_on_disk_and_loads_the_codec(model_dir, tmp_path):
    model = BarkHfModel.from_pretrained(model_dir, device_map=STAGES_ON_DISK, offload_folder=tmp_path)
    assert all(p.device.type == "meta" for p in model.coarse_acoustics.parameters())
    assert all(p.device.type == "cpu" for p in model.semantic.parameters())
    # The codec is decoded outside `forward`, where offload hooks never run: it is loaded whole.
    assert all(p.device.type == "cpu" for p in model.codec_model.parameters())
    assert not any(hasattr(module, "_hf_hook") for module in model.codec_model.modules())
    # Stages compute on the execution device, not on the "meta" device their weights wait on.
    assert model.coarse_acoustics.device == execution_device(model.coarse_acoustics) == torch.device("cpu")


def test_a_device_map_onto_meta_is_refused(model_dir):
    with pytest.raises(ValueError, match="loaded onto 'meta', which holds no data"):  # else generate failed deep
        BarkHfModel.from_pretrained(model_dir, device_map={"": "meta"})


def test_device_map_splitting_tied_weights_is_refused(model_dir, tmp_path):
    device_map = {**LAYERS_ON_DISK, "fine_acoustics.input_embeds_layers": "cpu"}
    with pytest.raises(ValueError, match=r"fine_acoustics\.lm_heads\.0\.weight \(disk\) and "
                                         r"fine_acoustics\.input_embeds_layers\.1\.weight \(cpu\)"):
        BarkHfModel.from_pretrained(model_dir, device_map=device_map, offload_folder=tmp_path)


@pytest.mark.parametrize("name", BUDGETS)
def test_budgets_never_split_blocks_the_fine_stage_or_the_codec(model_dir, tmp_path, name):
    model = BarkHfModel.from_pretrained(model_dir, offload_folder=tmp_path, **DEVICE_MAPS[name])
    assert {"BarkHfBlock", "BarkHfFineModel", "EncodecModel"} <= set(model._no_split_modules)
    for key in model.hf_device_map:
        assert not re.search(r"\.layers\.\d+\.", key), key
        assert not key.startswith(("fine_acoustics.", "codec_model.")), key


def test_a_budget_keyed_by_torch_device_is_the_budget_keyed_by_name(model_dir, reference, tmp_path):
    """accelerate takes only GPU indices and names as max_memory's keys: torch.device("cpu") failed with "Device cpu is
    not recognized"."""
    by_name = BarkHfModel.from_pretrained(model_dir, offload_folder=tmp_path / "by-name", device_map="auto",
                                          max_memory={"cpu": "14MB"})
    model = BarkHfModel.from_pretrained(model_dir, offload_folder=tmp_path / "by-device", device_map="auto",
                                        max_memory={torch.device("cpu"): "14MB"})
    assert model.hf_device_map == by_name.hf_device_map and {"cpu", "disk"} <= set(model.hf_device_map.values())
    _assert_same_output(_generate(model), reference)


def test_budget_keys_are_named_as_accelerate_names_devices():
    from bark_hf.modeling_bark_hf import _budget_device_names

    budgets = {torch.device("cuda", 1): "2GiB", torch.device("cpu"): "8GiB", torch.device("mps"): "1GiB", "disk": "1TB",
               0: "3GiB"}
    assert _budget_device_names(budgets) == {1: "2GiB", "cpu": "8GiB", "mps": "1GiB", "disk": "1TB", 0: "3GiB"}
    assert _budget_device_names({torch.device("cuda"): "1GiB"}) == {"cuda": "1GiB"}  # accelerate names the fix
    assert _budget_device_names({"cuda:1": "2GiB", "cpu": "8GiB", "xpu:0": "1GiB", "nowhere:3": "1GiB"}) == \
        {1: "2GiB", "cpu": "8GiB", 0: "1GiB", "nowhere:3": "1GiB"}
    with pytest.raises(ValueError, match=r"max_memory gives 0 two budgets \('1GiB' and '2GiB'\)"):
        _budget_device_names({0: "1GiB", torch.device("cuda", 0): "2GiB"})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_generates_with_a_float32_codec(model_dir, reference, dtype):
    model = BarkHfModel.from_pretrained(model_dir, dtype=dtype)
    for stage in (model.semantic, model.coarse_acoustics, model.fine_acoustics):
        assert {p.dtype for p in stage.parameters()} == {dtype}
    assert {p.dtype for p in model.codec_model.parameters()} == {torch.float32}
    output = _generate(model)
    # Half precision may flip near-tied greedy choices, so only the form of the output is fixed
    # here; docs/devices.md gives the measured agreement with float32.
    assert output.semantic_tokens.shape[0] == 2 and output.audio.dtype == torch.float32
    assert torch.isfinite(output.audio).all()
    for item, length in enumerate(output.fine_lengths.tolist()):
        assert torch.equal(output.fine_tokens[item, :2, :length], output.coarse_tokens[item, :, :length])


def test_half_precision_with_disk_offload_keeps_the_codec_float32(model_dir, tmp_path):
    model = BarkHfModel.from_pretrained(model_dir, dtype=torch.bfloat16, device_map={"": "disk"},
                                        offload_folder=tmp_path)
    assert {p.dtype for p in model.codec_model.parameters()} == {torch.float32}
    assert torch.isfinite(_generate(model).audio).all()


def test_cpu_offload_holds_one_stage_at_a_time(model_dir, reference, monkeypatch):
    """Record where `generate` last moved each stage whenever a stage computes."""
    model = BarkHfModel.from_pretrained(model_dir)
    # Without CUDA, "cpu:0" names the CPU distinctly, so moves to the "accelerator" can be told apart.
    accelerator = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu", 0)
    model.enable_cpu_offload(accelerator)
    stages = {"semantic": model.semantic, "coarse": model.coarse_acoustics, "fine": model.fine_acoustics,
              "codec": model.codec_model}
    placed = dict.fromkeys(stages, torch.device("cpu"))
    seen = []

    def spy_on(name: str, stage: torch.nn.Module) -> None:
        move = stage.to

        def recording_to(device, *args, **kwargs):
            placed[name] = torch.device(device)
            return move(device, *args, **kwargs)

        monkeypatch.setattr(stage, "to", recording_to)
        running = stage.decoder if name == "codec" else stage  # the codec decodes outside its forward
        running.register_forward_pre_hook(lambda module, args: seen.append((name, dict(placed))))

    for name, stage in stages.items():
        spy_on(name, stage)
    output = _generate(model)

    assert [name for name, _ in seen if name != seen[0][0]] and {name for name, _ in seen} == set(stages)
    for name, placement in seen:
        assert placement == {other: accelerator if other == name else torch.device("cpu") for other in stages}
    assert all(device == torch.device("cpu") for device in placed.values())  # everything back after the call
    _assert_same_output(output, _plain_output_on(accelerator, model_dir, reference))
    if accelerator.type == "cuda":
        assert all(p.device.type == "cpu" for p in model.parameters())


def test_cpu_offload_refuses_a_device_mapped_model(model_dir, tmp_path):
    model = BarkHfModel.from_pretrained(model_dir, device_map=STAGES_ON_DISK, offload_folder=tmp_path)
    with pytest.raises(ValueError, match="load it without device_map"):
        model.enable_cpu_offload("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_cpu_offload_without_cuda_asks_for_a_device(model_dir):
    model = BarkHfModel.from_pretrained(model_dir)
    with pytest.raises(ValueError, match="pass accelerator_device"):
        model.enable_cpu_offload()
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match=f"enable_cpu_offload\\('{device}'\\): this torch cannot use"):
            model.enable_cpu_offload(device)
    with pytest.raises(ValueError, match="meta device holds no weights"):
        model.enable_cpu_offload("meta")
    with pytest.raises(ValueError, match=r"unknown stages \['vocoder'\]"):
        model.enable_cpu_offload("cpu", stages=["semantic", "vocoder"])
    assert model.offload_device is None  # nothing was turned on


def test_cpu_offload_takes_transformers_accelerator_id(model_dir, monkeypatch):
    """transformers' Bark names the device by index, enable_cpu_offload(accelerator_id=0); it was a TypeError."""
    model = BarkHfModel.from_pretrained(model_dir)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *args, **kwargs: torch.device("cpu"))
    model.enable_cpu_offload(accelerator_id=0)
    assert model.offload_device == torch.device("cpu", 0)
    with pytest.raises(ValueError, match="accelerator_device or accelerator_id, not both"):
        model.enable_cpu_offload("cpu", accelerator_id=0)
    with pytest.raises(ValueError, match="accelerator_id must be a device index >= 0"):
        model.enable_cpu_offload(accelerator_id=-1)


def test_cpu_offload_moves_only_the_stages_asked_for(model_dir, reference, monkeypatch):
    model = BarkHfModel.from_pretrained(model_dir)
    accelerator = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu", 0)
    model.enable_cpu_offload(accelerator, stages=["coarse_acoustics"])
    moved = []

    def record_moves(name: str, stage: torch.nn.Module) -> None:
        move = stage.to

        def recording_to(device, *args, **kwargs):
            moved.append((name, torch.device(device)))
            return move(device, *args, **kwargs)

        monkeypatch.setattr(stage, "to", recording_to)

    for name in model.STAGE_MODULES:
        record_moves(name, getattr(model, name))
    _generate(model)
    assert {name for name, device in moved if device == accelerator} == {"coarse_acoustics"}


@pytest.mark.slow  # six fresh interpreters, one per mode: about 90 s on two cores
def test_memory_benchmark_quick_run(tmp_path):
    """`benchmarks/memory.py --quick`: every mode runs, each gives its reference's tokens, the budget uses disk."""
    root = Path(__file__).resolve().parents[1]
    results_file = tmp_path / "memory.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    completed = subprocess.run([sys.executable, str(root / "benchmarks" / "memory.py"), "--quick", "--device", "cpu",
                                "--json", str(results_file)], capture_output=True, text=True, env=env, timeout=900)
    assert completed.returncode == 0, completed.stderr[-4000:]
    results = {result["mode"]: result for result in json.loads(results_file.read_text())["shapes"]["tiny"]["results"]}
    assert set(results) == {"full", "offload", "device-map", "fp16", "bf16", "offload-fp16"}
    assert all(result["token_check"].startswith("equal to") for result in results.values())
    assert "disk" in results["device-map"]["device_map"].values()
    assert all(result["peak_anonymous_mb"] >= result["anonymous_after_imports_mb"] > 0 for result in results.values())


def test_cpu_offload_takes_one_stage_by_name(model_dir):
    model = BarkHfModel.from_pretrained(model_dir)
    model.enable_cpu_offload(torch.device("cpu", 0), stages="coarse_acoustics")  # not its letters
    assert model.offload_stages == ("coarse_acoustics",)


@pytest.mark.parametrize("setting", [dict(max_memory={"cpu": "14MB"}), dict(offload_folder="offload")])
def test_a_budget_or_offload_folder_without_a_device_map_is_refused(model_dir, setting):
    """transformers ignored them without a device_map: the model loaded whole, as if no budget had been given."""
    with pytest.raises(ValueError, match=f"{next(iter(setting))} applies only with a device_map; add device_map='auto"):
        BarkHfModel.from_pretrained(model_dir, **setting)


def test_a_budget_and_an_offload_folder_without_a_device_map_are_refused_together(model_dir):
    with pytest.raises(ValueError, match="max_memory and offload_folder apply only with a device_map"):
        BarkHfModel.from_pretrained(model_dir, max_memory={"cpu": "14MB"}, offload_folder="offload")


@pytest.mark.skipif(torch.cuda.is_available(), reason="names a device that is missing without CUDA")
@pytest.mark.parametrize("setting", [dict(device_map={"": 0}), dict(device_map="cuda"),
                                     dict(device_map={**STAGES_ON_DISK, "fine_acoustics": "cuda:1"}),
                                     dict(device_map="auto", max_memory={0: "1GiB", "cpu": "14MB"})])
def test_a_device_map_onto_a_missing_device_is_refused_before_loading(model_dir, tmp_path, setting):
    argument = "max_memory" if "max_memory" in setting else "device_map"
    with pytest.raises(ValueError, match=f"{argument} names the device .* which this torch cannot use"):
        BarkHfModel.from_pretrained(model_dir, offload_folder=tmp_path, **setting)


@pytest.mark.parametrize("device_map", [{"": "cpu", "semantic": "disk"},
                                        {**STAGES_ON_DISK, "coarse_acoustics.layers.0": "cpu"}])
def test_a_map_offloading_part_of_a_mapped_module_is_refused_before_loading(model_dir, tmp_path, device_map):
    with pytest.raises(ValueError, match=r"inside .* which accelerate cannot offload; map the other parts"):
        BarkHfModel.from_pretrained(model_dir, device_map=device_map, offload_folder=tmp_path)  # was: "weight is on
    assert not any(tmp_path.iterdir())                                                        # the meta device"


def test_a_nested_map_without_disk_is_left_to_accelerate():
    """Only disk inside (or around) a module mapped elsewhere was seen to fail; a GPU model with a part on "cpu",
    and devices written two ways ("0", "cuda:0"), are not refused by this check."""
    from bark_hf.modeling_bark_hf import _check_no_offload_inside_a_mapped_module

    _check_no_offload_inside_a_mapped_module({"": 0, "semantic": "cpu"})
    _check_no_offload_inside_a_mapped_module({"semantic": 0, "semantic.layers.0": "cuda:0", "codec_model": "disk"})
    with pytest.raises(ValueError, match="inside"):
        _check_no_offload_inside_a_mapped_module({"": 0, "semantic.layers.1": "disk"})


def test_an_offload_folder_that_is_a_file_is_refused(model_dir, tmp_path):
    taken = tmp_path / "offload"
    taken.write_text("")
    with pytest.raises(NotADirectoryError, match="offload_folder=.* is a file; pass a folder"):  # was: "File exists"
        BarkHfModel.from_pretrained(model_dir, device_map=STAGES_ON_DISK, offload_folder=taken)


@pytest.mark.parametrize("device_map", ["cpu", {"": "cpu"}, {**STAGES_ON_DISK, "coarse_acoustics": "cpu",
                                                             "fine_acoustics": "cpu", "codec_model": "cpu"}])
def test_an_offload_folder_that_is_a_file_is_ignored_by_a_map_without_disk(model_dir, reference, tmp_path, device_map):
    """transformers never uses the folder when nothing goes to disk, and such a load worked; the file check refused
    it."""
    taken = tmp_path / "offload"
    taken.write_text("")
    model = BarkHfModel.from_pretrained(model_dir, device_map=device_map, offload_folder=taken)
    _assert_same_output(_generate(model), reference)


def test_moving_an_offloaded_stage_is_refused_and_leaves_it_working(model_dir, reference, tmp_path):
    """torch failed deep ("Cannot copy out of meta tensor"); casting the weights stays allowed."""
    model = BarkHfModel.from_pretrained(model_dir, device_map=LAYERS_ON_DISK, offload_folder=tmp_path)
    for move in (lambda: model.semantic.to("cpu"), lambda: model.fine_acoustics.to(torch.device("cpu", 0)),
                 lambda: model.fine_acoustics.to("meta", torch.float16)):
        with pytest.raises(ValueError, match=r"model\.\w+ holds weights a device map offloaded .* load the model "
                                             "again with the device_map you want"):
            move()
    model.fine_acoustics.float()  # a cast, not a move
    _assert_same_output(_generate(model), reference)
