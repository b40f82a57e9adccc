"""generate() on the MLA groups: every decoding mode gives the tokens (and logits) of the plain one; dict
outputs have their attentions and hidden states; static caches and fullgraph compilation for MLA alone,
refused for the LRU groups. CPU, fp32, tiny configs, a few tokens."""

from __future__ import annotations

import pytest
import torch
from transformers import StaticCache

import models
from models import LatentCache, position_ids_from_mask
from tests.models.helpers import MLA_IDS, MLA_VARIANTS, VOCAB, build, left_padded_batch

LRU_VARIANTS, LRU_IDS = MLA_VARIANTS[1:], MLA_IDS[1:]
# A prompt with a repeated 4-gram, so prompt lookup finds drafts (which the model then mostly rejects).
REPEATING = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])
GREEDY = dict(do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)


def untied(group: str, overrides: dict):
    # Tied embeddings make a random tiny model repeat its last token, and a tiny assistant then guesses every
    # draft right: untied, the model's choices vary and the assistant's drafts are rejected (cropped).
    return build(group, tie_word_embeddings=False, **overrides)


@pytest.mark.parametrize("group, overrides", MLA_VARIANTS, ids=MLA_IDS)
def test_assisted_and_prompt_lookup_decoding_equal_greedy(group, overrides):
    model = untied(group, overrides)
    assistant = build(group, seed=1, num_hidden_layers=1, **overrides)
    with torch.no_grad():
        greedy = model.generate(REPEATING, max_new_tokens=8, **GREEDY)
        for mode in (dict(assistant_model=assistant), dict(prompt_lookup_num_tokens=3)):
            other = model.generate(REPEATING, max_new_tokens=8, **GREEDY, **mode)
            assert torch.equal(other.sequences, greedy.sequences), mode
            # Logits, not just tokens: an LRU state left over from rejected drafts moves them by ~1e-4.
            assert (torch.stack(other.logits, 1) - torch.stack(greedy.logits, 1)).abs().max() <= 1e-5, mode


@pytest.mark.parametrize("group, overrides", MLA_VARIANTS, ids=MLA_IDS)
def test_sampling_and_beam_search_with_cache_equal_without(group, overrides):
    model = build(group, **overrides)
    ids, mask, _ = left_padded_batch(seed=5, t=6)
    kwargs = dict(attention_mask=mask, max_new_tokens=5, pad_token_id=0)
    with torch.no_grad():
        for mode in (dict(do_sample=True, top_k=0, num_return_sequences=2), dict(num_beams=3, do_sample=False)):
            runs = []
            for use_cache in (True, False):
                torch.manual_seed(0)
                runs.append(model.generate(ids, use_cache=use_cache, **kwargs, **mode))
            assert torch.equal(*runs), mode


@pytest.mark.parametrize("group, overrides", MLA_VARIANTS, ids=MLA_IDS)
def test_dict_outputs_carry_attentions_and_hidden_states(group, overrides):
    model = untied(group, overrides)
    assistant = build(group, seed=1, num_hidden_layers=1, **overrides)
    layers, heads, d = model.config.num_hidden_layers, model.config.num_attention_heads, model.config.hidden_size
    p = REPEATING.shape[1]
    kwargs = dict(max_new_tokens=3, output_attentions=True, output_hidden_states=True, **GREEDY)
    with torch.no_grad():
        for mode in ({}, dict(assistant_model=assistant)):  # assisted decoding read outputs.attentions[0]
            out = model.generate(REPEATING, **kwargs, **mode)
            assert len(out.attentions) == len(out.hidden_states) == 3, mode  # one entry per new token
            assert len(out.attentions[0]) == layers and len(out.hidden_states[0]) == layers + 1
            assert out.attentions[0][0].shape == (1, heads, p, p) and out.hidden_states[0][0].shape == (1, p, d)
            last = out.attentions[-1][0]  # the last new token, over everything before it
            assert last.shape == (1, heads, 1, p + 2) and torch.allclose(last.sum(-1), torch.ones(1, heads, 1))


@pytest.mark.parametrize("group, overrides", [("mla_only", {}), ("mla_lru_adaptive", {"lru_global_halting": 0.5})],
                         ids=["mla_only", "mla_lru_adaptive-global"])
def test_chunked_prefill_equals_one_prefill(group, overrides):
    model = build(group, **overrides)
    ids, mask, _ = left_padded_batch(seed=6, t=9)
    kwargs = dict(attention_mask=mask, max_new_tokens=3, **GREEDY)
    with torch.no_grad():
        whole = model.generate(ids, **kwargs)
        chunked = model.generate(ids, prefill_chunk_size=4, **kwargs)
    assert torch.equal(whole.sequences, chunked.sequences)
    assert (torch.stack(whole.logits, 1) - torch.stack(chunked.logits, 1)).abs().max() <= 1e-5


# ---- the plain modes, every group -----------------------------------------------------------------------


