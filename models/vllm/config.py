"""How vLLM sizes and schedules the MLA + LRU model: two hooks the plugin installs, and the sizes they read.

vLLM sizes every attention page from the config's ``head_dim`` and ``num_key_value_heads``. Ours sets
``head_dim`` to the rotary size (transformers' rotary embedding reads it) and has no KV-head count, while the
twin's attention layer runs with one KV head of size C + R (padded): ``ArchConfigConvertor`` tells vLLM
those numbers, so a checkpoint serves without ``hf_overrides``. ``ModelConfigHook`` makes an LRU-free
checkpoint (``mla_only``) a plain decoder rather than a hybrid, and turns CUDA graphs off (ACT halting is
data-dependent control flow: ``running.any()`` cannot be captured).
"""

from __future__ import annotations

from vllm.logger import init_logger
from vllm.model_executor.models.config import VerifyAndUpdateConfig
from vllm.transformers_utils.model_arch_config_convertor import ModelArchConfigConvertorBase

from models.configuration import LatentReasoningConfig

logger = init_logger(__name__)

# Head sizes vLLM's CPU attention kernel takes (CPUAttentionBackend.get_supported_head_sizes); the GPU
# flash-attention kernels take every one of them up to 256.
ATTENTION_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def attention_head_size(config: LatentReasoningConfig) -> int:
    """P: the head size the attention layer runs with, C + R zero-padded to the next size the kernels take."""
    need = config.kv_lora_rank + config.qk_rope_head_dim
    for size in ATTENTION_HEAD_SIZES:
        if size >= need:
            return size
    raise ValueError(f"kv_lora_rank + qk_rope_head_dim = {need}: the vLLM twin supports at most "
                     f"{ATTENTION_HEAD_SIZES[-1]} (vLLM's attention kernels take no larger head)")


def lru_state_shape(config: LatentReasoningConfig) -> tuple[int, int, int]:
    """(K, rows, C): one page per sequence and LRU layer. Rows 0..W-2 of iteration k hold its last W-1
    inputs; with global halting row W-1 holds its running sum of states. The running count is not kept:
    it is the position of the sequence's next token. (At least one row: vLLM pages cannot be empty.)"""
    rows = config.lru_conv_kernel - 1 + (1 if config.lru_global_halting > 0 else 0)
    return config.lru_max_iterations, max(rows, 1), config.kv_lora_rank


def has_any_lru(config: LatentReasoningConfig) -> bool:
    return any(config.has_lru(i) for i in range(config.num_hidden_layers))


class ArchConfigConvertor(ModelArchConfigConvertorBase):
    """The attention geometry of the twin: one KV head of size P (``attention_head_size``)."""

    def get_head_size(self) -> int:
        return attention_head_size(self.hf_text_config)

    def get_total_num_kv_heads(self) -> int:
        return 1


class ModelConfigHook(VerifyAndUpdateConfig):
    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        config: LatentReasoningConfig = model_config.hf_config
        if not has_any_lru(config):
            # vLLM reads a hybrid model's layer kinds from layer_types; all attention = not hybrid.
            config.layer_types = ["full_attention"] * config.num_hidden_layers
        if not model_config.enforce_eager:
            logger.info("MLA + LRU model: enforce_eager=True (LRU halting is data-dependent control flow)")
            model_config.enforce_eager = True
