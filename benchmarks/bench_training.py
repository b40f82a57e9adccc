"""PPO training throughput: our engine against TRL's GRPOTrainer on the same tiny model, prompts and batch.

    pip install trl            # only for this benchmark
    python -m benchmarks.bench_training [--steps 5 --prompts 8 --n 4 --new 32]

Both run GRPO: ``--prompts`` causal-loop prompts per step, ``--n`` samples each, up to ``--new`` new
tokens, one optimisation pass, no KL term (TRL's beta 0; ours skips the reference and reuses the
rollout's logprobs as TRL does with one iteration), the project's reward. Ours runs in-process (torch rollout backend +
PPOTrainer, no Ray) so the comparison is of the engines, not of process layout. Our update runs each
prompt once for its n samples (``trainer.share_prompt``, the default); ``--no_share_prompt`` recomputes it
per sample as TRL does. Prints samples/s and the time split of our step.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM

import models
from data.causal_loop import TaskConfig, generate, to_table
from data.tokenizer import build_tokenizer
from rewards.causal_loop import compute_score, compute_score_batch
from rl.rollout import SamplingParams, TorchRolloutEngine
from rl.trainer import PPOSettings, PPOTrainer


def make_model(tokenizer, group: str):
    torch.manual_seed(0)
    config = models.tiny_config(group, vocab_size=-(-len(tokenizer) // 8) * 8, pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=tokenizer.eos_token_id)
    return AutoModelForCausalLM.from_config(config)


def ours(rows, tokenizer, group: str, args) -> tuple[float, dict]:
    model = make_model(tokenizer, group)
    engine = TorchRolloutEngine(model, tokenizer.pad_token_id)
    trainer = PPOTrainer(model, copy.deepcopy(model), None, PPOSettings(
        advantage="grpo", lr=1e-5, kl_coef=0.0, old_logprobs_from_rollout=True,  # as TRL: beta 0, one iteration
        minibatch_size=args.prompts * args.n, micro_batch_size=args.prompts * args.n,
        share_prompt=not args.no_share_prompt))
    params = SamplingParams(temperature=1.0, max_new_tokens=args.new, n=args.n,
                            stop_token_ids=(tokenizer.eos_token_id,))
    phases = {"rollout": 0.0, "score": 0.0, "train": 0.0}
    start = time.perf_counter()
    for step in range(args.steps):
        batch_rows = rows[step * args.prompts: (step + 1) * args.prompts]
        prompts = [tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
                   for r in batch_rows]
        t = time.perf_counter()
        out = engine.generate([tokenizer(p)["input_ids"] for p in prompts], params, seeds=list(range(len(prompts))))
        phases["rollout"] += time.perf_counter() - t
        t = time.perf_counter()
        texts = [tokenizer.decode(ids[m.bool()], skip_special_tokens=True)
                 for ids, m in zip(out.response_ids, out.response_mask, strict=True)]
        truths = [batch_rows[i]["reward_model"]["ground_truth"] for i in out.prompt_index.tolist()]
        scores = torch.tensor([s["score"] for s in compute_score_batch(None, texts, truths)])
        phases["score"] += time.perf_counter() - t
        t = time.perf_counter()
        model.train()
        trainer.update(trainer.prepare(out, scores))
        model.eval()
        phases["train"] += time.perf_counter() - t
    return args.steps * args.prompts * args.n / (time.perf_counter() - start), phases


def trl(rows, tokenizer, group: str, args) -> float:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    def reward(completions, ground_truth, **kwargs):
        return [compute_score("causal_loop", c if isinstance(c, str) else c[-1]["content"], g)["score"]
                for c, g in zip(completions, ground_truth, strict=True)]

    data = Dataset.from_list([{"prompt": tokenizer.apply_chat_template(r["prompt"], tokenize=False,
                                                                        add_generation_prompt=True),
                               "ground_truth": r["reward_model"]["ground_truth"]} for r in rows])
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(output_dir=out, per_device_train_batch_size=args.prompts * args.n,
                            num_generations=args.n, max_completion_length=args.new, max_steps=args.steps,
                            learning_rate=1e-5, logging_steps=1000, save_strategy="no", report_to=[],
                            use_cpu=True, bf16=False, beta=0.0, temperature=1.0, disable_tqdm=True,
                            gradient_checkpointing=False)  # ours does not checkpoint either
        trainer = GRPOTrainer(model=make_model(tokenizer, group), reward_funcs=reward, args=config,
                              train_dataset=data, processing_class=tokenizer)
        start = time.perf_counter()
        trainer.train()
        return args.steps * args.prompts * args.n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--groups", default="baseline,mla_lru_adaptive")
    parser.add_argument("--no_share_prompt", action="store_true",
                        help="recompute the prompt for every sample in our update, as TRL does")
    args = parser.parse_args()
    tokenizer = build_tokenizer()
    task = TaskConfig(levels=(1,), num_vars=(2, 2), num_steps=(1, 1))
    rows = to_table(generate(task, (args.steps + 1) * args.prompts, seed=0), "bench").to_pylist()
    print(f"GRPO, {args.prompts} prompts x {args.n} samples, <= {args.new} new tokens, {args.steps} steps (CPU)")
    for group in args.groups.split(","):
        ours_rate, phases = ours(rows, tokenizer, group, args)
        peer_rate = trl(rows, tokenizer, group, args)
        split = ", ".join(f"{k} {v / args.steps:.2f} s" for k, v in phases.items())
        print(f"{group:<18} ours {ours_rate:7.1f} samples/s   TRL GRPOTrainer {peer_rate:7.1f} samples/s   "
              f"ratio {ours_rate / peer_rate:5.2f}x   (ours per step: {split})")


if __name__ == "__main__":
    main()
