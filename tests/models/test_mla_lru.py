"""MLA + LRU as a transformers model: exact under caching, causal, halting bookkeeping, gradients,
save/load, RoPE variants; transformers' conventions (output_hidden_states / output_attentions, eager ==
sdpa, return_dict=False, packed rows, gradient checkpointing, AutoModel). generate(): test_generation.py;
cache operations: test_cache.py. CPU, fp32, tiny configs."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, Qwen2ForCausalLM

import models
from models import (
    LatentCache,
    LatentReasoningConfig,
    LatentReasoningForCausalLM,
    cache_bytes_per_token,
    position_ids_from_mask,
)
from models.lru import LatentReasoningUnit
from models.modeling_mla_lru import sequence_starts
from tests.models.helpers import (
    MLA_IDS,
    MLA_VARIANTS,
    VOCAB,
    build,
    decode_step_by_step,
    left_padded_batch,
    strengthen_lru,
)

VARIANTS = [(g, "sdpa", {}) for g in models.GROUPS] + [
    ("mla_lru_adaptive", "eager", {}),
    ("mla_lru_adaptive", "sdpa", {"lru_global_halting": 0.5}),
    ("mla_lru_adaptive", "sdpa", {"q_lora_rank": 48, "lru_conv_kernel": 4, "lru_max_iterations": 6}),
    ("mla_lru_fixed", "sdpa", {"lru_layers": [1, 3], "mla_absorb": False}),
    ("mla_lru_adaptive", "sdpa", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                      "original_max_position_embeddings": 8}}),
]


@pytest.mark.parametrize("group, attn, overrides", VARIANTS, ids=[f"{g}-{a}-{o}" for g, a, o in VARIANTS])
@pytest.mark.parametrize("prefill", [1, 6])
def test_cached_decode_equals_full_forward_with_left_padding(group, attn, overrides, prefill):
    model = build(group, attn, **overrides)
    ids, mask, positions = left_padded_batch()
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
    cached = decode_step_by_step(model, ids, mask, positions, prefill)
    real = mask.bool()
    assert torch.isfinite(full[real]).all()
    assert (full - cached)[real].abs().max() <= 1e-4


def test_state_after_every_position_halted_early_is_complete_and_exact():
    # A strong halting bias makes every position halt at the first iteration, so the later iterations are
    # skipped; their slots of the per-sequence state (conv windows, running sums) must still be written.
    model = build("mla_lru_adaptive", lru_global_halting=0.5)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.lru.halt.bias.fill_(20.0)
            layer.self_attn.lru.halt_global.bias.fill_(20.0)
    ids, mask, positions = left_padded_batch(seed=6)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=positions, use_cache=False)
        cached = decode_step_by_step(model, ids, mask, positions, prefill=5)
    assert (full.lru_iterations[:, mask.bool()] == 1).all()
    assert (full.logits - cached)[mask.bool()].abs().max() <= 1e-4
    with torch.no_grad():
        cache = model(ids, attention_mask=mask, position_ids=positions, past_key_values=LatentCache(
            config=model.config), use_cache=True).past_key_values
    for state in cache.lru_states.values():  # frozen after iteration 1: every iteration's running sum is the same
        sums = state.running_sum  # (B, K, C)
        assert torch.allclose(sums, sums[:, :1].expand_as(sums), atol=1e-5)


@pytest.mark.parametrize("group", ["mla_only", "mla_lru_adaptive"])
def test_absorbed_decode_equals_naive_decode(group):
    model = build(group)
    ids, mask, positions = left_padded_batch(seed=1)
    absorbed = decode_step_by_step(model, ids, mask, positions, prefill=4)
    model.config.mla_absorb = False
    naive = decode_step_by_step(model, ids, mask, positions, prefill=4)
    assert (absorbed - naive)[mask.bool()].abs().max() <= 1e-5


@pytest.mark.parametrize("group", models.GROUPS)
def test_left_padding_does_not_change_real_tokens(group):
    model = build(group, lru_global_halting=0.3) if group == "mla_lru_adaptive" else build(group)
    ids, mask, positions = left_padded_batch(seed=2)
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, position_ids=positions).logits
        for row in range(ids.shape[0]):
            real = mask[row].bool()
            alone = model(ids[row: row + 1, real]).logits[0]
            assert (batch[row, real] - alone).abs().max() <= 1e-4


@pytest.mark.parametrize("group", ["mla_lru_fixed", "mla_lru_adaptive"])
def test_causality_of_logits_and_lru_statistics(group):
    model = build(group, lru_global_halting=0.5) if group == "mla_lru_adaptive" else build(group)
    ids, mask, positions = left_padded_batch(seed=3)
    changed = ids.clone()
    changed[:, 8:] = torch.randint(1, VOCAB, changed[:, 8:].shape)
    with torch.no_grad():
        a = model(ids, attention_mask=mask, position_ids=positions)
        b = model(changed, attention_mask=mask, position_ids=positions)
    assert torch.equal(a.logits[:, :8], b.logits[:, :8])
    assert torch.equal(a.lru_iterations[..., :8], b.lru_iterations[..., :8])
    assert not torch.equal(a.logits[:, 8:], b.logits[:, 8:])


# ---- halting bookkeeping ---------------------------------------------------------------------------------


def reference_act(probs: list[float], k_max: int, epsilon: float) -> tuple[int, float, list[float]]:
    """Graves' ACT for one position, as a loop: (N, R, weights)."""
    total, weights = 0.0, []
    for n, p in enumerate(probs[:k_max], start=1):
        if total + p >= 1 - epsilon or n == k_max:
            remainder = 1 - total
            return n, remainder, weights + [remainder] + [0.0] * (k_max - n)
        total += p
        weights.append(p)
    raise AssertionError("unreachable")


