"""The warm start of one study run alone, in this process: the loss curve an experiment's run would have, and
variants of it (model or trainer overrides), without Ray, rollouts or evaluation.

    python scripts/warm_start_probe.py --experiment mla_only --seed 0 --steps 1000 \
        --variant default --variant 'no_latent_norm:model.overrides={kv_latent_norm: false}' --out probe.json

Each variant is ``name`` or ``name:override;override;...`` (the driver's ``section.field=value``, applied after
the experiment's own; ``;`` separates them, since a YAML value may hold spaces). The model, the data stream and
the optimizer are the run's (``rl.driver``'s ``build_model_and_tokenizer``, ``PromptSource`` at ``data.seed``,
``rl.sft``), so the default variant
reproduces the run's ``warm_start.jsonl`` losses: the check that a variant differs by its override only.
Prints the loss averaged over the 25 steps up to each report step and writes every step's loss to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rl.driver import build_model_and_tokenizer  # noqa: E402
from rl.experiments import load_experiments  # noqa: E402
from rl.prompts import PromptSource, encode_prompt, warm_start_target  # noqa: E402
from rl.sft import sft_step, warm_start_optimizer  # noqa: E402

REPORT_EVERY = 100
WINDOW = 25


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, overrides = text.partition(":")
    if not name:
        raise ValueError(f"--variant {text!r}: give a name, then optionally ':' and overrides separated by ';'")
    return name, [o.strip() for o in overrides.split(";") if o.strip()]


def warm_start_losses(cfg, steps: int) -> list[float]:
    """The losses of the first ``steps`` warm-start steps of a run with config ``cfg`` (its own sft_steps set
    the schedule, as in the run)."""
    model, tokenizer = build_model_and_tokenizer(cfg)
    data = PromptSource(cfg.data, cfg.data.seed)
    optimizer, scheduler = warm_start_optimizer(model, cfg.trainer.sft_lr, total_steps=cfg.trainer.sft_steps)
    losses = []
    for _ in range(steps):
        rows = data.next_rows(cfg.trainer.sft_batch_size)
        prompts = [encode_prompt(tokenizer, r, cfg.data.template) for r in rows]
        responses = [tokenizer(warm_start_target(r, cfg.data.warm_start_targets), add_special_tokens=False)
                     ["input_ids"] + [tokenizer.eos_token_id] for r in rows]
        losses.append(sft_step(model, optimizer, prompts, responses, tokenizer.pad_token_id))
        scheduler.step()
    return losses


def smoothed(losses: list[float]) -> dict[int, float]:
    return {s: float(np.mean(losses[max(0, s - WINDOW):s])) for s in range(REPORT_EVERY, len(losses) + 1,
                                                                          REPORT_EVERY)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--base", default="rl/presets/study.yaml")
    parser.add_argument("--seed", type=int, default=0, help="trainer.seed and data.seed, as run_ablation sets them")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--variant", action="append", default=[], help="name[:overrides]; repeatable")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    experiment = load_experiments(base=args.base)[args.experiment]
    results = {}
    for name, overrides in map(parse_variant, args.variant or ["default"]):
        cfg = experiment.config([f"trainer.seed={args.seed}", f"data.seed={args.seed}", *overrides])
        start = time.perf_counter()
        losses = warm_start_losses(cfg, args.steps)
        results[name] = {"overrides": overrides, "losses": losses, "smoothed": smoothed(losses),
                         "seconds": time.perf_counter() - start}
        print(name, " ".join(f"{s}:{v:.3f}" for s, v in results[name]["smoothed"].items()), flush=True)
        if args.out:  # after each variant: a long probe that is stopped keeps what it finished
            partial = args.out.with_name(args.out.name + ".tmp")  # written whole, then renamed: never half a file
            partial.write_text(json.dumps({"experiment": args.experiment, "base": args.base, "seed": args.seed,
                                           "steps": args.steps, "variants": results}))
            partial.replace(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
