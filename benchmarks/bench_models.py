"""Speed of the model library against transformers' Qwen2ForCausalLM of matched size, in one process.

    python -m benchmarks.bench_models                 # tiny presets + Qwen2.5-0.5B-shaped, CPU
    python -m benchmarks.bench_models --device cuda   # the same on a GPU

Prints, for each size: training tokens/s (forward + backward) and cached decode tokens/s of every group
with the ratio to the baseline; cache bytes per token; decode step time at long context with
absorption vs without (MLA only); LRU cost against its iteration count (fixed K = 1, 2, 4, 8) and
adaptive halting's time against the iterations it ran.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM

import models
from benchmarks.timing import median_seconds
from models import LatentCache
from models.param_count import cache_bytes_per_token, count_params
from models.presets import qwen25_05b_shaped


def timed(fn, repeats: int, device: str) -> float:
    return median_seconds(fn, repeats, sync=torch.cuda.synchronize if device == "cuda" else None)


def make(config, device: str):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device)


def train_tokens_per_s(model, batch: int, length: int, device: str, repeats: int) -> float:
    ids = torch.randint(1, model.config.vocab_size, (batch, length), device=device)
    model.train()

    def step():
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=ids, use_cache=False)
        out.loss.backward()

    return batch * length / timed(step, repeats, device)


@torch.no_grad()
def decode_tokens_per_s(model, batch: int, prompt: int, new: int, device: str, repeats: int) -> float:
    model.eval()
    ids = torch.randint(1, model.config.vocab_size, (batch, prompt), device=device)
    lat = isinstance(model, models.LatentReasoningForCausalLM)

    def run():
        cache = LatentCache(config=model.config) if lat else None
        out = model(ids, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(new):
            out = model(token, past_key_values=out.past_key_values, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)

    prefill = timed(lambda: model(ids, use_cache=True, past_key_values=LatentCache(config=model.config)
                                  if lat else None), repeats, device)
    return batch * new / max(timed(run, repeats, device) - prefill, 1e-9)


def compare_groups(name: str, configs: dict, device: str, train_shape, decode_shape, repeats: int) -> None:
    print(f"\n== {name}: training (batch x length {train_shape}) and cached decode (batch, prompt, new {decode_shape})")
    print(f"{'group':<18}{'params':>14}{'train tok/s':>14}{'vs base':>9}{'decode tok/s':>14}{'vs base':>9}"
          f"{'cache B/tok fp16':>18}")
    base = None
    for group, config in configs.items():
        model = make(config, device)
        train = train_tokens_per_s(model, *train_shape, device, repeats)
        decode = decode_tokens_per_s(model, *decode_shape, device, repeats)
        base = base or (train, decode)
        print(f"{group:<18}{count_params(config):>14,}{train:>14,.0f}{base[0] / train:>8.2f}x{decode:>14,.0f}"
              f"{base[1] / decode:>8.2f}x{cache_bytes_per_token(config, torch.float16):>18,}")
        del model


@torch.no_grad()
def absorption(config, device: str, context: int, repeats: int) -> None:
    model = make(config, device).eval()
    ids = torch.randint(1, config.vocab_size, (1, context), device=device)
    cache = LatentCache(config=model.config)
    model(ids, past_key_values=cache, use_cache=True)
    token = ids[:, -1:]
    times = {}
    for absorb in (False, True):
        model.config.mla_absorb = absorb

        def step():
            model(token, past_key_values=cache, use_cache=True)
            for layer in cache.layers:  # drop the token again so every step sees the same context
                layer.keys, layer.values = layer.keys[:, :, :context], layer.values[:, :, :context]

        times[absorb] = timed(step, repeats, device)
    print(f"\n== decode step at {context} context, MLA 0.5B-shaped: naive {times[False] * 1e3:.1f} ms, "
          f"absorbed {times[True] * 1e3:.1f} ms, speed-up {times[False] / times[True]:.2f}x")


def lru_scaling(device: str, repeats: int) -> None:
    print("\n== LRU cost vs iterations (tiny, training step, batch 8 x 128)")
    base = train_tokens_per_s(make(models.tiny_config("mla_only"), device), 8, 128, device, repeats)
    print(f"{'K (fixed)':<12}{'step ms':>10}{'LRU ms':>10}{'LRU ms / K':>12}")
    for k in (1, 2, 4, 8):
        tps = train_tokens_per_s(make(models.tiny_config("mla_lru_fixed", lru_max_iterations=k), device), 8, 128,
                                 device, repeats)
        step, plain = 8 * 128 / tps * 1e3, 8 * 128 / base * 1e3
        print(f"{k:<12}{step:>10.1f}{step - plain:>10.1f}{(step - plain) / k:>12.2f}")
    print(f"{'adaptive':<12}{'step ms':>10}{'LRU ms':>10}{'mean iters':>12}")
    for bias in (-3.0, 0.0, 3.0):  # halting bias: later or earlier halting, same K = 8
        model = make(models.tiny_config("mla_lru_adaptive", lru_max_iterations=8), device)
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.lru.halt.bias.fill_(bias)
        ids = torch.randint(1, 128, (8, 128), device=device)
        iters = model(ids).lru_stats["iterations_mean"].item()
        tps = train_tokens_per_s(model, 8, 128, device, repeats)
        step, plain = 8 * 128 / tps * 1e3, 8 * 128 / base * 1e3
        print(f"{'bias ' + str(bias):<12}{step:>10.1f}{step - plain:>10.1f}{iters:>12.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip_large", action="store_true", help="skip the 0.5B-shaped runs")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    dev, r = args.device, args.repeats
    compare_groups("tiny presets", {g: models.tiny_config(g) for g in models.GROUPS}, dev, (8, 128), (8, 16, 32), r)
    lru_scaling(dev, r)
    if not args.skip_large:
        large = {g: qwen25_05b_shaped(g) for g in models.GROUPS}
        compare_groups("Qwen2.5-0.5B-shaped", large, dev, (1, 128), (1, 16, 8), r)
        absorption(qwen25_05b_shaped("mla_only"), dev, 2048, r)


if __name__ == "__main__":
    main()
