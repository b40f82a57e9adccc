"""Supervised warm start on worked solutions: cross-entropy on the response tokens only.

A tiny model trained from scratch would see only zero rewards under PPO; a warm start on the generator's
worked solutions (``trainer.sft_steps``: 1,200 in the tiny default) teaches it the answer format and some
of the task first.
"""

from __future__ import annotations

import torch

from models import position_ids_from_mask
from rl.rollout import left_pad


def sft_batch(prompts: list[list[int]], responses: list[list[int]], pad_token_id: int):
    """(input_ids, attention_mask, labels): prompt + response, left-padded; labels -100 outside responses."""
    ids, mask = left_pad([p + r for p, r in zip(prompts, responses, strict=True)], pad_token_id)
    labels = torch.full_like(ids, -100)
    for row, response in enumerate(responses):
        labels[row, ids.shape[1] - len(response):] = torch.tensor(response)
    return ids, mask, labels


def warm_start_optimizer(model, lr: float, total_steps: int, warmup_steps: int = 50, final_fraction: float = 0.1):
    """AdamW without weight decay, a linear warm-up, then a linear decay to ``final_fraction`` of ``lr``
    at ``total_steps``: the settings the tiny default was tuned with (README, "What the tiny default shows")."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)

    def factor(step: int) -> float:
        warm_up = min(1.0, (step + 1) / warmup_steps)
        return warm_up * (1.0 - (1.0 - final_fraction) * min(step / max(total_steps, 1), 1.0))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def sft_step(model, optimizer, prompts, responses, pad_token_id: int, max_grad_norm: float = 1.0) -> float:
    ids, mask, labels = sft_batch(prompts, responses, pad_token_id)
    device = next(model.parameters()).device
    positions = position_ids_from_mask(mask)
    model.train()
    out = model(ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                labels=labels.to(device), use_cache=False)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    return out.loss.detach().item()
