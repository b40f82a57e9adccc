"""The PPO critic: a value per token for our model and the Qwen2 baseline; gradients; save/load."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import models
from models import ValueHeadModel


@pytest.mark.parametrize("group", models.GROUPS)
def test_values_per_token_gradients_and_round_trip(group, tmp_path):
    torch.manual_seed(0)
    config = models.tiny_config(group)
    critic = ValueHeadModel(AutoModelForCausalLM.from_config(config))
    ids = torch.randint(1, 128, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    out = critic(ids, attention_mask=mask)
    values, aux = out.values, out.aux_loss
    assert values.shape == (2, 9)
    assert (aux is None) == (not getattr(config, "use_lru", False))  # an aux loss exactly when there is an LRU
    (values[mask.bool()].sum() + (aux if aux is not None else 0)).backward()
    assert critic.v_head.weight.grad.abs().sum() > 0
    assert critic.lm.lm_head.weight.grad is not None  # tied to the embeddings, which the backbone uses
    critic.save_pretrained(tmp_path)
    loaded = ValueHeadModel.from_pretrained(tmp_path)
    saved, restored = critic.state_dict(), loaded.state_dict()
    assert saved.keys() == restored.keys() and all(torch.equal(saved[k], restored[k]) for k in saved)  # bit-exact
    with torch.no_grad():
        # Equal weights, but the loaded ones sit at other memory alignments (safetensors), so the CPU kernels may
        # split a reduction differently: outputs agree to float rounding (1.5e-8 seen), not bit for bit.
        torch.testing.assert_close(loaded(ids, attention_mask=mask).values, critic(ids, attention_mask=mask).values,
                                   rtol=0, atol=1e-6)


def test_fresh_head_when_only_an_lm_checkpoint_exists(tmp_path):
    AutoModelForCausalLM.from_config(models.tiny_config("mla_only")).save_pretrained(tmp_path)
    critic = ValueHeadModel.from_pretrained(tmp_path)
    assert critic(torch.randint(1, 128, (1, 5))).values.shape == (1, 5)
