"""Compare runs (the four groups of ``train_lru.sh all``) on the same held-out problems.

    python -m rl.compare outputs/study/baseline outputs/study/mla_only ... --out outputs/study

Writes ``comparison.md`` and ``comparison.json`` and overlaid curves (``curves/``). For every run and
held-out split: greedy accuracy after the warm start and after PPO with Wilson 95% intervals, and an
exact McNemar test of the change on the same problems (did PPO help?). Between runs: an exact McNemar
test of each run's final accuracy against the first run's (the baseline when ``all`` wrote them), on
the same problems, with Holm's correction over all the tests of the table.

Problems are paired by their canonical key (``extra_info.key``, kept per problem in each run's
``evals/step_N.json``), never by position: runs whose splits hold different problems (another data seed,
task or size) are refused, and so are records without keys. Every test is within one run or between two
runs' final models on the same problems; nothing is pooled over runs. Two seeds of one group would share
their problems, so pooling them would count each problem twice as if independent: several seeds of a
group are refused here. Seed-level statistics (the run as the unit) are ``rl.study_report``'s.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import proportion_confint

from rl.plot import plot_runs
from rl.report import fmt
from rl.tracking import read_metrics


@dataclass
class Evaluation:
    """One ``evals/step_N.json`` of a run: {split: per-problem record} and the file it came from."""

    path: Path
    splits: dict[str, dict[str, list]]


def load_evals(run_dir: Path) -> tuple[Evaluation, Evaluation]:
    """(first evaluation, last evaluation) of a run: after the warm start and after PPO."""
    files = sorted((Path(run_dir) / "evals").glob("step_*.json"))
    if not files:
        raise ValueError(f"{run_dir}: no evals/step_*.json (was it trained with this version of rl.driver?)")
    first, last = (Evaluation(f, json.loads(f.read_text())) for f in (files[0], files[-1]))
    return first, last


def problem_keys(record: dict[str, list], where: str) -> list[str]:
    """The identity of each problem of one split's record, its (data_source, key) as JSON, checked complete and
    distinct. ``where`` names the run, file and split for the message."""
    keys, n = record.get("key"), len(record.get("acc", []))
    if not keys or len(keys) != n or any(k is None for k in keys):
        raise ValueError(f"{where}: the record has no problem key (extra_info.key) for every problem, so its "
                         "problems cannot be paired with another evaluation's; it was written before keys were kept, "
                         "or from problems without extra_info.key: re-evaluate the run's checkpoints with "
                         "`python -m rl.evaluate` CHECKPOINT --record RUN/evals/step_N.json, on problems that carry "
                         "keys (the causal-loop generator writes them)")
    sources = record.get("data_source") or [None] * n
    ids = [json.dumps([source, key], sort_keys=True) for source, key in zip(sources, keys, strict=True)]
    if len(set(ids)) != n:
        raise ValueError(f"{where}: {n - len(set(ids))} problem key(s) appear twice: a split holds distinct problems")
    return ids


def paired_outcomes(ev: Evaluation, split: str, reference: list[str], run: str,
                    reference_run: str) -> dict[str, np.ndarray]:
    """A split's 0/1 outcomes ("acc", and "acc_sampled" when recorded) in the order of the ``reference``
    problem identities, paired by key. Refuses a split that is missing or holds other problems."""
    where = f"{run}, {ev.path.name}, split {split!r}"
    if split not in ev.splits:
        raise ValueError(f"{where}: no such split (it has {sorted(ev.splits)}): the comparison needs the same splits")
    record = ev.splits[split]
    ids = problem_keys(record, where)
    if set(ids) != set(reference):
        only_here, only_there = len(set(ids) - set(reference)), len(set(reference) - set(ids))
        raise ValueError(f"{where}: evaluated on different problems from {reference_run}'s last evaluation "
                         f"({only_here} of its {len(ids)} problems are not there, {only_there} of those are missing "
                         "here): another data.seed, task or eval_size; compare runs evaluated on the same problems")
    position = {problem: i for i, problem in enumerate(ids)}
    order = [position[problem] for problem in reference]
    return {f: np.asarray(record[f])[order] > 0.5 for f in ("acc", "acc_sampled") if f in record}


def run_identity(run_dir: Path) -> tuple[str | None, int | None]:
    """(model.group, trainer.seed) from the run's config.yaml, (None, None) where it has none."""
    path = Path(run_dir) / "config.yaml"
    cfg = yaml.safe_load(path.read_text()) if path.is_file() else {}
    return (cfg.get("model") or {}).get("group"), (cfg.get("trainer") or {}).get("seed")


