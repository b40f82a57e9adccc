"""Tiny presets of the four experiment groups, small enough to train on 2 CPU cores.

The baseline is ``transformers``' own Qwen2 (GQA). Its MLP width is chosen so that its parameter count
matches ``mla_lru_adaptive``, the largest group: the study asks whether latent iterations beat simply
spending the same parameters. ``mla_only`` is the same MLA model without the LRU (the ablation).
"""

from __future__ import annotations

from transformers import PretrainedConfig, Qwen2Config

from models.configuration import LatentReasoningConfig
from models.param_count import matched_baseline

GROUPS = ("baseline", "mla_only", "mla_lru_fixed", "mla_lru_adaptive")

TINY = dict(vocab_size=128, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
            max_position_embeddings=1024, tie_word_embeddings=True)
TINY_MLA = dict(kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, lru_max_iterations=4,
                lru_conv_kernel=3)
TINY_BASELINE = dict(num_key_value_heads=2)  # head size 128 / 4 = 32, as in the MLA presets


def mla_config(group: str, **overrides) -> LatentReasoningConfig:
    if group not in GROUPS[1:]:
        raise ValueError(f"group={group!r}: MLA groups are {list(GROUPS[1:])}")
    lru = {"mla_only": dict(use_lru=False), "mla_lru_fixed": dict(lru_halting="fixed"),
           "mla_lru_adaptive": dict(lru_halting="adaptive")}[group]
    return LatentReasoningConfig(**{**TINY, **TINY_MLA, **lru, **overrides})


def tiny_config(group: str, **overrides) -> PretrainedConfig:
    """The tiny preset config of a group, ready for ``AutoModelForCausalLM.from_config``."""
    if group not in GROUPS:
        raise ValueError(f"group={group!r}: valid groups are {list(GROUPS)}")
    if group != "baseline":
        return mla_config(group, **overrides)
    # Match against the adaptive model with the same shared overrides (a tokenizer's vocabulary, say).
    shared = {k: v for k, v in overrides.items() if k in TINY or k.endswith("token_id")}
    target = mla_config("mla_lru_adaptive", **shared)
    return matched_baseline(target, Qwen2Config(**{**TINY, **TINY_BASELINE}), **overrides)
