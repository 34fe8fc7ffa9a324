"""`pipeline("text-to-audio")` with bark-hf models, the Auto classes, and remote code."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import transformers
from conftest import TINY_PRESET_NAMES, random_voice_preset
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForTextToWaveform,
    AutoProcessor,
    AutoTokenizer,
    BarkConfig,
    BarkModel,
    BertTokenizer,
    pipeline,
)
from transformers.pipelines import TextToAudioPipeline

import bark_hf
import bark_hf.pipeline_bark_hf as pipeline_module
from bark_hf import BarkHfFineModel, BarkHfModel, BarkHfProcessor, BarkHfSemanticModel, BarkPipeline
from bark_hf.configuration_bark_hf import BarkHfSemanticConfig
from bark_hf.longform import generate_long_form
from bark_hf.registration import register
from bark_hf.tiny_random import tiny_random_bark

GREEDY = {"semantic_top_k": 1, "coarse_top_k": 1, "fine_temperature": None, "semantic_max_new_tokens": 40}
TEXTS = ["Hello there.", "A much longer sentence, spoken slowly, with several words in it.", "Hi!"]


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return pipeline("text-to-audio", model=str(tiny_model_dir), device="cpu")


def test_pipeline_factory_builds_bark_pipeline(pipe):
    assert type(pipe) is BarkPipeline
    assert isinstance(pipe.model, BarkHfModel)
    assert pipe.processor.available_voice_presets == sorted(TINY_PRESET_NAMES)


def test_single_text_gives_float32_audio_at_24khz(pipe, tiny_model_dir):
    output = pipe("Hello there.", voice_preset="v2/en_speaker_1", generate_kwargs=GREEDY)
    assert output["sampling_rate"] == 24_000
    assert pipe.sampling_rate == 24_000  # where transformers' TextToAudioPipeline has it
    assert output["audio"].dtype == np.float32 and output["audio"].ndim == 1
    # The same as calling the model directly, trimmed to the item's length.
    model, processor = pipe.model, pipe.processor
    direct = model.generate(**processor("Hello there.", voice_preset="v2/en_speaker_1"), return_dict_in_generate=True,
                            show_progress=False, **GREEDY)
    np.testing.assert_array_equal(output["audio"], direct.audio[0, : direct.audio_lengths[0]].numpy())


def test_batch_with_per_item_presets_equals_one_by_one(pipe, tmp_path):
    preset_file = tmp_path / "mine.npz"
    np.savez(preset_file, **random_voice_preset(7, n_semantic=25))
    presets = ["v2/en_speaker_0", None, str(preset_file)]
    batch = pipe(TEXTS, voice_preset=presets, generate_kwargs=GREEDY, batch_size=3)
    assert isinstance(batch, list) and len(batch) == 3
    for text, preset, output in zip(TEXTS, presets, batch, strict=True):
        alone = pipe(text, voice_preset=preset, generate_kwargs=GREEDY)
        np.testing.assert_array_equal(output["audio"], alone["audio"])


def test_one_preset_for_a_batch_and_batches_smaller_than_the_input(pipe):
    batch = pipe(TEXTS, voice_preset="v2/de_speaker_3", generate_kwargs=GREEDY, batch_size=2)
    for text, output in zip(TEXTS, batch, strict=True):
        alone = pipe(text, voice_preset="v2/de_speaker_3", generate_kwargs=GREEDY)
        np.testing.assert_array_equal(output["audio"], alone["audio"])


def test_streams_of_texts_give_an_iterator_of_outputs_batch_by_batch(pipe, monkeypatch):
    datasets = pytest.importorskip("datasets")
    from transformers.pipelines.pt_utils import KeyDataset

    alone = [pipe(text, voice_preset="v2/en_speaker_1", generate_kwargs=GREEDY)["audio"] for text in TEXTS]
    calls = []
    generate = pipe.model.generate
    monkeypatch.setattr(pipe.model, "generate", lambda **kwargs: calls.append(len(kwargs["input_ids"])) or
                        generate(**kwargs))
    dataset = datasets.Dataset.from_dict({"text": TEXTS})
    for stream in ((text for text in TEXTS), KeyDataset(dataset, "text"), np.array(TEXTS)):
        calls.clear()
        outputs = pipe(stream, voice_preset="v2/en_speaker_1", generate_kwargs=GREEDY, batch_size=2)
        if not isinstance(stream, np.ndarray):  # an array is a list of texts: a list back
            assert not isinstance(outputs, list) and calls == []  # lazy: nothing generated before iterating
        outputs = list(outputs)
        assert calls == [2, 1]
        for output, expected in zip(outputs, alone, strict=True):
            np.testing.assert_array_equal(output["audio"], expected)

    with pytest.raises(TypeError, match=r"KeyDataset\(dataset, 'text'\)"):
        list(pipe(dataset))  # rows are dicts
    with pytest.raises(TypeError, match=r"not a dict; .*KeyDataset"):
        pipe({"text": "Hello."})
    with pytest.raises(TypeError, match="A set of texts has no order"):
        pipe({"Hello.", "Hi."})
    # Settings are checked at the call, before any text is read or generated.
    for settings, error, message in [
        ({"voice_preset": ["v2/en_speaker_1"] * 3}, ValueError, "a stream of texts, pass one preset for all"),
        ({"voice": "x"}, TypeError, "Unknown BarkPipeline setting"),
        ({"voice_preset": "v2/en_speakr_1"}, ValueError, "v2/en_speaker_1"),
        ({"silence_s": -1}, ValueError, "silence_s"),
        ({"long_form": "yes"}, ValueError, "long_form must be"),
        ({"generate_kwargs": {"semantic_temperature": 0}}, ValueError, "temperature must be a finite number > 0"),
        ({"generate_kwargs": {"semantic_temp": 0.5}}, ValueError, "Unknown or invalid semantic setting"),
        # Was found by the fine stage's forward, after the semantic and coarse stages: a stream's first batch.
        ({"generate_kwargs": {"fine_max_fine_input_length": 2048}}, ValueError, "max_fine_input_length=2048 needs"),
    ]:
        with pytest.raises(error, match=message):
            pipe((pytest.fail("read a text") for _ in range(1)), **settings)
    with pytest.raises(ValueError, match="Text 3 is empty"):  # numbered within the whole stream
        list(pipe(iter(["Hi.", "Bye.", "Ok.", " "]), generate_kwargs=GREEDY, batch_size=2))


def test_a_seeded_stream_is_seeded_once(pipe):
    settings = {"semantic_max_new_tokens": 20}
    streamed = [out["audio"] for out in pipe(iter(["Hi.", "Hi."]), seed=5, generate_kwargs=settings, batch_size=1)]
    listed = [out["audio"] for out in pipe(["Hi.", "Hi."], seed=5, generate_kwargs=settings, batch_size=1)]
    for first, second in zip(streamed, listed, strict=True):
        np.testing.assert_array_equal(first, second)


def test_seed_makes_sampling_repeatable(pipe):
    settings = {"semantic_max_new_tokens": 30}
    first = pipe("Hello there.", seed=11, generate_kwargs=settings)["audio"]
    again = pipe("Hello there.", seed=11, generate_kwargs=settings)["audio"]
    other = pipe("Hello there.", seed=12, generate_kwargs=settings)["audio"]
    np.testing.assert_array_equal(first, again)
    assert first.shape != other.shape or not np.array_equal(first, other)


def test_transformers_forward_params_do_sample_work(pipe):
    """transformers' text-to-audio examples pass forward_params={"do_sample": True} for Bark; it was refused."""
    settings = {"semantic_max_new_tokens": 20}
    sampled = pipe("Hello there.", seed=4, forward_params={**settings, "do_sample": True})["audio"]
    np.testing.assert_array_equal(sampled, pipe("Hello there.", seed=4, generate_kwargs=settings)["audio"])
    greedy = pipe("Hello there.", forward_params={**settings, "do_sample": False})["audio"]
    np.testing.assert_array_equal(greedy, pipe("Hello there.", generate_kwargs={**GREEDY, **settings})["audio"])