def lru_unit(halting: str, seed: int, **overrides) -> LatentReasoningUnit:
    torch.manual_seed(seed)
    cfg = models.tiny_config("mla_lru_adaptive", lru_halting=halting, **overrides)
    unit = LatentReasoningUnit(cfg)
    for p in unit.parameters():  # varied halting patterns, not just the initial ones
        torch.nn.init.normal_(p, std=0.5)
    return unit


@pytest.mark.parametrize("seed", range(20))
def test_adaptive_halting_bookkeeping_matches_reference_act(seed):
    unit = lru_unit("adaptive", seed, lru_max_iterations=5, lru_global_halting=0.3 if seed % 2 else 0.0)
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(3, 9, unit.conv.in_channels, generator=g)
    valid = torch.rand(3, 9, generator=g) > 0.2
    with torch.no_grad():
        out, res, _ = unit(latent, valid, None, return_states=True)
    k = unit.iterations
    for b in range(3):
        for t in range(9):
            if not valid[b, t]:
                assert res.iterations[b, t] == 0 and res.weights[b, t].abs().sum() == 0 and out[b, t].abs().sum() == 0
                continue
            n, remainder, weights = reference_act(res.halting_probs[b, t].tolist(), k, unit.epsilon)
            assert res.iterations[b, t] == n  # a position running all K steps reports K, not K+1
            assert res.remainder[b, t] == pytest.approx(remainder, abs=1e-6)
            assert res.weights[b, t].tolist() == pytest.approx(weights, abs=1e-6)
            assert res.weights[b, t].sum() == pytest.approx(1.0, abs=1e-6)  # not 1.005
            frozen = res.states[n:, b, t]  # h^N .. h^K: a halted position stays frozen
            assert torch.equal(frozen, frozen[:1].expand_as(frozen))
            expected = (res.weights[b, t, :, None] * res.states[1:, b, t]).sum(0)
            assert torch.allclose(out[b, t], expected, atol=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_fixed_mode_runs_exactly_k_iterations(seed):
    unit = lru_unit("fixed", seed, lru_max_iterations=8)
    latent = torch.randn(2, 7, unit.conv.in_channels)
    valid = torch.ones(2, 7, dtype=torch.bool)
    with torch.no_grad():
        out, res, _ = unit(latent, valid, None, return_states=True)
    assert (res.iterations == 8).all()  # the reference's "fixed" mode halted after 4 of 8
    assert torch.equal(res.weights, torch.nn.functional.one_hot(torch.full((2, 7), 7), 8).float())
    assert torch.equal(out, res.states[-1])
    assert all(not torch.equal(res.states[i], res.states[i + 1]) for i in range(8))


def test_hoyer_sparsity_is_normalised_to_the_latent_size():
    # Hoyer-square (sum|x|)^2 / sum x^2 is 1 for a one-hot vector and C for a constant one; divided by C.
    unit = lru_unit("fixed", 0, lru_max_iterations=1)
    c = unit.conv.in_channels
    one_hot = torch.zeros(c)
    one_hot[3] = 2.0
    for vector, expected in ((one_hot, 1 / c), (torch.full((c,), -0.7), 1.0)):
        hoyer = vector.abs().sum().square() / (vector.square().sum() * c)
        assert hoyer.item() == pytest.approx(expected)
    with torch.no_grad():
        _, res, _ = unit(torch.randn(1, 4, c), torch.ones(1, 4, dtype=torch.bool), None)
    assert ((res.sparsity >= 1 / c - 1e-6) & (res.sparsity <= 1 + 1e-6)).all()


@pytest.mark.parametrize("group", ["mla_lru_adaptive", "mla_lru_fixed"])
def test_decoding_without_lru_diagnostics_gives_the_same_logits_and_cache(group):
    model = build(group, lru_global_halting=0.5) if group == "mla_lru_adaptive" else build(group)
    ids, mask, positions = left_padded_batch()
    with torch.no_grad():
        runs = []
        for diagnostics in (True, False):
            out = model(ids[:, :6], attention_mask=mask[:, :6], position_ids=positions[:, :6],
                        past_key_values=LatentCache(config=model.config), use_cache=True, lru_diagnostics=diagnostics)
            step = model(ids[:, 6:7], attention_mask=mask[:, :7], position_ids=positions[:, 6:7],
                         past_key_values=out.past_key_values, use_cache=True, lru_diagnostics=diagnostics)
            runs.append((out, step))
    (with_stats, step_with), (without, step_without) = runs
    assert torch.equal(with_stats.logits, without.logits) and torch.equal(step_with.logits, step_without.logits)
    assert without.lru_stats is None and without.aux_loss is None and with_stats.lru_stats is not None
    for i, state in with_stats.past_key_values.lru_states.items():
        assert torch.equal(state.conv, without.past_key_values.lru_states[i].conv)
    with pytest.raises(ValueError, match="keep it True when passing labels"):
        model(ids, attention_mask=mask, labels=ids, lru_diagnostics=False)


# ---- outputs, gradients, losses ------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("use_cache", [True, False])
def test_aux_loss_and_stats_on_every_forward(training, use_cache):
    model = build("mla_lru_adaptive").train(training)
    ids, mask, positions = left_padded_batch()
    out = model(ids, attention_mask=mask, position_ids=positions, use_cache=use_cache, labels=ids)
    assert out.aux_loss is not None and torch.isfinite(out.aux_loss)
    assert set(out.aux_terms) == {"stability", "sparsity", "ponder"}
    stats = out.lru_stats
    assert 1 <= stats["iterations_mean"] <= stats["iterations_max"] <= 4
    assert stats["halting_distribution"].sum() == pytest.approx(1.0)
    assert out.lru_iterations.shape == (4, 3, 12) and (out.lru_iterations[:, ~mask.bool()] == 0).all()
    plain = model(ids, attention_mask=mask, position_ids=positions, use_cache=use_cache)
    assert plain.logits.shape == (3, 12, VOCAB)


@pytest.mark.parametrize("group, overrides", [(g, {}) for g in models.GROUPS] + [
    ("mla_lru_adaptive", {"lru_global_halting": 0.5, "q_lora_rank": 32, "lru_sparsity_weight": 0.1})])
def test_every_parameter_receives_a_gradient(group, overrides):
    model = build(group, **overrides).train()
    ids, mask, positions = left_padded_batch()
    model(ids, attention_mask=mask, position_ids=positions, labels=ids, use_cache=False).loss.backward()
    dead = [name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead


def test_labels_loss_includes_the_aux_loss():
    model = build("mla_lru_adaptive", lru_ponder_weight=0.5)
    ids = torch.randint(1, VOCAB, (2, 10))
    out = model(ids, labels=ids)
    lm_loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    assert out.loss.item() == pytest.approx((lm_loss + out.aux_loss).item(), rel=1e-5)
    assert out.aux_loss.item() >= 0.5 * out.aux_terms["ponder"].item()


# ---- ecosystem -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group", models.GROUPS)
def test_save_load_round_trip_through_auto_classes(group, tmp_path):
    model = build(group)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    config = AutoConfig.from_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model) and type(config) is type(model.config)
    ids, mask, positions = left_padded_batch()
    with torch.no_grad():
        a = model(ids, attention_mask=mask, position_ids=positions).logits
        b = loaded(ids, attention_mask=mask, position_ids=positions).logits
    assert torch.equal(a, b)


def test_registered_with_auto_classes():
    assert isinstance(AutoConfig.for_model("mla_lru"), LatentReasoningConfig)
    assert isinstance(AutoModelForCausalLM.from_config(models.tiny_config("mla_only")), LatentReasoningForCausalLM)
    assert isinstance(build("baseline"), Qwen2ForCausalLM)


def test_rope_variants_come_from_transformers_and_change_positions():
    ids = torch.randint(1, VOCAB, (1, 40))
    logits = {}
    for name, rope in [("default", {"rope_type": "default", "rope_theta": 10000.0}),
                       ("dynamic", {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0}),
                       ("yarn", {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                 "original_max_position_embeddings": 16})]:
        model = build("mla_lru_adaptive", rope_parameters=rope, max_position_embeddings=16)
        with torch.no_grad():
            logits[name] = model(ids).logits
    assert not torch.allclose(logits["default"], logits["yarn"])
    assert not torch.allclose(logits["default"][:, 20:], logits["dynamic"][:, 20:])


def test_cache_bytes_per_token_measured_equal_formula():
    model = build("mla_lru_adaptive")
    ids = torch.randint(1, VOCAB, (2, 9))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    per_token = sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
                    for layer in cache.layers) / (2 * 9)
    assert per_token == cache_bytes_per_token(model.config, torch.float32) == 4 * (64 + 16) * 4
    # The LRU state is per sequence: its size does not grow with the sequence.
    longer = model(torch.randint(1, VOCAB, (2, 30)), use_cache=True).past_key_values
    assert all(longer.lru_states[i].conv.shape == cache.lru_states[i].conv.shape for i in cache.lru_states)


