"""The RL maths: pure functions of tensors and plain numbers. No config objects, no I/O, no Ray.

Shapes: B sequences, T response tokens. ``mask`` (B, T) is 1 on response tokens that count and 0 on
padding; every function ignores masked positions. Every function returns tensors on its inputs' device and
in their floating dtype (logprobs and entropies in at least fp32): nothing is allocated on a fixed device and
nothing branches on a tensor's value in Python, so they run on CPU, CUDA and the meta device alike
(tests/rl/test_core_devices.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")
KL_ESTIMATORS = ("k1", "k2", "k3")


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over positions where mask is 1 (0 when there are none)."""
    if dim is None:
        return masked_sum(x, mask) / mask.sum().clamp(min=1)
    return masked_sum(x, mask, dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over positions where mask is 1; ``unbiased`` (Bessel's n / (n - 1)) when there are two or more."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_sum((x - mean) ** 2, mask) / n.clamp(min=1)
    if unbiased:  # torch.where, not `if n > 1`: no host sync, and it runs on the meta device
        var = torch.where(n > 1, var * n / (n - 1).clamp(min=1), var)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise x to unit variance (and zero mean with ``shift_mean``) over the masked positions."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    return (whitened if shift_mean else whitened + mean) * mask


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
                lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2015, arXiv 1506.02438, eq. 11-16).

    delta_t = r_t + gamma * V_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1};  returns = A + V.
    Responses are right-padded: past a sequence's last token the next value and advantage are 0.
    rewards, values, mask: (B, T) -> advantages (B, T), returns (B, T); both 0 on padding.
    """
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        m = mask[:, t]
        advantages[:, t] = advantage * m
        # On padding the "next" step is the end of the episode: value 0, advantage 0.
        next_value = torch.where(m.bool(), values[:, t], torch.zeros_like(next_value))
        next_advantage = torch.where(m.bool(), advantage, torch.zeros_like(next_advantage))
    return advantages, (advantages + values) * mask


def grpo_advantages(scores: torch.Tensor, group: torch.Tensor, mask: torch.Tensor, normalize_std: bool = True,
                    eps: float = 1e-6) -> torch.Tensor:
    """Group-normalised outcome advantages (GRPO, Shao et al. 2024, arXiv 2402.03300, sec. 4.1.2).

    A_i = (s_i - mean of its group) / (std of its group + eps), the same for every token of response i.
    scores (B,), group (B,) integer ids of the prompt each response answers, mask (B, T) -> (B, T).
    A group of one response gets advantage 0.
    """
    inverse = dense_group_ids(group)
    count = scores.new_zeros(len(scores)).index_add_(0, inverse, torch.ones_like(scores))  # (B,) buckets
    mean = scores.new_zeros(len(scores)).index_add_(0, inverse, scores) / count.clamp(min=1)
    centred = scores - mean[inverse]
    if normalize_std:
        var = scores.new_zeros(len(scores)).index_add_(0, inverse, centred**2)
        std = (var / (count - 1).clamp(min=1)).sqrt()  # unbiased, as torch.std
        centred = centred / (std[inverse] + eps)
    centred = torch.where(count[inverse] > 1, centred, torch.zeros_like(centred))
    return centred[:, None] * mask


def dense_group_ids(group: torch.Tensor) -> torch.Tensor:
    """Integer ids (B,) -> ids in [0, B) (B,), equal exactly where the inputs are equal, numbered in sorted order.

    A stable sort and a cumulative sum of "differs from the previous" instead of ``torch.unique``, whose output
    size depends on the values: this keeps the device, needs no host sync, and runs on the meta device.
    """
    ordered, order = torch.sort(group, stable=True)
    starts = torch.cat([torch.zeros_like(ordered[:1]), (ordered[1:] != ordered[:-1]).to(ordered.dtype)])
    return torch.empty_like(order).scatter_(0, order, torch.cumsum(starts, 0).to(order.dtype))


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman, "Approximating KL divergence").

    k1 = log r, k2 = (log r)^2 / 2, k3 = (r' - 1) - log r' with r' = pi_ref / pi (unbiased, >= 0).
    """
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"estimator={estimator!r}: valid estimators are {list(KL_ESTIMATORS)}")


