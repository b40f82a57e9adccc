"""CUDA-only checks; skipped cleanly without a GPU. Cached decode on the GPU (sdpa, and flash-attn when
installed) must equal the full forward as it does on the CPU."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM

import models
from models import LatentCache

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

IMPLEMENTATIONS = ["sdpa", "eager"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])


@pytest.mark.parametrize("attn", IMPLEMENTATIONS)
@pytest.mark.parametrize("group", models.GROUPS)
def test_cached_decode_equals_full_forward_on_cuda(group, attn):
    dtype = torch.bfloat16 if attn.startswith("flash") else torch.float32
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(models.tiny_config(group), attn_implementation=attn,
                                             dtype=dtype).cuda().eval()
    ids = torch.randint(1, 128, (2, 16), device="cuda")
    with torch.no_grad():
        full = model(ids, use_cache=False).logits.float()
        cache = LatentCache(config=model.config) if group != "baseline" else None
        out = model(ids[:, :8], past_key_values=cache, use_cache=True)
        steps = [out.logits]
        for t in range(8, 16):
            out = model(ids[:, t: t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    tolerance = 5e-2 if dtype == torch.bfloat16 else 1e-3
    assert (full - torch.cat(steps, 1).float()).abs().max() <= tolerance