def test_settings_given_when_building_are_defaults(tiny_model_dir):
    pipe = pipeline("text-to-audio", model=str(tiny_model_dir), device="cpu", voice_preset="v2/en_speaker_1",
                    generate_kwargs=GREEDY)
    explicit = pipe("Hi!", voice_preset="v2/en_speaker_1", generate_kwargs=GREEDY)
    np.testing.assert_array_equal(pipe("Hi!")["audio"], explicit["audio"])


@pytest.mark.parametrize("default,error,message", [
    ({"generate_kwargs": {"semantic_temp": 0.5}}, ValueError, "semantic"),
    ({"forward_params": {"temperature": 0.5}}, ValueError, "stage prefix"),
    ({"voice_preset": "v2/en_speakr_1"}, ValueError, "v2/en_speaker_1"),
    ({"voice_preset": [None, "/nowhere/voice.npz"]}, FileNotFoundError, "voice.npz"),
    ({"batch_size": 0}, ValueError, "batch_size"),
    ({"seed": "7"}, TypeError, "seed"),
    ({"silence_s": -1}, ValueError, "silence_s"),
    ({"long_form": "yes"}, ValueError, "long_form"),
])
def test_bad_defaults_are_refused_when_building(pipe, default, error, message):
    """They were accepted, and then every call failed."""
    with pytest.raises(error, match=message):
        BarkPipeline(model=pipe.model, processor=pipe.processor, device="cpu", **default)


