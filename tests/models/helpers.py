"""Builders shared by the model tests: tiny models, a left-padded batch, step-by-step decoding."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

import models
from models import LatentCache, LatentReasoningForCausalLM, position_ids_from_mask

VOCAB = 128
# The three MLA groups, and the adaptive one with its per-sequence (global) halting signal.
MLA_VARIANTS = [("mla_only", {}), ("mla_lru_fixed", {}), ("mla_lru_adaptive", {}),
                ("mla_lru_adaptive", {"lru_global_halting": 0.5})]
MLA_IDS = ["mla_only", "mla_lru_fixed", "mla_lru_adaptive", "mla_lru_adaptive-global"]


def build(group: str, attn: str = "sdpa", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(models.tiny_config(group, **overrides), attn_implementation=attn).eval()


def strengthen_lru(model, seed: int = 0):
    """Redraw every LRU weight larger than its near-identity initialisation, so that an LRU state carried
    wrongly (from another sequence, or a rejected token) shows in the logits far above rounding."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lru." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


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
