"""The PPO trainer: rewards and advantages laid out right (KL in the GRPO score), learning on a one-token bandit,
micro-batch invariance of a whole update (the critic's LRU aux loss included), actor and critic clipped each to
its own norm, non-finite steps skipped and counted, warm-up, how many optimizer steps a PPO step takes."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import models
from models import ValueHeadModel, position_ids_from_mask
from rl import core
from rl.config import load_config
from rl.rollout import SamplingParams, TorchRolloutEngine, left_pad
from rl.trainer import NonFiniteError, PPOSettings, PPOTrainer

PROMPTS = [[5, 9, 13], [7, 7], [3, 4, 5, 6], [11]]
PRESET = Path(__file__).parents[2] / "rl" / "presets" / "tiny.yaml"
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


def test_resuming_with_another_learning_rate_warns(capsys):
    model = policy("mla_only")
    state = trainer_for(model, advantage="grpo", lr=1e-4).state_dict()
    trainer_for(model, advantage="grpo", lr=1e-4).load_state_dict(state)
    assert "warning" not in capsys.readouterr().err
    other = trainer_for(model, advantage="grpo", lr=3e-5)
    other.load_state_dict(state)
    assert "trainer.lr=3e-05, but the checkpoint's optimiser was built with lr=0.0001" in capsys.readouterr().err
    assert other.scheduler.get_last_lr() == [1e-4]  # torch's restore: the checkpoint's rate continues


def test_gae_needs_a_critic():
    model = policy("mla_only")
    with pytest.raises(ValueError, match="needs a critic"):
        PPOTrainer(model, copy.deepcopy(model), None, PPOSettings(advantage="gae"))


def capture_step(optimizer, module) -> list[torch.Tensor]:
    """Record ``module``'s flattened gradient each time ``optimizer`` steps (after clipping, before the step)."""
    step, captured = optimizer.step, []

    def capture(*args, **kwargs):
        captured.append(torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None]))
        return step(*args, **kwargs)

    optimizer.step = capture
    return captured


def critic_reference_gradient(critic, exp, value_clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """d/dθ of the whole minibatch's clipped value loss + the critic's own LRU aux loss, in one plain forward."""
    critic = copy.deepcopy(critic)
    r = exp.response_mask.shape[1]
    mask = exp.attention_mask
    out = critic(exp.input_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))
    loss = core.value_loss(out.values[:, -r - 1: -1], exp.values, exp.returns, exp.response_mask, value_clip)[0]
    (loss + out.aux_loss).backward()
    return torch.cat([p.grad.flatten() for p in critic.parameters() if p.grad is not None]), out.aux_loss.detach()


def test_the_critic_gets_its_lru_aux_loss_whatever_the_micro_batches():
    # The critic's backbone is an LRU model: its gradient is that of the value loss plus its own aux loss,
    # the same for 1 x 16 and 4 x 4 micro-batches (unclipped, compared before AdamW).
    for micro in (16, 4):
        model = policy("mla_lru_adaptive", seed=3)
        trainer = trainer_for(model, minibatch_size=16, micro_batch_size=micro, max_grad_norm=1e9)
        exp = trainer.prepare(rollout(model, n=4, seed=7), torch.rand(16, generator=torch.Generator().manual_seed(1)))
        expected, aux = critic_reference_gradient(trainer.critic, exp, trainer.s.value_clip)
        captured = capture_step(trainer.critic_optimizer, trainer.critic)
        metrics = trainer.update(exp, generator=torch.Generator().manual_seed(0))
        assert len(captured) == 1 and torch.allclose(captured[0], expected, rtol=1e-4, atol=1e-7), micro
        assert metrics["critic_lru_aux_loss"] == pytest.approx(aux.item(), rel=0.05)  # a mean of micro-batch means


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_actor_and_critic_gradients_are_clipped_each_to_its_own_norm():
    # Scores of ~1000 give the critic a gradient far above max_grad_norm; the policy's (whitened advantages)
    # is ordinary. Clipped together, the critic's norm would shrink the policy's step.
    model = policy("mla_only")
    trainer = trainer_for(model, minibatch_size=16, max_grad_norm=1.0)
    exp = trainer.prepare(rollout(model, n=4), 1000 * torch.rand(16, generator=torch.Generator().manual_seed(0)))
    actor, critic = capture_step(trainer.optimizer, model), capture_step(trainer.critic_optimizer, trainer.critic)
    metrics = trainer.update(exp)
    assert metrics["critic_grad_norm"] > 100
    assert actor[0].norm().item() == pytest.approx(min(metrics["grad_norm"], 1.0), rel=1e-4)
    assert critic[0].norm().item() == pytest.approx(1.0, rel=1e-4)


