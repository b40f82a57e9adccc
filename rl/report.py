"""End-of-run summary: ``summary.json`` for machines and ``report.md`` for people, with the curves.

Held-out accuracy after the warm start (step 0, or the first evaluation) and after PPO (the last one),
by split and level; LRU iterations; throughput and time per phase.
"""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean

from rl.plot import plot_runs
from rl.tracking import read_metrics

PHASES = ("time/rollout", "time/score", "time/train", "time/sync")


def fmt(x, spec: str = ".3f") -> str:
    """A number for a report table: formatted with ``spec``, or "n/a" when there is none."""
    return "n/a" if x is None else format(x, spec)


def _heldout(row: dict) -> dict:
    return {k[len("eval/"):]: v for k, v in row.items() if k.startswith("eval/")}


def summarize(rows: list[dict]) -> dict:
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    steps = [r for r in rows if "reward/mean" in r]

    def average(key: str) -> float | None:
        values = [r[key] for r in steps if r.get(key) is not None]
        return mean(values) if values else None

    return {
        "steps": steps[-1]["step"] if steps else 0,
        "heldout_before_ppo": _heldout(evals[0]) if evals else {},
        "heldout_after_ppo": _heldout(evals[-1]) if evals else {},
        "reward_first": steps[0]["reward/mean"] if steps else None,
        "reward_last": steps[-1]["reward/mean"] if steps else None,
        "lru_iterations_mean": average("train/lru_iterations") if any("train/lru_iterations" in r for r in steps)
        else None,
        "tokens_per_s": average("throughput/tokens_per_s"),
        "seconds_per_phase": {p.split("/")[1]: average(p) for p in PHASES},
        # The warm-start criterion (trainer.warm_start_min_acc, warm_start_max_loss) on the model PPO started from.
        "warm_start_passed": bool(evals[0].get("sft/passed", 1.0)) if evals else None,
        "warm_start_criterion_acc": evals[0].get("sft/criterion_acc") if evals else None,
        "warm_start_loss_last": evals[0].get("sft/loss_last") if evals else None,
    }


def write_report(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    summary = summarize(read_metrics(run_dir))
    summary["curves"] = [str(p) for p in plot_runs([run_dir], run_dir / "curves")]
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    before, after = summary["heldout_before_ppo"], summary["heldout_after_ppo"]
    lines = [f"# Run {run_dir.name}", "", f"{summary['steps']} PPO steps.", "",
             "| held-out metric | after warm start | after PPO |", "|---|---|---|"]
    lines += [f"| {k} | {before.get(k, float('nan')):.3f} | {after[k]:.3f} |" for k in sorted(after)]
    phases = ", ".join(f"{k} {v:.2f} s" for k, v in summary["seconds_per_phase"].items() if v is not None)
    lines += ["", f"Mean reward: first step {fmt(summary['reward_first'])}, last step {fmt(summary['reward_last'])}.",
              f"LRU iterations (mean): {fmt(summary['lru_iterations_mean'])}.",
              f"Throughput: {fmt(summary['tokens_per_s'])} tokens/s; time per step by phase: {phases}.", "",
              "Curves: " + ", ".join(f"[{Path(p).stem}](curves/{Path(p).name})" for p in summary["curves"])]
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")
    return summary
