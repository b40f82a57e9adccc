"""RL maths three ways: numbers by hand, loop references and torch/scipy references, invariants."""

from __future__ import annotations

import math

import pytest
import torch

from rl.core import (
    agg_loss,
    compute_gae,
    entropy_from_logits,
    explained_variance,
    grpo_advantages,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    value_loss,
)


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.5, 0.5]])
    mask = torch.ones(1, 3)
    # gamma = lam = 1: deltas (0, 0, 0.5); advantages are their suffix sums (0.5, 0.5, 0.5); returns A + V = 1.
    adv, ret = compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert adv.tolist() == [[0.5, 0.5, 0.5]] and ret.tolist() == [[1.0, 1.0, 1.0]]
    # gamma 0.9, lam 0.5: d2 = 1 - 0.5 = 0.5; d1 = 0.9*0.5 - 0.5 = -0.05; d0 = -0.05.
    # A2 = 0.5; A1 = -0.05 + 0.45*0.5 = 0.175; A0 = -0.05 + 0.45*0.175 = 0.02875.
    adv, _ = compute_gae(rewards, values, mask, gamma=0.9, lam=0.5)
    assert adv[0].tolist() == pytest.approx([0.02875, 0.175, 0.5])


def gae_loop(rewards, values, mask, gamma, lam):
    """Reference: one sequence at a time, only its real tokens."""
    out = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        n = int(mask[b].sum())
        running = 0.0
        for t in reversed(range(n)):
            next_value = values[b, t + 1].item() if t + 1 < n else 0.0
            running = rewards[b, t].item() + gamma * next_value - values[b, t].item() + gamma * lam * running
            out[b, t] = running
    return out


@pytest.mark.parametrize("seed", range(5))
def test_gae_equals_loop_reference_with_right_padding(seed):
    g = torch.Generator().manual_seed(seed)
    rewards, values = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    lengths = torch.randint(1, 11, (6,), generator=g)
    mask = (torch.arange(10)[None] < lengths[:, None]).float()
    adv, ret = compute_gae(rewards, values, mask, gamma=0.97, lam=0.9)
    assert torch.allclose(adv, gae_loop(rewards, values, mask, 0.97, 0.9), atol=1e-5)
    assert torch.allclose(ret, (adv + values) * mask)


def test_grpo_advantages_by_hand():
    # group 0: scores (1, 0, 0, 1): mean 0.5, unbiased std sqrt(1/3) -> +-0.866; group 1 alone -> 0.
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.7])
    adv = grpo_advantages(scores, torch.tensor([0, 0, 0, 0, 1]), torch.ones(5, 2), eps=0.0)
    expected = 0.5 / math.sqrt(1 / 3)
    assert adv[:, 0].tolist() == pytest.approx([expected, -expected, -expected, expected, 0.0])
    assert torch.equal(adv[:, 0], adv[:, 1])  # the same advantage for every token
    same = grpo_advantages(torch.ones(3), torch.zeros(3, dtype=torch.long), torch.ones(3, 1))
    assert (same == 0).all()  # all equal: nothing to learn, no NaN


def test_ppo_policy_loss_by_hand():
    mask = torch.ones(1, 1)
    old = torch.zeros(1, 1)

    def loss(ratio, advantage, dual=3.0):
        return ppo_policy_loss(torch.log(torch.tensor([[ratio]])), old, torch.tensor([[advantage]]), mask,
                               clip=0.2, dual_clip=dual)[0].item()

    assert loss(1.5, 1.0) == pytest.approx(-1.2)  # max(-1.5, -1.2): clipped at 1 + 0.2
    assert loss(0.5, 1.0) == pytest.approx(-0.5)  # max(-0.5, -0.8): unclipped
    assert loss(1.5, -1.0) == pytest.approx(1.5)  # max(1.5, 1.2)
    assert loss(4.0, -1.0) == pytest.approx(3.0)  # 4.0 capped by the dual clip at 3 * |A|
    assert loss(4.0, -1.0, dual=None) == pytest.approx(4.0)
    _, metrics = ppo_policy_loss(torch.log(torch.tensor([[1.5, 1.0]])), torch.zeros(1, 2),
                                 torch.tensor([[1.0, 1.0]]), torch.ones(1, 2), clip=0.2)
    assert metrics["clipfrac"].item() == pytest.approx(0.5)


