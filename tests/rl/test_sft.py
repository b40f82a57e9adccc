"""The warm start's optimiser schedule, with values worked out by hand."""

from __future__ import annotations

import pytest
import torch

from rl.sft import warm_start_optimizer


def test_warm_start_schedule_warms_up_then_decays_linearly_to_a_tenth():
    model = torch.nn.Linear(2, 2)
    optimizer, scheduler = warm_start_optimizer(model, lr=1e-3, total_steps=200, warmup_steps=50)
    lrs = []
    for _ in range(201):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(1e-3 / 50)  # step 0: 1/50 of the way up
    assert lrs[49] == pytest.approx(1e-3 * (1 - 0.9 * 49 / 200))  # warm-up done, decay under way
    assert lrs[100] == pytest.approx(1e-3 * 0.55)  # halfway: 1 - 0.9 / 2
    assert lrs[200] == pytest.approx(1e-4)  # the end: a tenth
    assert all(a >= b for a, b in zip(lrs[49:-1], lrs[50:], strict=True))
