"""The EnCodec conversion: decode parity with the `encodec` package, folder round trip, clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import encodec
import pytest
import torch
from safetensors.torch import load_file, save_file

from bark_hf.conversion.codec import convert_encodec_state_dict, load_codec


class _Opaque:
    """Stands in for any non-tensor object pickled into a checkpoint."""


@pytest.fixture(scope="module")
def original_state(original_codec_path: Path) -> dict[str, torch.Tensor]:
    return torch.load(original_codec_path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def original_model(original_state: dict[str, torch.Tensor]) -> encodec.EncodecModel:
    model = encodec.EncodecModel.encodec_model_24khz(pretrained=False)
    model.load_state_dict(original_state)
    return model.eval()


@pytest.fixture(scope="module")
def converted_model(original_codec_path: Path):
    return load_codec(original_codec_path)


@pytest.fixture(scope="module")
def transformers_folder(converted_model, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("encodec_hf")
    converted_model.save_pretrained(folder)
    return folder


def _decode_original(model: encodec.EncodecModel, codes: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.decoder(model.quantizer.decode(codes))


def _decode_converted(codec, codes: torch.Tensor) -> torch.Tensor:
    # The same two calls the composite model makes.
    with torch.no_grad():
        return codec.decoder(codec.quantizer.decode(codes))


def _random_codes(batch_size: int, frames: int = 30) -> torch.Tensor:
    generator = torch.Generator().manual_seed(batch_size)
    return torch.randint(0, 1024, (8, batch_size, frames), generator=generator)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_decode_matches_original(original_model, converted_model, batch_size):
    codes = _random_codes(batch_size)
    expected = _decode_original(original_model, codes)
    actual = _decode_converted(converted_model, codes)
    assert actual.shape == (batch_size, 1, 30 * 320)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_loaded_model_is_float32_and_in_eval_mode(converted_model):
    assert not converted_model.training
    assert all(param.dtype == torch.float32 for param in converted_model.parameters())


def test_transformers_folder_round_trip(original_model, transformers_folder):
    codec = load_codec(transformers_folder)
    codes = _random_codes(2)
    assert not codec.training
    expected = _decode_original(original_model, codes)
    torch.testing.assert_close(_decode_converted(codec, codes), expected, atol=1e-5, rtol=0)


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "pickled.th"
    torch.save({"encoder.model.0.conv.conv.bias": _Opaque()}, path)
    with pytest.raises(ValueError, match="refuses to unpickle arbitrary objects"):
        load_codec(path)


def test_truncated_file(original_codec_path, tmp_path):
    path = tmp_path / "truncated.th"
    path.write_bytes(original_codec_path.read_bytes()[:4096])
    with pytest.raises(ValueError, match="truncated or corrupt") as error:
        load_codec(path)
    assert str(path) in str(error.value)


def test_file_without_a_state_dict(tmp_path):
    path = tmp_path / "list.th"
    torch.save([torch.zeros(3)], path)
    with pytest.raises(ValueError, match="does not hold a state dict"):
        load_codec(path)


def test_missing_key(original_state, tmp_path):
    state = dict(original_state)
    del state["decoder.model.3.convtr.convtr.weight_g"]
    path = tmp_path / "missing.th"
    torch.save(state, path)
    with pytest.raises(ValueError, match="not an EnCodec 24 kHz checkpoint") as error:
        load_codec(path)
    assert "missing keys: decoder.layers.3.conv.parametrizations.weight.original0" in str(error.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_named(original_state, tmp_path, value):
    """A damaged codec was converted (inf) or reported only as weights that differ from the source (NaN)."""
    key = "decoder.model.3.convtr.convtr.weight_v"
    tensor = original_state[key].clone()
    tensor.view(-1)[7] = value
    path = tmp_path / "damaged.th"
    torch.save({**original_state, key: tensor}, path)
    with pytest.raises(ValueError, match="NaN or infinite weights at decoder.layers.3.conv.parametrizations.weight"):
        load_codec(path)


def test_key_without_rename_rule(original_state):
    state = {**original_state, "encoder.model.0.conv.conv.scale": torch.zeros(1)}
    with pytest.raises(ValueError, match="no rename rule for keys encoder.model.0.conv.conv.scale"):
        convert_encodec_state_dict(state)


def test_extra_key(original_state):
    state = {**original_state, "quantizer.vq.layers.32._codebook.embed": torch.zeros(1024, 128)}
    with pytest.raises(ValueError, match="unexpected keys: quantizer.layers.32.codebook.embed"):
        convert_encodec_state_dict(state)


def test_wrong_shape(original_state):
    state = {**original_state, "quantizer.vq.layers.0._codebook.embed": torch.zeros(1024, 64)}
    with pytest.raises(ValueError, match="not an EnCodec 24 kHz checkpoint") as error:
        convert_encodec_state_dict(state)
    assert "quantizer.layers.0.codebook.embed (1024, 64) (expected (1024, 128))" in str(error.value)


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="No EnCodec checkpoint at"):
        load_codec(tmp_path / "nowhere.th")


def test_folder_without_config(tmp_path):
    with pytest.raises(ValueError, match="folder without config.json"):
        load_codec(tmp_path)


def test_48khz_folder_is_refused(transformers_folder, tmp_path):
    folder = tmp_path / "encodec_48khz"
    shutil.copytree(transformers_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config["sampling_rate"] = 48_000
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="sampling_rate 48000 \\(Bark needs 24000\\)"):
        load_codec(folder)


def test_folder_with_incomplete_weights(transformers_folder, tmp_path):
    folder = tmp_path / "encodec_incomplete"
    shutil.copytree(transformers_folder, folder)
    weights = load_file(folder / "model.safetensors")
    del weights["decoder.layers.3.conv.bias"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing keys: decoder.layers.3.conv.bias"):
        load_codec(folder)
