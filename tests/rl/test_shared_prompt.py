"""Prefix sharing in the trainer's forward: running each distinct prompt once gives the full forward's
logprobs, LRU aux loss and gradients, for every group, with rows in any order."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2ForCausalLM

import models
from models import ValueHeadModel, position_ids_from_mask
from rl.core import logprobs_from_logits
from rl.rollout import SamplingParams, TorchRolloutEngine
from rl.shared_prompt import group_ordered_permutation, response_outputs

PROMPTS = [[5, 9, 13, 2, 8], [7, 7], [3, 4, 5, 6], [11]]


def rows(model, n=3):
    """Sampled responses of different lengths to left-padded prompts of different lengths, rows shuffled."""
    batch = TorchRolloutEngine(model, pad_token_id=0).generate(
        PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=6, n=n, stop_token_ids=(1, 2, 3)), seeds=[0, 1, 2, 3])
    order = torch.randperm(len(batch.prompt_index), generator=torch.Generator().manual_seed(0))
    ids = torch.cat([batch.prompt_ids, batch.response_ids], 1)[order]
    mask = torch.cat([batch.prompt_mask, batch.response_mask], 1)[order]
    return ids, mask, batch.response_ids.shape[1], batch.prompt_index[order]


def policy_terms(model, ids, mask, r, prompt_index):
    out = response_outputs(model, model.config, ids, mask, r, prompt_index)
    logprobs = logprobs_from_logits(out.outputs, ids[:, -r:]) * mask[:, -r:]
    return logprobs, out


@pytest.mark.parametrize("group", models.GROUPS)
def test_shared_prompt_forward_equals_the_full_forward_and_its_gradients(group):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(models.tiny_config(group)).eval()
    ids, mask, r, prompt_index = rows(model)
    results = {}
    for name, index in (("full", None), ("shared", prompt_index)):
        model.zero_grad()
        logprobs, states = policy_terms(model, ids, mask, r, index)
        loss = logprobs.sum() + (states.aux_loss if states.aux_loss is not None else 0.0)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[name] = (logprobs.detach(), states, grads)
    (full, full_states, full_grads), (shared, shared_states, shared_grads) = results["full"], results["shared"]
    assert (full - shared).abs().max() <= 1e-5
    assert full_grads.keys() == shared_grads.keys()
    for name, grad in full_grads.items():  # per tensor: some (a key bias) are float noise around an exact 0
        assert (grad - shared_grads[name]).abs().max() <= 1e-4 * grad.abs().max() + 1e-9, name
    if model.config.model_type != "qwen2" and model.config.use_lru:
        positions = position_ids_from_mask(mask)
        own = model(ids, attention_mask=mask, position_ids=positions).aux_loss  # the model's own aux loss
        assert torch.allclose(full_states.aux_loss, own, rtol=1e-6)
        assert torch.allclose(full_states.aux_loss, shared_states.aux_loss, rtol=1e-5)
        for name, value in full_states.lru_stats.items():
            assert torch.allclose(value, shared_states.lru_stats[name], rtol=1e-5, atol=1e-6), name


def test_shared_prompt_values_equal_the_full_forward():
    torch.manual_seed(0)
    critic = ValueHeadModel(AutoModelForCausalLM.from_config(models.tiny_config("mla_lru_fixed"))).eval()
    ids, mask, r, prompt_index = rows(critic.lm)
    full, shared = (response_outputs(critic, critic.lm.config, ids, mask, r, index).outputs
                    for index in (None, prompt_index))
    assert (full - shared).abs().max() <= 1e-5
    own = critic(ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).values[:, -r - 1: -1]
    assert torch.equal(full, own)  # the critic's own forward: one way to compute values


class SoftCappedQwen2(Qwen2ForCausalLM):
    """A causal LM whose forward post-processes its logits (as Gemma 2's soft-capping does)."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = 3.0 * torch.tanh(out.logits / 3.0)
        return out


def test_logits_come_from_the_models_own_forward():
    torch.manual_seed(0)
    model = SoftCappedQwen2(models.tiny_config("baseline")).eval()
    ids, mask, r, prompt_index = rows(model)
    expected = model(ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits[:, -r - 1: -1]
    for index in (None, prompt_index):
        logits = response_outputs(model, model.config, ids, mask, r, index).outputs
        assert (logits - expected).abs().max() <= 1e-5


def test_rows_that_claim_one_prompt_but_differ_are_refused():
    model = AutoModelForCausalLM.from_config(models.tiny_config("mla_only"))
    ids, mask, r, prompt_index = rows(model)
    with pytest.raises(ValueError, match="different prompt tokens"):
        response_outputs(model, model.config, ids, mask, r, torch.zeros_like(prompt_index))


def test_group_ordered_permutation_shuffles_whole_groups():
    prompt_index = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]).flip(0)
    order = group_ordered_permutation(prompt_index, torch.Generator().manual_seed(3))
    assert sorted(order.tolist()) == list(range(8))
    groups = prompt_index[order].tolist()
    assert all(groups[i] == groups[i + 1] for i in range(0, 8, 2))
    orders = {tuple(group_ordered_permutation(prompt_index, torch.Generator().manual_seed(s)).tolist())
              for s in range(10)}
    assert len(orders) > 1