def agg_loss(loss: torch.Tensor, mask: torch.Tensor, mode: str, num_tokens: float | None = None,
             num_seqs: float | None = None) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to a scalar.

    Invariant: the loss does not depend on how a batch is split into micro-batches (or ranks). Pass the
    whole batch's ``num_tokens`` (token-mean) or ``num_seqs`` (the seq-mean modes) to every micro-batch:
    then the micro-batch losses *sum* to the whole batch's loss, and so do their gradients, which is
    what gradient accumulation adds up. Without them the counts of this batch are used.

    token-mean           sum over all tokens / number of tokens
    seq-mean-token-sum   sum over a sequence's tokens, summed over sequences / number of sequences
    seq-mean-token-mean  mean over a sequence's tokens, summed over sequences / number of sequences
    """
    if mode == "token-mean":
        return masked_sum(loss, mask) / (mask.sum() if num_tokens is None else num_tokens)
    seqs = mask.shape[0] if num_seqs is None else num_seqs
    if mode == "seq-mean-token-sum":
        return masked_sum(loss, mask, dim=1).sum() / seqs
    if mode == "seq-mean-token-mean":
        return (masked_sum(loss, mask, dim=1) / mask.sum(1).clamp(min=1)).sum() / seqs
    raise ValueError(f"mode={mode!r}: valid modes are {list(AGG_MODES)}")


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip: float, dual_clip: float | None = 3.0, agg: str = "token-mean", num_tokens=None,
                    num_seqs=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate (PPO, Schulman et al. 2017, arXiv 1707.06347, eq. 7), with dual clip for
    negative advantages (Ye et al. 2020, arXiv 1912.09729): the loss of a token is at most
    ``dual_clip * |A|`` however large the ratio. -> (loss, {clipfrac, dual_clipfrac, approx_kl, ratio_mean})
    """
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    per_token = torch.maximum(unclipped, clipped)
    dual = torch.zeros_like(mask, dtype=torch.bool)
    if dual_clip is not None:
        capped = torch.minimum(per_token, -advantages * dual_clip)
        dual = (advantages < 0) & (per_token > capped)
        per_token = torch.where(advantages < 0, capped, per_token)
    metrics = {
        "clipfrac": masked_mean((clipped > unclipped).to(logp.dtype), mask),
        "dual_clipfrac": masked_mean(dual.to(logp.dtype), mask),
        "approx_kl": masked_mean(0.5 * log_ratio**2, mask),  # k2 estimate of KL(old || new)
        "ratio_mean": masked_mean(ratio, mask),
    }
    return agg_loss(per_token, mask, agg, num_tokens, num_seqs), {k: v.detach() for k, v in metrics.items()}


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float | None, agg: str = "token-mean", num_tokens=None,
               num_seqs=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss 0.5 * max((V - R)^2, (V_clip - R)^2), V_clip = V_old + clamp(V - V_old, +-clip)
    (as in OpenAI baselines' PPO2). ``clip=None`` gives the plain squared error."""
    unclipped = (values - returns) ** 2
    if clip is None:
        per_token, clipfrac = unclipped, values.new_zeros(())
    else:
        v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
        clipped = (v_clipped - returns) ** 2
        per_token = torch.maximum(unclipped, clipped)
        clipfrac = masked_mean((clipped > unclipped).to(values.dtype), mask)
    return 0.5 * agg_loss(per_token, mask, agg, num_tokens, num_seqs), {"vf_clipfrac": clipfrac.detach()}


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits upcast to fp32 (a log-softmax in half precision loses the small probabilities); fp64 kept."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log pi(token) from logits (B, T, V) and tokens (B, T) -> (B, T), in fp32 (fp64 for fp64 logits)."""
    logits = _at_least_fp32(logits)
    return torch.gather(logits, -1, tokens[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (B, T) of the categorical distribution at every position of logits (B, T, V):
    logsumexp(l) - sum softmax(l) * l, in fp32 (fp64 for fp64 logits)."""
    logits = _at_least_fp32(logits)
    return torch.logsumexp(logits, dim=-1) - (F.softmax(logits, dim=-1) * logits).sum(-1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(R - V) / Var(R) over the masked positions: 1 is a perfect critic, 0 a constant one."""
    var_returns = masked_var(returns, mask)
    return 1 - masked_var(returns - values, mask) / var_returns.clamp(min=1e-8)