@pytest.mark.parametrize("device", ["meta", "gpu", pytest.param("cuda", marks=pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks a torch without CUDA"))])
def test_an_unusable_device_is_refused_naming_the_fix(pipe, tiny_model_dir, monkeypatch, device):
    """device='cuda' without CUDA failed inside torch ("Torch not compiled with CUDA enabled"), 'gpu' with torch's
    list of device types; 'meta' moved the weights away. from_pretrained refuses it before loading."""
    with pytest.raises(ValueError, match=f"device={device!r} cannot hold the model here.*device='cpu'"):
        BarkPipeline(model=pipe.model, processor=pipe.processor, device=device)
    assert pipe.model.device == torch.device("cpu")
    with pytest.raises(ValueError, match=f"device={device!r} cannot hold the model here"):
        pipeline("text-to-audio", model=str(tiny_model_dir), device=device)
    monkeypatch.setattr(BarkHfModel, "from_pretrained", lambda *args, **kwargs: pytest.fail("loaded"))
    with pytest.raises(ValueError, match=f"device={device!r} cannot hold the model here"):
        BarkPipeline.from_pretrained(tiny_model_dir, device=device)


@pytest.mark.parametrize("setting", [{"num_workers": 2}, {"preprocess_params": {}}, {"processor_kwargs": {}}])
def test_transformers_settings_without_meaning_here_are_refused_by_name(pipe, tiny_model_dir, setting):
    """num_workers was taken, unused, when building; all three were called unknown at a call."""
    name = next(iter(setting))
    with pytest.raises(TypeError, match=f"does not take {name} .*TextToAudioPipeline"):
        pipe("Hi", **setting)
    with pytest.raises(TypeError, match=f"does not take {name}"):
        pipeline("text-to-audio", model=str(tiny_model_dir), device="cpu", **setting)


def test_long_form_is_the_long_form_generator_joined_with_silence(pipe):
    text = "First sentence here. Second one follows! And a third one, to end?"
    settings = {**GREEDY, "semantic_max_new_tokens": 20}
    output = pipe(text, long_form=True, silence_s=0.5, voice_preset="v2/en_speaker_0", generate_kwargs=settings)
    expected = generate_long_form(pipe.model, pipe.processor, text, voice_preset="v2/en_speaker_0", silence_s=0.5,
                                  generate_kwargs=settings, show_progress=False)
    np.testing.assert_array_equal(output["audio"], expected.audio)
    silence = 12_000  # 0.5 s at 24 kHz
    assert output["audio"].shape[0] == sum(expected.chunk_lengths) + silence * (len(expected.chunks) - 1)


def test_long_form_history_previous_chains_the_chunks_as_the_long_form_generator_does(pipe):
    text = "First sentence here. Second one follows! And a third one, to end?"
    settings = {**GREEDY, "semantic_max_new_tokens": 20}
    output = pipe(text, long_form=True, history="previous", generate_kwargs=settings)
    expected = generate_long_form(pipe.model, pipe.processor, text, history="previous", generate_kwargs=settings,
                                  show_progress=False)
    np.testing.assert_array_equal(output["audio"], expected.audio)
    with pytest.raises(ValueError, match="history must be one of 'auto', 'first', 'previous'.*got 'last'"):
        pipe(text, long_form=True, history="last")


def test_long_text_turns_long_form_on_by_default(pipe, monkeypatch):
    import bark_hf.pipeline_bark_hf as module

    calls = []
    real = module.generate_long_form
    monkeypatch.setattr(module, "generate_long_form", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    long_text = " ".join(["This sentence is one of many in a long text."] * 12)
    pipe(long_text, generate_kwargs={**GREEDY, "semantic_max_new_tokens": 8}, voice_preset="v2/en_speaker_0")
    pipe("Short text.", generate_kwargs=GREEDY)
    assert calls == [long_text]


@pytest.mark.parametrize("call,error,message", [
    (lambda p: p(""), ValueError, "empty"),
    (lambda p: p(["fine", "   "]), ValueError, "Text 1 is empty"),
    (lambda p: p(42), TypeError, "string"),
    (lambda p: p(["ok", 3]), TypeError, "Text 1"),
    (lambda p: p("Hi", voice_preset="v2/en_speakr_1"), ValueError, "v2/en_speaker_1"),
    (lambda p: p("Hi", voice_preset="/nowhere/voice.npz"), FileNotFoundError, "voice.npz"),
    (lambda p: p(["a", "b"], voice_preset=["v2/en_speaker_0"]), ValueError, "one per text"),
    (lambda p: p("Hi", generate_kwargs={"temperature": 0.5}), ValueError, "stage prefix"),
    (lambda p: p("Hi", generate_kwargs={"semantic_tempreature": 0.5}), ValueError, "semantic"),
    (lambda p: p("Hi", voice="x"), TypeError, "Unknown BarkPipeline setting"),
    # Checked for every text, not only where long-form runs.
    (lambda p: p("Hi", silence_s=-1), ValueError, "silence_s must be a finite number of seconds >= 0"),
    (lambda p: p("Hi", silence_s=float("inf")), ValueError, "silence_s"),
    (lambda p: p("Hi", silence_s=1e9), ValueError, "silence_s must be at most 60 seconds"),  # filled memory
    (lambda p: p("Hi", long_form="no"), ValueError, "long_form must be True, False or None"),
    (lambda p: p("Hi", seed=2**70), ValueError, "seed must be within"),
    (lambda p: p("Hi", show_progress="no"), ValueError, "show_progress must be True or False"),  # showed bars
    # Set from the call's own arguments, on the plain path too.
    (lambda p: p("Hi", generate_kwargs={"history_prompt": "v2/en_speaker_1"}), ValueError, "voice_preset="),
    (lambda p: p("Hi", generate_kwargs={"return_dict_in_generate": True}), ValueError, "may not set"),
    (lambda p: p("Hi", forward_params={"show_progress": True}), ValueError, "show_progress="),
])
def test_bad_input_gets_a_clear_error(pipe, call, error, message):
    with pytest.raises(error, match=message):
        call(pipe)


def test_an_empty_list_gives_an_empty_list_as_transformers_pipelines_do(pipe, monkeypatch):
    monkeypatch.setattr(pipe.model, "generate", lambda **kwargs: pytest.fail("generated"))
    assert pipe([]) == [] and pipe(()) == []
    with pytest.raises(ValueError, match="batch_size"):  # the settings are still checked
        pipe([], batch_size=0)
    with pytest.raises(ValueError, match="voice_preset has 1 entries for 0 texts"):
        pipe([], voice_preset=["v2/en_speaker_0"])


def test_text_without_tokens_is_refused_by_its_place_before_any_generation(pipe, monkeypatch):
    calls = []
    monkeypatch.setattr(pipe.model, "generate", lambda **kwargs: calls.append(kwargs) or pytest.fail("generated"))
    with pytest.raises(ValueError, match=r"Text 2 \('\\u200b\\u200c'\) gives no tokens"):  # was "text[0]", late
        pipe(["Hi.", "Bye.", "\u200b\u200c"], batch_size=2, generate_kwargs=GREEDY)
    with pytest.raises(ValueError, match="Text 1 .* gives no tokens"):  # numbered within the stream
        list(pipe(iter(["Hi.", "\u200b"]), batch_size=2, generate_kwargs=GREEDY))
    assert calls == []


def test_checking_a_long_text_for_tokens_does_not_warn_of_its_length(pipe, monkeypatch, caplog):
    """encode() warned "Token indices sequence length is longer than the specified maximum" for every long-form
    text past the tokenizer's model_max_length (512 for Bark's): a text the pipeline splits into chunks anyway."""
    monkeypatch.setattr(pipe.processor.tokenizer, "model_max_length", 16)
    transformers.logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            pipeline_module._checked_texts(["word " * 40], pipe.processor.tokenizer)
    finally:
        transformers.logging.disable_propagation()
    assert "sequence length" not in caplog.text


def test_bad_preset_file_is_refused(pipe, tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, semantic_prompt=np.arange(5))
    with pytest.raises(ValueError, match="coarse_prompt"):
        pipe("Hi", voice_preset=str(bad))


def test_other_text_to_audio_models_keep_transformers_pipeline(tmp_path):
    stage = dict(num_layers=1, num_heads=2, hidden_size=16, block_size=64)
    config = BarkConfig(semantic_config=stage, coarse_acoustics_config=stage, fine_acoustics_config=stage)
    bark = BarkModel(config).eval()
    tokenizer = BertTokenizer.from_pretrained(_tiny_bert_vocab(tmp_path))
    pipe = pipeline("text-to-audio", model=bark, tokenizer=tokenizer, device="cpu")
    assert type(pipe) is TextToAudioPipeline


def _tiny_bert_vocab(folder):
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]) + "\n")
    return str(folder)


def test_auto_classes_know_every_model(tiny_model_dir):
    register()  # a second registration is harmless
    assert isinstance(AutoConfig.from_pretrained(tiny_model_dir), bark_hf.BarkHfConfig)
    assert type(AutoModelForTextToWaveform.from_pretrained(tiny_model_dir)) is BarkHfModel
    assert type(AutoModel.from_pretrained(tiny_model_dir)) is BarkHfModel
    assert type(AutoProcessor.from_pretrained(tiny_model_dir)) is BarkHfProcessor
    semantic_config = BarkHfSemanticConfig(num_layers=1, num_heads=2, hidden_size=16)
    assert type(AutoModelForCausalLM.from_config(semantic_config)) is BarkHfSemanticModel
    fine = AutoModel.from_config(AutoConfig.for_model("bark_hf_fine", num_layers=1, num_heads=2, hidden_size=16))
    assert type(fine) is BarkHfFineModel


def test_save_code_leaves_the_config_in_memory_unchanged(tmp_path):
    model, _ = tiny_random_bark()
    model.save_pretrained(tmp_path / "with_code", save_code=True)
    assert "auto_map" not in model.config.to_dict()
    saved = json.loads((tmp_path / "with_code" / "config.json").read_text())
    assert saved["auto_map"]["AutoModelForTextToWaveform"] == "modeling_bark_hf.BarkHfModel"
    assert "custom_pipelines" not in saved
    for name in ("configuration_bark_hf.py", "modeling_bark_hf.py", "pipeline_bark_hf.py", "processing_bark_hf.py"):
        assert (tmp_path / "with_code" / name).is_file()


REMOTE_CODE_SCRIPT = textwrap.dedent("""
    import sys, json, os
    import numpy as np

    class NoBarkHf:  # prove the package itself is never imported
        def find_spec(self, name, path=None, target=None):
            if name == "bark_hf" or name.startswith("bark_hf."):
                raise ImportError("bark_hf must not be imported in this process")
    sys.meta_path.insert(0, NoBarkHf())

    from transformers import AutoProcessor, pipeline
    folder, preset, settings, output = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
    pipe = pipeline("text-to-audio", model=folder, trust_remote_code=True, device="cpu")
    result = pipe("Hello there.", voice_preset=preset, generate_kwargs=settings)
    np.save(output, result["audio"])
    # The same task again in this process (pipeline() once rewrote the config's shared custom_pipelines).
    second = pipeline("text-to-audio", model=folder, trust_remote_code=True, device="cpu")
    assert type(second).__name__ == "BarkPipeline", type(second)
    # A model loaded as remote code saves itself, its code and its processor again; that folder works the same.
    pipe.save_pretrained(folder + "-again", save_code=True)
    assert os.path.isfile(folder + "-again/README.md")  # the model card, though the config is another copy's class
    again = pipeline("text-to-speech", model=folder + "-again", trust_remote_code=True, device="cpu")
    assert type(again).__name__ == "BarkPipeline", type(again)
    result_again = again("Hello there.", voice_preset=preset, generate_kwargs=settings)
    assert np.array_equal(result_again["audio"], result["audio"])
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert preset in processor.available_voice_presets, type(processor)
    print(type(pipe).__name__, type(pipe.model).__module__, result["sampling_rate"])
""")


def test_remote_code_pipeline_without_the_package(pipe, tmp_path):
    folder = tmp_path / "bark-with-code"
    pipe.model.save_pretrained(folder, save_code=True)
    pipe.processor.save_pretrained(folder)
    script = tmp_path / "remote.py"
    script.write_text(REMOTE_CODE_SCRIPT)
    environment = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(script), str(folder), "v2/en_speaker_1", json.dumps(GREEDY), str(tmp_path / "out.npy")],
        capture_output=True, text=True, env=environment, cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    name, module, rate = result.stdout.split()[-3:]
    assert name == "BarkPipeline" and module.startswith("transformers_modules.") and rate == "24000"
    expected = pipe("Hello there.", voice_preset="v2/en_speaker_1", generate_kwargs=GREEDY)["audio"]
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), expected)


