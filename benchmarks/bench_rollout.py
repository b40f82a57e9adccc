"""Rollout speed: our torch backend against transformers' generate() on the same model, batch and lengths.

    python -m benchmarks.bench_rollout [--batch 32 --prompt 32 --new 64 --n 1]
    python -m benchmarks.bench_rollout --batch 8 --n 8 --prompt 128 --new 40   # the tiny default's rollout

Both sample (temperature 1, top-p 0.95) with a KV cache and generate exactly ``--new`` tokens (no stop
token) for ``--n`` samples of each of ``--batch`` prompts (generate(): ``num_return_sequences``); the
figure is generated tokens per second and the ratio.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM

import models
from benchmarks.timing import median_seconds
from rl.rollout import SamplingParams, TorchRolloutEngine, left_pad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--n", type=int, default=1, help="samples per prompt")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    prompts = torch.randint(1, 128, (args.batch, args.prompt)).tolist()
    ids, mask = left_pad(prompts, 0)
    print(f"batch {args.batch} prompts x {args.n} samples, prompt {args.prompt}, {args.new} new tokens, "
          f"sampling T=1 top-p 0.95 (CPU, {torch.get_num_threads()} threads)")
    print(f"{'group':<18}{'ours tok/s':>12}{'generate() tok/s':>18}{'ratio':>8}")
    for group in models.GROUPS:
        ours, peer = compare(group, prompts, ids, mask, args)
        tokens = args.batch * args.n * args.new
        print(f"{group:<18}{tokens / ours:>12,.0f}{tokens / peer:>18,.0f}{peer / ours:>7.2f}x")


def compare(group: str, prompts, ids, mask, args) -> tuple[float, float]:
    """Seconds for our engine and for generate() on one group's tiny model."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(models.tiny_config(group)).eval()
    engine = TorchRolloutEngine(model, pad_token_id=0)
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=args.new, n=args.n)
    ours = median_seconds(lambda: engine.generate(prompts, params, seeds=list(range(args.batch))), args.repeats)
    with torch.no_grad():
        peer = median_seconds(lambda: model.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0,
                                                     top_p=0.95, max_new_tokens=args.new, min_new_tokens=args.new,
                                                     num_return_sequences=args.n, pad_token_id=0), args.repeats)
    return ours, peer


if __name__ == "__main__":
    main()