def test_plain_dynamic_cache_is_refused_with_a_fix():
    from transformers import DynamicCache

    model = build("mla_lru_adaptive")
    with pytest.raises(ValueError, match="needs a LatentCache"):
        model(torch.randint(1, VOCAB, (1, 4)), past_key_values=DynamicCache(config=model.config))


@pytest.mark.parametrize("overrides, message", [
    ({"lru_halting": "sometimes"}, "valid modes are"),
    ({"qk_rope_head_dim": 7}, "even size"),
    ({"lru_layers": [9]}, "outside 0..3"),
    ({"lru_global_halting": 0.5, "lru_halting": "fixed"}, "needs lru_halting='adaptive'"),
])
def test_bad_config_names_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        models.tiny_config("mla_lru_adaptive", **overrides)


# ---- transformers conventions: output flags, return_dict, packed rows, checkpointing, AutoModel ----------


@pytest.mark.parametrize("group, overrides", MLA_VARIANTS, ids=MLA_IDS)
def test_hidden_states_and_attentions_have_their_shapes_and_eager_equals_sdpa(group, overrides):
    sdpa, eager = build(group, "sdpa", **overrides), build(group, "eager", **overrides)
    ids, mask, positions = left_padded_batch(seed=8)
    real, (b, t) = mask.bool(), ids.shape
    layers, heads, d = sdpa.config.num_hidden_layers, sdpa.config.num_attention_heads, sdpa.config.hidden_size
    inputs = dict(attention_mask=mask, position_ids=positions, use_cache=False)
    with torch.no_grad():
        plain = sdpa(ids, **inputs)
        states = sdpa(ids, **inputs, output_hidden_states=True)  # the sdpa path itself
        both = sdpa(ids, **inputs, output_hidden_states=True, output_attentions=True)  # weights: eager's softmax
        reference = eager(ids, **inputs, output_hidden_states=True, output_attentions=True)
    assert torch.equal(states.logits, plain.logits) and plain.hidden_states is None and plain.attentions is None
    assert len(states.hidden_states) == layers + 1 and states.attentions is None
    assert all(h.shape == (b, t, d) for h in states.hidden_states)
    assert torch.equal(states.hidden_states[0], sdpa.model.embed_tokens(ids))
    assert torch.equal(sdpa.lm_head(states.hidden_states[-1]), plain.logits)  # the last one is normed
    assert len(both.attentions) == layers and all(w.shape == (b, heads, t, t) for w in both.attentions)
    for ours, theirs in [(plain.logits, reference.logits), (both.logits, reference.logits),
                         *zip(states.hidden_states, reference.hidden_states, strict=True)]:
        assert (ours - theirs)[real].abs().max() <= 1e-5
    for ours, theirs in zip(both.attentions, reference.attentions, strict=True):
        ours, theirs = ours.transpose(1, 2)[real], theirs.transpose(1, 2)[real]  # (real queries, H, T)
        assert (ours - theirs).abs().max() <= 1e-6
        assert torch.allclose(ours.sum(-1), torch.ones(())) and (ours[..., ~real.any(0)] == 0).all()


