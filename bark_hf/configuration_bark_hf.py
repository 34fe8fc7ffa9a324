"""Model configs: one per GPT stage, and the composite that adds transformers' EnCodec config.

Field names equal those of transformers' Bark configs, so a `config.json` written by
`transformers.BarkModel` reads into these classes unchanged.
"""

from __future__ import annotations

import os
from typing import Any

from transformers import AutoConfig, EncodecConfig, PretrainedConfig

from .generation_configuration_bark_hf import COARSE_RATE_HZ, CODEBOOK_SIZE, N_FINE_CODEBOOKS, SAMPLE_RATE

_MODEL_CLASS_OF_TYPE = {"bark_hf": "BarkHfModel", "bark_hf_semantic": "BarkHfSemanticModel",
                        "bark_hf_coarse": "BarkHfCoarseModel", "bark_hf_fine": "BarkHfFineModel"}


def _check_model_type(config_cls: type[PretrainedConfig], config_dict: dict[str, Any],
                      source: str | os.PathLike) -> None:
    """Refuse a bark-hf folder of another model: transformers only logs a warning, then built a default-sized
    model of random weights (the whole model from a stage's folder) or put one stage's weights in another.
    A config that is not a JSON object failed inside this check with an AttributeError."""
    if not isinstance(config_dict, dict):
        raise ValueError(f"The config.json in {os.fspath(source)!r} holds a JSON {type(config_dict).__name__}, not an "
                         "object of settings; restore that file or save the model again.")
    found = config_dict.get("model_type")
    if found == config_cls.model_type or found not in _MODEL_CLASS_OF_TYPE:
        return
    if found == BarkHfConfig.model_type and config_cls is not BarkHfConfig:
        return  # a stage's part of the whole model
    wanted, holder = _MODEL_CLASS_OF_TYPE[config_cls.model_type], _MODEL_CLASS_OF_TYPE[found]
    raise ValueError(f"{os.fspath(source)!r} holds a {holder} (model_type {found!r}), not a {wanted}; load it with "
                     f"{holder}.from_pretrained (or AutoModel.from_pretrained, which picks the class).")


