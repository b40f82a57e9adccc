"""Compare runs (the four groups of ``train_lru.sh all``) on the same held-out problems.

    python -m rl.compare outputs/study/baseline outputs/study/mla_only ... --out outputs/study

Writes ``comparison.md`` and ``comparison.json`` and overlaid curves (``curves/``). For every run and
held-out split: greedy accuracy after the warm start and after PPO with Wilson 95% intervals, and an
exact McNemar test of the change on the same problems (did PPO help?). Between runs: an exact McNemar
test of each run's final accuracy against the first run's (the baseline when ``all`` wrote them), on
the same problems, with Holm's correction over all the tests of the table. The per-problem results
come from each run's ``evals/step_N.json``; runs evaluated on different problems are refused.
One seed per run says nothing about seed variance: repeat the study with other ``trainer.seed``
values before trusting a small difference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import proportion_confint

from rl.plot import plot_runs
from rl.report import fmt
from rl.tracking import read_metrics


def load_evals(run_dir: Path) -> tuple[dict, dict]:
    """(first evaluation, last evaluation) of a run: {split: {"acc": [...], "index": [...], ...}}."""
    files = sorted((Path(run_dir) / "evals").glob("step_*.json"))
    if not files:
        raise ValueError(f"{run_dir}: no evals/step_*.json (was it trained with this version of rl.driver?)")
    return json.loads(files[0].read_text()), json.loads(files[-1].read_text())


def mcnemar_p(before: np.ndarray, after: np.ndarray) -> float:
    """Exact (binomial) McNemar p-value for paired 0/1 outcomes on the same problems."""
    table = [[int(np.sum((before == 1) & (after == 1))), int(np.sum((before == 1) & (after == 0)))],
             [int(np.sum((before == 0) & (after == 1))), int(np.sum((before == 0) & (after == 0)))]]
    return float(mcnemar(table, exact=True).pvalue)


def wilson(acc: np.ndarray) -> tuple[float, float]:
    low, high = proportion_confint(int(acc.sum()), len(acc), alpha=0.05, method="wilson")
    return float(low), float(high)


def compare(run_dirs: list[Path]) -> dict:
    names = [Path(d).name for d in run_dirs]
    if len(set(names)) != len(names):
        raise ValueError(f"run directory names must differ (they label the table): {names}")
    evals = {name: load_evals(d) for name, d in zip(names, run_dirs, strict=True)}
    reference = names[0]
    splits = list(evals[reference][1])
    for name in names[1:]:
        for split in splits:
            if evals[name][1].get(split, {}).get("index") != evals[reference][1][split]["index"]:
                raise ValueError(f"{name} and {reference} were evaluated on different {split!r} problems "
                                 "(different data config or seed): the comparison needs the same problems")
    rows, tests = [], []
    for name in names:
        first, last = evals[name]
        for split in splits:
            before, after = np.array(first[split]["acc"]) > 0.5, np.array(last[split]["acc"]) > 0.5
            row = {"run": name, "split": split, "problems": len(after), "acc_before": float(before.mean()),
                   "acc_after": float(after.mean()), "ci_after": wilson(after),
                   "p_ppo_vs_warm_start": mcnemar_p(before, after)}
            tests.append((len(rows), "p_ppo_vs_warm_start"))
            if "acc_sampled" in first[split] and "acc_sampled" in last[split]:
                s_before = np.array(first[split]["acc_sampled"]) > 0.5
                s_after = np.array(last[split]["acc_sampled"]) > 0.5
                row.update({"sampled_before": float(s_before.mean()), "sampled_after": float(s_after.mean()),
                            "p_sampled_ppo_vs_warm_start": mcnemar_p(s_before, s_after)})
                tests.append((len(rows), "p_sampled_ppo_vs_warm_start"))
            if name != reference:
                row[f"p_vs_{reference}"] = mcnemar_p(np.array(evals[reference][1][split]["acc"]) > 0.5, after)
                tests.append((len(rows), f"p_vs_{reference}"))
            rows.append(row)
    if tests:
        adjusted = multipletests([rows[i][key] for i, key in tests], method="holm")[1]
        for (i, key), p in zip(tests, adjusted, strict=True):
            rows[i][key + "_holm"] = float(p)
    summaries = {name: json.loads((Path(d) / "summary.json").read_text()) if (Path(d) / "summary.json").is_file()
                 else {} for name, d in zip(names, run_dirs, strict=True)}
    infos = {name: json.loads((Path(d) / "run_info.json").read_text()) if (Path(d) / "run_info.json").is_file()
             else {} for name, d in zip(names, run_dirs, strict=True)}
    runs = {name: {"parameters": infos[name].get("parameters"), "steps": summaries[name].get("steps"),
                   "lru_iterations_mean": summaries[name].get("lru_iterations_mean"),
                   "tokens_per_s": summaries[name].get("tokens_per_s"),
                   "wall_s": _wall_seconds(Path(d))} for name, d in zip(names, run_dirs, strict=True)}
    return {"reference": reference, "runs": runs, "rows": rows}


def _wall_seconds(run_dir: Path) -> float | None:
    times = [r["time/step"] for r in read_metrics(run_dir) if r.get("time/step") is not None]
    return float(sum(times)) if times else None


def markdown(result: dict) -> str:
    ref = result["reference"]
    lines = ["# Comparison", "", "| run | parameters | PPO steps | LRU iterations | tokens/s | PPO wall (s) |",
             "|---|---|---|---|---|---|"]
    for name, r in result["runs"].items():
        lines.append(f"| {name} | {fmt(r['parameters'], ',')} | {fmt(r['steps'], '')} | "
                     f"{fmt(r['lru_iterations_mean'], '.2f')} | {fmt(r['tokens_per_s'], '.0f')} | "
                     f"{fmt(r['wall_s'], '.0f')} |")
    lines += ["", f"Greedy held-out accuracy. p-values: exact McNemar on the same problems, Holm-adjusted over "
              f"the table; 'PPO vs warm start' is within a run, 'vs {ref}' compares final models.", "",
              f"| run | split | n | after warm start | after PPO (95% CI) | p PPO vs warm start | p vs {ref} |",
              "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        low, high = r["ci_after"]
        lines.append(f"| {r['run']} | {r['split']} | {r['problems']} | {r['acc_before']:.3f} | "
                     f"{r['acc_after']:.3f} ({low:.3f}–{high:.3f}) | {r['p_ppo_vs_warm_start_holm']:.3g} | "
                     f"{fmt(r.get(f'p_vs_{ref}_holm'), '.3g')} |")
    sampled = [r for r in result["rows"] if "sampled_after" in r]
    if sampled:
        lines += ["", "One sample per problem at the rollout temperature (the distribution PPO trains), same seeds "
                  "before and after:", "", "| run | split | after warm start | after PPO | p PPO vs warm start |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['run']} | {r['split']} | {r['sampled_before']:.3f} | {r['sampled_after']:.3f} | "
                  f"{r['p_sampled_ppo_vs_warm_start_holm']:.3g} |" for r in sampled]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories; the first is the reference")
    parser.add_argument("--out", type=Path, required=True, help="directory for comparison.md/json and curves/")
    args = parser.parse_args(argv)
    try:
        result = compare(args.runs)
    except ValueError as e:
        parser.error(str(e))
    args.out.mkdir(parents=True, exist_ok=True)
    result["curves"] = [str(p) for p in plot_runs(args.runs, args.out / "curves")]
    (args.out / "comparison.json").write_text(json.dumps(result, indent=2))
    text = markdown(result)
    (args.out / "comparison.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
