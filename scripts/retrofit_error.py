"""The retrofit's error against latent width C and rotary size R (the README's table).

    python scripts/retrofit_error.py [--sft_steps 400] [--seed 0]

Warms up the tiny Qwen2 baseline on the task's worked solutions (the project's own "pretrained" model; the
preset's shape: 4 query heads on 2 key/value heads of 32), converts it to ``mla_only`` at every (R, C) of the
grid (models/convert.py: R = 2rG keeps r of the 16 rotary pairs of each head, chosen on 16 training problems;
C below the exact width F is a joint SVD), and reports on held-out problems the KL(source || converted) per
token, the top-1 agreement, the largest logit difference and the warm-start loss on the worked solutions of
the source and of the converted model.
"""

from __future__ import annotations

import argparse

import torch
from transformers import Qwen2ForCausalLM

import models
from data.tokenizer import build_tokenizer
from models.convert import convert_model, logit_error
from rl.config import DataConfig
from rl.prompts import PromptSource, encode_prompt, warm_start_target
from rl.sft import sft_batch, sft_step, warm_start_optimizer


def batch(tokenizer, rows):
    eos = tokenizer.eos_token_id
    prompts = [encode_prompt(tokenizer, r, "chat") for r in rows]
    responses = [tokenizer(warm_start_target(r, "trace"), add_special_tokens=False)["input_ids"] + [eos] for r in rows]
    return prompts, responses


@torch.no_grad()
def loss(model, tokenizer, prompts, responses) -> float:
    ids, mask, labels = sft_batch(prompts, responses, tokenizer.pad_token_id)
    positions = models.position_ids_from_mask(mask)
    return model(ids, attention_mask=mask, position_ids=positions, labels=labels, use_cache=False).loss.item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft_steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer()
    config = models.tiny_config("baseline", match_params=False, vocab_size=-(-len(tokenizer) // 8) * 8,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    source = Qwen2ForCausalLM(config)
    data = PromptSource(DataConfig(), args.seed)
    optimizer, schedule = warm_start_optimizer(source, 1e-3, args.sft_steps)
    for _ in range(args.sft_steps):
        sft_step(source, optimizer, *batch(tokenizer, data.next_rows(16)), tokenizer.pad_token_id)
        schedule.step()
    source.eval()
    prompts, responses = batch(tokenizer, data.eval_sets["test"][:32])
    ids, _, _ = sft_batch(prompts, responses, tokenizer.pad_token_id)
    ids = ids[:, (ids == tokenizer.pad_token_id).sum(1).max():]  # drop the columns any row pads: no mask needed
    g, d = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    base = loss(source, tokenizer, prompts, responses)
    calibration, _, _ = sft_batch(*batch(tokenizer, data.next_rows(16)), tokenizer.pad_token_id)  # training rows
    print(f"source Qwen2 ({args.sft_steps} warm-start steps): warm-start loss {base:.4f}")
    print("| R (pairs kept of 16) | C | exact width F | KL per token | top-1 agree | max abs logit diff | loss |")
    print("|---|---|---|---|---|---|---|")
    for rope in (g * d, g * d // 2, g * d // 4, g * d // 8):
        full = g * (d - rope // g + d)
        for c in (full, 3 * full // 4, full // 2, full // 4):
            target = convert_model(source, "mla_only", c, rope, calibration_ids=calibration)
            e = logit_error(source, target, ids)
            print(f"| {rope} ({rope // (2 * g)}) | {c} | {full} | {e['kl']:.2e} | {e['top1_agree']:.3f} | "
                  f"{e['max_abs']:.2e} | {loss(target, tokenizer, prompts, responses):.4f} |")


if __name__ == "__main__":
    main()