class _BarkHfStageConfig(PretrainedConfig):
    """Hyper-parameters of one Bark GPT (nanoGPT layout)."""

    attribute_map = {
        "num_attention_heads": "num_heads",
        "num_hidden_layers": "num_layers",
        "vocab_size": "input_vocab_size",
        "window_size": "block_size",
    }

    def __init__(
        self,
        block_size: int = 1024,
        input_vocab_size: int = 10_048,
        output_vocab_size: int = 10_048,
        num_layers: int = 12,
        num_heads: int = 12,
        hidden_size: int = 768,
        dropout: float = 0.0,
        bias: bool = True,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        **kwargs: Any,
    ):
        if hidden_size % num_heads != 0:
            raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of num_heads ({num_heads}).")
        self.block_size = block_size
        self.input_vocab_size = input_vocab_size
        self.output_vocab_size = output_vocab_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.dropout = dropout
        self.bias = bias
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(**kwargs)

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path: str | os.PathLike,
                        **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """The folder's config dict, refusing another stage's folder (a whole model's holds this stage's)."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        _check_model_type(cls, config_dict, pretrained_model_name_or_path)
        return config_dict, kwargs


class BarkHfSemanticConfig(_BarkHfStageConfig):
    """Text -> semantic GPT. Real sizes: input vocab 129 600, output vocab 10 048."""

    model_type = "bark_hf_semantic"

    def __init__(self, input_vocab_size: int = 129_600, output_vocab_size: int = 10_048, **kwargs: Any):
        super().__init__(input_vocab_size=input_vocab_size, output_vocab_size=output_vocab_size, **kwargs)


class BarkHfCoarseConfig(_BarkHfStageConfig):
    """Semantic -> coarse GPT. Real sizes: input and output vocab 12 096."""

    model_type = "bark_hf_coarse"

    def __init__(self, input_vocab_size: int = 12_096, output_vocab_size: int = 12_096, **kwargs: Any):
        super().__init__(input_vocab_size=input_vocab_size, output_vocab_size=output_vocab_size, **kwargs)


class BarkHfFineConfig(_BarkHfStageConfig):
    """Non-causal fine GPT: one input embedding per codebook, one head per predicted codebook.

    `n_codes_given` is the first codebook it has a head for (1 in Bark's checkpoints): head `i` predicts
    codebook `n_codes_given + i` and shares its weight with embedding `i + 1`, as in the original `FineGPT`
    and transformers' Bark (that codebook's own embedding when `n_codes_given` is 1). Generation gives
    it the coarse stage's codebooks and predicts the rest.
    """

    model_type = "bark_hf_fine"

    def __init__(
        self,
        input_vocab_size: int = CODEBOOK_SIZE + 32,
        output_vocab_size: int = CODEBOOK_SIZE + 32,
        n_codes_total: int = N_FINE_CODEBOOKS,
        n_codes_given: int = 1,
        tie_word_embeddings: bool = True,
        **kwargs: Any,
    ):
        if not 1 <= n_codes_given <= n_codes_total:
            # Head i shares its weight with embedding i + 1, so with none given the last head had no embedding and
            # building the model failed as "ModuleList has no attribute `8`" (the original cannot build it either).
            raise ValueError(f"n_codes_given ({n_codes_given}) must be in [1, n_codes_total ({n_codes_total})]: "
                             "codebook 0 always comes from the coarse stage.")
        self.n_codes_total = n_codes_total
        self.n_codes_given = n_codes_given
        super().__init__(
            input_vocab_size=input_vocab_size,
            output_vocab_size=output_vocab_size,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )


def bark_codec_config(**overrides: Any) -> EncodecConfig:
    """transformers' EnCodec config for Bark's codec: 24 kHz mono, 75 Hz frames.

    Bark decodes at 6 kbps, i.e. with the first 8 codebooks (N_FINE_CODEBOOKS) of this codec.
    """
    defaults = dict(
        sampling_rate=SAMPLE_RATE,
        target_bandwidths=[1.5, 3.0, 6.0, 12.0, 24.0],
        codebook_size=CODEBOOK_SIZE,
        audio_channels=1,
        normalize=False,
    )
    config = EncodecConfig(**{**defaults, **overrides})
    if config.frame_rate != COARSE_RATE_HZ:
        raise ValueError(f"Bark needs a {COARSE_RATE_HZ} Hz EnCodec; this config runs at {config.frame_rate} Hz.")
    return config


class BarkHfConfig(PretrainedConfig):
    """The composite: three GPT stage configs and the EnCodec config of the codec."""

    model_type = "bark_hf"
    sub_configs = {
        "semantic_config": BarkHfSemanticConfig,
        "coarse_acoustics_config": BarkHfCoarseConfig,
        "fine_acoustics_config": BarkHfFineConfig,
        "codec_config": AutoConfig,
    }
    @property
    def custom_pipelines(self) -> dict[str, dict[str, Any]]:
        """Loaded as remote code (`trust_remote_code=True` without the bark_hf package installed), the config
        tells `pipeline()` to build the folder's BarkPipeline. With the package imported, registration.py
        routes the task instead, so a folder saved with its code needs no trust there. Not an attribute, so
        never written to config.json; transformers resolves no task aliases for custom pipelines, so
        "text-to-speech" is named too. A new dict on every read: `pipeline()` replaces the class names in it
        with the classes, so a shared one broke every later `pipeline()` call for the same task."""
        if not __name__.startswith("transformers_modules."):
            return {}
        return {task: {"impl": "pipeline_bark_hf.BarkPipeline", "pt": ["AutoModelForTextToWaveform"]}
                for task in ("text-to-audio", "text-to-speech")}

    def __init__(
        self,
        semantic_config: dict | BarkHfSemanticConfig | None = None,
        coarse_acoustics_config: dict | BarkHfCoarseConfig | None = None,
        fine_acoustics_config: dict | BarkHfFineConfig | None = None,
        codec_config: dict | EncodecConfig | None = None,
        initializer_range: float = 0.02,
        **kwargs: Any,
    ):
        self.semantic_config = _as_config(BarkHfSemanticConfig, semantic_config)
        self.coarse_acoustics_config = _as_config(BarkHfCoarseConfig, coarse_acoustics_config)
        self.fine_acoustics_config = _as_config(BarkHfFineConfig, fine_acoustics_config)
        if isinstance(codec_config, dict):
            codec_config = bark_codec_config(**{k: v for k, v in codec_config.items() if k != "model_type"})
        self.codec_config = codec_config if codec_config is not None else bark_codec_config()
        self.initializer_range = initializer_range
        super().__init__(**kwargs)

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path: str | os.PathLike,
                        **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """The folder's config dict; transformers' own Bark configs (`model_type: "bark"`) read as ours, without
        transformers' warning that a `bark` checkpoint "is otherwise not supported" by this class; a stage's
        folder is refused."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        _check_model_type(cls, config_dict, pretrained_model_name_or_path)
        if config_dict.get("model_type") == "bark":
            config_dict = {**config_dict, "model_type": cls.model_type}
        return config_dict, kwargs

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        for name in self.sub_configs:
            output[name] = getattr(self, name).to_dict()
        return output


def _as_config(config_cls: type[PretrainedConfig], value: dict | PretrainedConfig | None) -> PretrainedConfig:
    """Build a stage config from a dict (ours or transformers' Bark layout) or pass one through."""
    if value is None:
        return config_cls()
    if isinstance(value, PretrainedConfig):
        value = value.to_dict()
    # transformers' Bark stage dicts carry their own model_type ("semantic", ...); ours is fixed.
    return config_cls(**{k: v for k, v in value.items() if k not in ("model_type", "transformers_version")})


__all__ = [
    "BarkHfCoarseConfig",
    "BarkHfConfig",
    "BarkHfFineConfig",
    "BarkHfSemanticConfig",
    "bark_codec_config",
]
