"""MLA + LRU as a transformers model: exact under caching, causal, halting bookkeeping, gradients,
save/load, generate(), RoPE variants. CPU, fp32, tiny configs."""

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
from models.cache import GrowingLayer
from models.lru import LatentReasoningUnit

VOCAB = 128


def build(group: str, attn: str = "sdpa", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(models.tiny_config(group, **overrides), attn_implementation=attn).eval()


def left_padded_batch(seed: int = 0, b: int = 3, t: int = 12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, :5] = 0
    positions = position_ids_from_mask(mask)
    return ids, mask, positions


def new_cache(model):
    return LatentCache(config=model.config) if isinstance(model, LatentReasoningForCausalLM) else None


@torch.no_grad()
def decode_step_by_step(model, ids, mask, positions, prefill: int):
    """Prefill ``prefill`` tokens, then feed the rest one at a time through the cache. -> logits (B, T, V)"""
    cache = new_cache(model)
    out = model(ids[:, :prefill], attention_mask=mask[:, :prefill], position_ids=positions[:, :prefill],
                past_key_values=cache, use_cache=True)
    logits = [out.logits]
    for t in range(prefill, ids.shape[1]):
        out = model(ids[:, t: t + 1], attention_mask=mask[:, : t + 1], position_ids=positions[:, t: t + 1],
                    past_key_values=out.past_key_values, use_cache=True)
        logits.append(out.logits)
    return torch.cat(logits, dim=1)


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


def test_growing_cache_layer_equals_concatenation_through_reorder_and_crop():
    layer = GrowingLayer()
    g = torch.Generator().manual_seed(0)

    def chunk(b: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(b, 1, t, 4, generator=g), torch.randn(b, 1, t, 2, generator=g)

    keys, values = chunk(3, 5)
    layer.update(keys, values)
    for t in [1] * 70 + [9]:  # past the first capacity (64) and its doubling
        k, v = chunk(3, t)
        got_k, got_v = layer.update(k, v)
        keys, values = torch.cat([keys, k], dim=2), torch.cat([values, v], dim=2)
        assert torch.equal(got_k, keys) and torch.equal(got_v, values)
    order = torch.tensor([2, 2, 0])
    layer.reorder_cache(order)
    layer.crop(-4)
    keys, values = keys[order][:, :, :-4], values[order][:, :, :-4]
    k, v = chunk(3, 1)
    got_k, got_v = layer.update(k, v)
    assert torch.equal(got_k, torch.cat([keys, k], dim=2)) and torch.equal(got_v, torch.cat([values, v], dim=2))
    assert layer.get_seq_length() == keys.shape[2] + 1
    assert isinstance(LatentCache(config=build("mla_only").config).layers[0], GrowingLayer)


# ---- outputs, gradients, losses ------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("use_cache", [True, False])
def test_aux_loss_and_stats_on_every_forward(training, use_cache):
    model = build("mla_lru_adaptive").train(training)
    ids, mask, positions = left_padded_batch()
    out = model(ids, attention_mask=mask, position_ids=positions, use_cache=use_cache, labels=ids)
    assert out.aux_loss is not None and torch.isfinite(out.aux_loss)
    assert set(out.aux_terms) == {"last_update", "sparsity", "ponder"}
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


@pytest.mark.parametrize("group", models.GROUPS)
def test_greedy_generate_equals_argmax_of_full_forward(group):
    model = build(group)
    ids, mask, _ = left_padded_batch(seed=4, t=6)
    with torch.no_grad():
        generated = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        seq, seq_mask = ids, mask
        for _ in range(6):  # the same greedy decode with no cache at all
            positions = position_ids_from_mask(seq_mask)
            nxt = model(seq, attention_mask=seq_mask, position_ids=positions, use_cache=False).logits[:, -1].argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            seq_mask = torch.cat([seq_mask, torch.ones_like(nxt[:, None])], dim=1)
    assert torch.equal(generated, seq)


@pytest.mark.parametrize("group", ["mla_lru_adaptive", "baseline"])
def test_beam_search_with_cache_equals_without(group):
    # Beams reorder the cache every step: the LRU state must follow its sequences (LatentCache.reorder_cache).
    model = build(group, lru_global_halting=0.5) if group != "baseline" else build(group)
    ids, mask, _ = left_padded_batch(seed=5, t=6)
    kwargs = dict(attention_mask=mask, max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kwargs)
        uncached = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_sampling_options_eos_and_stop_strings(tmp_path):
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["<pad>", "<eos>"] + [chr(ord("a") + i) for i in range(26)])}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()  # characters join without spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    model = build("mla_lru_adaptive")
    prompt = tokenizer(["abc", "de"], return_tensors="pt", padding=True, padding_side="left")
    torch.manual_seed(0)
    sampled = model.generate(**prompt, do_sample=True, temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.3,
                             max_new_tokens=8, pad_token_id=0)
    assert sampled.shape[0] == 2 and sampled.shape[1] <= 3 + 8
    # EOS: make <eos> the only possible token; generation stops after one step.
    with torch.no_grad():
        model.lm_head.weight.zero_()  # tied: also zeroes the embeddings, fine for this check
        model.lm_head.weight[1] = 0.0
    bias = torch.full((VOCAB,), -1e4)
    bias[1] = 0.0
    model.lm_head.register_forward_hook(lambda m, i, o: o + bias)
    stopped = model.generate(**prompt, max_new_tokens=8, do_sample=False, eos_token_id=1, pad_token_id=0)
    assert stopped.shape[1] == prompt["input_ids"].shape[1] + 1 and (stopped[:, -1] == 1).all()
    # Stop strings through transformers' StopStringCriteria.
    bias.fill_(-1e4)
    bias[vocab["z"]] = 0.0
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False, stop_strings=["zz"], tokenizer=tokenizer,
                         pad_token_id=0)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 2


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
