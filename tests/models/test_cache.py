"""models/cache.py: every Cache method transformers calls keeps the LRU state exact, or refuses.

The reference is always a fresh run: decoding after a cache operation must give the logits of the same
tokens run from scratch (fp32, <= 1e-5; the differences are rounding, ~1e-7). The LRU weights are
strengthened (``strengthen_lru``) so that a state carried wrongly would show far above that.
"""

from __future__ import annotations

import pytest
import torch

from models import LatentCache
from models.cache import GrowingLayer
from tests.models.helpers import MLA_IDS, MLA_VARIANTS, VOCAB, build, left_padded_batch, strengthen_lru

TOL = 1e-5


def model_of(group: str, overrides: dict):
    return strengthen_lru(build(group, **overrides))


@torch.no_grad()
def fresh_logits(model, ids, mask):
    """Logits of the last token of each row, with no cache at all. (B, V)"""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return model(ids, attention_mask=mask, position_ids=positions, use_cache=False).logits[:, -1]


@torch.no_grad()
def step(model, cache, ids, mask, new: int):
    """Feed the last ``new`` tokens of ``ids`` (B, S) through ``cache``. -> logits of the last one (B, V)"""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return model(ids[:, -new:], attention_mask=mask, position_ids=positions[:, -new:], past_key_values=cache,
                 use_cache=True).logits[:, -1]


@pytest.mark.parametrize("group, overrides", MLA_VARIANTS, ids=MLA_IDS)
def test_crop_puts_the_lru_state_back_exactly(group, overrides):
    # What assisted decoding does: feed drafts (here in calls of 3, 1 and 1 tokens, as the main model and an
    # assistant feed them), reject some, crop, continue. 4 rejected tokens span the three calls.
    model = model_of(group, overrides)
    ids, mask, _ = left_padded_batch(seed=1, t=11)
    cache = LatentCache(config=model.config)
    step(model, cache, ids[:, :5], mask[:, :5], new=5)
    cache.activate_past_recording()
    for end, new in ((8, 3), (9, 1), (10, 1)):
        step(model, cache, ids[:, :end], mask[:, :end], new)
    cache.crop(-4)  # keep 6 tokens
    assert cache.get_seq_length() == 6
    accepted = torch.cat([ids[:, :6], ids[:, 10:11]], dim=1)  # then a token other than the rejected ones
    got = step(model, cache, accepted, mask[:, :7], new=1)
    assert (got - fresh_logits(model, accepted, mask[:, :7])).abs().max() <= TOL
    # crop(0) keeps everything (and drops the trails: only what follows can be undone now).
    cache.crop(0)
    more = torch.cat([accepted, ids[:, 3:5]], dim=1)
    step(model, cache, more, mask[:, :9], new=2)
    cache.crop(-1)
    got = step(model, cache, more[:, :9], mask[:, :9], new=1)  # the token cropped, fed again
    assert (got - fresh_logits(model, more, mask[:, :9])).abs().max() <= TOL


@pytest.mark.parametrize("group, overrides", MLA_VARIANTS[1:], ids=MLA_IDS[1:])
def test_a_crop_that_was_not_recorded_is_refused(group, overrides):
    model = build(group, **overrides)
    ids = torch.randint(1, VOCAB, (1, 6))
    cache = LatentCache(config=model.config)
    step(model, cache, ids, torch.ones_like(ids), new=6)
    assert not cache.is_croppable
    with pytest.raises(ValueError, match="not recorded.*activate_past_recording"):
        cache.crop(-1)
    cache.activate_past_recording()
    assert cache.is_croppable
    step(model, cache, torch.cat([ids, ids[:, :2]], 1), torch.ones(1, 8, dtype=torch.long), new=2)
    with pytest.raises(ValueError, match="before the last 3 tokens was not recorded \\(2 tokens"):
        cache.crop(-3)


def test_mla_only_crops_without_recording():
    model = build("mla_only")
    ids = torch.randint(1, VOCAB, (1, 6))
    cache = LatentCache(config=model.config)
    step(model, cache, ids, torch.ones_like(ids), new=6)
    assert cache.is_croppable
    cache.crop(-2)
    got = step(model, cache, ids[:, :5], torch.ones(1, 5, dtype=torch.long), new=1)
    assert (got - fresh_logits(model, ids[:, :5], torch.ones(1, 5, dtype=torch.long))).abs().max() <= TOL


# How each row operation maps old rows to new ones, as transformers' generation code uses it.
ROW_OPERATIONS = {
    "reorder_cache": (lambda cache: cache.reorder_cache(torch.tensor([2, 0, 0])), [2, 0, 0]),  # beam search
    "batch_select_indices": (lambda cache: cache.batch_select_indices(torch.tensor([2, 1])), [2, 1]),
    "batch_select_mask": (lambda cache: cache.batch_select_indices(torch.tensor([True, False, True])), [0, 2]),
    "batch_repeat_interleave": (lambda cache: cache.batch_repeat_interleave(2), [0, 0, 1, 1, 2, 2]),
}


@pytest.mark.parametrize("operation", list(ROW_OPERATIONS))
@pytest.mark.parametrize("group, overrides", MLA_VARIANTS, ids=MLA_IDS)
def test_row_operations_move_the_lru_state_with_its_rows(group, overrides, operation):
    model = model_of(group, overrides)
    ids, mask, _ = left_padded_batch(seed=2, t=9)
    cache = LatentCache(config=model.config)
    step(model, cache, ids[:, :7], mask[:, :7], new=7)
    apply, rows = ROW_OPERATIONS[operation]
    apply(cache)
    ids, mask = ids[rows], mask[rows]
    step(model, cache, ids[:, :8], mask[:, :8], new=1)
    got = step(model, cache, ids, mask, new=1)
    assert (got - fresh_logits(model, ids, mask)).abs().max() <= TOL


@pytest.mark.parametrize("group, overrides", MLA_VARIANTS[1:], ids=MLA_IDS[1:])
def test_rows_and_crop_together(group, overrides):
    # Rows selected while recording: the trails follow the rows too.
    model = model_of(group, overrides)
    ids, mask, _ = left_padded_batch(seed=3, t=9)
    cache = LatentCache(config=model.config)
    cache.activate_past_recording()
    step(model, cache, ids[:, :8], mask[:, :8], new=8)
    cache.batch_select_indices(torch.tensor([2, 0]))
    cache.crop(-2)
    ids, mask = torch.cat([ids[[2, 0], :6], ids[[2, 0], 8:9]], 1), mask[[2, 0], :7]
    got = step(model, cache, ids, mask, new=1)
    assert (got - fresh_logits(model, ids, mask)).abs().max() <= TOL


@pytest.mark.parametrize("group, overrides", MLA_VARIANTS[1:], ids=MLA_IDS[1:])
def test_reset_forgets_the_lru_state(group, overrides):
    model = model_of(group, overrides)
    a, b = torch.randint(1, VOCAB, (2, 1, 6))
    cache = LatentCache(config=model.config)
    step(model, cache, a, torch.ones_like(a), new=6)
    cache.reset()
    assert cache.get_seq_length() == 0 and not cache.lru_states
    assert torch.equal(step(model, cache, b, torch.ones_like(b), new=6), fresh_logits(model, b, torch.ones_like(b)))


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