@pytest.mark.parametrize("group, overrides", MLA_VARIANTS, ids=MLA_IDS)
def test_a_decode_steps_attentions_equal_the_full_forwards(group, overrides):
    # One cached token goes through the absorbed path, which returns its own softmax.
    model = build(group, **overrides)
    ids, mask, positions = left_padded_batch(seed=9)
    flags = dict(output_attentions=True, output_hidden_states=True)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=positions, use_cache=False, **flags)
        prefix = model(ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1], use_cache=True)
        step = model(ids[:, -1:], attention_mask=mask, position_ids=positions[:, -1:],
                     past_key_values=prefix.past_key_values, **flags)
    for ours, theirs in zip(step.attentions, full.attentions, strict=True):
        assert ours.shape == (3, model.config.num_attention_heads, 1, 12)
        assert (ours - theirs[:, :, -1:]).abs().max() <= 1e-6
    for ours, theirs in zip(step.hidden_states, full.hidden_states, strict=True):
        assert (ours - theirs[:, -1:]).abs().max() <= 1e-5


@pytest.mark.parametrize("group, overrides", MLA_VARIANTS, ids=MLA_IDS)
def test_return_dict_false_gives_tuples(group, overrides):
    model = build(group, **overrides)
    ids = torch.randint(1, VOCAB, (2, 6))
    with torch.no_grad():
        reference = model(ids, labels=ids)
        out = model(ids, labels=ids, return_dict=False)
        base = model.model(ids, return_dict=False, output_hidden_states=True)
        model.config.return_dict = False
        from_config = model(ids)
    assert isinstance(out, tuple) and torch.equal(out[0], reference.loss) and torch.equal(out[1], reference.logits)
    assert isinstance(base, tuple) and torch.equal(model.lm_head(base[0]), reference.logits)
    assert isinstance(from_config, tuple) and torch.equal(from_config[0], reference.logits)