def test_folder_with_code_still_loads_without_trust_when_the_package_is_imported(pipe, tmp_path):
    folder = tmp_path / "bark-with-code"
    pipe.model.save_pretrained(folder, save_code=True)
    pipe.processor.save_pretrained(folder)
    loaded = pipeline("text-to-audio", model=str(folder), device="cpu")
    assert type(loaded) is BarkPipeline
    output = loaded("Hi!", generate_kwargs=GREEDY)
    np.testing.assert_array_equal(output["audio"], pipe("Hi!", generate_kwargs=GREEDY)["audio"])


def test_batch_items_of_different_lengths_each_equal_their_own_run(ours):
    """The converted tiny model (whose end-of-speech is likelier) stops each text at its own length."""
    from conftest import TEXTS as LANGUAGE_TEXTS

    speaker = BarkPipeline(model=ours[0], processor=ours[1], device="cpu")
    texts = list(LANGUAGE_TEXTS.values())
    settings = {"semantic_top_k": 1, "coarse_top_k": 1, "fine_temperature": None}
    batch = speaker(texts, generate_kwargs=settings, batch_size=4)
    alone = [speaker(text, generate_kwargs=settings) for text in texts]
    for one, other in zip(batch, alone, strict=True):
        np.testing.assert_array_equal(one["audio"], other["audio"])
    assert len({output["audio"].shape[0] for output in batch}) > 1  # each trimmed to its own length


