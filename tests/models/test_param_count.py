"""Closed-form parameter counts equal the instantiated models; the matched baseline; the CLI."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

import models
from models.param_count import count_params, matched_baseline
from models.presets import QWEN25_05B, main, qwen25_05b_shaped


def instantiated(config) -> int:
    with torch.device("meta"):  # shapes only: a 0.5B model costs no memory or time this way
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def test_qwen25_05b_is_494_million_with_tied_embeddings_and_qkv_biases():
    # The reference called this model "630M". 151936*896 embeddings (tied, once)
    # + 24 layers * (q 896*896+896, k and v 896*128+128 each, o 896*896, MLP 3*896*4864, 2 norms of 896)
    # + the final norm 896 = 136,134,656 + 24 * 14,912,384 + 896 = 494,032,768.
    config = Qwen2Config(**QWEN25_05B)
    assert count_params(config) == 494_032_768 == instantiated(config)


@pytest.mark.parametrize("config", [
    *(models.tiny_config(g) for g in models.GROUPS),
    *(qwen25_05b_shaped(g) for g in models.GROUPS),
    models.tiny_config("mla_lru_adaptive", q_lora_rank=48, attention_bias=True, tie_word_embeddings=False),
    models.tiny_config("mla_lru_adaptive", lru_global_halting=0.5, lru_layers=[0, 2], lru_conv_kernel=5),
    models.tiny_config("mla_lru_fixed", lru_layers=[3]),
    Qwen2Config(vocab_size=100, hidden_size=64, intermediate_size=100, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, tie_word_embeddings=False),
], ids=lambda c: f"{c.model_type}")
def test_formula_equals_instantiated_model(config):
    assert count_params(config) == instantiated(config)


def test_matched_baseline_is_within_one_mlp_unit_of_the_target():
    target = models.tiny_config("mla_lru_adaptive")
    baseline = models.tiny_config("baseline")
    assert isinstance(AutoModelForCausalLM.from_config(baseline), Qwen2ForCausalLM)
    per_unit = 3 * baseline.hidden_size * baseline.num_hidden_layers
    assert abs(count_params(baseline) - count_params(target)) <= per_unit / 2
    with pytest.raises(ValueError, match="shrink its hidden size"):
        matched_baseline(models.tiny_config("mla_only", hidden_size=8, num_attention_heads=1, vocab_size=8),
                         Qwen2Config(**QWEN25_05B))


def test_matching_follows_shared_overrides_like_a_tokenizers_vocabulary():
    baseline = models.tiny_config("baseline", vocab_size=240, eos_token_id=1)
    target = models.tiny_config("mla_lru_adaptive", vocab_size=240)
    assert baseline.vocab_size == 240
    assert abs(count_params(baseline) - count_params(target)) <= 3 * baseline.hidden_size * baseline.num_hidden_layers


def test_cli_table(capsys):
    main([])
    out = capsys.readouterr().out
    assert "0.5B-shaped baseline" in out and "494,032,768" in out and "tiny mla_lru_adaptive" in out