def test_only_attention_arguments_reach_the_attention_function():
    # return_dict, output_hidden_states and output_attentions used to leak into the attention call.
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    seen = []

    def recording_sdpa(module, query, key, value, attention_mask, **kwargs):
        seen.append(set(kwargs))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("sdpa_recording", recording_sdpa)
    AttentionMaskInterface.register("sdpa_recording", sdpa_mask)
    model = build("mla_lru_adaptive", attn="sdpa_recording")
    ids = torch.randint(1, VOCAB, (1, 5))
    with torch.no_grad():
        out = model(ids, return_dict=False, output_hidden_states=True, use_cache=False)
    assert isinstance(out, tuple) and len(seen) == model.config.num_hidden_layers
    assert all(kwargs == {"scaling", "dropout"} for kwargs in seen)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("group, overrides", MLA_VARIANTS, ids=MLA_IDS)
def test_a_packed_row_equals_its_sequences_run_alone(group, overrides, attn):
    # Padding-free packing (DataCollatorWithFlattening): one row, position_ids restarting, no mask. The
    # attention mask comes from transformers; the LRU must not read across the starts either (strengthened
    # weights, so that a leak shows). A 1-token sequence is shorter than the convolution's window.
    model = strengthen_lru(build(group, attn, **overrides))
    g = torch.Generator().manual_seed(10)
    sequences = [torch.randint(1, VOCAB, (1, n), generator=g) for n in (5, 1, 3, 6)]
    packed = torch.cat(sequences, dim=1)
    positions = torch.cat([torch.arange(s.shape[1]) for s in sequences])[None]
    with torch.no_grad():
        out = model(packed, position_ids=positions, use_cache=False)
        alone = [model(s, use_cache=False) for s in sequences]
    assert (out.logits - torch.cat([a.logits for a in alone], dim=1)).abs().max() <= 1e-5
    if out.lru_iterations is not None:
        assert torch.equal(out.lru_iterations, torch.cat([a.lru_iterations for a in alone], dim=2))