def test_value_loss_by_hand():
    # V = 2, V_old = 1, R = 1.5, clip 0.2: unclipped (0.5)^2 = 0.25, V_clip = 1.2 -> (0.3)^2 = 0.09; 0.5 * 0.25.
    args = torch.tensor([[2.0]]), torch.tensor([[1.0]]), torch.tensor([[1.5]]), torch.ones(1, 1)
    assert value_loss(*args, clip=0.2)[0].item() == pytest.approx(0.125)
    # R = 3: unclipped 1, clipped (1.8)^2 = 3.24 -> the larger: 0.5 * 3.24.
    args = torch.tensor([[2.0]]), torch.tensor([[1.0]]), torch.tensor([[3.0]]), torch.ones(1, 1)
    assert value_loss(*args, clip=0.2)[0].item() == pytest.approx(1.62)
    assert value_loss(*args, clip=None)[0].item() == pytest.approx(0.5)


def test_kl_estimators_against_torch_kl():
    torch.manual_seed(0)
    p = torch.distributions.Categorical(logits=torch.randn(8))
    q = torch.distributions.Categorical(logits=torch.randn(8))
    true = torch.distributions.kl_divergence(p, q).item()
    samples = p.sample((200_000,))
    logp, logq = p.log_prob(samples), q.log_prob(samples)
    for estimator in ("k1", "k3"):  # unbiased estimators
        assert kl_penalty(logp, logq, estimator).mean().item() == pytest.approx(true, rel=0.03)
    assert (kl_penalty(logp, logq, "k3") >= 0).all() and (kl_penalty(logp, logq, "k2") >= 0).all()
    with pytest.raises(ValueError, match="valid estimators"):
        kl_penalty(logp, logq, "k9")


def test_logprobs_and_entropy_against_torch_distributions():
    torch.manual_seed(1)
    logits = torch.randn(3, 5, 11) * 3
    tokens = torch.randint(0, 11, (3, 5))
    dist = torch.distributions.Categorical(logits=logits)
    assert torch.allclose(logprobs_from_logits(logits, tokens), dist.log_prob(tokens), atol=1e-5)
    assert torch.allclose(entropy_from_logits(logits), dist.entropy(), atol=1e-5)


def test_masked_statistics():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    assert masked_mean(x, mask).item() == 2.5
    w = masked_whiten(x, mask)
    assert masked_mean(w, mask).abs().item() < 1e-6 and (w * (1 - mask)).abs().sum() == 0
    assert masked_mean(w**2, mask).item() == pytest.approx(0.75, rel=1e-4)  # unbiased var 1 over n = 4: 3/4
    assert explained_variance(x, x, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.full_like(x, 2.5), x, mask).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_gradient_accumulation_over_micro_batches_equals_one_big_batch(mode):
    # The invariant of agg_loss: 4 micro-batches with the whole batch's counts sum to the big batch's loss.
    torch.manual_seed(2)
    weight = torch.randn(6, requires_grad=True)
    features = torch.randn(8, 7, 6)
    lengths = torch.tensor([7, 1, 3, 5, 2, 7, 4, 6])
    mask = (torch.arange(7)[None] < lengths[:, None]).float()
    old, adv = torch.randn(8, 7), torch.randn(8, 7)

    def loss(rows, **counts):
        logp = torch.nn.functional.logsigmoid(features[rows] @ weight)
        return ppo_policy_loss(logp, old[rows], adv[rows], mask[rows], clip=0.2, agg=mode, **counts)[0]

    big = loss(slice(None))
    (big_grad,) = torch.autograd.grad(big, weight)
    total, grad = 0.0, torch.zeros(6)
    for part in torch.arange(8).split(2):
        small = loss(part, num_tokens=mask.sum(), num_seqs=8)
        total += small.item()
        grad += torch.autograd.grad(small, weight)[0]
    assert total == pytest.approx(big.item(), rel=1e-5)
    assert torch.allclose(grad, big_grad, atol=1e-6)
    with pytest.raises(ValueError, match="valid modes"):
        agg_loss(old, mask, "mean")
