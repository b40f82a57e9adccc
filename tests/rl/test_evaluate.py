"""rl.evaluate on a real checkpoint directory: greedy accuracy equals scoring HF generate()'s greedy
answers by hand, pass@k has its closed form, and LRU iterations are broken down by difficulty."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import models
from data.causal_loop.__main__ import main as write_dataset
from data.tokenizer import build_tokenizer
from rewards.causal_loop import compute_score
from rl.evaluate import load_problem_sets, main, pass_at_k, resolve_model_dir
from rl.prompts import encode_prompt


def test_pass_at_k_by_hand():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 1, 4) == 1.0


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    write_dataset(["--local_dir", str(root / "data"), "--num_samples", "10", "--num_test", "6", "--num_heldout", "0",
                   "--levels", "1", "--num_vars", "2,2", "--num_steps", "1,3", "--quiet"])
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(models.tiny_config(
        "mla_lru_adaptive", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return root


def test_evaluate_a_model_directory(model_and_data):
    import pyarrow.parquet as pq

    root = model_and_data
    out = root / "eval.json"
    assert main([str(root / "model"), "--data", str(root / "data" / "test.parquet"), "--k", "2", "--samples", "3",
                 "--max-new-tokens", "12", "--out", str(out)]) == 0
    result = json.loads(out.read_text())["sets"]["test"]
    # Reference: transformers' own greedy generate(), one prompt at a time, scored by the reward itself.
    model = AutoModelForCausalLM.from_pretrained(root / "model").eval()
    tokenizer = build_tokenizer()
    rows = pq.read_table(root / "data" / "test.parquet").to_pylist()
    scores, texts = [], []
    for row in rows:
        ids = torch.tensor([encode_prompt(tokenizer, row, "chat")])
        full = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(full[0, ids.shape[1]:], skip_special_tokens=True)
        texts.append(text)
        scores.append(compute_score(row["data_source"], text, row["reward_model"]["ground_truth"])["score"])
    assert result["greedy_responses"] == texts
    assert result["problems"] == 6 and result["greedy_score"] == pytest.approx(sum(scores) / 6)
    assert 0.0 <= result["sampled_acc_mean"] <= result["pass@2"] <= 1.0 and 0.0 <= result["sampled_acc"] <= 1.0
    steps = {str(r["extra_info"]["num_steps"]) for r in rows}
    assert set(result["greedy_acc_by"]["num_steps"]) == steps
    assert set(result["lru_iterations_by"]["num_steps"]) == steps
    assert 1.0 <= result["lru_iterations_mean"] <= model.config.lru_max_iterations


def test_bad_paths_get_clear_errors(tmp_path, model_and_data, capsys):
    with pytest.raises(ValueError, match="not a model directory"):
        resolve_model_dir(tmp_path)
    (tmp_path / "step_000001" / "policy").mkdir(parents=True)
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        resolve_model_dir(tmp_path / "step_000001")
    with pytest.raises(SystemExit):
        main([str(model_and_data / "model")])  # a bare model directory: which problems?
    assert "pass --data" in capsys.readouterr().err
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"question": ["1+1"]}), tmp_path / "other.parquet")
    with pytest.raises(ValueError, match=r"not a verl-schema problem file, missing columns \['data_source'"):
        load_problem_sets([str(tmp_path / "other.parquet")], None, None)


def test_response_iterations_equal_each_response_alone(model_and_data):
    """Chunked, left-padded and right-padded as the evaluation batches them, each response's mean iterations
    equal the same prompt + response run alone (the reference: lru_iterations averaged by hand)."""
    from rl.heldout import response_iterations
    from rl.rollout import RolloutBatch

    model = AutoModelForCausalLM.from_pretrained(model_and_data / "model").eval()
    torch.manual_seed(1)
    prompts = [torch.randint(5, 60, (n,)) for n in (3, 5, 4)]
    responses = [torch.randint(5, 60, (n,)) for n in (2, 4, 1)]
    P, R = max(map(len, prompts)), max(map(len, responses))
    batch = RolloutBatch(
        prompt_ids=torch.stack([torch.cat([torch.zeros(P - len(p), dtype=torch.long), p]) for p in prompts]),
        prompt_mask=torch.stack([torch.cat([torch.zeros(P - len(p)), torch.ones(len(p))]).long() for p in prompts]),
        response_ids=torch.stack([torch.cat([r, torch.zeros(R - len(r), dtype=torch.long)]) for r in responses]),
        response_mask=torch.stack([torch.cat([torch.ones(len(r)), torch.zeros(R - len(r))]).bool()
                                   for r in responses]),
        logprobs=torch.zeros(3, R), prompt_index=torch.arange(3))
    expected = []
    for p, r in zip(prompts, responses, strict=True):
        out = model(torch.cat([p, r])[None], use_cache=False)
        expected.append(out.lru_iterations.float().mean(0)[0, len(p):].mean().item())  # (layers, 1, T) -> response
    model.train()
    assert response_iterations(model, batch, chunk=2) == pytest.approx(expected, abs=1e-6)
    assert model.training  # the caller's mode is kept
    assert response_iterations(model, batch) == pytest.approx(expected, abs=1e-6)
