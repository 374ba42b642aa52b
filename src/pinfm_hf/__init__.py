"""pinfm-hf: a Hugging Face-native foundation model for user activity sequences (PinFM, GPSD)."""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForPreTraining,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_pinfm import PinFMConfig
from .losses import PretrainingObjective
from .modeling_pinfm import (
    PinFMForPretraining,
    PinFMForPretrainingOutput,
    PinFMModel,
    PinFMModelOutput,
    PinFMNextItemHead,
    PinFMPreTrainedModel,
)
from .modeling_pinfm_ctr import PinFMDCATOutput, PinFMForCTR, PinFMForCTROutput
from .pipeline_pinfm import PINFM_PIPELINE_TASK, PinFMRecommendationPipeline
from .tokenization_pinfm import PinFMTokenizer


__version__ = "0.1.0"

# Installed package: the Auto classes resolve "pinfm" without trust_remote_code.
AutoConfig.register(PinFMConfig.model_type, PinFMConfig, exist_ok=True)
AutoModel.register(PinFMConfig, PinFMModel, exist_ok=True)
AutoModelForPreTraining.register(PinFMConfig, PinFMForPretraining, exist_ok=True)
AutoModelForSequenceClassification.register(PinFMConfig, PinFMForCTR, exist_ok=True)
AutoTokenizer.register(PinFMConfig, slow_tokenizer_class=PinFMTokenizer, exist_ok=True)
# Saved folders: `save_pretrained` copies the code and writes `auto_map`, so trust_remote_code loads work anywhere.
PinFMConfig.register_for_auto_class()
PinFMModel.register_for_auto_class("AutoModel")
PinFMForPretraining.register_for_auto_class("AutoModelForPreTraining")
PinFMForCTR.register_for_auto_class("AutoModelForSequenceClassification")
PinFMTokenizer.register_for_auto_class("AutoTokenizer")
# `pipeline("pinfm-recommendation", model=folder)`; saved folders also name the pipeline for remote-code loading.
PIPELINE_REGISTRY.register_pipeline(
    PINFM_PIPELINE_TASK, pipeline_class=PinFMRecommendationPipeline, pt_model=AutoModelForPreTraining, type="text"
)

__all__ = [
    "PinFMConfig",
    "PinFMModel",
    "PinFMForPretraining",
    "PinFMForCTR",
    "PinFMForCTROutput",
    "PinFMDCATOutput",
    "PinFMNextItemHead",
    "PretrainingObjective",
    "PinFMModelOutput",
    "PinFMForPretrainingOutput",
    "PinFMPreTrainedModel",
    "PinFMTokenizer",
    "PinFMRecommendationPipeline",
    "PINFM_PIPELINE_TASK",
]
