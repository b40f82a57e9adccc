"""The PPO trainer: actor, critic and frozen reference in one process. No Ray here (the actor wraps it).

One step, as in the PPO paper's algorithm box (Schulman et al. 2017, Alg. 1) with the RLHF additions:

    prepare(rollout, scores):   old logprobs, reference logprobs, values (logprobs_and_values);
                                token rewards (score on the last token, minus beta * KL if kl_in_reward);
                                advantages by GAE with the critic, or group-normalised scores (GRPO)
    update(experience):         for each epoch, for each shuffled minibatch, accumulate over micro-batches
                                the clipped policy loss - entropy bonus (+ beta * KL loss) + LRU aux loss
                                and the clipped value loss + the critic's LRU aux loss; clip the actor's and
                                the critic's gradients each to its own norm; AdamW steps with warm-up.
                                A non-finite loss or gradient norm skips the step (both models) and is counted.

With one minibatch per step and one epoch (``PPOSettings.is_on_policy_single_update``) the update is
on-policy: the only optimizer step sees the policy that sampled, every ratio is 1 and nothing is clipped,
so "PPO" is REINFORCE with a baseline (the critic, or the group mean under GRPO). The metrics say so:
``updates_per_step`` counts the optimizer steps of a PPO step and ``clipfrac`` stays 0.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, fields

import torch

from models import ValueHeadModel
from rl import core
from rl.config import AlgorithmConfig, ExperimentConfig, RolloutConfig, TrainerConfig
from rl.rollout import RolloutBatch
from rl.shared_prompt import ResponseOutputs, group_ordered_permutation, response_outputs


@dataclass(frozen=True)
class PPOSettings:
    """Plain numbers of the algorithm. Defaults are the config dataclasses' (one source of defaults);
    ``from_config`` fills them in from an ``ExperimentConfig``, which has validated them."""

    lr: float = TrainerConfig.lr
    critic_lr: float = TrainerConfig.critic_lr
    weight_decay: float = TrainerConfig.weight_decay
    warmup_steps: int = TrainerConfig.warmup_steps
    clip: float = AlgorithmConfig.clip
    dual_clip: float | None = AlgorithmConfig.dual_clip
    value_clip: float | None = AlgorithmConfig.value_clip
    kl_coef: float = AlgorithmConfig.kl_coef
    kl_estimator: str = AlgorithmConfig.kl_estimator
    kl_in_reward: bool = AlgorithmConfig.kl_in_reward
    entropy_coef: float = AlgorithmConfig.entropy_coef
    gamma: float = AlgorithmConfig.gamma
    lam: float = AlgorithmConfig.lam
    advantage: str = AlgorithmConfig.advantage  # "gae" or "grpo"
    whiten_advantages: bool = AlgorithmConfig.whiten_advantages
    agg: str = AlgorithmConfig.agg
    epochs: int = TrainerConfig.epochs
    minibatch_size: int = TrainerConfig.minibatch_size
    micro_batch_size: int = TrainerConfig.micro_batch_size
    max_grad_norm: float = TrainerConfig.max_grad_norm
    temperature: float = RolloutConfig.temperature
    max_bad_steps: int = TrainerConfig.max_bad_steps  # consecutive non-finite updates before the run stops
    old_logprobs_from_rollout: bool = AlgorithmConfig.old_logprobs_from_rollout  # skip the old-logprob forward
    share_prompt: bool = TrainerConfig.share_prompt  # run each distinct prompt once per micro-batch

    def updates_per_step(self, rows: int) -> int:
        """Optimizer steps one PPO step takes on a batch of ``rows`` responses: epochs x minibatches."""
        return self.epochs * -(-rows // self.minibatch_size)

    def is_on_policy_single_update(self, rows: int) -> bool:
        """True when a batch of ``rows`` responses gets one optimizer step (one minibatch, one epoch): that step
        starts from the sampling policy, so every ratio is 1, the clip never acts, and the update is REINFORCE
        with a baseline rather than PPO (Schulman et al. 2017, sec. 3, needs several steps on one batch)."""
        return self.updates_per_step(rows) == 1

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> PPOSettings:
        """Each field from the config section that holds it (algorithm, trainer, or rollout.temperature)."""
        sections = (vars(cfg.algorithm), vars(cfg.trainer), {"temperature": cfg.rollout.temperature})
        return cls(**{f.name: next(s[f.name] for s in sections if f.name in s) for f in fields(cls)})


@dataclass
class Experience:
    """A scored rollout with everything the update needs. B rows (prompt x sample), P prompt, R response."""

    input_ids: torch.Tensor  # (B, P+R) prompt then response
    attention_mask: torch.Tensor  # (B, P+R)
    response_mask: torch.Tensor  # (B, R) float
    old_logprobs: torch.Tensor  # (B, R)
    ref_logprobs: torch.Tensor  # (B, R)
    values: torch.Tensor  # (B, R), zeros without a critic
    rewards: torch.Tensor  # (B, R) token rewards
    advantages: torch.Tensor  # (B, R)
    returns: torch.Tensor  # (B, R)
    prompt_index: torch.Tensor  # (B,) which prompt each row answers: rows of one prompt share its forward

    def rows(self, index: torch.Tensor) -> Experience:
        return Experience(**{k: v[index] for k, v in vars(self).items()})


class NonFiniteError(RuntimeError):
    """Too many updates in a row had a non-finite loss or gradient."""


class PPOTrainer:
    def __init__(self, policy, reference, critic: ValueHeadModel | None, settings: PPOSettings):
        if settings.advantage == "gae" and critic is None:
            raise ValueError("advantage='gae' needs a critic; pass one or use advantage='grpo'")
        self.policy, self.reference, self.critic, self.s = policy, reference.eval(), critic, settings
        self.reference.requires_grad_(False)
        self.optimizer = torch.optim.AdamW(policy.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        self.critic_optimizer = (torch.optim.AdamW(critic.parameters(), lr=settings.critic_lr)
                                 if critic is not None else None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._warmup)
        self.bad_steps = 0
        self.skipped_steps = 0

    def _warmup(self, step: int) -> float:
        """The learning-rate factor: a linear warm-up over ``warmup_steps`` updates, then 1."""
        return min(1.0, (step + 1) / self.s.warmup_steps) if self.s.warmup_steps else 1.0

    # ---- logprobs and values --------------------------------------------------------------------------

    def _outputs(self, module, config, exp: Experience) -> ResponseOutputs:
        return response_outputs(module, config, exp.input_ids, exp.attention_mask, exp.response_mask.shape[1],
                                exp.prompt_index if self.s.share_prompt else None)

    def _logits(self, model, exp: Experience) -> tuple[torch.Tensor, ResponseOutputs]:
        """The (B, R, V) logits that predicted the response tokens (only those go through the LM head)."""
        out = self._outputs(model, model.config, exp)
        logits = out.outputs.float()
        return logits / self.s.temperature if self.s.temperature > 0 else logits, out

    def _logprobs(self, logits: torch.Tensor, exp: Experience) -> torch.Tensor:
        return core.logprobs_from_logits(logits, exp.input_ids[:, -exp.response_mask.shape[1]:])

    def _values(self, exp: Experience) -> ResponseOutputs:
        """The (B, R) values of the state before each response token, and the critic's LRU aux loss."""
        return self._outputs(self.critic, self.critic.lm.config, exp)

    # ---- prepare ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def logprobs_and_values(self, rollout: RolloutBatch) -> Experience:
        """Old and reference logprobs and values of a rollout; needs no scores, so it runs while they come."""
        mask = rollout.response_mask.float()
        exp = Experience(
            input_ids=torch.cat([rollout.prompt_ids, rollout.response_ids], dim=1),
            attention_mask=torch.cat([rollout.prompt_mask, rollout.response_mask], dim=1),
            response_mask=mask, old_logprobs=None, ref_logprobs=None, values=torch.zeros_like(mask),
            rewards=None, advantages=None, returns=None, prompt_index=rollout.prompt_index)
        if self.s.old_logprobs_from_rollout:  # equal to the recomputation up to ~1e-6 (tests/rl/test_rollout.py)
            exp.old_logprobs = rollout.logprobs.float() * mask
        else:
            exp.old_logprobs = self._logprobs(self._logits(self.policy, exp)[0], exp) * mask
        if self.s.kl_coef:
            exp.ref_logprobs = self._logprobs(self._logits(self.reference, exp)[0], exp) * mask
        else:  # no KL term: skip the reference forward
            exp.ref_logprobs = exp.old_logprobs
        if self.critic is not None:
            exp.values = self._values(exp).outputs * mask
        return exp

    @torch.no_grad()
    def add_scores(self, exp: Experience, scores: torch.Tensor, prompt_index: torch.Tensor) -> Experience:
        """Token rewards (the score on the last response token, minus beta * KL if kl_in_reward) and
        advantages: GAE with the critic, or group-normalised sequence scores (GRPO, groups = prompt_index; the
        score minus beta * the response's summed KL if kl_in_reward). scores (B,), prompt_index (B,)."""
        mask, scores = exp.response_mask, scores.to(exp.response_mask)
        last = (mask.sum(1).long() - 1).clamp(min=0)
        exp.rewards = torch.zeros_like(mask).scatter(1, last[:, None], scores[:, None]) * mask
        if self.s.kl_in_reward and self.s.kl_coef:
            kl = self.s.kl_coef * core.kl_penalty(exp.old_logprobs, exp.ref_logprobs, self.s.kl_estimator) * mask
            exp.rewards = exp.rewards - kl
            # GRPO's outcome score is then the sequence's summed token reward, score - beta * sum_t KL_t, as in
            # verl (ray_trainer.apply_kl_penalty feeds token_level_rewards.sum(-1) to
            # compute_grpo_outcome_advantage). Applied rather than refused: it is the only way to put the KL
            # in the advantage without a critic; kl_in_reward=false keeps DeepSeekMath's KL loss (sec. 4.1).
            scores = scores - kl.sum(1)
        if self.s.advantage == "grpo":
            exp.advantages = core.grpo_advantages(scores, prompt_index.to(mask.device), mask)
            exp.returns = exp.advantages.clone()
        else:
            exp.advantages, exp.returns = core.compute_gae(exp.rewards, exp.values, mask, self.s.gamma, self.s.lam)
            if self.s.whiten_advantages:
                exp.advantages = core.masked_whiten(exp.advantages, mask)
        return exp

    def prepare(self, rollout: RolloutBatch, scores: torch.Tensor) -> Experience:
        return self.add_scores(self.logprobs_and_values(rollout), scores, rollout.prompt_index)

    # ---- update ----------------------------------------------------------------------------------------

    def update(self, exp: Experience, generator: torch.Generator | None = None) -> dict[str, float]:
        """PPO epochs over shuffled minibatches, accumulating gradients over micro-batches. Metrics are the
        means over minibatches, plus ``updates_per_step`` (optimizer steps taken, skipped ones not counted)."""
        totals: dict[str, list[float]] = {}
        rows, updates = exp.response_mask.shape[0], 0
        for _ in range(self.s.epochs):
            # Whole prompt groups are shuffled when they share a forward, so a micro-batch holds few prompts.
            order = (group_ordered_permutation(exp.prompt_index, generator) if self.s.share_prompt
                     else torch.randperm(rows, generator=generator))
            for minibatch in order.split(self.s.minibatch_size):
                metrics, stepped = self._minibatch_step(exp.rows(minibatch))
                updates += stepped
                for name, value in metrics.items():
                    totals.setdefault(name, []).append(value)
        metrics = {name: sum(v) / len(v) for name, v in totals.items()}
        metrics["updates_per_step"] = float(updates)
        metrics["skipped_steps"] = float(self.skipped_steps)
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        return metrics

    def _minibatch_step(self, mb: Experience) -> tuple[dict[str, float], bool]:
        """Accumulate one minibatch's gradients, clip, step. -> (metrics, whether the optimizers stepped)."""
        self._zero_grad()
        metrics, finite = self._accumulate(mb)
        # Each model's gradient clipped to its own norm, as verl's actor and critic workers do: clipped together,
        # a large value-loss gradient would shrink the policy's step (and the policy's the critic's).
        nan = torch.tensor(float("nan"))
        grad_norm = self._clip(self.optimizer) if finite else nan
        critic_norm = (self._clip(self.critic_optimizer) if finite else nan) if self.critic is not None else None
        metrics["grad_norm"] = float(grad_norm)
        if critic_norm is not None:
            metrics["critic_grad_norm"] = float(critic_norm)
        if not all(math.isfinite(metrics[k]) for k in ("grad_norm", "critic_grad_norm") if k in metrics):
            self._skip()
            return metrics, False
        self.bad_steps = 0
        self.optimizer.step()
        if self.critic_optimizer is not None:
            self.critic_optimizer.step()
        self.scheduler.step()
        return metrics, True

    def _accumulate(self, mb: Experience) -> tuple[dict[str, float], bool]:
        """Backward of every micro-batch's loss (while all are finite). -> (metrics averaged over rows, finite)."""
        counts = {"num_tokens": mb.response_mask.sum(), "num_seqs": mb.response_mask.shape[0]}
        metrics: dict[str, float] = {}
        finite = True
        for micro in torch.arange(mb.response_mask.shape[0]).split(self.s.micro_batch_size):
            part = mb.rows(micro)
            share = len(micro) / mb.response_mask.shape[0]  # for averaging the metrics
            # The LRU aux loss is a mean over valid positions: weighted by this part's share of them, the
            # micro-batch terms add up to the minibatch's mean (agg_loss's invariant, for the aux loss).
            aux_share = part.attention_mask.sum() / mb.attention_mask.sum()
            loss, m = self._policy_loss(part, counts, aux_share)
            if self.critic is not None:
                v_loss, vm = self._value_loss(part, counts, aux_share)
                loss = loss + v_loss
                m.update(vm)
            finite &= bool(torch.isfinite(loss))
            if finite:
                loss.backward()
            for name, value in m.items():
                metrics[name] = metrics.get(name, 0.0) + float(value) * share
        return metrics, finite

    def _clip(self, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """Clip the gradients of one optimizer's parameters to ``max_grad_norm``; -> their norm before clipping."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return torch.nn.utils.clip_grad_norm_(params, self.s.max_grad_norm)

    def _zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.critic_optimizer is not None:
            self.critic_optimizer.zero_grad(set_to_none=True)

    def _skip(self) -> None:
        self._zero_grad()
        self.skipped_steps += 1
        self.bad_steps += 1
        if self.bad_steps >= self.s.max_bad_steps:
            raise NonFiniteError(f"{self.bad_steps} updates in a row had a non-finite loss or gradient; "
                                 "lower the learning rate or check the data")

    def _policy_loss(self, part: Experience, counts: dict, aux_share: torch.Tensor) -> tuple[torch.Tensor, dict]:
        logits, out = self._logits(self.policy, part)
        logp = self._logprobs(logits, part)
        mask = part.response_mask
        pg_loss, metrics = core.ppo_policy_loss(logp, part.old_logprobs, part.advantages, mask, self.s.clip,
                                                self.s.dual_clip, self.s.agg, **counts)
        loss = pg_loss
        entropy = core.entropy_from_logits(logits)
        loss = loss - self.s.entropy_coef * core.agg_loss(entropy, mask, self.s.agg, **counts)
        if self.s.kl_coef:  # without a KL term the reference is never run, so there is no KL to report
            kl = core.kl_penalty(logp, part.ref_logprobs, self.s.kl_estimator)
            metrics["kl_ref"] = core.masked_mean(kl, mask).detach()
            if not self.s.kl_in_reward:
                loss = loss + self.s.kl_coef * core.agg_loss(kl, mask, self.s.agg, **counts)
        if out.aux_loss is not None:  # the model's LRU auxiliary loss, already weighted by its config
            loss = loss + out.aux_loss * aux_share
            metrics["lru_aux_loss"] = out.aux_loss.detach()
            metrics["lru_iterations"] = out.lru_stats["iterations_mean"]
            metrics["lru_ponder"] = out.lru_stats["ponder"]
        metrics.update(pg_loss=pg_loss.detach(), actor_loss=loss.detach(),
                       entropy=core.masked_mean(entropy, mask).detach())
        return loss, metrics

    def _value_loss(self, part: Experience, counts: dict, aux_share: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Clipped value loss + the critic's own LRU aux loss (its backbone is an LRU model too: without the
        term its halting and update gates train on the value loss alone), weighted like the policy's."""
        out = self._values(part)
        values = out.outputs
        loss, metrics = core.value_loss(values, part.values, part.returns, part.response_mask, self.s.value_clip,
                                        self.s.agg, **counts)
        metrics.update(value_loss=loss.detach(),
                       explained_variance=core.explained_variance(values.detach(), part.returns, part.response_mask))
        if out.aux_loss is not None:  # already weighted by the critic's config (lru_*_weight)
            loss = loss + out.aux_loss * aux_share
            metrics["critic_lru_aux_loss"] = out.aux_loss.detach()
        return loss, metrics

    # ---- checkpointing ---------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "critic_optimizer": self.critic_optimizer.state_dict() if self.critic_optimizer else None,
                "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        saved = [group.get("initial_lr", group["lr"]) for group in state["optimizer"]["param_groups"]]
        if saved and saved[0] != self.s.lr:
            # torch restores the learning rate with the optimiser's state, so a changed trainer.lr would be
            # silently ignored on resume (as in transformers' Trainer); say so rather than train at another one.
            print(f"warning: resuming with trainer.lr={self.s.lr:g}, but the checkpoint's optimiser was built with "
                  f"lr={saved[0]:g}, and its schedule continues; to train at another learning rate, start a new "
                  "run directory", file=sys.stderr)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.critic_optimizer is not None and state.get("critic_optimizer") is not None:
            self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        self.skipped_steps = state.get("skipped_steps", 0)