@pytest.mark.parametrize("global_halting", [0.0, 0.3])
def test_the_lru_state_after_a_packed_row_is_its_last_sequences(global_halting):
    # What a cache would carry on: the last sequence's own state, even when it is shorter than the window.
    unit = lru_unit("adaptive", 1, lru_global_halting=global_halting)
    latent = torch.randn(2, 7, unit.conv.in_channels)
    valid = torch.ones(2, 7, dtype=torch.bool)
    starts = torch.zeros(2, 7, dtype=torch.bool)
    starts[0, 6] = starts[1, 4] = True  # the last sequences: 1 and 3 tokens
    with torch.no_grad():
        _, _, packed = unit(latent, valid, None, starts=starts)
        for row, first in ((0, 6), (1, 4)):
            _, _, alone = unit(latent[row:row + 1, first:], valid[row:row + 1, first:], None)
            for name in ("conv", "running_sum", "count"):
                ours, theirs = getattr(packed, name), getattr(alone, name)
                assert (ours is None) == (theirs is None) and (ours is None or torch.allclose(ours[row], theirs[0],
                                                                                               atol=1e-6))


def test_left_padding_is_no_packing():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert sequence_starts(position_ids_from_mask(mask), mask, 0, 2, 4) is None
    packed = torch.tensor([[0, 1, 0, 1]])
    assert sequence_starts(packed, None, 0, 1, 4).tolist() == [[False, False, True, False]]
    assert sequence_starts(torch.tensor([[0]]), None, 5, 1, 1).tolist() == [[True]]  # after cached tokens


@pytest.mark.parametrize("group, overrides", MLA_VARIANTS, ids=MLA_IDS)
def test_gradient_checkpointing_gives_the_same_gradients(group, overrides):
    model = build(group, **overrides).train()
    ids, mask, positions = left_padded_batch()
    calls = []
    for layer in model.model.layers:  # a pre-hook: the recomputation stops early, before a forward hook would run
        layer.register_forward_pre_hook(lambda *_: calls.append(1))

    def gradients():
        model.zero_grad()
        model(ids, attention_mask=mask, position_ids=positions, labels=ids).loss.backward()  # aux loss included
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    plain = gradients()
    model.gradient_checkpointing_enable()
    calls.clear()
    checkpointed = gradients()
    assert len(calls) == 2 * model.config.num_hidden_layers  # every layer ran again in the backward pass
    assert all(torch.equal(plain[name], checkpointed[name]) for name in plain)  # bitwise, as measured


