"""Evaluate a checkpoint on held-out problems: greedy accuracy, pass@k, LRU iterations vs difficulty.

    python -m rl.evaluate outputs/run                                   # the run's latest checkpoint
    python -m rl.evaluate outputs/run/checkpoints/step_000040 --k 8 --out eval.json
    python -m rl.evaluate path/to/hf_model --data test.parquet heldout_more_steps.parquet

Problems come from verl-schema parquet files (``--data``), or else from the run's ``config.yaml``: the
same held-out splits, seeded the same way, that training evaluated on. Greedy and sampled accuracy are
``rl.heldout``'s, with the run's sampling settings and seed, so they reproduce what the run logged.
Accuracy is broken down by level, number of variables and number of steps. pass@k is the unbiased
estimator of Chen et al. (2021) over ``--samples`` more samples per problem (default k). For models with
a Latent Reasoning Unit the iterations it ran are averaged over each greedy response's tokens (a
teacher-forced forward of prompt + response) and related to difficulty with Spearman's rank correlation
against the number of steps. No Ray: one process, the ``torch`` rollout engine.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from scipy.special import comb
from scipy.stats import spearmanr
from transformers import AutoModelForCausalLM

from data.tokenizer import load_tokenizer
from rl import checkpoint
from rl.config import DataConfig, RewardConfig, RolloutConfig, load_config
from rl.heldout import evaluate_split, heldout_params, response_iterations, sample_seeds, split_record
from rl.prompts import PromptSource, encode_prompt
from rl.report import fmt
from rl.reward_scorer import RewardRunner
from rl.rollout import RolloutBatch, TorchRolloutEngine

DIFFICULTY = ("level", "num_vars", "num_steps")
VERL_COLUMNS = ("data_source", "prompt", "reward_model", "extra_info")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c correct) is correct."""
    if n - c < k:
        return 1.0
    return float(1.0 - comb(n - c, k, exact=True) / comb(n, k, exact=True))


def resolve_model_dir(path: Path) -> tuple[Path, Path | None]:
    """(directory holding the policy's weights and tokenizer, run directory or None) for a run directory,
    a checkpoint step directory, or a plain Hugging Face model directory."""
    path = Path(path)
    if (path / "config.json").is_file():
        run = path.parents[2] if path.name == "policy" and path.parent.parent.name == "checkpoints" else None
        return path, run
    if (path / "policy").is_dir():
        if not (path / checkpoint.COMPLETE).is_file():
            raise ValueError(f"{path} is not a complete checkpoint (no {checkpoint.COMPLETE} marker)")
        return path / "policy", path.parent.parent
    latest = checkpoint.latest_checkpoint(path)
    if latest is None:
        raise ValueError(f"{path}: not a model directory (no config.json), a checkpoint (no policy/) or a run "
                         "directory with a complete checkpoint")
    return latest / "policy", path


def load_problem_sets(data_files: list[str], run_dir: Path | None, size: int | None) -> dict[str, list[dict]]:
    if data_files:
        sets = {}
        for f in data_files:
            if not Path(f).is_file():
                raise ValueError(f"--data {f}: no such file")
            table = pq.read_table(f)
            missing = sorted(set(VERL_COLUMNS) - set(table.column_names))
            if missing:
                raise ValueError(f"--data {f}: not a verl-schema problem file, missing columns {missing} "
                                 "(write one with python -m data.causal_loop)")
            sets[Path(f).stem] = table.to_pylist()[:size]
        return sets
    if run_dir is None or not (run_dir / "config.yaml").is_file():
        raise ValueError("no problems to evaluate on: pass --data FILE.parquet, or a checkpoint inside a run "
                         "directory (its config.yaml says which held-out splits training used)")
    cfg = load_config(run_dir / "config.yaml", [])
    if size:
        cfg.data.eval_size = size
    return PromptSource(cfg.data, cfg.data.seed).eval_sets


def _breakdown(rows: list[dict], values: np.ndarray) -> dict[str, dict[str, float]]:
    out = {}
    for key in DIFFICULTY:
        groups = defaultdict(list)
        for row, v in zip(rows, values, strict=True):
            groups[row.get("extra_info", {}).get(key)].append(v)
        if None not in groups:
            out[key] = {str(k): float(np.mean(v)) for k, v in sorted(groups.items())}
    return out


def evaluate_set(model, tokenizer, scorer: RewardRunner, name: str, rows: list[dict], template: str, k: int,
                 samples: int, rollout: RolloutConfig, seed: int) -> dict:
    """One split: ``rl.heldout``'s greedy and sampled accuracy (the numbers a run logs for the same seed),
    pass@k over ``samples`` more samples per problem, and breakdowns by difficulty."""
    engine = TorchRolloutEngine(model, pad_token_id=tokenizer.pad_token_id)
    prompts = [encode_prompt(tokenizer, r, template) for r in rows]

    def decode(batch: RolloutBatch) -> list[str]:
        return [tokenizer.decode(i[m.bool()], skip_special_tokens=True)
                for i, m in zip(batch.response_ids, batch.response_mask, strict=True)]

    def score(answered: list[dict], texts: list[str]):
        return scorer.score([r["data_source"] for r in answered], texts,
                            [r["reward_model"]["ground_truth"] for r in answered], [r["extra_info"] for r in answered])

    params = heldout_params(rollout, tokenizer.eos_token_id)
    split = evaluate_split(name, rows, prompts, engine.generate, score, decode, params, seed,
                           iterations=lambda batch: response_iterations(model, batch))
    result = {"problems": len(rows), "greedy_acc": float(split.acc.mean()), "greedy_score": float(split.scores.mean()),
              "greedy_acc_by": _breakdown(rows, split.acc), "sampled_acc": float(split.acc_sampled.mean()),
              "response_length_mean": float(split.greedy.response_lengths.float().mean()),
              "greedy_responses": split.texts, "record": split_record(rows, split)}
    if samples:
        batch = engine.generate(prompts, replace(params[1], n=samples), sample_seeds(seed, name, len(rows)))
        correct = np.asarray(score([rows[i] for i in batch.prompt_index.tolist()], decode(batch)).accuracy())
        counts = correct.reshape(len(rows), samples).sum(1).astype(int)
        passes = np.array([pass_at_k(samples, int(c), k) for c in counts])
        result.update({"sampled_acc_mean": float(correct.mean()), f"pass@{k}": float(passes.mean()),
                       f"pass@{k}_by": _breakdown(rows, passes)})
    result.update(_iterations(split.lru_iterations, rows))
    return result


