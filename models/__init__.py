"""HF-compatible model code. Importing this package registers ``mla_lru`` and ``looped_mla`` (the looped-layer
control) with ``AutoConfig``, ``AutoModel`` (the backbones, ``LatentReasoningModel``, ``LoopedModel``) and
``AutoModelForCausalLM``.

    import models
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_config(models.tiny_config("mla_lru_adaptive"))

configuration.py  the config (``LatentReasoningConfig``)
lru.py            the Latent Reasoning Unit: the update, the halting rule, its auxiliary loss
cache.py          KV caches (``GrowingCache`` for any decoder, ``LatentCache`` for MLA + LRU)
modeling_mla_lru.py  MLA attention, decoder, backbone and causal LM
looped.py         the looped-layer control: MLA without the LRU, a block of layers run K times
presets.py        the experiment groups and their tiny presets (``python -m models.presets``: a table)
param_count.py    parameter, FLOP and cache-size formulas, the parameter- and FLOP-matched controls
value_head.py     the PPO critic: a value per token on any causal LM of this project
convert.py        the retrofit: a pretrained Qwen2 (GQA) checkpoint to an MLA group (``python -m models.convert``)
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from models.cache import GrowingCache, LatentCache
from models.configuration import LatentReasoningConfig
from models.looped import LoopedConfig, LoopedForCausalLM, LoopedModel
from models.lru import LatentReasoningUnit, LRUResult, LRUState, LRUTrail, lru_summary
from models.modeling_mla_lru import (
    LatentReasoningForCausalLM,
    LatentReasoningModel,
    LatentReasoningOutput,
    position_ids_from_mask,
)
from models.param_count import cache_bytes_per_token, count_params, flops_per_token
from models.presets import GROUPS, tiny_config
from models.value_head import ValueHeadModel

AutoConfig.register(LatentReasoningConfig.model_type, LatentReasoningConfig, exist_ok=True)
AutoModel.register(LatentReasoningConfig, LatentReasoningModel, exist_ok=True)
AutoModelForCausalLM.register(LatentReasoningConfig, LatentReasoningForCausalLM, exist_ok=True)
AutoConfig.register(LoopedConfig.model_type, LoopedConfig, exist_ok=True)
AutoModel.register(LoopedConfig, LoopedModel, exist_ok=True)
AutoModelForCausalLM.register(LoopedConfig, LoopedForCausalLM, exist_ok=True)

__all__ = ["GROUPS", "GrowingCache", "LRUResult", "LRUState", "LRUTrail", "LatentCache", "LatentReasoningConfig",
           "LatentReasoningForCausalLM", "LatentReasoningModel", "LatentReasoningOutput", "LatentReasoningUnit",
           "LoopedConfig", "LoopedForCausalLM", "LoopedModel", "ValueHeadModel", "cache_bytes_per_token",
           "count_params", "flops_per_token", "lru_summary", "position_ids_from_mask", "tiny_config"]
