"""HF-compatible model code: MLA + Latent Reasoning Unit, the Qwen2 baseline presets, value heads,
parameter counting. Importing this package registers ``mla_lru`` with ``AutoConfig`` and
``AutoModelForCausalLM``.

    import models
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_config(models.tiny_config("mla_lru_adaptive"))
"""

from transformers import AutoConfig, AutoModelForCausalLM

from models.configuration import LatentReasoningConfig
from models.modeling_mla_lru import (
    GrowingCache,
    LatentCache,
    LatentReasoningForCausalLM,
    LatentReasoningModel,
    LatentReasoningOutput,
    cache_bytes_per_token,
)
from models.presets import GROUPS, tiny_config
from models.value_head import ValueHeadModel

AutoConfig.register(LatentReasoningConfig.model_type, LatentReasoningConfig, exist_ok=True)
AutoModelForCausalLM.register(LatentReasoningConfig, LatentReasoningForCausalLM, exist_ok=True)

__all__ = ["GROUPS", "GrowingCache", "LatentCache", "LatentReasoningConfig", "LatentReasoningForCausalLM",
           "LatentReasoningModel", "LatentReasoningOutput", "ValueHeadModel", "cache_bytes_per_token", "tiny_config"]
