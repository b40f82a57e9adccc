"""Closed-form parameter counts equal the instantiated models; FLOPs per token equal torch's FLOP counter and
numbers worked by hand; the matched baseline and controls; the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

import models
from models.param_count import count_params, flops_breakdown, flops_per_token, matched_baseline
from models.presets import QWEN25_05B, main, qwen25_05b_shaped

SHAPES = {"tiny": models.tiny_config, "0.5B-shaped": qwen25_05b_shaped}


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
    assert "MFLOPs/token (context 256)" in out and "tiny looped" in out and "tiny mla_only_matched" in out
    assert "tiny looped: layers 1..1 of 4 run 2 times (5 virtual layers)" in out


# ---- the matched controls ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_mla_only_matched_is_within_half_an_mlp_unit_of_the_adaptive_model_and_has_no_lru(shape):
    control, target = SHAPES[shape]("mla_only_matched"), SHAPES[shape]("mla_lru_adaptive")
    per_unit = 3 * control.hidden_size * control.num_hidden_layers  # gate, up and down rows of one MLP unit
    assert abs(count_params(control) - count_params(target)) <= per_unit / 2
    assert not control.use_lru and control.intermediate_size > SHAPES[shape]("mla_only").intermediate_size
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(control)
    assert not any(isinstance(m, models.LatentReasoningUnit) for m in model.modules())
    assert sum(p.numel() for p in model.parameters()) == count_params(control)


@pytest.mark.parametrize("shape", SHAPES)
def test_looped_matches_mla_lru_fixed_flops_within_half_a_layer_with_fewer_parameters(shape):
    looped, fixed, plain = (SHAPES[shape](g) for g in ("looped", "mla_lru_fixed", "mla_only"))
    k = looped.loop_iterations
    one_layer = (flops_per_token(looped) - flops_per_token(looped, loop_iterations=k - 1)) / looped.block_size
    # The loop adds whole layers: the best a loop can do is within half a layer of the target.
    assert abs(flops_per_token(looped) - flops_per_token(fixed)) <= one_layer / 2
    assert count_params(looped) == count_params(plain) < count_params(fixed)


def test_controls_match_with_shared_overrides_and_lru_fields_describe_the_target():
    control = models.tiny_config("mla_only_matched", vocab_size=240, eos_token_id=1)
    target = models.tiny_config("mla_lru_adaptive", vocab_size=240)
    assert control.vocab_size == 240 and abs(count_params(control) - count_params(target)) <= 3 * 128 * 4 / 2
    # Matched to a fixed LRU with K=8: more than the K=4 default's compute, so the loop is longer.
    long = models.tiny_config("looped", lru_max_iterations=8)
    assert long.lru_max_iterations == 4  # the control keeps no LRU field it was given
    assert long.num_virtual_layers > models.tiny_config("looped").num_virtual_layers
    assert abs(flops_per_token(long) - flops_per_token(models.tiny_config("mla_lru_fixed", lru_max_iterations=8))) < \
        abs(flops_per_token(models.tiny_config("looped")) - flops_per_token(models.tiny_config("mla_lru_fixed",
                                                                                              lru_max_iterations=8)))
    given = models.tiny_config("looped", loop_iterations=5, loop_halting="converge")
    assert given.loop_iterations == 5 and given.loop_halting == "converge"  # a loop field given replaces the solved
    with pytest.raises(ValueError, match="intermediate_size: mla_only_matched solves its MLP width"):
        models.tiny_config("mla_only_matched", intermediate_size=100)


# ---- FLOPs per token ------------------------------------------------------------------------------------


def test_flops_worked_by_hand():
    # Tiny MLA, one key (context 1), per layer, multiply-adds: q 128*4*48 = 24,576; [c ; k_r] 128*80 = 10,240;
    # W_UK, W_UV 64*4*64 = 16,384; o 128*128 = 16,384; scores and values 4*1*(48+32) = 320; MLP 3*128*384 = 147,456
    # -> 215,360; x 4 layers + LM head 128*128 = 877,824 multiply-adds = 1,755,648 FLOPs.
    assert flops_per_token(models.tiny_config("mla_only"), context=1) == 1_755_648
    # Each context key adds 4 heads * 80 multiply-adds in each of the 4 layers: 2 * 1,280 FLOPs.
    assert flops_per_token(models.tiny_config("mla_only"), context=2) == 1_755_648 + 2_560
    # The LRU, per iteration and layer: conv 64*3 = 192; gates 128*128 = 16,384; candidate 128*64 = 8,192
    # -> 24,768; x 4 iterations x 4 layers = 396,288 multiply-adds = 792,576 FLOPs.
    fixed = models.tiny_config("mla_lru_fixed")
    assert flops_per_token(fixed, context=1) - flops_per_token(models.tiny_config("mla_only"), context=1) == 792_576
    # Adaptive: + the halting head, 64; one more mean iteration costs 4 layers * 2 * (24,768 + 64) = 198,656 FLOPs.
    adaptive = models.tiny_config("mla_lru_adaptive")
    assert flops_per_token(adaptive, lru_iterations=3) - flops_per_token(adaptive, lru_iterations=2) == 198_656
    assert flops_per_token(adaptive) == flops_per_token(adaptive, lru_iterations=4)  # at most K, by default
    assert flops_per_token(adaptive, lru_iterations=0) == flops_per_token(models.tiny_config("mla_only"))
    # The tiny looped control runs layer 1 twice: one more layer, 2 * 215,360 = 430,720 FLOPs at context 1.
    looped = models.tiny_config("looped")
    assert flops_per_token(looped, context=1) - flops_per_token(models.tiny_config("mla_only"), context=1) == 430_720
    converge = models.tiny_config("looped", loop_halting="converge", loop_iterations=4)
    assert flops_per_token(converge, loop_iterations=2.5) == flops_per_token(models.tiny_config("mla_only")) + \
        1.5 * (flops_per_token(looped) - flops_per_token(models.tiny_config("mla_only")))


FLOP_CASES = [(g, {}) for g in models.GROUPS] + [
    ("mla_lru_fixed", {"q_lora_rank": 48, "lru_layers": [0, 2], "lru_conv_kernel": 5}),
    ("mla_lru_adaptive", {"lru_global_halting": 0.5}),
    ("looped", {"loop_start": 1, "loop_end": 3, "loop_iterations": 3})]


@pytest.mark.parametrize("group, overrides", FLOP_CASES, ids=[f"{g}-{o}" for g, o in FLOP_CASES])
def test_flops_formula_equals_torchs_flop_counter(group, overrides):
    """FlopCounterMode counts every matmul of a forward of T tokens; with eager attention each token's scores are
    computed against all T keys (the causal mask applies after), so its count per token is the formula at context
    T. Two differences, both exact: it does not see the LRU's depthwise convolution (the unit writes it as an
    elementwise weighted sum of its taps), and the adaptive LRU runs its halting heads on every position of a layer
    while any position there still iterates, where the formula counts each position's own iterations."""
    torch.manual_seed(0)
    config = models.tiny_config(group, **overrides)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    t = 16
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = model(torch.randint(1, 128, (1, t)), use_cache=False)
    iterations = getattr(out, "lru_iterations", None)  # (L_lru, B, T)
    adaptive = iterations is not None and config.lru_halting == "adaptive"
    parts = flops_breakdown(config, context=t, lru_iterations=float(iterations.mean()) if adaptive else None)
    expected = sum(parts.values()) - parts.get("lru_conv", 0.0)
    if adaptive:
        heads = 1 + int(config.lru_global_halting > 0)
        idle = sum(float(layer.max() - layer.mean()) for layer in iterations)  # per token, summed over layers
        expected += idle * 2 * config.kv_lora_rank * heads
        assert 1 < float(iterations.mean()) < config.lru_max_iterations  # it did halt at different iterations
    assert counter.get_total_flops() / t == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("call, message", [
    (lambda: flops_per_token(models.tiny_config("mla_only"), lru_iterations=2), "this model has 0 LRU layers"),
    (lambda: flops_per_token(models.tiny_config("mla_lru_fixed"), lru_iterations=5), r"in \[0, K=4\]"),
    (lambda: flops_per_token(models.tiny_config("mla_lru_fixed"), loop_iterations=2), "only the looped control"),
    (lambda: flops_per_token(models.tiny_config("looped"), loop_iterations=3), r"in \[1, K=2\]"),
    (lambda: flops_per_token(models.tiny_config("baseline"), lru_iterations=1), "the Qwen2 baseline has neither"),
    (lambda: flops_per_token(models.tiny_config("baseline"), context=0), "context=0"),
])
def test_bad_flop_arguments_say_what_is_wrong(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_unmatched_baseline_keeps_the_preset_width_and_unknown_overrides_are_refused():
    from models.presets import TINY, tiny_config

    assert tiny_config("baseline", match_params=False).intermediate_size == TINY["intermediate_size"]
    assert count_params(tiny_config("baseline", match_params=False)) < count_params(tiny_config("baseline"))
    with pytest.raises(ValueError, match=r"\['lru_iters'\] are not fields of the mla_lru_adaptive config"):
        tiny_config("mla_lru_adaptive", lru_iters=8)  # a typo would otherwise train the default K silently


@pytest.mark.parametrize("group", ["mla_only", "mla_only_matched", "looped"])
def test_groups_without_the_lru_carry_no_lru_settings(group, tmp_path):
    config = models.tiny_config(group)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["use_lru"] is False and not [k for k in saved if k.startswith("lru_")]
    if group == "mla_only":  # a control's lru_* fields describe its target instead
        with pytest.raises(ValueError, match="not fields of the mla_only config"):
            models.tiny_config(group, lru_ponder_weight=0.01)
