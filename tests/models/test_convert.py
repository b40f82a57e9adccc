"""The retrofit (models/convert.py): a tiny random Qwen2 converted to every MLA group.

Tolerances are measured, fp32 on the CPU: the exact conversions (every rotary pair kept, C >= F) differ from
the source by ~1.5e-6 in the logits (logits of std ~0.2); 1e-4 leaves rounding room and fails any real
mistake (a wrong head, slot or frequency moves logits by > 0.1)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import models
from data.tokenizer import build_tokenizer
from models import LatentReasoningForCausalLM, count_params
from models.convert import GROUPS, calibration_batch, convert, convert_model, logit_error, main, pair_scores
from tests.models.helpers import decode_step_by_step, left_padded_batch

EXACT = 1e-4
G, D = 2, 16  # key/value heads, head size of the tiny source


def tiny_qwen2(seed: int = 0, vocab: int = 128) -> Qwen2ForCausalLM:
    """A random Qwen2 (GQA: 4 query heads on 2 key/value heads of 16) with non-zero q/k/v biases and weights
    large enough that attention is far from uniform, so a mis-mapped head or frequency shows in the logits."""
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=G, max_position_embeddings=256,
                      tie_word_embeddings=True, pad_token_id=0, eos_token_id=1)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
            elif "self_attn" in name:
                p.normal_(0, 0.3)
    return model


def silence_pairs(model: Qwen2ForCausalLM, kept: list[list[int]]) -> None:
    """Zero the key rows (and biases) of every rotary pair of head g outside ``kept[g]`` in every layer: the
    dropped pairs then add nothing to any score, so partial RoPE keeping ``kept`` is exact."""
    with torch.no_grad():
        for layer in model.model.layers:
            k = layer.self_attn.k_proj
            for g, pairs in enumerate(kept):
                for i in set(range(D // 2)) - set(pairs):
                    for dim in (i, i + D // 2):
                        k.weight[g * D + dim] = 0
                        k.bias[g * D + dim] = 0


def ids_batch(seed: int = 0, b: int = 2, t: int = 24) -> torch.Tensor:
    return torch.randint(0, 128, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory):
    """A saved tiny Qwen2 with the task tokenizer and a generation config, as a local checkpoint is."""
    path = tmp_path_factory.mktemp("qwen2")
    tokenizer = build_tokenizer()
    vocab = -(-len(tokenizer) // 8) * 8
    model = tiny_qwen2(vocab=vocab)
    model.generation_config.max_new_tokens = 7
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("group", GROUPS)
def test_full_width_conversion_is_the_source(source_dir, tmp_path, group):
    """Every pair rotary (R = G*D, Dn = 0) and C = F: the converted model, saved and loaded back through
    AutoModelForCausalLM, gives the source's logits; tokenizer, generation config and record come along."""
    info = convert(source_dir, group, tmp_path, qk_rope_head_dim=G * D)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, LatentReasoningForCausalLM)
    assert (info["kv_lora_rank"], info["qk_nope_head_dim"], loaded.config.use_lru) == (G * D, 0, group != "mla_only")
    source = AutoModelForCausalLM.from_pretrained(source_dir).eval()
    ids = ids_batch()
    assert logit_error(source, loaded, ids)["max_abs"] < EXACT
    assert (tmp_path / "tokenizer.json").is_file() and loaded.generation_config.max_new_tokens == 7
    assert json.loads((tmp_path / "convert_info.json").read_text())["group"] == group
    assert count_params(loaded.config) == sum(p.numel() for p in loaded.parameters())


def test_partial_rope_is_exact_when_the_dropped_pairs_are_silent():
    """Different kept pairs per head (slots, frequencies and query placement all exercised): with the dropped
    pairs' keys zero the conversion is exact at C = F; the 2-norm criterion picks exactly the live pairs."""
    kept = [[1, 4, 6], [0, 2, 7]]
    source = tiny_qwen2(seed=1)
    silence_pairs(source, kept)
    for calibration in (None, ids_batch(seed=2)):
        scores = pair_scores(source, calibration)
        assert sorted(scores[0].topk(3).indices.tolist()) == kept[0]
        target = convert_model(source, "mla_only", qk_rope_head_dim=2 * 3 * G, calibration_ids=calibration)
        assert target.config.qk_nope_head_dim == D - 6 and target.config.kv_lora_rank == G * (D - 6 + D)
        assert logit_error(source, target, ids_batch())["max_abs"] < EXACT