def test_gradient_checkpointing_refuses_what_it_would_get_wrong():
    model = build("mla_lru_adaptive").train()
    with pytest.raises(ValueError, match="use_reentrant=True.*auxiliary loss"):
        model.gradient_checkpointing_enable({"use_reentrant": True})
    model.gradient_checkpointing_enable()
    ids = torch.randint(1, VOCAB, (1, 4))
    for cache_use in (dict(use_cache=True), dict(past_key_values=LatentCache(config=model.config))):
        with pytest.raises(ValueError, match="write the cache .* a second time"):
            model(ids, **cache_use)
    assert model(ids).past_key_values is None  # the config's use_cache default: no cache while checkpointing
    assert model.eval()(ids).past_key_values is not None


@pytest.mark.parametrize("group, overrides", MLA_VARIANTS, ids=MLA_IDS)
def test_auto_model_is_the_backbone_and_round_trips(group, overrides, tmp_path):
    from transformers import AutoModel

    torch.manual_seed(0)
    base = AutoModel.from_config(models.tiny_config(group, **overrides)).eval()
    assert type(base) is models.LatentReasoningModel
    base.save_pretrained(tmp_path / "base")
    lm = build(group, **overrides)
    lm.save_pretrained(tmp_path / "lm")
    loaded = AutoModel.from_pretrained(tmp_path / "base").eval()
    backbone, info = AutoModel.from_pretrained(tmp_path / "lm", output_loading_info=True)  # an LM's checkpoint
    assert not info["missing_keys"] and type(backbone) is models.LatentReasoningModel
    ids, mask, positions = left_padded_batch()
    inputs = dict(attention_mask=mask, position_ids=positions)
    with torch.no_grad():
        # Loaded weights sit at other memory alignments, so CPU kernels may round differently: close, not equal.
        close = dict(rtol=0, atol=1e-6)
        torch.testing.assert_close(loaded(ids, **inputs).last_hidden_state,
                                   base(ids, **inputs).last_hidden_state, **close)
        torch.testing.assert_close(backbone.eval()(ids, **inputs).last_hidden_state,
                                   lm.model(ids, **inputs).last_hidden_state, **close)


def test_stability_term_penalises_growing_updates_only():
    """The design's stability term: sum_k relu(|d_k|^2 - |d_{k-1}|^2) / |latent|^2, by hand on traced norms;
    a position whose updates shrink, or that halts after one iteration, costs nothing."""
    from models.lru import LatentReasoningUnit

    config = models.tiny_config("mla_lru_fixed")
    unit = LatentReasoningUnit(config)
    latent = torch.full((1, 3, config.kv_lora_rank), 0.5)  # |latent|^2 = 64 * 0.25 = 16
    norms = torch.tensor([[[2.0, 1.0, 0.5, 0.2], [1.0, 2.0, 1.0, 3.0], [1.0, 0.0, 0.0, 0.0]]])
    trace = {"update_norms": norms, "weights": torch.zeros(1, 3, 4), "probs": torch.zeros(1, 3, 4)}
    iterations = torch.tensor([[4.0, 4.0, 1.0]])
    report = unit._report(latent, torch.ones(1, 3, dtype=torch.bool), latent, iterations, torch.ones(1, 3), trace)
    # row 0 shrinks: 0; row 1: (4 - 1) + 0 + (9 - 1) = 11, over 16; row 2 halted after one iteration: 0
    assert torch.allclose(report.stability, torch.tensor([[0.0, 11 / (16 + 1e-6), 0.0]]))
    assert config.lru_stability_weight == 0.1 and config.lru_sparsity_weight == 0.01
    assert config.lru_ponder_weight == 0.001