def test_transformers_format_folder_keeps_their_pipeline_and_loads_in_ours(tmp_path):
    from transformers import BarkProcessor

    tiny = tiny_random_bark()[0].config  # real vocabularies: the processor offsets text ids past 10 048

    def stage(config) -> dict:
        return {k: v for k, v in config.to_dict().items() if k not in ("model_type", "transformers_version")}

    BarkModel(BarkConfig(semantic_config=stage(tiny.semantic_config), fine_acoustics_config=stage(
        tiny.fine_acoustics_config), coarse_acoustics_config=stage(tiny.coarse_acoustics_config))
    ).save_pretrained(tmp_path / "theirs")
    BarkProcessor(BertTokenizer.from_pretrained(_tiny_bert_vocab(tmp_path))).save_pretrained(tmp_path / "theirs")
    assert type(pipeline("text-to-audio", model=str(tmp_path / "theirs"), device="cpu")) is TextToAudioPipeline

    ours = BarkPipeline.from_pretrained(tmp_path / "theirs", device="cpu", batch_size=2)
    assert isinstance(ours.model, BarkHfModel)
    output = ours("a b", generate_kwargs={**GREEDY, "semantic_max_new_tokens": 5})
    assert output["sampling_rate"] == 24_000 and output["audio"].shape[0] > 0


