"""The looped-layer control (models/looped.py): the block runs K times, one cache layer per virtual layer, cached
decoding equals the full forward (fixed and converge stops, left padding), the converge stop, save/load,
generate(), gradients, config errors. CPU, fp32, tiny configs."""

from __future__ import annotations

import collections

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, DynamicCache, StaticCache

import models
from models import LoopedConfig, LoopedForCausalLM, LoopedModel, cache_bytes_per_token, position_ids_from_mask
from tests.models.helpers import VOCAB, build, decode_step_by_step, left_padded_batch

BLOCK2_K4 = dict(loop_start=1, loop_end=3, loop_iterations=4)  # layers 1 and 2 four times: 4 + 2 * 3 = 10 virtual
# 0.55 lies between the tokens' relative changes at the third iteration (0.45-0.61 for this seed's batch), so some
# stop after three iterations and some run four; at least 5e-3 from every change, far above rounding.
CONVERGE = dict(BLOCK2_K4, loop_halting="converge", loop_tolerance=0.55)


def layer_calls(model) -> collections.Counter:
    """{physical layer: forward calls so far}, counted by hooks on the decoder layers."""
    calls = collections.Counter()
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_hook(lambda *_, i=i: calls.update([i]))
    return calls


def scaled_embeddings(model, ids: torch.Tensor, positions: list[int], scale: float = 1e3) -> torch.Tensor:
    """The token embeddings with those at ``positions`` made ``scale`` times larger. Every layer reads its input
    through an RMSNorm, so its update keeps its size: the relative change of a scaled token is ~1/scale."""
    factor = torch.ones(ids.shape[1])
    factor[positions] = scale
    return model.model.embed_tokens(ids).detach() * factor[None, :, None]


@pytest.mark.parametrize("overrides", [{}, BLOCK2_K4], ids=["preset", "block2-k4"])
def test_the_block_runs_k_times_and_every_virtual_layer_has_its_cache(overrides):
    model = build("looped", **overrides)
    config = model.config
    calls = layer_calls(model)
    ids, mask, positions = left_padded_batch()
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=positions, use_cache=True)
    block = range(config.loop_start, config.loop_end)
    assert calls == {i: config.loop_iterations if i in block else 1 for i in range(config.num_hidden_layers)}
    assert torch.equal(out.loop_iterations, config.loop_iterations * mask.float())  # 0 at pads
    cache = out.past_key_values
    assert len(cache.layers) == config.num_virtual_layers == 4 + (config.loop_iterations - 1) * len(block)
    per_token = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers) / ids.numel()
    assert per_token == cache_bytes_per_token(config) == config.num_virtual_layers * (64 + 16) * 4


def test_the_preset_loops_a_middle_layer_and_is_an_mla_model_without_lru():
    config = models.tiny_config("looped")
    assert isinstance(config, LoopedConfig) and not config.use_lru and config.loop_halting == "fixed"
    assert 0 < config.loop_start and config.loop_end < config.num_hidden_layers and config.loop_iterations >= 2
    model = build("looped")
    assert not any(isinstance(m, models.LatentReasoningUnit) for m in model.modules())
    assert sum(p.numel() for p in model.parameters()) == models.count_params(models.tiny_config("mla_only"))


DECODE_CASES = {"preset": ("sdpa", {}), "block2-k4": ("sdpa", BLOCK2_K4),
                "block2-k4-naive-eager": ("eager", {**BLOCK2_K4, "mla_absorb": False}),
                "converge": ("sdpa", CONVERGE), "converge-eager": ("eager", CONVERGE)}


@pytest.mark.parametrize("attn, overrides", DECODE_CASES.values(), ids=DECODE_CASES)
@pytest.mark.parametrize("prefill", [1, 6])
def test_cached_decode_equals_full_forward_with_left_padding(attn, overrides, prefill, monkeypatch):
    model = build("looped", attn, **overrides)
    skipped = []  # forwards where every token stopped early: their skipped virtual layers are filled by copies
    fill = LoopedModel._fill_skipped
    monkeypatch.setattr(LoopedModel, "_fill_skipped",
                        lambda self, cache, last, t: (skipped.append(last) if cache is not None else None,
                                                      fill(self, cache, last, t)))
    ids, mask, positions = left_padded_batch()
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=positions, use_cache=False)
    cached = decode_step_by_step(model, ids, mask, positions, prefill)
    real = mask.bool()
    assert (full.logits - cached)[real].abs().max() <= 1e-5
    if overrides is CONVERGE:  # the case this guards: some tokens stopped early, whole decode steps too
        assert set(full.loop_iterations[real].tolist()) == {3.0, 4.0}
        assert skipped