@pytest.mark.parametrize("group", models.GROUPS)
def test_greedy_generate_equals_argmax_of_full_forward(group):
    model = build(group)
    ids, mask, _ = left_padded_batch(seed=4, t=6)
    with torch.no_grad():
        generated = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        seq, seq_mask = ids, mask
        for _ in range(6):  # the same greedy decode with no cache at all
            positions = position_ids_from_mask(seq_mask)
            nxt = model(seq, attention_mask=seq_mask, position_ids=positions, use_cache=False).logits[:, -1].argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            seq_mask = torch.cat([seq_mask, torch.ones_like(nxt[:, None])], dim=1)
    assert torch.equal(generated, seq)


def test_beam_search_with_cache_equals_without_for_the_baseline():
    # The MLA groups: test_sampling_and_beam_search_with_cache_equal_without.
    model = build("baseline")
    ids, mask, _ = left_padded_batch(seed=5, t=6)
    kwargs = dict(attention_mask=mask, max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kwargs)
        uncached = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_sampling_options_eos_and_stop_strings(tmp_path):
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["<pad>", "<eos>"] + [chr(ord("a") + i) for i in range(26)])}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()  # characters join without spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    model = build("mla_lru_adaptive")
    prompt = tokenizer(["abc", "de"], return_tensors="pt", padding=True, padding_side="left")
    torch.manual_seed(0)
    sampled = model.generate(**prompt, do_sample=True, temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.3,
                             max_new_tokens=8, pad_token_id=0)
    assert sampled.shape[0] == 2 and sampled.shape[1] <= 3 + 8
    # EOS: make <eos> the only possible token; generation stops after one step.
    with torch.no_grad():
        model.lm_head.weight.zero_()  # tied: also zeroes the embeddings, fine for this check
        model.lm_head.weight[1] = 0.0
    bias = torch.full((VOCAB,), -1e4)
    bias[1] = 0.0
    model.lm_head.register_forward_hook(lambda m, i, o: o + bias)
    stopped = model.generate(**prompt, max_new_tokens=8, do_sample=False, eos_token_id=1, pad_token_id=0)
    assert stopped.shape[1] == prompt["input_ids"].shape[1] + 1 and (stopped[:, -1] == 1).all()
    # Stop strings through transformers' StopStringCriteria.
    bias.fill_(-1e4)
    bias[vocab["z"]] = 0.0
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False, stop_strings=["zz"], tokenizer=tokenizer,
                         pad_token_id=0)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 2


# ---- static caches and torch.compile -------------------------------------------------------------------


def test_mla_only_decodes_with_a_static_cache_and_compiles_as_one_graph():
    model = build("mla_only", num_hidden_layers=2)
    ids, mask, positions = left_padded_batch(seed=7, t=8)
    with torch.no_grad():
        dynamic = model.generate(ids, attention_mask=mask, max_new_tokens=4, **GREEDY)
        static = model.generate(ids, attention_mask=mask, max_new_tokens=4, cache_implementation="static", **GREEDY)
        assert torch.equal(dynamic.sequences, static.sequences)
        assert (torch.stack(dynamic.logits, 1) - torch.stack(static.logits, 1)).abs().max() <= 1e-5
        # A decode step under torch.compile(fullgraph=True) (dynamo's graph capture; no C++ build needed).
        full = model(ids, attention_mask=mask, position_ids=positions, use_cache=False).logits[:, -1]
        cache = StaticCache(config=model.config, max_cache_len=12)
        model(ids[:, :7], attention_mask=mask[:, :7], position_ids=positions[:, :7], past_key_values=cache)
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        step = compiled(ids[:, 7:], attention_mask=mask, position_ids=positions[:, 7:], past_key_values=cache)
    assert (step.logits[:, -1] - full).abs().max() <= 1e-5
    assert model._can_compile_fullgraph and not build("mla_lru_fixed")._can_compile_fullgraph


@pytest.mark.parametrize("group, overrides", LRU_VARIANTS, ids=LRU_IDS)
def test_lru_groups_refuse_static_caches_with_the_reason(group, overrides):
    model = build(group, **overrides)
    ids = torch.randint(1, VOCAB, (1, 4))
    for implementation in ("static", "offloaded_static", "quantized"):
        with pytest.raises(ValueError, match="data-dependent halting.*cache_implementation=None"):
            model.generate(ids, max_new_tokens=2, cache_implementation=implementation, pad_token_id=0)
    with pytest.raises(ValueError, match="needs a LatentCache.*StaticCache.*data-dependent"):
        model(ids, past_key_values=StaticCache(config=model.config, max_cache_len=8))


def test_lru_groups_refuse_a_fullgraph_compile_with_the_reason_and_compile_without_it():
    model = build("mla_lru_adaptive", num_hidden_layers=1)
    ids = torch.randint(1, VOCAB, (1, 4))
    with torch.no_grad():
        with pytest.raises(Exception, match="the LRU runs eagerly: its halting is data-dependent"):
            torch.compile(model, fullgraph=True, backend="eager")(ids, use_cache=False)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="eager")(ids, use_cache=False).logits  # the LRU between graphs
        assert torch.equal(compiled, model(ids, use_cache=False).logits)


def test_an_assistants_cache_records_for_rollback():
    model = build("mla_lru_adaptive")
    generation_config = model.generation_config
    generation_config.is_assistant = True
    kwargs = {}
    model._prepare_cache_for_generation(generation_config, kwargs, None, 1, 8)
    assert isinstance(kwargs["past_key_values"], LatentCache) and kwargs["past_key_values"].record_past
