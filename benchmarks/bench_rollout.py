"""Rollout speed: our torch backend against transformers' generate() on the same model, batch and lengths.

    python -m benchmarks.bench_rollout [--batch 32 --prompt 32 --new 64 --n 1]
    python -m benchmarks.bench_rollout --batch 8 --n 8 --prompt 128 --new 40   # the tiny default's rollout
    python -m benchmarks.bench_rollout --batch 8 --n 8 --prompt 128 --new 40 --stops 4   # lengths that vary

Both sample (temperature 1, top-p 0.95) with a KV cache for ``--n`` samples of each of ``--batch``
prompts (generate(): ``num_return_sequences``). Without ``--stops`` both generate exactly ``--new``
tokens. With ``--stops K`` the K highest token ids end a response (the untrained model samples nearly
uniformly, so each step ends about K/128 of the rows), as responses of different lengths do in RL;
then only the tokens up to each stop token count. The figure is generated tokens per second and the ratio.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM

import models
from rl.rollout import SamplingParams, TorchRolloutEngine, left_pad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--n", type=int, default=1, help="samples per prompt")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stops", type=int, default=0, help="stop token ids (0: fixed lengths)")
    args = parser.parse_args()
    prompts = torch.randint(1, 128, (args.batch, args.prompt)).tolist()
    ids, mask = left_pad(prompts, 0)
    stops = list(range(128 - args.stops, 128))
    print(f"batch {args.batch} prompts x {args.n} samples, prompt {args.prompt}, {args.new} new tokens"
          f"{f' at most, stop tokens {stops}' if stops else ''}, sampling T=1 top-p 0.95 "
          f"(CPU, {torch.get_num_threads()} threads)")
    print(f"{'group':<18}{'ours tok/s':>12}{'generate() tok/s':>18}{'ratio':>8}{'mean length ours / peer':>26}")
    for group in models.GROUPS:
        (ours_rate, ours_length), (peer_rate, peer_length) = compare(group, prompts, ids, mask, stops, args)
        print(f"{group:<18}{ours_rate:>12,.0f}{peer_rate:>18,.0f}{ours_rate / peer_rate:>7.2f}x"
              f"{ours_length:>14.1f} / {peer_length:.1f}")


def compare(group: str, prompts, ids, mask, stops: list[int], args) -> tuple[tuple[float, float], ...]:
    """(generated tokens/s, mean response length) of our engine and of generate() on one group's tiny model,
    over ``--repeats`` calls after a warm-up. Call i of either engine is seeded with i, so both sample the same
    number of responses from the same distribution."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(models.tiny_config(group)).eval()
    engine = TorchRolloutEngine(model, pad_token_id=0)
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=args.new, n=args.n,
                            stop_token_ids=tuple(stops))

    def ours(call: int) -> int:
        out = engine.generate(prompts, params, seeds=[call * args.batch + i for i in range(args.batch)])
        return int(out.response_mask.sum())

    def peer(call: int) -> int:
        torch.manual_seed(call)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=0.95,
                                 max_new_tokens=args.new, min_new_tokens=0 if stops else args.new,
                                 eos_token_id=stops or None, num_return_sequences=args.n, pad_token_id=0)
        return generated_tokens(out, ids, stops)

    return tuple(tokens_per_second(engine_call, args.repeats, args.batch * args.n) for engine_call in (ours, peer))


def tokens_per_second(call, repeats: int, rows: int) -> tuple[float, float]:
    """Total generated tokens over total seconds of ``repeats`` calls after one warm-up; mean response length."""
    call(repeats)  # warm-up, with a seed no timed call uses
    tokens, seconds = 0, 0.0
    for i in range(repeats):
        start = time.perf_counter()
        tokens += call(i)  # the token count is a few tensor ops on the output: negligible next to a rollout
        seconds += time.perf_counter() - start
    return tokens / seconds, tokens / (repeats * rows)


def generated_tokens(sequences: torch.Tensor, prompt_ids: torch.Tensor, stops: list[int]) -> int:
    """Tokens generate() produced, each row up to and including its first stop token."""
    new = sequences[:, prompt_ids.shape[1]:]
    if not stops:
        return new.numel()
    ended = torch.isin(new, torch.tensor(stops)).long()
    after_stop = (ended.cumsum(1) - ended) > 0  # positions after the first stop token
    return int((~after_stop).sum())


if __name__ == "__main__":
    main()
