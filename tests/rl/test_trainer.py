"""The PPO trainer: rewards and advantages laid out right, learning on a one-token bandit, micro-batch
invariance of a whole update, non-finite steps skipped and counted, warm-up."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import models
from models import ValueHeadModel, position_ids_from_mask
from rl.rollout import SamplingParams, TorchRolloutEngine, left_pad
from rl.trainer import NonFiniteError, PPOSettings, PPOTrainer

PROMPTS = [[5, 9, 13], [7, 7], [3, 4, 5, 6], [11]]
REWARDED = 16  # the bandit rewards responses whose first token is below this (1/8 of the vocabulary)


def policy(group: str = "mla_lru_adaptive", seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(models.tiny_config(group))


def trainer_for(model, advantage="gae", **settings) -> PPOTrainer:
    critic = ValueHeadModel(copy.deepcopy(model)) if advantage == "gae" else None
    return PPOTrainer(model, copy.deepcopy(model), critic, PPOSettings(advantage=advantage, **settings))


def rollout(model, n=4, seed=0, max_new_tokens=3):
    engine = TorchRolloutEngine(model, pad_token_id=0)
    return engine.generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens, n=n),
                           seeds=[seed + i for i in range(len(PROMPTS))])


def test_prepare_places_the_score_on_the_last_token_and_old_logprobs_match_the_rollout():
    model = policy()
    trainer = trainer_for(model, kl_coef=0.1, kl_in_reward=True)
    batch = rollout(model)
    scores = torch.arange(batch.response_ids.shape[0], dtype=torch.float)
    exp = trainer.prepare(batch, scores)
    model.train(False)
    assert (exp.old_logprobs - batch.logprobs).abs().max() <= 1e-4
    # The reference starts as the policy: KL 0, up to rounding (a copy's weights sit at other addresses, which
    # can change the CPU kernels' summation order).
    assert (exp.old_logprobs - exp.ref_logprobs).abs().max() <= 1e-5
    last = batch.response_mask.sum(1) - 1
    assert torch.allclose(exp.rewards.gather(1, last[:, None]).squeeze(1), scores, atol=1e-6)
    assert exp.rewards.sum() == pytest.approx(scores.sum().item(), abs=1e-4)


def test_on_policy_shortcuts_skip_the_extra_forwards():
    model = policy("mla_only")
    trainer = trainer_for(model, advantage="grpo", kl_coef=0.0, old_logprobs_from_rollout=True)

    def refuse(*args, **kwargs):
        raise AssertionError("no forward of the reference without a KL term")

    trainer.reference.forward = refuse
    batch = rollout(model)
    exp = trainer.prepare(batch, torch.rand(batch.response_ids.shape[0]))
    assert torch.equal(exp.old_logprobs, batch.logprobs * batch.response_mask)
    assert "kl_ref" not in trainer.update(exp)


def test_grpo_advantages_are_group_normalised_scores():
    model = policy()
    trainer = trainer_for(model, advantage="grpo")
    batch = rollout(model, n=4)
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0] * len(PROMPTS))
    exp = trainer.prepare(batch, scores)
    first = exp.advantages[:, 0]
    assert first[:4].tolist() == pytest.approx([0.866, -0.866, -0.866, 0.866], abs=1e-3)


@pytest.mark.parametrize("advantage", ["gae", "grpo"])
def test_ppo_raises_the_reward_on_a_one_token_bandit(advantage):
    model = policy("mla_lru_adaptive")
    trainer = trainer_for(model, advantage=advantage, lr=3e-3, critic_lr=3e-3, minibatch_size=16,
                          micro_batch_size=8, epochs=2, entropy_coef=0.0)

    ids, mask = left_pad(PROMPTS, 0)

    def probability_of_target() -> float:
        with torch.no_grad():
            logits = model(ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits[:, -1]
        return torch.softmax(logits, -1)[:, :REWARDED].sum(-1).mean().item()

    before = probability_of_target()
    generator = torch.Generator().manual_seed(0)
    for step in range(15):
        batch = rollout(model, n=8, seed=100 * step, max_new_tokens=1)
        scores = (batch.response_ids[:, 0] < REWARDED).float()
        model.train()
        trainer.update(trainer.prepare(batch, scores), generator=generator)
    after = probability_of_target()
    assert after > before + 0.3, (before, after)


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_one_update_does_not_depend_on_micro_batch_size():
    # agg_loss's invariant, through the whole trainer: 16 rows as 1 x 16 or 4 x 4 micro-batches give the
    # same accumulated gradient (compared before AdamW, whose normalisation would amplify float noise).
    gradients = []
    for micro in (16, 4):
        model = policy("mla_lru_adaptive", seed=3)
        trainer = trainer_for(model, lr=1e-3, critic_lr=1e-3, minibatch_size=16, micro_batch_size=micro,
                              agg="seq-mean-token-mean")
        batch = rollout(model, n=4, seed=7)
        exp = trainer.prepare(batch, torch.rand(16, generator=torch.Generator().manual_seed(1)))
        model.train()
        step = trainer.optimizer.step
        captured = []

        def capture(*args, step=step, captured=captured, model=model, **kwargs):
            captured.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
            return step(*args, **kwargs)

        trainer.optimizer.step = capture
        trainer.update(exp, generator=torch.Generator().manual_seed(0))
        gradients.append(captured[0])
    assert torch.allclose(gradients[0], gradients[1], rtol=1e-4, atol=1e-7)


def test_non_finite_updates_are_skipped_counted_and_stop_the_run():
    model = policy("mla_only")
    trainer = trainer_for(model, advantage="grpo", max_bad_steps=2, minibatch_size=16)
    batch = rollout(model, n=4)
    exp = trainer.prepare(batch, torch.rand(16))
    before = [p.detach().clone() for p in model.parameters()]
    exp.advantages[0, 0] = float("nan")
    metrics = trainer.update(exp)
    assert metrics["skipped_steps"] == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    with pytest.raises(NonFiniteError, match="2 updates in a row"):
        trainer.update(exp)


def test_warmup_raises_the_learning_rate_linearly():
    model = policy("mla_only")
    trainer = trainer_for(model, advantage="grpo", lr=1.0, warmup_steps=4, minibatch_size=4)
    exp = trainer.prepare(rollout(model, n=1), torch.rand(4))
    lrs = [trainer.update(exp)["lr"] for _ in range(5)]
    assert lrs == pytest.approx([0.5, 0.75, 1.0, 1.0, 1.0])
    state = trainer.state_dict()
    fresh = trainer_for(model, advantage="grpo", lr=1.0, warmup_steps=4, minibatch_size=4)
    fresh.load_state_dict(state)
    assert fresh.scheduler.get_last_lr() == trainer.scheduler.get_last_lr()


def test_gae_needs_a_critic():
    model = policy("mla_only")
    with pytest.raises(ValueError, match="needs a critic"):
        PPOTrainer(model, copy.deepcopy(model), None, PPOSettings(advantage="gae"))