def test_error_grows_as_the_latent_narrows():
    """Joint SVD below C = F: exact down to the rank of the stacked projections (here 2 value heads of 16: the
    silenced pairs are every position-free key dimension), then the error grows as C shrinks."""
    kept = [[0, 3], [5, 6]]
    source = tiny_qwen2(seed=3)
    silence_pairs(source, kept)
    full = G * (D - 4 + D)
    errors = [logit_error(source, convert_model(source, "mla_only", c, 2 * 2 * G), ids_batch())["kl"]
              for c in (full, 32, 24, 16, 8)]
    assert max(errors[:2]) < 1e-10 and errors[2] > 1e-6
    assert errors == sorted(errors)


@pytest.mark.parametrize("group", ["mla_lru_fixed", "mla_lru_adaptive"])
def test_lru_is_a_no_op_at_start(group, tmp_path):
    """A retrofitted LRU model computes exactly (bitwise) the converted mla_only model, left padding included,
    after a save/load, and the residual gate gets a gradient (the unit can still learn)."""
    source = tiny_qwen2(seed=4)
    plain = convert_model(source, "mla_only", 40, 16)
    lru = convert_model(source, group, 40, 16)
    lru.save_pretrained(tmp_path)
    lru = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert lru.config.lru_residual_gate and lru.config.rope_inv_freq == plain.config.rope_inv_freq
    ids, mask, positions = left_padded_batch()
    with torch.no_grad():
        want = plain(ids, attention_mask=mask, position_ids=positions).logits
        got = lru(ids, attention_mask=mask, position_ids=positions).logits
    valid = mask.bool()
    assert torch.equal(got[valid], want[valid])
    out = lru(ids, attention_mask=mask, position_ids=positions, labels=ids)
    out.loss.backward()
    gate = lru.model.layers[0].self_attn.lru.residual_gate
    assert torch.count_nonzero(gate).item() == 0 and gate.grad.abs().sum() > 0


@pytest.mark.parametrize("group", GROUPS)
def test_cached_decode_equals_full_forward(group):
    """After conversion (partial RoPE, a narrow latent): step-by-step cached decode (absorbed) equals the full
    forward, and greedy generate with the cache gives the tokens of generate without it."""
    model = convert_model(tiny_qwen2(seed=5), group, 24, 8)
    ids, mask, positions = left_padded_batch()
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=positions).logits
    stepped = decode_step_by_step(model, ids, mask, positions, prefill=6)
    valid = mask.bool()
    assert (stepped[valid] - full[valid]).abs().max() < EXACT
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    cached = model.generate(ids, use_cache=True, **kwargs)
    uncached = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_refuses_what_it_does_not_convert(tmp_path):
    """Not Qwen2, sliding-window attention, a bad rotary size, a bad group: refused, the field named."""
    llama = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(llama)
    with pytest.raises(ValueError, match="model_type='llama'"):
        convert(llama, "mla_only", tmp_path / "out")
    with pytest.raises(ValueError, match="no config.json"):
        convert(tmp_path / "missing", "mla_only", tmp_path / "out")
    source = tiny_qwen2()
    with pytest.raises(ValueError, match="qk_rope_head_dim=6"):
        convert_model(source, "mla_only", qk_rope_head_dim=6)
    with pytest.raises(ValueError, match="group='baseline'"):
        convert_model(source, "baseline")
    source.config.use_sliding_window = True
    with pytest.raises(ValueError, match="use_sliding_window"):
        convert_model(source, "mla_only")