def test_a_non_finite_critic_gradient_skips_the_whole_step():
    model = policy("mla_only")
    trainer = trainer_for(model, minibatch_size=16)
    exp = trainer.prepare(rollout(model, n=4), torch.rand(16))
    trainer.critic.v_head.weight.register_hook(lambda grad: grad * float("inf"))
    before = [p.detach().clone() for p in [*model.parameters(), *trainer.critic.parameters()]]
    metrics = trainer.update(exp)
    assert math.isfinite(metrics["grad_norm"]) and not math.isfinite(metrics["critic_grad_norm"])
    assert metrics["skipped_steps"] == 1 and metrics["updates_per_step"] == 0
    after = [*model.parameters(), *trainer.critic.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_grpo_with_kl_in_the_reward_normalises_the_score_minus_the_sequence_kl():
    # verl's GRPO with use_kl_in_reward: the outcome score is sum_t (score_t - beta * KL_t).
    model = policy("mla_only")
    trainer = trainer_for(model, advantage="grpo", kl_coef=0.5, kl_in_reward=True)
    with torch.no_grad():  # a reference that differs from the policy: a KL that is not 0
        for p in trainer.reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = rollout(model, n=4)
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0] * len(PROMPTS))
    exp = trainer.prepare(batch, scores)
    kl = core.kl_penalty(exp.old_logprobs, exp.ref_logprobs, "k3") * exp.response_mask
    assert kl.sum() > 0.01
    expected = core.grpo_advantages(scores - 0.5 * kl.sum(1), batch.prompt_index, exp.response_mask)
    assert torch.allclose(exp.advantages, expected, atol=1e-6)
    assert not torch.allclose(exp.advantages, core.grpo_advantages(scores, batch.prompt_index, exp.response_mask))
    assert torch.allclose(exp.rewards.sum(1), scores - 0.5 * kl.sum(1), atol=1e-5)  # the token rewards agree


def test_updates_per_step_say_when_ppo_is_a_single_on_policy_update():
    assert PPOSettings(minibatch_size=256).updates_per_step(256) == 1
    assert PPOSettings(minibatch_size=256).is_on_policy_single_update(256)
    assert PPOSettings(minibatch_size=64).updates_per_step(256) == 4  # 4 minibatches
    assert PPOSettings(minibatch_size=256, epochs=2).updates_per_step(256) == 2
    assert PPOSettings(minibatch_size=100, epochs=2).updates_per_step(256) == 6  # 100 + 100 + 56, twice
    assert not PPOSettings(minibatch_size=64).is_on_policy_single_update(256)
    model = policy("mla_only")
    batch = rollout(model, n=4)
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0] * len(PROMPTS))
    for minibatch in (16, 4):
        trainer = trainer_for(copy.deepcopy(model), advantage="grpo", kl_coef=0.0, old_logprobs_from_rollout=True,
                              minibatch_size=minibatch, micro_batch_size=4)
        metrics = trainer.update(trainer.prepare(batch, scores))
        assert metrics["updates_per_step"] == trainer.s.updates_per_step(16) == 16 // minibatch
        if minibatch == 16:  # the one step starts from the sampling policy: ratio 1, nothing clipped
            assert metrics["clipfrac"] == 0.0 and metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-4)


@pytest.mark.slow
def test_four_minibatches_make_the_tiny_defaults_update_clip():
    # The tiny default (32 prompts x 8 samples, one minibatch of 256, one epoch) takes one on-policy step:
    # clipfrac 0. trainer.minibatch_size=64 makes it 4 steps on the same batch, and the later ones clip.
    # Its model, tokenizer, prompts and response length; the model is untrained (no warm start); ~10 s idle.
    from data.tokenizer import build_tokenizer
    from rl.prompts import PromptSource, encode_prompt

    cfg = load_config(PRESET, ["trainer.minibatch_size=64"])
    settings, rows = PPOSettings.from_config(cfg), cfg.trainer.prompts_per_step * cfg.rollout.n
    assert settings.updates_per_step(rows) == 4 and not settings.is_on_policy_single_update(rows)
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(models.tiny_config(
        cfg.model.group, vocab_size=-(-len(tokenizer) // 8) * 8, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id))
    prompts = [encode_prompt(tokenizer, r, cfg.data.template)
               for r in PromptSource(cfg.data, cfg.data.seed).next_rows(cfg.trainer.prompts_per_step)]
    params = SamplingParams(temperature=cfg.rollout.temperature, max_new_tokens=cfg.rollout.max_new_tokens,
                            n=cfg.rollout.n, stop_token_ids=(tokenizer.eos_token_id,))
    engine = TorchRolloutEngine(model.eval(), tokenizer.pad_token_id)
    batch = engine.generate(prompts, params, list(range(len(prompts))))
    scores = torch.rand(rows, generator=torch.Generator().manual_seed(0)).round()
    critic = ValueHeadModel(copy.deepcopy(model)) if settings.advantage == "gae" else None
    trainer = PPOTrainer(model, copy.deepcopy(model), critic, settings)
    exp = trainer.prepare(batch, scores)
    model.train()
    metrics = trainer.update(exp, generator=torch.Generator().manual_seed(0))
    assert metrics["updates_per_step"] == 4 and metrics["clipfrac"] > 0.001 and metrics["approx_kl"] > 0, metrics
