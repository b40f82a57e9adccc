"""vLLM serving our checkpoints (the plugin in models/vllm, the backend in rl/vllm_rollout.py), against the
trainer: token logprobs equal ``rl.rollout.sequence_logprobs`` within 1e-4 in fp32 for every group, before
and after a weight update, with prompts long enough to hit the prefix cache; greedy tokens equal the torch
backend's. Skipped without vLLM (the main environment); run with ``.venv-vllm/bin/python -m pytest -m vllm``.

One engine per case (module-scoped: a start is 20-50 s on 2 CPU cores); the model and the engine always
hold the same weights.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import models

vllm = pytest.importorskip("vllm", reason="needs vLLM: the .venv-vllm environment (README, the vLLM backend)")

from vllm.engine.arg_utils import EngineArgs  # noqa: E402

from rl.rollout import SamplingParams, TorchRolloutEngine, sequence_logprobs  # noqa: E402
from rl.vllm_rollout import VLLMRolloutEngine, logprob_parity  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

# case -> (group, config overrides, the temperature the engine is built for and samples at)
CASES = {
    "baseline": ("baseline", {}, 1.0),
    "mla_only": ("mla_only", {}, 1.0),
    "mla_lru_fixed": ("mla_lru_fixed", {}, 1.0),
    "mla_lru_adaptive": ("mla_lru_adaptive", {}, 1.0),
    # The other options in one engine: global halting (running sums in the LRU state), the LRU on some layers
    # only, low-rank queries, biases, a latent whose head (C + R = 56) is zero-padded to 64; sampled at 0.7,
    # where the engine returns vLLM's processed logprobs.
    "mla_lru_options": ("mla_lru_adaptive", {"lru_global_halting": 0.5, "lru_layers": [1, 3], "q_lora_rank": 32,
                                             "attention_bias": True, "kv_lora_rank": 40}, 0.7),
}
BLOCK = 32  # KV block (and LRU state checkpoint) size: a prompt longer than a block can hit the prefix cache
TOLERANCE = 1e-4


def build(group: str, overrides: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(models.tiny_config(group, **overrides)).eval()
    with torch.no_grad():  # a fresh LRU is close to the identity and halts early: make it mix and halt unevenly
        for name, p in model.named_parameters():
            if ".lru." in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    shared = torch.randint(3, 128, (70,), generator=g).tolist()
    # two prompts share 45 tokens; one spans more than two blocks; one is shorter than a block
    return [shared[:66], shared[:45], torch.randint(3, 128, (5,), generator=g).tolist(),
            torch.randint(3, 128, (37,), generator=g).tolist()]


@pytest.fixture(scope="module", params=list(CASES))
def served(request):
    group, overrides, temperature = CASES[request.param]
    model = build(group, overrides)
    # enforce_eager: vLLM would torch.compile its Qwen2 first (a minute on 2 cores); ours always runs eagerly
    engine = VLLMRolloutEngine(model, pad_token_id=0, temperature=temperature, max_model_len=256,
                               block_size=BLOCK, disable_log_stats=False, enforce_eager=True)
    yield request.param, model, engine, temperature
    engine.close()


def prefix_cache_hits(engine: VLLMRolloutEngine) -> int:
    return sum(m.value for m in engine.llm.get_metrics() if m.name == "vllm:prefix_cache_hits")


def check_parity(model, engine, params: SamplingParams, seeds: list[int]) -> dict[str, float]:
    batch = engine.generate(prompts(), params, seeds)
    with torch.no_grad():
        recomputed = sequence_logprobs(model, batch, params.temperature)
    parity = logprob_parity(batch.logprobs, recomputed, batch.response_mask)
    print(parity)  # shown with -s: the measured numbers
    assert parity["rollout/logprob_diff_max"] <= TOLERANCE, parity
    assert (batch.logprobs[batch.response_mask == 0] == 0).all()
    return parity


def test_logprobs_equal_the_trainers_before_and_after_a_weight_update(served):
    _, model, engine, temperature = served
    params = SamplingParams(temperature=temperature, max_new_tokens=16, n=3)
    assert engine.logprobs_exact(params)
    check_parity(model, engine, params, seeds=[1, 2, 3, 4])
    cold = prefix_cache_hits(engine)
    check_parity(model, engine, params, seeds=[5, 6, 7, 8])  # the same prompts again: their blocks are cached
    warm = prefix_cache_hits(engine)
    assert warm > cold

    with torch.no_grad():  # a trainer step
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    engine.load_weights(model.state_dict())
    # The prompts' blocks were cached under the old weights: had they survived, these logprobs would be off.
    check_parity(model, engine, params, seeds=[1, 2, 3, 4])
    hits = prefix_cache_hits(engine)
    check_parity(model, engine, params, seeds=[5, 6, 7, 8])
    assert prefix_cache_hits(engine) > hits


def test_greedy_tokens_equal_the_torch_backends(served):
    _, model, engine, _ = served
    params = SamplingParams(temperature=0.0, max_new_tokens=16)
    got = engine.generate(prompts(), params)
    want = TorchRolloutEngine(model, pad_token_id=0).generate(prompts(), params)
    assert torch.equal(got.response_ids, want.response_ids)
    assert torch.equal(got.prompt_ids, want.prompt_ids) and torch.equal(got.prompt_index, want.prompt_index)
    assert (got.logprobs - want.logprobs).abs().max() <= TOLERANCE


def test_seeds_stops_and_weight_names(served):
    case, model, engine, _ = served
    if case != "mla_lru_adaptive":
        pytest.skip("engine behaviour shared by all cases: checked once, on the main experiment's model")
    params = SamplingParams(temperature=1.0, max_new_tokens=24, n=4, stop_token_ids=(5, 9))
    first, again = (engine.generate(prompts(), params, seeds=[1, 2, 3, 4]) for _ in range(2))
    assert torch.equal(first.response_ids, again.response_ids) and torch.equal(first.logprobs, again.logprobs)
    other = engine.generate(prompts(), params, seeds=[1, 2, 3, 5])
    assert not torch.equal(first.response_ids, other.response_ids)
    assert first.prompt_index.tolist() == [i for i in range(4) for _ in range(4)]
    for row, length in zip(first.response_ids, first.response_lengths, strict=True):
        stops = torch.isin(row[:length], torch.tensor([5, 9])).nonzero().flatten().tolist()
        assert stops in ([], [length - 1])  # a stop token ends the response and is kept in it
        assert length == 24 or stops
        assert (row[length:] == 0).all()
    assert (first.response_lengths < 24).any()  # some response did stop
    with pytest.raises(ValueError, match="missing"):
        engine.load_weights({k: v for k, v in model.state_dict().items() if "lru" not in k})


SERVED_GROUPS = [g for g in models.GROUPS if g != "looped"]  # the looped control has no vLLM model


@pytest.mark.parametrize("group", SERVED_GROUPS)
def test_a_saved_checkpoint_configures_vllm_with_nothing_else_to_do(group, tmp_path):
    """What vllm.LLM(model=dir) resolves (no engine started): our architecture and the hooks' geometry."""
    AutoModelForCausalLM.from_config(models.tiny_config(group)).save_pretrained(tmp_path)
    config = EngineArgs(model=str(tmp_path), skip_tokenizer_init=True).create_engine_config().model_config
    if group == "baseline":
        assert config.architecture == "Qwen2ForCausalLM"  # vLLM's own
        return
    assert config.architecture == "LatentReasoningForCausalLM"
    assert config.get_head_size() == 80 and config.get_total_num_kv_heads() == 1  # C + R = 64 + 16, one KV head
    assert config.is_hybrid == config.hf_config.use_lru  # the LRU's state is what makes it a hybrid
    assert config.enforce_eager


def test_a_model_without_a_vllm_twin_is_refused_before_the_engine_starts(tmp_path):
    AutoModelForCausalLM.from_config(models.tiny_config("looped")).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="rollout.backend=torch"):
        VLLMRolloutEngine(tmp_path, pad_token_id=0)
