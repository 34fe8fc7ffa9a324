"""Model cards (README.md with Hub metadata) generated from a model's config."""

from __future__ import annotations

from huggingface_hub import ModelCard, ModelCardData

from .configuration_bark_hf import BarkHfConfig

# The 13 languages of Suno's release (ISO 639-1), as its voice presets name them.
BARK_LANGUAGES = ["en", "de", "es", "fr", "hi", "it", "ja", "ko", "pl", "pt", "ru", "tr", "zh"]

_CARD_TEMPLATE = """---
{card_data}
---

# {title}

Suno's [Bark](https://github.com/suno-ai/bark) text-to-audio model for the
[`bark-hf`](https://pypi.org/project/bark-hf/) package: {stages}.
{provenance}

Given the same weights and deterministic settings, it produces the same tokens and audio as
Suno's original code.

## Usage

```python
from bark_hf import BarkHfModel, BarkHfProcessor

processor = BarkHfProcessor.from_pretrained("{model_id}")
model = BarkHfModel.from_pretrained("{model_id}")
audio = model.generate(**processor("Hello!", voice_preset="v2/en_speaker_1"))  # [1, samples], 24 kHz
```

## Voice presets

{presets}

## Licence

MIT, as Suno's release.
"""


def stage_summary(config: BarkHfConfig) -> str:
    """One line per stage: layers, width and parameter-defining sizes."""
    parts = []
    for name, stage in (("semantic", config.semantic_config), ("coarse", config.coarse_acoustics_config),
                        ("fine", config.fine_acoustics_config)):
        parts.append(f"{name} GPT {stage.num_layers} layers x {stage.hidden_size} wide")
    return ", ".join(parts) + ", and EnCodec 24 kHz at 6 kbps"


def bark_model_card(
    config: BarkHfConfig,
    model_id: str = "path/to/this/folder",
    voice_presets: list[str] | None = None,
    provenance: str = "",
) -> ModelCard:
    """The card for a bark-hf model folder: metadata the Hub reads, and a usage snippet."""
    data = ModelCardData(
        library_name="bark-hf",
        pipeline_tag="text-to-audio",
        language=BARK_LANGUAGES,
        license="mit",
        tags=["bark", "bark-hf", "text-to-speech", "audio"],
    )
    presets = voice_presets or []
    preset_text = (
        f"{len(presets)} presets, e.g. {', '.join(f'`{p}`' for p in presets[:5])}."
        if presets else "None stored with this model; pass a `.npz` path or a dict of arrays."
    )
    return ModelCard(_CARD_TEMPLATE.format(
        card_data=data.to_yaml(),
        title=f"Bark ({model_id})" if model_id else "Bark",
        stages=stage_summary(config),
        provenance=provenance,
        model_id=model_id,
        presets=preset_text,
    ))
