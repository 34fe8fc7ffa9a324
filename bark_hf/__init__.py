"""bark-hf: Suno's Bark text-to-audio model as Hugging Face transformers models."""

from .configuration_bark_hf import (
    BarkHfCoarseConfig,
    BarkHfConfig,
    BarkHfFineConfig,
    BarkHfSemanticConfig,
)
from .generation_configuration_bark_hf import (
    SAMPLE_RATE,
    BarkHfCoarseGenerationConfig,
    BarkHfFineGenerationConfig,
    BarkHfGenerationConfig,
    BarkHfSemanticGenerationConfig,
)
from .longform import LongFormOutput, chunk_text, generate_long_form, split_sentences
from .model_card import bark_model_card
from .modeling_bark_hf import (
    BarkHfCoarseModel,
    BarkHfFineModel,
    BarkHfGenerationOutput,
    BarkHfModel,
    BarkHfSemanticModel,
    BarkHfStageOutput,
)
from .pipeline_bark_hf import BarkPipeline
from .processing_bark_hf import BarkHfProcessor
from .registration import register

register()

__version__ = "0.1.0"

__all__ = [
    "SAMPLE_RATE",
    "BarkHfCoarseConfig",
    "BarkHfCoarseGenerationConfig",
    "BarkHfCoarseModel",
    "BarkHfConfig",
    "BarkHfFineConfig",
    "BarkHfFineGenerationConfig",
    "BarkHfFineModel",
    "BarkHfGenerationConfig",
    "BarkHfGenerationOutput",
    "BarkHfModel",
    "BarkHfProcessor",
    "BarkHfSemanticConfig",
    "BarkHfSemanticGenerationConfig",
    "BarkHfSemanticModel",
    "BarkHfStageOutput",
    "BarkPipeline",
    "LongFormOutput",
    "bark_model_card",
    "chunk_text",
    "generate_long_form",
    "register",
    "split_sentences",
]
