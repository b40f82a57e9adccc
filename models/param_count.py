"""Closed-form parameter counts, a parameter-matched baseline, and a table.

    python -m models.param_count            # the four tiny groups and a Qwen2.5-0.5B-shaped comparison

The formulas are tested equal to ``sum(p.numel())`` of the instantiated models. Tied embeddings count
once; Qwen2's q/k/v projections carry biases (o_proj does not). Qwen2.5-0.5B is 494,032,768.
"""

from __future__ import annotations

import argparse

from transformers import PretrainedConfig, Qwen2Config

from models.configuration import LatentReasoningConfig

QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)


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
        lines.append(f"{name:<34}{count_params(cfg):>16,}{_cache_bytes(cfg, 2):>28,}")
    return "\n".join(lines)


def _cache_bytes(cfg: PretrainedConfig, itemsize: int) -> int:
    if isinstance(cfg, LatentReasoningConfig):
        return cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * itemsize
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * hd * itemsize


def qwen25_05b_shaped(group: str) -> PretrainedConfig:
    """A Qwen2.5-0.5B-sized model of a group (MLA groups: its widths with a 256-wide latent)."""
    from models.presets import GROUPS

    if group == "baseline":
        return Qwen2Config(**QWEN25_05B)
    if group not in GROUPS:
        raise ValueError(f"group={group!r}: valid groups are {list(GROUPS)}")
    lru = {"mla_only": dict(use_lru=False), "mla_lru_fixed": dict(lru_halting="fixed"),
           "mla_lru_adaptive": dict(lru_halting="adaptive")}[group]
    return LatentReasoningConfig(**QWEN25_05B, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
                                 v_head_dim=64, **lru)


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    from models.presets import GROUPS, tiny_config

    rows = [(f"tiny {g}", tiny_config(g)) for g in GROUPS]
    rows += [(f"0.5B-shaped {g}", qwen25_05b_shaped(g)) for g in GROUPS]
    print(table(rows))


if __name__ == "__main__":
    main()