def test_from_pretrained_takes_a_subfolder(tiny_model_dir, tmp_path):
    """subfolder= was kept as a call default, so the processor looked for the tokenizer in the folder above."""
    shutil.copytree(tiny_model_dir, tmp_path / "models" / "bark")
    built = BarkPipeline.from_pretrained(tmp_path / "models", subfolder="bark")
    assert built.processor.available_voice_presets == BarkHfProcessor.from_pretrained(
        tiny_model_dir).available_voice_presets
    assert built("Hi!", generate_kwargs=GREEDY)["audio"].dtype == np.float32


def test_pipeline_from_a_model_in_memory(pipe):
    built = pipeline("text-to-audio", model=pipe.model, processor=pipe.processor, tokenizer=pipe.processor.tokenizer,
                     device="cpu")
    assert type(built) is BarkPipeline
    np.testing.assert_array_equal(built("Hi!", generate_kwargs=GREEDY)["audio"],
                                  pipe("Hi!", generate_kwargs=GREEDY)["audio"])


def test_the_pipeline_factory_names_a_folder_saved_without_its_processor(pipe, tiny_model_dir, tmp_path):
    """pipeline() loads the tokenizer before it builds the pipeline: for a folder of weights alone, transformers
    guessed its generic tokenizer and failed asking for sentencepiece or tiktoken."""
    folder = tmp_path / "weights-only"
    folder.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, folder / name)
    for load in (lambda: pipeline("text-to-audio", model=str(folder), device="cpu"),
                 lambda: AutoTokenizer.from_pretrained(folder)):
        with pytest.raises(FileNotFoundError, match=r"holds no tokenizer \(tokenizer.json or vocab.txt\)") as error:
            load()
        assert repr(str(folder)) in str(error.value)
        assert f"save_pretrained({str(folder)!r})" in str(error.value)
        assert "tokenizer=processor.tokenizer, processor=processor" in str(error.value)
    # The ways out that the message names.
    given = pipeline("text-to-audio", model=str(folder), device="cpu", tokenizer=pipe.processor.tokenizer,
                     processor=pipe.processor)
    np.testing.assert_array_equal(given("Hi!", generate_kwargs=GREEDY)["audio"],
                                  pipe("Hi!", generate_kwargs=GREEDY)["audio"])
    pipe.processor.save_pretrained(folder)
    assert pipeline("text-to-audio", model=str(folder), device="cpu").processor.available_voice_presets == \
        pipe.processor.available_voice_presets


