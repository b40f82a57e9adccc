"""Rollout speed of the vllm backend against the torch backend and transformers' generate(): same model,
same prompts, same lengths, for every group, at the tiny default's rollout shape (rl/presets/tiny.yaml:
32 prompts of the causal-loop task x 8 samples, temperature 1, 64 new tokens).

    .venv-vllm/bin/python -m benchmarks.bench_vllm [--prompts 32 --n 8 --new 64 --repeats 3]

Every engine generates exactly ``--new`` tokens per response (no stop token), so each call makes
prompts x n x new tokens; the figure is generated tokens per second over ``--repeats`` calls after one
warm-up call. The torch backend and generate() run first, in this process; then one vLLM engine starts
(its start time is reported apart) and is closed before the next group. vLLM runs its model in a worker
process with its own thread settings (it lowers torch to one thread per worker unless OMP_NUM_THREADS is set).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from transformers import AutoModelForCausalLM

import models
from data.tokenizer import build_tokenizer
from rl.config import load_config
from rl.prompts import PromptSource, encode_prompt
from rl.rollout import SamplingParams, TorchRolloutEngine, left_pad
from rl.vllm_rollout import VLLMRolloutEngine

# The groups the vLLM twin serves (rl/vllm_rollout.py refuses the looped control and mla_only_matched is
# mla_only's architecture at other widths, so it adds nothing here).
VLLM_GROUPS = ("baseline", "mla_only", "mla_lru_fixed", "mla_lru_adaptive")


def tiny_default_prompts(count: int) -> tuple[list[list[int]], int]:
    """``count`` training prompts of the tiny default, as the driver encodes them; and the vocabulary size."""
    cfg = load_config("rl/presets/tiny.yaml", [])
    tokenizer = build_tokenizer()
    rows = PromptSource(cfg.data, seed=0).next_rows(count)
    return [encode_prompt(tokenizer, row, cfg.data.template) for row in rows], len(tokenizer)


def rate(call, repeats: int) -> float:
    """Generated tokens per second over ``repeats`` calls after one warm-up call; call(i) returns its tokens."""
    call(repeats)
    tokens, seconds = 0, 0.0
    for i in range(repeats):
        start = time.perf_counter()
        tokens += call(i)
        seconds += time.perf_counter() - start
    return tokens / seconds


def measure(group: str, prompts: list[list[int]], vocab: int, args) -> dict[str, float]:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(models.tiny_config(group, vocab_size=vocab)).eval()
    params = SamplingParams(temperature=1.0, max_new_tokens=args.new, n=args.n)
    seeds = lambda call: [call * len(prompts) + i for i in range(len(prompts))]  # noqa: E731
    torch_engine = TorchRolloutEngine(model, pad_token_id=0)
    ids, mask = left_pad(prompts, 0)

    def generate(call: int) -> int:
        torch.manual_seed(call)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, max_new_tokens=args.new,
                                 min_new_tokens=args.new, num_return_sequences=args.n, pad_token_id=0)
        return out[:, ids.shape[1]:].numel()

    result = {"torch": rate(lambda c: int(torch_engine.generate(prompts, params, seeds(c)).response_mask.sum()),
                            args.repeats),
              "generate": rate(generate, args.repeats)}
    start = time.perf_counter()
    engine = VLLMRolloutEngine(model, pad_token_id=0, max_model_len=max(map(len, prompts)) + args.new)
    result["vllm_start_s"] = time.perf_counter() - start
    result["vllm"] = rate(lambda c: int(engine.generate(prompts, params, seeds(c)).response_mask.sum()), args.repeats)
    engine.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--groups", nargs="+", default=list(VLLM_GROUPS), choices=VLLM_GROUPS)
    args = parser.parse_args()
    prompts, vocab = tiny_default_prompts(args.prompts)
    lengths = sorted(map(len, prompts))
    print(f"{args.prompts} prompts ({lengths[0]}-{lengths[-1]} tokens) x {args.n} samples x {args.new} new tokens, "
          f"T=1, fp32, CPU ({os.cpu_count()} cores, this process {torch.get_num_threads()} threads, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")
    print(f"{'group':<18}{'vllm tok/s':>12}{'torch tok/s':>13}{'generate() tok/s':>18}{'vllm/torch':>12}"
          f"{'vllm/generate':>15}{'vllm start s':>14}", flush=True)
    for group in args.groups:  # a row as soon as it is measured: vLLM's own log goes to stdout too
        r = measure(group, prompts, vocab, args)
        print(f"{group:<18}{r['vllm']:>12,.0f}{r['torch']:>13,.0f}{r['generate']:>18,.0f}"
              f"{r['vllm'] / r['torch']:>11.2f}x{r['vllm'] / r['generate']:>14.2f}x{r['vllm_start_s']:>14.1f}",
              flush=True)


if __name__ == "__main__":
    main()
