"""A killed checkpoint write never leaves a checkpoint that loads as valid."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import models
from data.tokenizer import build_tokenizer
from rl.checkpoint import latest_checkpoint, load_state, save_checkpoint


def test_atomic_write_and_latest(tmp_path, monkeypatch):
    model = AutoModelForCausalLM.from_config(models.tiny_config("mla_only"))
    tokenizer = build_tokenizer()
    assert latest_checkpoint(tmp_path) is None
    first = save_checkpoint(tmp_path, 5, model, tokenizer, None, {"step": 5, "x": torch.ones(2)})
    assert latest_checkpoint(tmp_path) == first and load_state(first)["step"] == 5

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies half way through writing step 10

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 10, model, tokenizer, None, {"step": 10})
    assert latest_checkpoint(tmp_path) == first  # the half-written step 10 is ignored
    leftovers = [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        load_state(leftovers[0])
    loaded = AutoModelForCausalLM.from_pretrained(first / "policy")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values(),
                                                   strict=True))