@pytest.mark.parametrize("dtype", ["int8", torch.int8, "float17"])
def test_from_pretrained_refuses_a_dtype_that_is_no_float(tiny_model_dir, dtype):
    """'int8' was loaded as float32, with only transformers' log line to say so."""
    with pytest.raises(ValueError, match="quantize_int8|not a torch dtype"):
        BarkPipeline.from_pretrained(tiny_model_dir, dtype=dtype)
    with pytest.raises(ValueError, match="quantize_int8|not a torch dtype"):
        BarkHfModel.from_pretrained(tiny_model_dir, dtype=dtype)


def test_from_pretrained_takes_torch_dtype_and_device_map(tiny_model_dir):
    """torch_dtype (transformers' older name for dtype) went to Pipeline.__init__, which ignored it: float32 weights."""
    built = BarkPipeline.from_pretrained(tiny_model_dir, torch_dtype=torch.bfloat16)
    assert built.model.semantic.dtype == torch.bfloat16 and built.model.codec_model.dtype == torch.float32
    built = BarkPipeline.from_pretrained(tiny_model_dir, device_map="cpu", dtype="float16")
    assert built.device == built.model.device == torch.device("cpu")
    assert built.model.semantic.dtype == torch.float16
    assert built("Hi!", generate_kwargs=GREEDY)["audio"].dtype == np.float32
    with pytest.raises(ValueError, match="pass only dtype"):
        BarkPipeline.from_pretrained(tiny_model_dir, dtype=torch.float16, torch_dtype=torch.float16)
    with pytest.raises(ValueError, match="both device and device_map"):
        BarkPipeline.from_pretrained(tiny_model_dir, device="cpu", device_map="cpu")


def test_the_pipeline_factory_refuses_an_integer_dtype(tiny_model_dir):
    """pipeline() retries a load that failed with its dtype in float32, so from_pretrained's refusal of 'int8' was
    swallowed and a float32 model came back, with only a log line."""
    with pytest.raises(ValueError, match="int8 is not a floating-point dtype.*quantize_int8"):
        pipeline("text-to-audio", model=str(tiny_model_dir), dtype="int8")


def test_a_name_or_a_single_stage_is_refused_with_the_fix(pipe, tiny_model_dir):
    with pytest.raises(TypeError, match=r"got str: .*BarkPipeline.from_pretrained"):
        BarkPipeline(model=str(tiny_model_dir))
    with pytest.raises(FileNotFoundError, match="No folder at"):  # was: "Repo id must be in the form ..."
        BarkPipeline.from_pretrained(tiny_model_dir.parent / "missing")
    with pytest.raises(TypeError, match="got BarkHfSemanticModel: a single stage cannot speak"):
        pipeline("text-to-audio", model=pipe.model.semantic, processor=pipe.processor,
                 tokenizer=pipe.processor.tokenizer)


