"""The ``torch`` rollout backend: batched, KV-cached sampling with token logprobs. No Ray here.

    engine = TorchRolloutEngine(model, pad_token_id=0)
    batch = engine.generate(prompts, SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=64, n=4),
                            seeds=[0, 1, 2])
    engine.load_weights(trainer_state_dict)

The backend interface is two methods, ``generate`` and ``load_weights``, so another backend (vLLM)
drops in. Logprobs are those of softmax(logits / temperature), the distribution the PPO ratio is taken
under (as verl does); top-k, top-p and the repetition penalty (``transformers``' own logits processors)
shape sampling only. Each prompt's samples come from its own seeded generator (Gumbel-max sampling),
so they do not depend on which other prompts share the batch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from models import GrowingCache, LatentCache, LatentReasoningForCausalLM, position_ids_from_mask
from rl.core import logprobs_from_logits


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy. top_k 0 and top_p 1 are off. stop_token_ids end a response (kept in it)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 64
    n: int = 1
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        checks = [(self.temperature >= 0, "temperature must be >= 0 (0 = greedy)"),
                  (self.top_k >= 0, "top_k must be >= 0 (0 = off)"),
                  (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
                  (self.repetition_penalty > 0, "repetition_penalty must be > 0 (1 = off)"),
                  (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"), (self.n >= 1, "n must be >= 1")]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"SamplingParams: {message}; got {self}")


@dataclass
class RolloutBatch:
    """Responses to B prompts x n samples (rows grouped by prompt: prompt i's samples are rows i*n … i*n+n-1)."""

    prompt_ids: torch.Tensor  # (B*n, P) left-padded
    prompt_mask: torch.Tensor  # (B*n, P) 1 on real prompt tokens
    response_ids: torch.Tensor  # (B*n, R) right-padded with pad_token_id
    response_mask: torch.Tensor  # (B*n, R) 1 on generated tokens (the stop token included)
    logprobs: torch.Tensor  # (B*n, R) fp32 log softmax(logits / temperature) of each generated token, 0 on pads
    prompt_index: torch.Tensor  # (B*n,) which prompt each row answers

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(1)


def left_pad(sequences: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids, mask), both (B, max length), padded on the left as batched generation needs."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("every prompt needs at least one token")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.tensor(seq)
        mask[row, width - len(seq):] = 1
    return ids, mask


def step_seed(seed: int, step: int, salt: str = "") -> int:
    """A 32-bit seed for one purpose ("salt") at one step of a run seeded ``seed``: prompts' sampling seeds,
    the update's shuffling, held-out samples."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{step}:{salt}".encode(), digest_size=4).digest(), "little")


def _generator(seed: int, sample: int) -> torch.Generator:
    digest = hashlib.blake2b(f"{seed}:{sample}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


class TorchRolloutEngine:
    def __init__(self, model: torch.nn.Module, pad_token_id: int):
        self.model = model.eval()
        self.pad_token_id = pad_token_id

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Take the trainer's weights (all of them: a missing or unexpected key is an error)."""
        self.model.load_state_dict(state_dict, strict=True)

    def _processors(self, params: SamplingParams) -> LogitsProcessorList:
        processors = LogitsProcessorList()
        if params.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
        if params.top_k > 0:
            processors.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            processors.append(TopPLogitsWarper(params.top_p))
        return processors

    def _new_cache(self):
        """A cache that writes each new token in place (``GrowingCache``) instead of concatenating."""
        if isinstance(self.model, LatentReasoningForCausalLM):
            return LatentCache(config=self.model.config)
        return GrowingCache(config=self.model.config)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 seeds: list[int] | None = None) -> RolloutBatch:
        """Sample ``params.n`` responses to every prompt (token id lists)."""
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts: give one seed per prompt")
        device = next(self.model.parameters()).device
        index = torch.arange(len(prompts), device=device).repeat_interleave(params.n)  # row -> its prompt
        unique_ids, unique_mask = (t.to(device) for t in left_pad(prompts, self.pad_token_id))
        ids, mask = unique_ids[index], unique_mask[index]
        rows = ids.shape[0]
        generators = None
        if params.temperature > 0:
            seeds = seeds if seeds is not None else torch.randint(0, 2**31, (len(prompts),)).tolist()
            generators = [_generator(seeds[i], k % params.n) for k, i in enumerate(index.tolist())]
        processors = self._processors(params)
        # Decoding needs no LRU auxiliary loss or statistics: skip computing them at every token.
        fast = {"lru_diagnostics": False} if isinstance(self.model, LatentReasoningForCausalLM) else {}
        stop = torch.tensor(list(params.stop_token_ids), dtype=torch.long, device=device)
        out = self._prefill(unique_ids, unique_mask, index, fast)
        # The decode batch: its rows are ``live`` (indices into the output rows). Rows that finish stay in it,
        # fed padding, until a quarter of it has finished; then it is compacted, so the rows that run long do
        # not make every finished row pay for their tail (what generate() does).
        live = torch.arange(rows, device=device)
        sequence, attention = ids, mask
        position = position_ids_from_mask(mask)[:, -1:]
        finished = torch.zeros(rows, dtype=torch.bool, device=device)
        tokens = torch.full((rows, params.max_new_tokens), self.pad_token_id, dtype=torch.long, device=device)
        logprobs = torch.zeros(rows, params.max_new_tokens, device=device)
        lengths = torch.zeros(rows, dtype=torch.long, device=device)  # response tokens so far, stop token included
        steps = 0
        for step in range(params.max_new_tokens):
            steps = step + 1
            logits = out.logits[:, -1].float()  # (live rows, V)
            scaled = logits / params.temperature if params.temperature > 0 else logits
            if generators is None:
                token = processors(sequence, scaled).argmax(-1)
            else:
                token = self._sample(processors(sequence, scaled.clone()), generators)
            token = torch.where(finished, torch.full_like(token, self.pad_token_id), token)
            tokens[live, step] = token
            logprobs[live, step] = torch.where(finished, 0.0,
                                               logprobs_from_logits(scaled[:, None], token[:, None])[:, 0])
            lengths[live] += (~finished).long()
            finished = finished | torch.isin(token, stop)
            if bool(finished.all()):
                break
            if params.repetition_penalty != 1.0:  # the one processor that reads the tokens so far
                sequence = torch.cat([sequence, token[:, None]], dim=1)
            attention = torch.cat([attention, torch.ones_like(token[:, None])], dim=1)
            position = position + 1
            if 4 * int(finished.sum()) >= len(finished):
                keep = (~finished).nonzero().squeeze(1)
                live, sequence, attention, position, token, finished = (
                    t[keep] for t in (live, sequence, attention, position, token, finished))
                out.past_key_values.reorder_cache(keep)  # the LRU states too (LatentCache)
                generators = None if generators is None else [generators[i] for i in keep.tolist()]
            out = self.model(token[:, None], attention_mask=attention, position_ids=position,
                             past_key_values=out.past_key_values, use_cache=True, **fast)
        response_mask = torch.arange(steps, device=device) < lengths[:, None]
        return RolloutBatch(prompt_ids=ids, prompt_mask=mask, response_ids=tokens[:, :steps],
                            response_mask=response_mask.long(), logprobs=logprobs[:, :steps], prompt_index=index)

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor, index: torch.Tensor, fast: dict):
        """Run each distinct prompt once, then copy its cache rows and last logits to its n samples (rows
        ``index``): the n samples of a prompt share its prefill, which costs n times less than running
        every row (what ``generate(num_return_sequences=n)`` does)."""
        positions = position_ids_from_mask(mask)
        out = self.model(ids, attention_mask=mask, position_ids=positions, past_key_values=self._new_cache(),
                         use_cache=True, logits_to_keep=1, **fast)
        if index.shape[0] != ids.shape[0]:  # n > 1
            out.past_key_values.reorder_cache(index)
            out.logits = out.logits[index]
        return out

    @staticmethod
    def _sample(logits: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """Gumbel-max: argmax(logits + Gumbel noise) samples softmax(logits); one generator per row."""
        uniform = torch.stack([torch.rand(logits.shape[1], generator=g) for g in generators]).to(logits.device)
        gumbel = -torch.log(-torch.log(uniform.clamp(min=1e-20)))
        return (logits + gumbel).argmax(-1)


def sequence_logprobs(model: torch.nn.Module, batch: RolloutBatch, temperature: float) -> torch.Tensor:
    """The trainer's view: log softmax(logits / temperature) of each response token in one full forward.
    -> (B*n, R), 0 on padding. Equal to the rollout's logprobs for the same weights."""
    ids = torch.cat([batch.prompt_ids, batch.response_ids], dim=1)
    mask = torch.cat([batch.prompt_mask, batch.response_mask], dim=1)
    positions = position_ids_from_mask(mask)
    logits = model(ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
    prompt_len, resp_len = batch.prompt_ids.shape[1], batch.response_ids.shape[1]
    logits = logits[:, prompt_len - 1: prompt_len - 1 + resp_len].float()  # the logits that predicted them
    if temperature > 0:
        logits = logits / temperature
    return logprobs_from_logits(logits, batch.response_ids) * batch.response_mask


def logprob_parity(rollout: torch.Tensor, trainer: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """The rollout backend's logprobs against the trainer's recomputation, over response tokens (as verl
    logs rollout-vs-actor differences each step). rollout, trainer, mask: (B*n, R).
    -> {"rollout/logprob_diff_max", "rollout/logprob_diff_mean"}: max and mean |delta|."""
    diff = (rollout.float() - trainer.float()).abs()[mask.bool()]
    if diff.numel() == 0:
        return {"rollout/logprob_diff_max": 0.0, "rollout/logprob_diff_mean": 0.0}
    return {"rollout/logprob_diff_max": diff.max().item(), "rollout/logprob_diff_mean": diff.mean().item()}


def concat_rollouts(batches: list[RolloutBatch], prompt_ids: list[list[int]], pad_token_id: int) -> RolloutBatch:
    """Join batches generated for subsets of the prompts; ``prompt_ids[k]`` are the global indices of the
    prompts batch k answered. Prompts stay left-padded and responses right-padded to the widest."""
    p = max(b.prompt_ids.shape[1] for b in batches)
    r = max(b.response_ids.shape[1] for b in batches)

    def pad(t: torch.Tensor, width: int, value: int, left: bool) -> torch.Tensor:
        extra = width - t.shape[1]
        return torch.nn.functional.pad(t, (extra, 0) if left else (0, extra), value=value)

    return RolloutBatch(
        prompt_ids=torch.cat([pad(b.prompt_ids, p, pad_token_id, True) for b in batches]),
        prompt_mask=torch.cat([pad(b.prompt_mask, p, 0, True) for b in batches]),
        response_ids=torch.cat([pad(b.response_ids, r, pad_token_id, False) for b in batches]),
        response_mask=torch.cat([pad(b.response_mask, r, 0, False) for b in batches]),
        logprobs=torch.cat([pad(b.logprobs, r, 0, False) for b in batches]),
        prompt_index=torch.cat([torch.as_tensor(ids)[b.prompt_index] for b, ids in zip(batches, prompt_ids,
                                                                                     strict=True)]),
    )
