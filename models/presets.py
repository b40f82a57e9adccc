"""The experiment groups and their preset models, small enough to train on 2 CPU cores.

    python -m models.presets      # parameters and cache bytes of the tiny groups and Qwen2.5-0.5B-shaped ones

The baseline is ``transformers``' own Qwen2 (GQA). Its MLP width is chosen so that its parameter count
matches ``mla_lru_adaptive``, the largest group: the study asks whether latent iterations beat simply
spending the same parameters. ``mla_only`` is the same MLA model without the LRU (the ablation).
"""

from __future__ import annotations

import argparse

from transformers import PretrainedConfig, Qwen2Config

from models.configuration import LatentReasoningConfig
from models.param_count import matched_baseline, table

GROUPS = ("baseline", "mla_only", "mla_lru_fixed", "mla_lru_adaptive")
# What each MLA group sets in LatentReasoningConfig: the one home of "group -> architecture".
GROUP_SETTINGS = {"mla_only": dict(use_lru=False), "mla_lru_fixed": dict(lru_halting="fixed"),
                  "mla_lru_adaptive": dict(lru_halting="adaptive")}

TINY = dict(vocab_size=128, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
            max_position_embeddings=1024, tie_word_embeddings=True)
TINY_MLA = dict(kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, lru_max_iterations=4,
                lru_conv_kernel=3)
TINY_BASELINE = dict(num_key_value_heads=2)  # head size 128 / 4 = 32, as in the MLA presets
QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)
QWEN25_05B_MLA = dict(kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64)


def mla_config(group: str, shape: dict, **overrides) -> LatentReasoningConfig:
    """An MLA group's config at a given shape (a dict of config fields), with overrides on top."""
    if group not in GROUP_SETTINGS:
        raise ValueError(f"group={group!r}: MLA groups are {list(GROUP_SETTINGS)}")
    return LatentReasoningConfig(**{**shape, **GROUP_SETTINGS[group], **overrides})


def tiny_config(group: str, **overrides) -> PretrainedConfig:
    """The tiny preset config of a group, ready for ``AutoModelForCausalLM.from_config``."""
    if group not in GROUPS:
        raise ValueError(f"group={group!r}: valid groups are {list(GROUPS)}")
    if group != "baseline":
        return mla_config(group, {**TINY, **TINY_MLA}, **overrides)
    # Match against the adaptive model with the same shared overrides (a tokenizer's vocabulary, say).
    shared = {k: v for k, v in overrides.items() if k in TINY or k.endswith("token_id")}
    target = mla_config("mla_lru_adaptive", {**TINY, **TINY_MLA}, **shared)
    return matched_baseline(target, Qwen2Config(**{**TINY, **TINY_BASELINE}), **overrides)


def qwen25_05b_shaped(group: str) -> PretrainedConfig:
    """A Qwen2.5-0.5B-sized model of a group (MLA groups: its widths with a 256-wide latent)."""
    if group not in GROUPS:
        raise ValueError(f"group={group!r}: valid groups are {list(GROUPS)}")
    if group == "baseline":
        return Qwen2Config(**QWEN25_05B)
    return mla_config(group, {**QWEN25_05B, **QWEN25_05B_MLA})


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    rows = [(f"tiny {g}", tiny_config(g)) for g in GROUPS]
    rows += [(f"0.5B-shaped {g}", qwen25_05b_shaped(g)) for g in GROUPS]
    print(table(rows))


if __name__ == "__main__":
    main()
