"""The trainer's forward over prompt + response rows, with each distinct prompt run once (prefix sharing).

A PPO/GRPO batch holds n samples of every prompt, and a plain forward recomputes the prompt for each of
them: at the tiny default 125 of ~155 tokens per row. Here the distinct prompts of the rows go through the
model once with a KV cache; the cache is copied to their rows (``reorder_cache``: an ``index_select``,
so gradients flow back into the prompt's activations) and the responses run on top of it. Positions and
masks are those of the full forward, so the outputs are the same up to float rounding, and so are
the gradients (tests/rl/test_shared_prompt.py). ``prompt_index=None`` is the plain forward.

Written here because the peer this project benchmarks against (TRL's GRPOTrainer) recomputes the prompt
per sample; only the caching API of ``transformers`` is needed to avoid it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models import ValueHeadModel, position_ids_from_mask
from models.lru import LRUResult, lru_summary

# The per-position fields lru_summary reads.
_SUMMARY_FIELDS = ("iterations", "remainder", "stability", "sparsity", "convergence")


@dataclass
class ResponseOutputs:
    outputs: torch.Tensor  # (B, R, V) logits or (B, R) values at the positions that predict each response token
    aux_loss: torch.Tensor | None = None  # the LRU auxiliary loss over every valid position of the full rows
    lru_stats: dict[str, torch.Tensor] | None = None


def response_outputs(module, config, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int,
                     prompt_index: torch.Tensor | None = None) -> ResponseOutputs:
    """Run ``module`` over rows of a left-padded prompt then a right-padded response of ``response_len`` tokens
    and keep its outputs at the positions that predict the response tokens: the logits of a causal LM, or the
    values of a ``ValueHeadModel`` (either's own forward, so any head scaling or soft-capping stays).
    ``prompt_index`` (B,) says which rows share a prompt: each shared prompt then runs once. The LRU aux loss
    and statistics (LRU models) weigh positions as the full forward does."""
    field = "values" if isinstance(module, ValueHeadModel) else "logits"
    positions = position_ids_from_mask(attention_mask)
    head_only = {"logits_to_keep": response_len + 1} if field == "logits" else {}
    if prompt_index is None:
        out = module(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False,
                     **head_only)
        outputs = getattr(out, field)[:, -response_len - 1: -1]
        return _with_lru(outputs, getattr(out, "lru_results", None), getattr(out, "valid", None), config)

    p = input_ids.shape[1] - response_len
    first, row_group = _first_rows(prompt_index)
    if not torch.equal(input_ids[first[row_group], :p], input_ids[:, :p]):
        raise ValueError("rows with the same prompt_index have different prompt tokens")
    prompt = module(input_ids=input_ids[first, :p], attention_mask=attention_mask[first, :p],
                    position_ids=positions[first, :p], use_cache=True, **({"logits_to_keep": 1} if head_only else {}))
    cache = prompt.past_key_values
    cache.reorder_cache(row_group)  # each row gets its prompt's cache (and LRU state)
    response = module(input_ids=input_ids[:, p:], attention_mask=attention_mask, position_ids=positions[:, p:],
                      past_key_values=cache, use_cache=True)
    # Left padding puts every prompt's last token in the last column: its output predicts the first response token.
    outputs = torch.cat([getattr(prompt, field)[row_group, -1:], getattr(response, field)[:, :-1]], dim=1)
    results = getattr(response, "lru_results", None)
    if not results:
        return ResponseOutputs(outputs)
    # A prompt position stands for as many positions of the full forward as the prompt has rows here.
    multiplicity = torch.bincount(row_group, minlength=len(first)).to(outputs.dtype)
    prompt_weight = prompt.valid * multiplicity[:, None]
    merged = [LRUResult(**{f: torch.cat([getattr(a, f).flatten(), getattr(b, f).flatten()])[None]
                           for f in _SUMMARY_FIELDS})
              for a, b in zip(prompt.lru_results, results, strict=True)]
    weight = torch.cat([prompt_weight.flatten(), response.valid.to(outputs.dtype).flatten()])[None]
    return _with_lru(outputs, merged, weight, config)


def _first_rows(prompt_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> the first row of each distinct prompt (G,), and each row's position among them (B,)."""
    _, row_group = torch.unique(prompt_index, return_inverse=True)
    rows = torch.arange(len(prompt_index), device=prompt_index.device)
    first = torch.full((int(row_group.max()) + 1,), len(prompt_index), device=prompt_index.device)
    return first.scatter_reduce(0, row_group, rows, "amin"), row_group


def _with_lru(outputs, results, weight, config) -> ResponseOutputs:
    if not results:
        return ResponseOutputs(outputs)
    aux, _, stats, _ = lru_summary(results, weight, config)
    return ResponseOutputs(outputs, aux, stats)


def group_ordered_permutation(prompt_index: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random order of the rows that shuffles whole prompt groups and keeps each group's rows together,
    so a minibatch (and a micro-batch) holds few distinct prompts to share."""
    _, row_group = torch.unique(prompt_index, return_inverse=True)
    rank = torch.randperm(int(row_group.max()) + 1, generator=generator)
    return torch.sort(rank[row_group.cpu()], stable=True).indices