def test_a_saved_pipeline_keeps_its_voice_presets(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "saved")
    reloaded = pipeline("text-to-audio", model=str(tmp_path / "saved"))
    assert reloaded.processor.available_voice_presets == pipe.processor.available_voice_presets != []
    expected = pipe("Hi!", voice_preset="v2/en_speaker_0", generate_kwargs=GREEDY)["audio"]
    np.testing.assert_array_equal(reloaded("Hi!", voice_preset="v2/en_speaker_0", generate_kwargs=GREEDY)["audio"],
                                  expected)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        pipe.save_pretrained(tmp_path / "file")


def test_numpy_numbers_are_numbers(pipe):
    expected = pipe(["a", "b"], generate_kwargs=GREEDY, batch_size=2, silence_s=0.5, seed=3)
    output = pipe(["a", "b"], generate_kwargs=GREEDY, batch_size=np.int64(2), silence_s=np.float32(0.5),
                  seed=np.uint8(3), long_form=np.bool_(False))
    for item, reference in zip(output, expected, strict=True):
        np.testing.assert_array_equal(item["audio"], reference["audio"])


@pytest.mark.parametrize("batch_size", [0, -1, "2", 1.5, True])
def test_bad_batch_size_is_refused_and_does_not_stick(pipe, batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        pipe(["a", "b"], batch_size=batch_size)
    assert pipe._batch_size is None


def test_pipeline_leaves_an_offloaded_model_to_place_its_stages(monkeypatch):
    """transformers' pipelines put a model on GPU 0 by default: one under enable_cpu_offload() went there whole."""
    import transformers.pipelines.base as pipeline_base

    model, processor = tiny_random_bark()
    model.enable_cpu_offload(torch.device("cpu", 0))
    monkeypatch.setattr(pipeline_base, "is_torch_cuda_available", lambda: True)  # GPU 0: the default device
    moves = []
    monkeypatch.setattr(model, "to", lambda *args, **kwargs: moves.append(args) or model)
    for speaker in (pipeline("text-to-audio", model=model, processor=processor, tokenizer=processor.tokenizer),
                    BarkPipeline(model=model, processor=processor, device=-1)):
        assert speaker.device == torch.device("cpu")
    assert not moves
    with pytest.raises(ValueError, match="enable_cpu_offload.*leave the pipeline's device unset"):
        BarkPipeline(model=model, processor=processor, device=0)
    monkeypatch.undo()
    offloaded = pipeline("text-to-audio", model=model, processor=processor, tokenizer=processor.tokenizer)
    audio = offloaded("Hi.", generate_kwargs=GREEDY)["audio"]
    model.offload_device = None  # the same model, not offloaded
    torch.testing.assert_close(BarkPipeline(model=model, processor=processor, device="cpu")(
        "Hi.", generate_kwargs=GREEDY)["audio"], audio, rtol=0, atol=0)


def test_from_pretrained_takes_the_hub_options(tiny_model_dir, tmp_path, monkeypatch):
    """revision=, token=, local_files_only=, ... were refused as unknown pipeline settings."""
    built = BarkPipeline.from_pretrained(tiny_model_dir, local_files_only=True, revision="main", batch_size=2)
    assert built("Hi!", generate_kwargs=GREEDY)["audio"].dtype == np.float32
    seen = []
    real = BarkHfModel.from_pretrained.__func__
    monkeypatch.setattr(BarkHfModel, "from_pretrained",
                        classmethod(lambda cls, name, **kwargs: seen.append(kwargs) or real(cls, name, **kwargs)))
    BarkPipeline.from_pretrained(tiny_model_dir, token="hf_x", cache_dir=str(tmp_path), force_download=False)
    assert {key: seen[0][key] for key in ("token", "cache_dir", "force_download")} == dict(
        token="hf_x", cache_dir=str(tmp_path), force_download=False)
    with pytest.raises(ConnectionError, match="Could not reach the Hugging Face Hub"):
        BarkPipeline.from_pretrained("nobody/no-such-bark", local_files_only=True, cache_dir=str(tmp_path))


def test_the_output_full_pair_as_voice_preset_names_its_first_item(pipe):
    """generate_audio(..., output_full=True)'s (full_generation, audio) was read as one preset per text ("voice_preset
    has 2 entries for 1 texts")."""
    pair = (random_voice_preset(0), np.zeros(100, dtype=np.float32))
    for texts in ("Hello.", ["Hello.", "Hi."], iter(["Hello."])):
        with pytest.raises(TypeError, match=r"not the \(full_generation, audio\) tuple .* pass its first item"):
            pipe(texts, voice_preset=pair)
