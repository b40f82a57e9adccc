"""Closed-form parameter counts and cache sizes of every group's model, and a parameter-matched baseline.

The table of the presets is ``python -m models.presets``. The formulas are tested equal to ``sum(p.numel())``
of the instantiated models. Tied embeddings count once; Qwen2's q/k/v projections carry biases (o_proj does
not). Qwen2.5-0.5B is 494,032,768.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig, Qwen2Config

from models.configuration import LatentReasoningConfig


def _embeddings(cfg: PretrainedConfig) -> int:
    d, v = cfg.hidden_size, cfg.vocab_size
    return v * d * (1 if cfg.tie_word_embeddings else 2) + d  # + the final norm


def qwen2_params(cfg: Qwen2Config) -> int:
    d, h, kv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or d // h
    attention = (d * h * hd + h * hd) + 2 * (d * kv * hd + kv * hd) + h * hd * d  # q, k, v with bias; o without
    layer = attention + 3 * d * cfg.intermediate_size + 2 * d  # SwiGLU MLP, two norms
    return _embeddings(cfg) + cfg.num_hidden_layers * layer


def lru_params(cfg: LatentReasoningConfig) -> int:
    """One layer's LRU: depthwise conv, GRU gates and candidate, halting heads."""
    c = cfg.kv_lora_rank
    n = c * cfg.lru_conv_kernel + c + (2 * c * 2 * c + 2 * c) + (2 * c * c + c)
    if cfg.lru_halting == "adaptive":
        n += c + 1
    if cfg.lru_global_halting > 0:
        n += c + 1
    return n


def mla_params(cfg: LatentReasoningConfig) -> int:
    d, h, c = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    bias = int(cfg.attention_bias)
    if cfg.q_lora_rank is None:
        query = d * h * qk
    else:
        query = d * cfg.q_lora_rank + bias * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * h * qk
    kv = d * (c + cfg.qk_rope_head_dim) + bias * (c + cfg.qk_rope_head_dim) + c + c * h * (
        cfg.qk_nope_head_dim + cfg.v_head_dim)
    out = h * cfg.v_head_dim * d + bias * d
    layer = query + kv + out + 3 * d * cfg.intermediate_size + 2 * d
    lru_layers = sum(cfg.has_lru(i) for i in range(cfg.num_hidden_layers))
    return _embeddings(cfg) + cfg.num_hidden_layers * layer + lru_layers * lru_params(cfg)


def count_params(cfg: PretrainedConfig) -> int:
    if isinstance(cfg, LatentReasoningConfig):
        return mla_params(cfg)
    if isinstance(cfg, Qwen2Config):
        return qwen2_params(cfg)
    raise ValueError(f"no formula for model_type={cfg.model_type!r}; known: mla_lru, qwen2")


def matched_baseline(target: PretrainedConfig, base: Qwen2Config, **overrides) -> Qwen2Config:
    """``base`` with the MLP width that brings its parameter count closest to ``target``'s.

    The count is linear in intermediate_size (3 * d * layers per unit), so the width is solved exactly.
    """
    values = {**base.to_dict(), **overrides}
    without_mlp = qwen2_params(Qwen2Config(**{**values, "intermediate_size": 0}))
    per_unit = 3 * base.hidden_size * base.num_hidden_layers
    width = round((count_params(target) - without_mlp) / per_unit)
    if width < 1:
        raise ValueError(f"the baseline without its MLP already has {without_mlp} parameters, more than the "
                         f"target's {count_params(target)}: shrink its hidden size or layers")
    return Qwen2Config(**{**values, "intermediate_size": width})


def table(rows: list[tuple[str, PretrainedConfig]]) -> str:
    lines = [f"{'model':<34}{'parameters':>16}{'cache bytes/token (fp16)':>28}"]
    for name, cfg in rows:
        lines.append(f"{name:<34}{count_params(cfg):>16,}{cache_bytes_per_token(cfg, torch.float16):>28,}")
    return "\n".join(lines)


def cache_bytes_per_token(cfg: PretrainedConfig, dtype: torch.dtype = torch.float32) -> int:
    """Bytes the KV cache holds per token, all layers: (C + R) numbers per layer for MLA (the latent and the
    rotary key), 2 x KV heads x head size for GQA."""
    if isinstance(cfg, LatentReasoningConfig):
        return cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * dtype.itemsize
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * hd * dtype.itemsize