def test_a_cache_built_from_the_config_grows_a_layer_per_virtual_layer():
    """generate() and the rollout build DynamicCache(config=...) / GrowingCache(config=...): one layer per
    physical layer. The model appends the rest."""
    model = build("looped", **BLOCK2_K4)
    ids, mask, positions = left_padded_batch()
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=positions).logits
        for cache in (DynamicCache(config=model.config), models.GrowingCache(config=model.config)):
            out = model(ids[:, :6], attention_mask=mask[:, :6], position_ids=positions[:, :6], past_key_values=cache)
            step = model(ids[:, 6:], attention_mask=mask, position_ids=positions[:, 6:], past_key_values=cache)
            assert len(cache.layers) == model.config.num_virtual_layers
            assert (torch.cat([out.logits, step.logits], 1) - full)[mask.bool()].abs().max() <= 1e-5
        with pytest.raises(ValueError, match="static caches are not supported"):
            model(ids, past_key_values=StaticCache(config=model.config, max_cache_len=16))


def test_converge_stops_the_tokens_that_barely_change():
    model = build("looped", loop_halting="converge", loop_tolerance=1e-2, **BLOCK2_K4)
    ids = torch.randint(1, VOCAB, (1, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model(inputs_embeds=scaled_embeddings(model, ids, [0, 4, 7]))
    # Scaled tokens change by ~1e-3 of their size: they stop after one iteration; the others change by > 0.3.
    expected = torch.full((1, 10), 4.0)
    expected[0, [0, 4, 7]] = 1.0
    assert torch.equal(out.loop_iterations, expected)
    assert (out.loop_changes[0, [0, 4, 7], 0] < 1e-2).all() and (out.loop_changes[0, [1, 2, 3, 5, 6, 8, 9]] > 0.3).all()
    # Every token scaled: the loop ends after one iteration, and the cache still has every virtual layer, the
    # skipped ones holding copies of the first iteration's entries (a frozen token stores the same at each).
    calls = layer_calls(model)
    with torch.no_grad():
        out = model(inputs_embeds=scaled_embeddings(model, ids, list(range(10))), use_cache=True)
    assert calls == {0: 1, 1: 1, 2: 1, 3: 1} and torch.equal(out.loop_iterations, torch.ones(1, 10))
    cache, config = out.past_key_values, model.config
    for layer in (1, 2):
        first = cache.layers[config.virtual_index(layer, 0)]
        for k in range(1, 4):
            assert torch.equal(cache.layers[config.virtual_index(layer, k)].keys, first.keys)


def test_converge_with_frozen_tokens_decodes_exactly_from_embeddings():
    """Scaled tokens stop after one iteration, before and during decoding (a decode step of one scaled token ends
    the loop at once); the tokens after them read their frozen entries."""
    model = build("looped", loop_halting="converge", loop_tolerance=1e-2, **BLOCK2_K4)
    ids = torch.randint(1, VOCAB, (1, 10), generator=torch.Generator().manual_seed(4))
    embeds = scaled_embeddings(model, ids, [1, 3, 6, 7])
    with torch.no_grad():
        full = model(inputs_embeds=embeds).logits
        out = model(inputs_embeds=embeds[:, :4], use_cache=True)
        steps = [out.logits]
        for t in range(4, 10):
            out = model(inputs_embeds=embeds[:, t: t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-5


def test_converge_with_zero_tolerance_is_the_fixed_loop():
    fixed = build("looped", **BLOCK2_K4)
    converge = build("looped", loop_halting="converge", loop_tolerance=0.0, **BLOCK2_K4)
    ids, mask, positions = left_padded_batch()
    with torch.no_grad():
        a = fixed(ids, attention_mask=mask, position_ids=positions)
        b = converge(ids, attention_mask=mask, position_ids=positions)
    real = mask.bool()
    assert torch.equal(a.logits[real], b.logits[real])
    assert torch.equal(a.loop_iterations, b.loop_iterations)


@pytest.mark.parametrize("overrides", [{}, CONVERGE], ids=["fixed", "converge"])
def test_every_parameter_receives_a_gradient(overrides):
    model = build("looped", **overrides).train()
    ids, mask, positions = left_padded_batch()
    model(ids, attention_mask=mask, position_ids=positions, labels=ids, use_cache=False).loss.backward()
    assert not [name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]


@pytest.mark.parametrize("overrides", [{}, CONVERGE], ids=["fixed", "converge"])
def test_save_load_round_trip_through_auto_classes(overrides, tmp_path):
    model = build("looped", **overrides)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    config = AutoConfig.from_pretrained(tmp_path)
    fields = ("loop_start", "loop_end", "loop_iterations", "loop_halting", "loop_tolerance", "use_lru")
    assert type(config) is LoopedConfig and all(getattr(config, f) == getattr(model.config, f) for f in fields)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    backbone = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is LoopedForCausalLM and type(backbone) is LoopedModel
    ids, mask, positions = left_padded_batch()
    inputs = dict(attention_mask=mask, position_ids=positions)
    with torch.no_grad():
        # Loaded weights sit at other memory alignments, so CPU kernels may round differently: close, not equal.
        close = dict(rtol=0, atol=1e-6)
        torch.testing.assert_close(loaded(ids, **inputs).logits, model(ids, **inputs).logits, **close)
        torch.testing.assert_close(backbone(ids, **inputs).last_hidden_state,
                                   model.model(ids, **inputs).last_hidden_state, **close)


@pytest.mark.parametrize("overrides", [{}, CONVERGE], ids=["fixed", "converge"])
def test_greedy_generate_equals_argmax_of_full_forward(overrides):
    model = build("looped", **overrides)
    ids, mask, _ = left_padded_batch(seed=4, t=6)
    with torch.no_grad():
        generated = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        seq, seq_mask = ids, mask
        for _ in range(6):  # the same greedy decode with no cache at all
            nxt = model(seq, attention_mask=seq_mask, position_ids=position_ids_from_mask(seq_mask),
                        use_cache=False).logits[:, -1].argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            seq_mask = torch.cat([seq_mask, torch.ones_like(nxt[:, None])], dim=1)
    assert torch.equal(generated, seq)
    with pytest.raises(ValueError, match="cache_implementation='static'"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, cache_implementation="static", pad_token_id=0)


def test_hidden_states_and_attentions_come_once_per_virtual_layer():
    model = build("looped", "eager", **BLOCK2_K4)
    with torch.no_grad():
        out = model(torch.randint(1, VOCAB, (2, 5)), output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == model.config.num_virtual_layers + 1 == 11
    assert len(out.attentions) == 10 and out.attentions[0].shape == (2, 4, 5, 5)


@pytest.mark.parametrize("overrides, message", [
    (dict(loop_start=2, loop_end=2), r"loop_start=2, loop_end=2: the looped block must be"),
    (dict(loop_end=5), r"loop_end=5: the looped block must be 0 <= loop_start < loop_end <= num_hidden_layers=4"),
    (dict(loop_iterations=0), r"loop_iterations=0: must be >= 1"),
    (dict(loop_halting="sometimes"), r"loop_halting='sometimes': valid modes are \['fixed', 'converge'\]"),
    (dict(loop_tolerance=-0.1), r"loop_tolerance=-0.1"),
    (dict(use_lru=True), r"use_lru=True: the looped control has no LRU"),
])
def test_bad_config_names_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        models.tiny_config("looped", **overrides)


def test_registered_with_auto_classes():
    assert isinstance(AutoConfig.for_model("looped_mla"), LoopedConfig)
    assert isinstance(AutoModelForCausalLM.from_config(models.tiny_config("looped")), LoopedForCausalLM)
