"""The torch rollout backend: logprobs equal the trainer's recomputation, greedy equals HF generate(),
per-prompt seeds, stop tokens, weight loading."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import models
from rl.rollout import SamplingParams, TorchRolloutEngine, left_pad, sequence_logprobs

PROMPTS = [[5, 9, 13, 2], [7, 7], [3, 4, 5, 6, 8, 20, 21], [11]]


def build(group: str, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(models.tiny_config(group)).eval()


@pytest.mark.parametrize("group", models.GROUPS)
@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, max_new_tokens=12, n=2),
    SamplingParams(temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.2, max_new_tokens=12, n=3,
                   stop_token_ids=(4, 17)),
    SamplingParams(temperature=0.0, max_new_tokens=8),
], ids=["plain", "all-options", "greedy"])
def test_rollout_logprobs_equal_trainer_recomputation(group, params):
    model = build(group)
    batch = TorchRolloutEngine(model, pad_token_id=0).generate(PROMPTS, params, seeds=[1, 2, 3, 4])
    assert batch.response_ids.shape[0] == len(PROMPTS) * params.n
    with torch.no_grad():
        recomputed = sequence_logprobs(model, batch, params.temperature)
    assert (recomputed - batch.logprobs).abs().max() <= 1e-4
    assert (batch.logprobs[batch.response_mask == 0] == 0).all()


@pytest.mark.parametrize("group", ["baseline", "mla_lru_adaptive"])
def test_greedy_equals_transformers_generate(group):
    model = build(group)
    engine = TorchRolloutEngine(model, pad_token_id=0)
    batch = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=10))
    ids, mask = left_pad(PROMPTS, 0)
    reference = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(batch.response_ids, reference[:, ids.shape[1]:])


def test_seeds_are_per_prompt_and_reproducible():
    engine = TorchRolloutEngine(build("mla_lru_adaptive"), pad_token_id=0)
    params = SamplingParams(temperature=1.0, max_new_tokens=10, n=2)
    together = engine.generate(PROMPTS[:2], params, seeds=[10, 11])
    again = engine.generate(PROMPTS[:2], params, seeds=[10, 11])
    alone = engine.generate(PROMPTS[1:2], params, seeds=[11])
    assert torch.equal(together.response_ids, again.response_ids)
    assert torch.equal(together.response_ids[2:], alone.response_ids)  # prompt 1's samples, whatever the batch
    assert not torch.equal(together.response_ids[2], together.response_ids[3])  # n samples differ
    with pytest.raises(ValueError, match="one seed per prompt"):
        engine.generate(PROMPTS, params, seeds=[1])


@pytest.mark.parametrize("group", ["baseline", "mla_lru_adaptive"])
def test_samples_of_a_prompt_share_its_prefill_exactly(group):
    """n samples are prefilled once per prompt; greedy samples must equal one greedy response each."""
    engine = TorchRolloutEngine(build(group), pad_token_id=0)
    once = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=10))
    thrice = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=10, n=3))
    assert torch.equal(thrice.response_ids, once.response_ids.repeat_interleave(3, dim=0))
    assert torch.equal(thrice.prompt_ids, once.prompt_ids.repeat_interleave(3, dim=0))
    assert (thrice.logprobs - once.logprobs.repeat_interleave(3, dim=0)).abs().max() <= 1e-5


def test_stop_tokens_end_responses_and_mask_them_in():
    model = build("mla_only")
    engine = TorchRolloutEngine(model, pad_token_id=0)
    free = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=10))
    stop = int(free.response_ids[0, 3])  # the 4th token of row 0 becomes a stop token
    batch = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=10, stop_token_ids=(stop,)))
    first = int((free.response_ids[0] == stop).nonzero()[0])
    assert batch.response_mask[0].sum() == first + 1 and batch.response_ids[0, first] == stop
    assert (batch.response_ids[0, first + 1:] == 0).all()


@pytest.mark.parametrize("group", models.GROUPS)
def test_rows_that_stop_early_leave_the_batch_without_changing_the_others(group):
    """Finished rows are dropped from the decode batch (cache and LRU state included): every row must read as
    its own free-running response cut after its first stop token, with the same logprobs."""
    engine = TorchRolloutEngine(build(group), pad_token_id=0)
    prompts = PROMPTS * 2
    free = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=12))
    stops = tuple({int(free.response_ids[r, r + 1]) for r in range(3)})  # rows 0-2 stop by their 2nd-4th token
    batch = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=12, stop_token_ids=stops))
    lengths = []
    for r in range(len(prompts)):
        hits = torch.isin(free.response_ids[r], torch.tensor(stops)).nonzero()
        lengths.append(int(hits[0]) + 1 if len(hits) else 12)
        assert batch.response_mask[r].sum() == lengths[r]
        assert torch.equal(batch.response_ids[r, :lengths[r]], free.response_ids[r, :lengths[r]])
        assert (batch.response_ids[r, lengths[r]:] == 0).all()
    assert sum(length <= 4 for length in lengths) >= len(prompts) // 4 and max(lengths) > 6  # it did compact
    width = batch.logprobs.shape[1]
    assert ((batch.logprobs - free.logprobs[:, :width]) * batch.response_mask).abs().max() <= 1e-5

    sampled = SamplingParams(temperature=1.0, max_new_tokens=12, n=2, stop_token_ids=stops)
    together = engine.generate(prompts, sampled, seeds=list(range(len(prompts))))
    for i in range(len(prompts)):
        alone = engine.generate(prompts[i:i + 1], sampled, seeds=[i])
        length = alone.response_ids.shape[1]
        assert torch.equal(together.response_ids[2 * i: 2 * i + 2, :length], alone.response_ids)
        assert (together.response_ids[2 * i: 2 * i + 2, length:] == 0).all()


def test_load_weights_makes_the_engine_compute_the_trainers_model():
    trainer_model, engine_model = build("mla_lru_fixed", seed=1), build("mla_lru_fixed", seed=2)
    engine = TorchRolloutEngine(engine_model, pad_token_id=0)
    engine.load_weights(trainer_model.state_dict())
    for (name, a), (_, b) in zip(trainer_model.state_dict().items(), engine.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(RuntimeError, match="Missing key"):
        engine.load_weights({})


@pytest.mark.parametrize("kwargs", [{"temperature": -1}, {"top_p": 0}, {"n": 0}, {"max_new_tokens": 0}])
def test_bad_sampling_params(kwargs):
    with pytest.raises(ValueError, match="SamplingParams"):
        SamplingParams(**kwargs)