def _iterations(iterations: np.ndarray | None, rows: list[dict]) -> dict:
    """LRU iterations per greedy response token, by difficulty, and their rank correlation with steps."""
    if iterations is None:
        return {}
    out = {"lru_iterations_mean": float(iterations.mean()), "lru_iterations_by": _breakdown(rows, iterations)}
    steps = [r.get("extra_info", {}).get("num_steps") for r in rows]
    if None not in steps and len(set(steps)) > 1 and np.ptp(iterations) > 0:
        rho, p = spearmanr(steps, iterations)
        out["lru_iterations_vs_steps"] = {"spearman_rho": float(rho), "p_value": float(p)}
    return out


def markdown(results: dict[str, dict], k: int) -> str:
    lines = [f"| set | problems | greedy acc | sampled acc | pass@{k} | LRU iterations |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['problems']} | {fmt(r.get('greedy_acc'))} | {fmt(r.get('sampled_acc'))} | "
                     f"{fmt(r.get(f'pass@{k}'))} | {fmt(r.get('lru_iterations_mean'))} |")
    for name, r in results.items():
        for key in DIFFICULTY:
            accs, its = r["greedy_acc_by"].get(key, {}), r.get("lru_iterations_by", {}).get(key, {})
            if len(accs) > 1:
                lines.append(f"\n{name}, by {key}: " + ", ".join(
                    f"{v}: acc {a:.3f}" + (f", iterations {its[v]:.2f}" if v in its else "") for v, a in accs.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="run directory (latest checkpoint), checkpoint step directory or model directory")
    parser.add_argument("--data", nargs="*", default=[], help="verl-schema parquet files (default: the run's splits)")
    parser.add_argument("--size", type=int, help="at most this many problems per set")
    parser.add_argument("--k", type=int, default=4, help="pass@k (default 4)")
    parser.add_argument("--samples", type=int, help="samples per problem for pass@k (default k; 0 = greedy only)")
    parser.add_argument("--temperature", type=float, help="sampling temperature (default: the run's, else 1)")
    parser.add_argument("--max-new-tokens", type=int, help="default: the run's rollout.max_new_tokens, else 64")
    parser.add_argument("--template", choices=("chat", "base"), help="prompt template (default: the run's, else chat)")
    parser.add_argument("--reward", default=None, help="reward function module:fn (default: the run's)")
    parser.add_argument("--seed", type=int, help="sampling seed (default: the run's trainer.seed, else 0)")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--record", help="also write the per-problem records, as a run's evals/step_N.json holds them "
                                         "(problem keys included: what rl.compare pairs)")
    args = parser.parse_args(argv)
    samples = args.k if args.samples is None else args.samples
    if args.k < 1 or (samples and samples < args.k):
        parser.error(f"--k {args.k} --samples {samples}: need k >= 1 and samples >= k (or samples 0)")
    try:
        model_dir, run_dir = resolve_model_dir(Path(args.model))
        sets = load_problem_sets(args.data, run_dir, args.size)
    except ValueError as e:
        parser.error(str(e))
    cfg = load_config(run_dir / "config.yaml", []) if run_dir and (run_dir / "config.yaml").is_file() else None
    rollout = replace(cfg.rollout if cfg else RolloutConfig(max_new_tokens=64),
                      **{k: v for k, v in (("temperature", args.temperature), ("max_new_tokens", args.max_new_tokens))
                         if v is not None})
    reward = args.reward or (cfg.reward.function if cfg else RewardConfig.function)
    template = args.template or (cfg.data.template if cfg else DataConfig.template)
    seed = args.seed if args.seed is not None else (cfg.trainer.seed if cfg else 0)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = load_tokenizer(model_dir)
    scorer = RewardRunner(reward, cfg.reward.kwargs if cfg else {})
    results = {name: evaluate_set(model, tokenizer, scorer, name, rows, template, args.k, samples, rollout, seed)
               for name, rows in sets.items()}
    records = {name: result.pop("record") for name, result in results.items()}
    print(f"model: {model_dir}\n\n{markdown(results, args.k)}")
    if args.record:
        Path(args.record).parent.mkdir(parents=True, exist_ok=True)
        Path(args.record).write_text(json.dumps(records))
    if args.out:
        Path(args.out).write_text(json.dumps({"model": str(model_dir), "k": args.k, "samples": samples,
                                              "sets": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
