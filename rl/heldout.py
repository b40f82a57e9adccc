"""Held-out evaluation: one function, used by the driver (every ``trainer.eval_every`` steps) and by the
``python -m rl.evaluate`` command, so a checkpoint evaluated later reproduces the numbers its run logged.

Per problem: the greedy answer's accuracy, and one sample's at the rollout temperature (what PPO trains;
it moves before greedy does). The sample is seeded per problem from the run's seed and the split's name,
the same at every evaluation, so before/after differences are paired. For a model with a Latent Reasoning
Unit, optionally, the iterations it ran averaged over each greedy response's tokens (``response_iterations``):
what relates halting to difficulty. No Ray: the caller passes how to generate, how to score and how to count
iterations.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from models import position_ids_from_mask
from rl.reward_scorer import ScoredBatch
from rl.rollout import RolloutBatch, SamplingParams, step_seed

Generate = Callable[[list[list[int]], SamplingParams, list[int]], RolloutBatch]  # prompts, params, seeds
Score = Callable[[list[dict], list[str]], ScoredBatch]  # the rows each response answers, the responses
Iterations = Callable[[RolloutBatch], np.ndarray]  # responses -> (N,) mean LRU iterations per response token
RECORD_FIELDS = ("index", "key", "level", "num_vars", "num_steps")  # extra_info kept per problem


def heldout_params(rollout, eos_token_id: int) -> tuple[SamplingParams, SamplingParams]:
    """(greedy, sampled) parameters from a ``RolloutConfig``: one response per problem, the rollout's
    temperature, top-k and top-p for the sampled one."""
    stop = (eos_token_id,)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=rollout.max_new_tokens, stop_token_ids=stop)
    sampled = SamplingParams(temperature=rollout.temperature, top_k=rollout.top_k, top_p=rollout.top_p,
                             max_new_tokens=rollout.max_new_tokens, stop_token_ids=stop)
    return greedy, sampled


def sample_seeds(seed: int, split: str, n: int) -> list[int]:
    """The per-problem seeds of a split's sampled evaluation (the same at every evaluation of a run)."""
    return [step_seed(seed, 0, f"eval/{split}/{i}") for i in range(n)]


@dataclass
class SplitResult:
    acc: np.ndarray  # (N,) greedy accuracy per problem
    acc_sampled: np.ndarray  # (N,) accuracy of one sample per problem
    scores: np.ndarray  # (N,) greedy reward
    greedy: RolloutBatch  # the greedy responses (token ids)
    texts: list[str]  # the greedy responses
    texts_sampled: list[str]
    lru_iterations: np.ndarray | None = None  # (N,) mean LRU iterations over each greedy response's tokens


@torch.no_grad()
def response_iterations(model, batch: RolloutBatch, chunk: int = 128) -> np.ndarray | None:
    """(N,) mean LRU iterations over each response's tokens (averaged over LRU layers), from a teacher-forced
    forward of prompt + response in chunks of ``chunk`` rows; None for a model without an LRU. The model is in
    eval mode for it and returned in the mode it came in."""
    training, out = model.training, []
    model.eval()
    try:
        for start in range(0, batch.prompt_ids.shape[0], chunk):
            part = slice(start, start + chunk)
            ids = torch.cat([batch.prompt_ids[part], batch.response_ids[part]], 1)  # (b, P + R)
            mask = torch.cat([batch.prompt_mask[part], batch.response_mask[part].long()], 1)
            iterations = getattr(model(ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                                       use_cache=False), "lru_iterations", None)  # (LRU layers, b, P + R)
            if iterations is None:
                return None
            per_token = iterations.float().mean(0)[:, batch.prompt_ids.shape[1]:]  # (b, R)
            response = batch.response_mask[part].float()
            out.append((per_token * response).sum(1).div(response.sum(1).clamp(min=1)).cpu())
    finally:
        model.train(training)
    return torch.cat(out).numpy()


def evaluate_split(name: str, rows: list[dict], prompts: list[list[int]], generate: Generate, score: Score,
                   decode: Callable[[RolloutBatch], list[str]], params: tuple[SamplingParams, SamplingParams],
                   seed: int, iterations: Iterations | None = None) -> SplitResult:
    """Greedy and sampled accuracy of every problem of one held-out split (and, given ``iterations``, the LRU
    iterations of each greedy response)."""
    greedy_params, sampled_params = params
    greedy = generate(prompts, greedy_params, [0] * len(rows))
    texts = decode(greedy)
    scored = score(rows, texts)
    sampled = generate(prompts, sampled_params, sample_seeds(seed, name, len(rows)))
    texts_sampled = decode(sampled)
    return SplitResult(np.asarray(scored.accuracy()), np.asarray(score(rows, texts_sampled).accuracy()),
                       np.asarray(scored.scores), greedy, texts, texts_sampled,
                       None if iterations is None else iterations(greedy))


def split_metrics(name: str, rows: list[dict], result: SplitResult) -> dict[str, float]:
    """The logged numbers of a split: ``eval/<split>/acc``, ``acc_sampled``, ``score``, ``acc_level<k>``, and
    ``lru_iterations`` when they were counted."""
    out = {f"eval/{name}/acc": float(result.acc.mean()), f"eval/{name}/acc_sampled": float(result.acc_sampled.mean()),
           f"eval/{name}/score": float(result.scores.mean())}
    by_level = defaultdict(list)
    for row, a in zip(rows, result.acc, strict=True):
        by_level[row["extra_info"].get("level", 0)].append(a)
    out.update({f"eval/{name}/acc_level{lv}": float(np.mean(v)) for lv, v in sorted(by_level.items())})
    if result.lru_iterations is not None:
        out[f"eval/{name}/lru_iterations"] = float(result.lru_iterations.mean())
    return out


def split_record(rows: list[dict], result: SplitResult) -> dict[str, list]:
    """Each problem's results and identity (for paired tests, and for re-scoring what the policy wrote); with
    ``lru_iterations`` for a model with an LRU (for relating its halting to difficulty)."""
    iterations = {} if result.lru_iterations is None else {"lru_iterations": result.lru_iterations.tolist()}
    return {"acc": result.acc.tolist(), "acc_sampled": result.acc_sampled.tolist(), "score": result.scores.tolist(),
            **iterations, "response": result.texts, "response_sampled": result.texts_sampled,
            "ground_truth": [r["reward_model"]["ground_truth"] for r in rows],
            "data_source": [r["data_source"] for r in rows],
            **{k: [r["extra_info"].get(k) for r in rows] for k in RECORD_FIELDS}}