def refuse_pooled_seeds(identities: dict[str, tuple[str | None, int | None]]) -> None:
    """Several seeds of one group share their held-out problems: comparing them here would invite pooling
    problems over seeds as independent. The seed is the unit of replication: that is rl.study_report's job."""
    seeds: dict[str, dict[int, str]] = {}
    for name, (group, seed) in identities.items():
        if group is not None:
            seeds.setdefault(group, {})[seed] = name
    for group, by_seed in seeds.items():
        if len(by_seed) > 1:
            runs = ", ".join(f"{n} (trainer.seed={s})" for s, n in sorted(by_seed.items(), key=lambda x: str(x[0])))
            raise ValueError(f"runs {runs} are all model.group={group!r}: rl.compare tests problems within a seed "
                             "and never pools problems over seeds (they share problems, so they are not independent); "
                             "compare one seed's runs at a time, and use rl.study_report (rl.stats) for statistics "
                             "over seeds, with the run as the unit")


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
    identities = {name: run_identity(d) for name, d in zip(names, run_dirs, strict=True)}
    refuse_pooled_seeds(identities)
    evals = {name: load_evals(d) for name, d in zip(names, run_dirs, strict=True)}
    reference = names[0]
    ref_last = evals[reference][1]
    keys = {split: problem_keys(record, f"{reference}, {ref_last.path.name}, split {split!r}")
            for split, record in ref_last.splits.items()}
    # outcomes[name][split] = (after the warm start, after PPO), both in the reference's problem order
    outcomes = {name: {split: tuple(paired_outcomes(ev, split, keys[split], name, reference) for ev in evals[name])
                       for split in keys} for name in names}
    rows, tests = [], []
    for name in names:
        for split in keys:
            row, row_tests = _row(name, split, outcomes[name][split],
                                  outcomes[reference][split][1]["acc"] if name != reference else None, reference)
            tests += [(len(rows), key) for key in row_tests]
            rows.append(row)
    if tests:
        adjusted = multipletests([rows[i][key] for i, key in tests], method="holm")[1]
        for (i, key), p in zip(tests, adjusted, strict=True):
            rows[i][key + "_holm"] = float(p)
    return {"reference": reference, "runs": _run_summaries(names, run_dirs, identities), "rows": rows}


def _row(name: str, split: str, outcomes: tuple[dict, dict], reference_after: np.ndarray | None,
         reference: str) -> tuple[dict, list[str]]:
    """One run's row of a split, and the names of the p-values in it (for Holm's correction)."""
    first, last = outcomes
    before, after = first["acc"], last["acc"]
    row = {"run": name, "split": split, "problems": len(after), "acc_before": float(before.mean()),
           "acc_after": float(after.mean()), "ci_after": wilson(after), "p_ppo_vs_warm_start": mcnemar_p(before, after)}
    tests = ["p_ppo_vs_warm_start"]
    if "acc_sampled" in first and "acc_sampled" in last:
        s_before, s_after = first["acc_sampled"], last["acc_sampled"]
        row.update({"sampled_before": float(s_before.mean()), "sampled_after": float(s_after.mean()),
                    "p_sampled_ppo_vs_warm_start": mcnemar_p(s_before, s_after)})
        tests.append("p_sampled_ppo_vs_warm_start")
    if reference_after is not None:
        row[f"p_vs_{reference}"] = mcnemar_p(reference_after, after)
        tests.append(f"p_vs_{reference}")
    return row, tests


def _run_summaries(names: list[str], run_dirs: list[Path], identities: dict) -> dict:
    def read(d: Path, file: str) -> dict:
        return json.loads((Path(d) / file).read_text()) if (Path(d) / file).is_file() else {}

    out = {}
    for name, d in zip(names, run_dirs, strict=True):
        summary, info = read(d, "summary.json"), read(d, "run_info.json")
        out[name] = {"group": identities[name][0], "seed": identities[name][1], "parameters": info.get("parameters"),
                     "steps": summary.get("steps"), "lru_iterations_mean": summary.get("lru_iterations_mean"),
                     "tokens_per_s": summary.get("tokens_per_s"), "wall_s": _wall_seconds(Path(d))}
    return out


def _wall_seconds(run_dir: Path) -> float | None:
    times = [r["time/step"] for r in read_metrics(run_dir) if r.get("time/step") is not None]
    return float(sum(times)) if times else None


def markdown(result: dict) -> str:
    ref = result["reference"]
    lines = ["# Comparison", "", "| run | trainer.seed | parameters | PPO steps | LRU iterations | tokens/s | "
             "PPO wall (s) |", "|---|---|---|---|---|---|---|"]
    for name, r in result["runs"].items():
        lines.append(f"| {name} | {fmt(r.get('seed'), '')} | {fmt(r['parameters'], ',')} | {fmt(r['steps'], '')} | "
                     f"{fmt(r['lru_iterations_mean'], '.2f')} | {fmt(r['tokens_per_s'], '.0f')} | "
                     f"{fmt(r['wall_s'], '.0f')} |")
    lines += ["", f"Greedy held-out accuracy. p-values: exact McNemar on the same problems (paired by problem key), "
              f"Holm-adjusted over the table; 'PPO vs warm start' is within a run, 'vs {ref}' compares final models. "
              "Each test is of one run (one seed): do not pool them over seeds, whose problems are the same.", "",
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
