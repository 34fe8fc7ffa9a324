"""Make transformers' Auto classes and `pipeline()` know bark-hf models; called once by `import bark_hf`.

Registering again is harmless. The text-to-audio task keeps transformers' own pipeline for every
other model (its Bark port, VITS, MusicGen...): only bark-hf models get a `BarkPipeline`.
"""

from __future__ import annotations

import os
from typing import Any

import transformers
from transformers import AutoConfig, AutoProcessor, AutoTokenizer, BertTokenizer
from transformers.pipelines import PIPELINE_REGISTRY, TextToAudioPipeline

from .configuration_bark_hf import BarkHfConfig
from .modeling_bark_hf import (
    BarkHfCoarseModel,
    BarkHfFineModel,
    BarkHfModel,
    BarkHfPreTrainedModel,
    BarkHfSemanticModel,
)
from .pipeline_bark_hf import BarkPipeline
from .processing_bark_hf import BarkHfProcessor

TEXT_TO_AUDIO = "text-to-audio"


class TextToAudioDispatch(TextToAudioPipeline):
    """What `pipeline("text-to-audio")` builds: a `BarkPipeline` for bark-hf models, else transformers' own.

    Any other model gets a plain `TextToAudioPipeline`, constructed exactly as transformers would.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        model = kwargs["model"] if "model" in kwargs else args[0]
        target = BarkPipeline if isinstance(model, BarkHfPreTrainedModel) else TextToAudioPipeline
        pipeline = object.__new__(target)
        pipeline.__init__(*args, **kwargs)  # not an instance of cls, so Python will not call __init__ again
        return pipeline


class _BarkHfTokenizerLoader:
    """What `AutoTokenizer` loads for a bark-hf config whose folder names no tokenizer class: the processor's
    tokenizer, through the processor's loader, so that a folder saved without its processor is refused as such.

    `pipeline("text-to-audio", model=folder)` loads the tokenizer before it builds the pipeline, so before
    `TextToAudioDispatch` sees the model: for a folder of weights alone, transformers guessed its generic tokenizer
    and failed asking for sentencepiece or tiktoken. Folders that name their class (every processor save) never
    come here.
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> BertTokenizer:
        """A plain `BertTokenizer`, as a processor save writes it (no presets: they are not the tokenizer's)."""
        return BarkHfProcessor.from_pretrained(pretrained_model_name_or_path, speaker_embeddings_dict_path=None,
                                               **kwargs).tokenizer


def register() -> None:
    """Register configs, models, the processor, the tokenizer's loader and the text-to-audio pipeline with
    transformers."""
    for model_class in (BarkHfSemanticModel, BarkHfCoarseModel, BarkHfFineModel, BarkHfModel):
        config_class = model_class.config_class
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        for auto_class in model_class.auto_classes:
            getattr(transformers, auto_class).register(config_class, model_class, exist_ok=True)
    AutoProcessor.register(BarkHfConfig, BarkHfProcessor, exist_ok=True)
    AutoTokenizer.register(BarkHfConfig, tokenizer_class=_BarkHfTokenizerLoader, exist_ok=True)

    task = PIPELINE_REGISTRY.supported_tasks[TEXT_TO_AUDIO]
    if task["impl"] is not TextToAudioDispatch:
        # Keep the task's model classes and default; only the class that builds the pipeline changes.
        PIPELINE_REGISTRY.supported_tasks[TEXT_TO_AUDIO] = {**task, "impl": TextToAudioDispatch}