def test_command_line(source_dir, tmp_path, capsys):
    """``python -m models.convert``: calibrates on the task's text through the source tokenizer, records the
    plan and the measured error beside the weights."""
    main(["--from", str(source_dir), "--group", "mla_lru_adaptive", "--out", str(tmp_path),
          "--kv_lora_rank", "40", "--qk_rope_head_dim", "8"])
    info = json.loads(capsys.readouterr().out)
    # R = 8 keeps r = R / 2G = 2 pairs of each head: Dn = 16 - 4, F = G (Dn + D)
    assert (info["kv_lora_rank"], info["qk_rope_head_dim"], info["exact_latent_width"]) == (40, 8, 2 * (12 + 16))
    assert 0 <= info["logit_error"]["kl"] < 1 and info["logit_error"]["top1_agree"] > 0
    assert models.LatentReasoningConfig.from_pretrained(tmp_path).rope_inv_freq is not None
    assert calibration_batch(None) is None


@pytest.fixture(scope="module")
def warmed_dir(tmp_path_factory):
    """A tiny Qwen2 warmed up on the task's text in the test (the project's own "pretrained" model: 60
    steps, far from converged but no longer random), saved with its tokenizer."""
    from data.causal_loop import TaskConfig, generate
    from rl.sft import sft_step, warm_start_optimizer

    path = tmp_path_factory.mktemp("warmed")
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(models.tiny_config("baseline", match_params=False,
                                                vocab_size=-(-len(tokenizer) // 8) * 8,
                                                pad_token_id=tokenizer.pad_token_id,
                                                eos_token_id=tokenizer.eos_token_id))
    optimizer, schedule = warm_start_optimizer(model, 1e-3, 60, warmup_steps=5)
    batch = generate(TaskConfig(), 60 * 8, seed=1)  # the calibration text's distribution, other problems
    for step in range(60):  # language modelling of the whole text (an empty prompt: every token a label)
        texts = [batch.problem(step * 8 + i).question() + "\n" + batch.problem(step * 8 + i).solution()
                 for i in range(8)]
        sft_step(model, optimizer, [[]] * 8, [tokenizer(t)["input_ids"][:256] for t in texts], tokenizer.pad_token_id)
        schedule.step()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, tokenizer


@pytest.mark.parametrize("group", GROUPS)
def test_a_warmed_up_checkpoint_converts_with_its_loss_kept(warmed_dir, tmp_path, group):
    """On the task's text the warmed-up model's loss (well below a random model's ln V) is the converted one's
    at full width, and within a few percent with half the rotary pairs (the default R)."""
    path, tokenizer = warmed_dir
    ids = calibration_batch(tokenizer)
    source = Qwen2Config.from_pretrained(path)
    every_pair = source.num_key_value_heads * source.hidden_size // source.num_attention_heads
    exact = convert(path, group, tmp_path / "exact", qk_rope_head_dim=every_pair, calibration_ids=ids)
    error = exact["logit_error"]
    assert error["loss_source"] < 0.5 * torch.log(torch.tensor(float(len(tokenizer)))).item()
    assert error["max_abs"] < EXACT and abs(error["loss_converted"] - error["loss_source"]) < 1e-5
    half = convert(path, group, tmp_path / "half", calibration_ids=ids)["logit_error"]
    assert half["loss_converted"] < 1.05 * half["loss_source"]


def test_the_task_tokenizer_beside_a_qwen2_config_loads_as_saved(source_dir):
    """AutoTokenizer swaps the saved class for Qwen2Tokenizer beside a qwen2 config (transformers'
    MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS), which re-tokenises the task's vocabulary; load_tokenizer, which
    the driver, the evaluation and the conversion use, keeps the saved one, so a checkpoint's ids are its run's."""
    from transformers import AutoTokenizer

    from data.tokenizer import load_tokenizer

    text = "user: A=1, B=5\nB = B + A\n2 times, simultaneous, modulo 10\nassistant:"
    want = build_tokenizer()(text)["input_ids"]
    loaded = load_tokenizer(source_dir)
    assert loaded(text)["input_ids"] == want and loaded.padding_side == "left" and loaded.chat_template
    assert AutoTokenizer.from_pretrained(source_dir)(text)["input_ids"] != want  # the trap, as it stands
