"""The study's tables and figures from a tidy table of runs, with the seed (one run) as the unit.

    from rl.study_report import write_report
    write_report(runs, problems, "outputs/study")   # report.md, report.tex, report.json, figures/*.png

``runs`` has one dict per run: {"experiment": str, "seed": int, "passed_warm_start": bool, "metrics": {"acc":
float, "acc_by_steps": {"2": float, ...}, "iterations_mean": float | None, "iterations_by_steps": {...},
"iterations_steps_rho": float | None (Spearman's rho of a problem's LRU iterations against its steps, per run),
"wall_s": float, optionally "warm_start_loss" and "acc_before_ppo" for the table of runs, ...}}. ``problems``
(optional) has one dict per problem and run: {"experiment", "seed", "problem_key", "correct", "num_steps"};
``problem_key`` names the problem itself, so the same key in two runs is the same problem.

Runs with passed_warm_start=False are left out of every mean and comparison and listed as excluded. Contrasts
pair runs by seed (only the seeds both experiments have). The pre-registered contrasts (``rl.stats.PREREGISTERED``)
form one Holm family; every other experiment against the main one is exploratory (Benjamini-Hochberg).
The retrofit arm (``rl.stats.RETROFIT_ARM``: the baseline's checkpoint converted per MLA group or continued) has its own
planned family (``rl.stats.RETROFIT_CONTRASTS``, Holm) and its own exploratory contrasts (BH): the arm's main
experiment against the arm's others and the baseline it was converted from. The two arms are never compared
with each other (a converted model against one trained from scratch answers no question the study asks).
A contrast that cannot be computed is reported as "not run" with the reason. The statistics are ``rl.stats``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from rl import stats

MAIN = "mla_lru_adaptive"  # the proposed model: exploratory contrasts compare every other experiment with it
METRICS = ("acc", "iterations_mean", "iterations_steps_rho", "wall_s")  # per-experiment summary columns
RUN_METRICS = ("warm_start_loss", "acc_before_ppo")  # optional, shown per run only (the table of runs)
EXPLORATORY_METRICS = ("acc",)
ALPHA = 0.05
LABELS = {"acc": "accuracy", "iterations_mean": "LRU iterations", "iterations_steps_rho": "iterations-steps rho",
          "wall_s": "wall s"}


# ---- the table of runs ------------------------------------------------------------------------------------

def validate_runs(runs: list[dict]) -> None:
    """Raise a ValueError naming the run for a missing field, a non-finite metric or a repeated (experiment, seed)."""
    seen = set()
    for i, run in enumerate(runs):
        missing = {"experiment", "seed", "passed_warm_start", "metrics"} - set(run)
        if missing:
            raise ValueError(f"run {i} lacks {sorted(missing)}: each run needs experiment, seed, passed_warm_start, "
                             "metrics")
        key = (run["experiment"], run["seed"])
        if key in seen:
            raise ValueError(f"two runs of experiment {key[0]!r} with seed {key[1]}: pairing by seed needs one each")
        seen.add(key)
        for name in METRICS + RUN_METRICS:
            value = run["metrics"].get(name)
            number = isinstance(value, int | float) and math.isfinite(value)
            if (name == "acc" and not number) or (value is not None and not number):
                raise ValueError(f"run {key}: metrics[{name!r}] = {value!r}; acc must be a finite number and "
                                 "other metrics finite or None")


def split_runs(runs: list[dict]) -> tuple[list[dict], list[dict]]:
    """(included runs, excluded ones as {"experiment", "seed", "reason"})."""
    kept = [r for r in runs if r["passed_warm_start"]]
    excluded = [{"experiment": r["experiment"], "seed": r["seed"],
                 "reason": "did not pass the warm start (passed_warm_start=False)"}
                for r in runs if not r["passed_warm_start"]]
    return kept, excluded


def seed_scores(runs: list[dict], metric: str) -> dict[str, dict[int, float]]:
    """{experiment: {seed: value}} of one metric; runs without the metric (None or absent) are skipped."""
    out: dict[str, dict[int, float]] = {r["experiment"]: {} for r in runs}
    for r in runs:
        if r["metrics"].get(metric) is not None:
            out[r["experiment"]][r["seed"]] = float(r["metrics"][metric])
    return out


def run_rows(runs: list[dict]) -> list[dict]:
    """Every run, excluded ones too, in (experiment, seed) order: what each one did before any averaging."""
    return [{"experiment": r["experiment"], "seed": r["seed"], "passed_warm_start": r["passed_warm_start"],
             **{m: r["metrics"].get(m) for m in RUN_METRICS + METRICS}}
            for r in sorted(runs, key=lambda r: (r["experiment"], r["seed"]))]


def summarize_experiments(runs: list[dict]) -> list[dict]:
    """Per experiment: seeds and mean with a 95% t interval over seeds of each metric in ``METRICS``."""
    rows = []
    for experiment in sorted({r["experiment"] for r in runs}):
        row = {"experiment": experiment, "seeds": sorted(r["seed"] for r in runs if r["experiment"] == experiment)}
        for metric in METRICS:
            values = [v for _, v in sorted(seed_scores(runs, metric)[experiment].items())]  # seed order: same sums
            row[metric] = asdict(stats.mean_ci(np.array(values))) if values else None
        rows.append(row)
    return rows


# ---- contrasts --------------------------------------------------------------------------------------------

def _not_run_reason(runs: list[dict], a: str, b: str, metric: str) -> str | None:
    scores = seed_scores(runs, metric)
    for name in (a, b):
        if name not in scores:
            return f"no included runs of {name}"
        if not scores[name]:
            return f"{name} has no {metric} values"
    shared = sorted(set(scores[a]) & set(scores[b]))
    if len(shared) < 2:
        return f"{len(shared)} shared seed(s) {shared} with {metric}: a paired comparison needs at least 2"
    return None


def run_contrast(runs: list[dict], name: str, a: str, b: str, metric: str, family: str, question: str = "") -> dict:
    """Paired comparison of ``a - b`` on the seeds both have: tests, choice, CIs, effect sizes (no correction)."""
    row = {"name": name, "family": family, "question": question, "experiment_a": a, "experiment_b": b,
           "metric": metric}
    reason = _not_run_reason(runs, a, b, metric)
    if reason:
        return {**row, "status": "not run", "reason": reason}
    scores = seed_scores(runs, metric)
    seeds = sorted(set(scores[a]) & set(scores[b]))
    x, y = np.array([scores[a][s] for s in seeds]), np.array([scores[b][s] for s in seeds])
    cmp = stats.compare_paired(x, y)
    return {**row, "status": "run", "seeds": seeds, "n": len(seeds), "mean_diff": cmp.mean_diff,
            "sd_diff": float(np.std(x - y, ddof=1)),
            "ci": asdict(stats.bootstrap_mean_diff(x, y, "BCa")),
            "ci_other": {"percentile": asdict(stats.bootstrap_mean_diff(x, y, "percentile")),
                         "basic": asdict(stats.bootstrap_mean_diff(x, y, "basic")),
                         "t": asdict(stats.mean_ci(x - y))},
            "tests": {t.name: asdict(t) for t in (cmp.ttest, cmp.wilcoxon, cmp.permutation)},
            "chosen": cmp.chosen, "reason": cmp.reason, "p": cmp.p,
            "min_p_permutation": 2 / 2 ** len(seeds) if len(seeds) <= stats.EXACT_MAX_N else None,
            "d_z": stats.cohens_dz(x, y), "rank_biserial": stats.rank_biserial(x, y)}


def correct_family(rows: list[dict], method: str, count_not_run: bool) -> list[dict]:
    """Adjusted p (``method``: "holm" or "bh") and the MDE at alpha / m, m the family size, for the run rows.

    ``count_not_run``: a planned test that could not be run enters the family with p = 1, so the family
    does not shrink after seeing the data (conservative); otherwise only the run tests form the family.
    """
    done = [r for r in rows if r["status"] == "run"]
    p = [r["p"] for r in done] + ([1.0] * (len(rows) - len(done)) if count_not_run else [])
    adjusted = stats.adjust_pvalues(np.array(p), method)
    m = len(p)
    for r, q in zip(done, adjusted[:len(done)], strict=True):  # the not-run entries come last
        r.update(p_adjusted=float(q), adjustment=f"{method} over {m} tests",
                 mde=asdict(stats.minimum_detectable_effect(r["n"], r["sd_diff"], alpha=ALPHA / m)))
    return rows


def preregistered_contrasts(runs: list[dict]) -> list[dict]:
    """Every (contrast, metric) of ``stats.PREREGISTERED``, Holm-adjusted as one family."""
    rows = [run_contrast(runs, c.name, c.experiment_a, c.experiment_b, metric, "preregistered", c.question)
            for c in stats.PREREGISTERED for metric in c.metrics]
    return correct_family(rows, "holm", count_not_run=True)


def retrofit_contrasts(runs: list[dict]) -> list[dict]:
    """Every (contrast, metric) of ``stats.RETROFIT_CONTRASTS``, Holm-adjusted as a family of its own."""
    rows = [run_contrast(runs, c.name, c.experiment_a, c.experiment_b, metric, "retrofit", c.question)
            for c in stats.RETROFIT_CONTRASTS for metric in c.metrics]
    return correct_family(rows, "holm", count_not_run=True)


def exploratory_contrasts(runs: list[dict], main: str = MAIN, retrofit: bool = False) -> list[dict]:
    """``main`` minus every other included experiment of its arm on ``EXPLORATORY_METRICS``, unless planned; BH.
    The from-scratch arm leaves out ``stats.RETROFIT_ARM``; the retrofit arm (``retrofit``) is that arm and the
    baseline, its source (nothing when no experiment of the arm has a run)."""
    family = stats.RETROFIT_CONTRASTS if retrofit else stats.PREREGISTERED
    planned = {frozenset((c.experiment_a, c.experiment_b, m)) for c in family for m in c.metrics}
    names = {r["experiment"] for r in runs}
    if retrofit:  # nothing without a run of the arm (the baseline alone belongs to the from-scratch arm)
        arm = names & {*stats.RETROFIT_ARM, "baseline"} if names & set(stats.RETROFIT_ARM) else set()
    else:
        arm = names - set(stats.RETROFIT_ARM)
    rows = [run_contrast(runs, f"{main} vs {other}", main, other, metric,
                         "retrofit exploratory" if retrofit else "exploratory")
            for other in sorted(arm - {main}) for metric in EXPLORATORY_METRICS
            if frozenset((main, other, metric)) not in planned]
    return correct_family(rows, "bh", count_not_run=False)


def problem_level(problems: list[dict], runs: list[dict]) -> dict:
    """GEE log-odds ratios (``stats.problem_level_gee``) for the accuracy contrasts, on included runs only."""
    included = {(r["experiment"], r["seed"]) for r in runs}
    rows = [p for p in problems if (p["experiment"], p["seed"]) in included]
    out = {"records": len(problems), "records_dropped": len(problems) - len(rows),
           "why_dropped": "records of excluded runs or runs absent from the table of runs", "contrasts": []}
    for c in stats.PREREGISTERED + stats.RETROFIT_CONTRASTS:
        entry = {"name": c.name, "experiment_a": c.experiment_a, "experiment_b": c.experiment_b}
        try:
            entry.update(status="run", **asdict(stats.problem_level_gee(rows, c.experiment_a, c.experiment_b)))
        except ValueError as e:  # the reason (missing experiment, one seed, separation) goes into the report
            entry.update(status="not run", reason=str(e))
        out["contrasts"].append(entry)
    return out


def build_study(runs: list[dict], problems: list[dict] | None = None, main: str = MAIN) -> dict:
    """Everything the report shows, as plain data (the JSON)."""
    validate_runs(runs)
    kept, excluded = split_runs(runs)
    study = {"unit": "seed (one training run)", "alpha": ALPHA, "main": main, "excluded": excluded,
             "experiments": summarize_experiments(kept), "preregistered": preregistered_contrasts(kept),
             "exploratory": exploratory_contrasts(kept, main), "retrofit": retrofit_contrasts(kept),
             "retrofit_exploratory": exploratory_contrasts(kept, stats.RETROFIT_MAIN, retrofit=True),
             "problem_level": None, "runs": run_rows(runs)}
    if problems:
        study["problem_level"] = problem_level(problems, kept)
    return study


# ---- formatting -------------------------------------------------------------------------------------------

def _num(x: float | None, fmt: str = ".3f") -> str:
    return "n/a" if x is None or not math.isfinite(x) else format(x, fmt)


def _ci(ci: dict | None) -> str:
    """"mean [low, high]" of an Interval dict, or "mean (one seed)"."""
    if ci is None:
        return "n/a"
    if not math.isfinite(ci["low"]):
        return f"{_num(ci['estimate'])} ({ci['note'] or 'no interval'})"
    return f"{_num(ci['estimate'])} [{_num(ci['low'])}, {_num(ci['high'])}]"


def _mde(row: dict) -> str:
    mde = row["mde"]
    return f"{_num(mde['mde_dz'], '.2f')} ({_num(mde['mde_raw'])})"


def contrast_cells(row: dict) -> list[str]:
    """One table row of a contrast: name, metric, a - b, seeds, mean diff [CI], test (reason), p, p adj, d_z,
    rank-biserial, MDE d_z (raw) at alpha / m. A contrast not run fills the remaining cells with its reason."""
    head = [row["name"], row["metric"], f"{row['experiment_a']} - {row['experiment_b']}"]
    if row["status"] != "run":
        return head + ["-", f"not run: {row['reason']}"] + [""] * 6
    return head + [str(row["n"]), _ci(row["ci"]), f"{row['chosen']} ({row['reason']})", _num(row["p"], ".3g"),
                   _num(row["p_adjusted"], ".3g"), _num(row["d_z"], ".2f"), _num(row["rank_biserial"], ".2f"),
                   _mde(row)]


CONTRAST_HEADER = ["contrast", "metric", "a - b", "seeds", "mean diff [95% CI, BCa]", "test (why)", "p", "p adj",
                   "d_z", "rank-biserial", "MDE d_z (raw)"]


def experiment_cells(row: dict) -> list[str]:
    return [row["experiment"], str(len(row["seeds"]))] + [_ci(row[m]) for m in METRICS]


EXPERIMENT_HEADER = ["experiment", "seeds"] + [f"{LABELS[m]} mean [95% CI]" for m in METRICS]


def problem_cells(row: dict) -> list[str]:
    head = [row["name"], f"{row['experiment_a']} - {row['experiment_b']}"]
    if row["status"] != "run":
        return head + [f"not run: {row['reason']}", "", "", ""]
    return head + [f"{_num(row['log_odds_ratio'])} [{_num(row['low'])}, {_num(row['high'])}]", _num(row["p"], ".3g"),
                   f"{row['n_seeds']} / {row['n_problems']}", row["note"]]


PROBLEM_HEADER = ["contrast", "a - b", "log-odds ratio [95% CI]", "p", "seeds / problems", "note"]


def run_cells(row: dict) -> list[str]:
    return [row["experiment"], str(row["seed"]), "yes" if row["passed_warm_start"] else "no",
            _num(row["warm_start_loss"]), _num(row["acc_before_ppo"]), _num(row["acc"]),
            _num(row["iterations_mean"], ".2f"), _num(row["iterations_steps_rho"], ".2f"), _num(row["wall_s"], ".0f")]


RUN_HEADER = ["experiment", "seed", "passed warm start", "warm-start loss", "accuracy after warm start",
              "accuracy after PPO", "LRU iterations", "iterations-steps rho", "wall s"]


def _sections(study: dict) -> list[tuple[str, str, list[str], list[list[str]]]]:
    """(title, caption, header, rows) of each table, shared by the markdown and LaTeX writers."""
    m = len(study["preregistered"])
    out = [("Experiments", "Included runs only; mean over seeds with a 95% t interval.", EXPERIMENT_HEADER,
            [experiment_cells(r) for r in study["experiments"]]),
           ("Pre-registered contrasts", f"Holm over the {m} planned tests (a test not run counts as p = 1). "
            "Paired by seed; MDE at power 0.8 and alpha / m. The exact sign-flip test cannot go below p = 2 / 2^n "
            "(0.0625 with 5 seeds).", CONTRAST_HEADER,
            [contrast_cells(r) for r in study["preregistered"]]),
           (f"Exploratory contrasts vs {study['main']}", "Exploratory: Benjamini-Hochberg over these tests only; "
            "not confirmatory; the retrofit arm is left out.", CONTRAST_HEADER,
            [contrast_cells(r) for r in study["exploratory"]]),
           ("Retrofit arm: pre-registered contrasts", f"Every MLA group converted from the baseline's warm-started "
            f"checkpoint of the same seed, then a recovery fine-tune and PPO; retrofit_baseline is that checkpoint "
            f"continued without a conversion, for the same steps. Holm over these "
            f"{len(study['retrofit'])} planned tests, a family of their own (a test not run counts as p = 1).",
            CONTRAST_HEADER, [contrast_cells(r) for r in study["retrofit"]]),
           (f"Retrofit arm: exploratory contrasts vs {stats.RETROFIT_MAIN}", "Within the arm and against its source "
            "baseline; Benjamini-Hochberg over these tests only; not confirmatory.", CONTRAST_HEADER,
            [contrast_cells(r) for r in study["retrofit_exploratory"]])]
    if study["problem_level"]:
        out.append(("Problem level (GEE, complement)", "Logit of per-problem correctness, exchangeable within "
                    "seed; the seed remains the unit of replication.", PROBLEM_HEADER,
                    [problem_cells(r) for r in study["problem_level"]["contrasts"]]))
    out.append(("Runs", "Every run, excluded ones included, before any averaging. Accuracy is greedy, on the test "
                "split; the warm-start loss is the one its criterion reads.", RUN_HEADER,
                [run_cells(r) for r in study["runs"]]))
    return out


def to_markdown(study: dict) -> str:
    def cell(s: str) -> str:
        return s.replace("|", "\\|")

    lines = ["# Study report", "", f"Unit of analysis: the {study['unit']}. Differences are a - b.", "",
             "Excluded runs (not averaged, not compared): "
             + (", ".join(f"{e['experiment']} seed {e['seed']} ({e['reason']})" for e in study["excluded"]) or "none")]
    for title, caption, header, rows in _sections(study):
        lines += ["", f"## {title}", "", caption, "", "| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


LATEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "<": r"\textless{}", ">": r"\textgreater{}"}


def latex_escape(text: str) -> str:
    """Escape LaTeX's special characters, e.g. ``mla_lru_fixed`` -> ``mla\\_lru\\_fixed``."""
    return "".join(LATEX_SPECIALS.get(ch, ch) for ch in text)


def to_latex(study: dict) -> str:
    """One booktabs tabular per table (needs ``\\usepackage{booktabs}``), names escaped."""
    parts = [f"% Study report: unit of analysis the {latex_escape(study['unit'])}; differences are a - b."]
    for title, caption, header, rows in _sections(study):
        parts += [f"% {latex_escape(title)}: {latex_escape(caption)}", r"\begin{tabular}{" + "l" * len(header) + "}",
                  r"\toprule", " & ".join(latex_escape(h) for h in header) + r" \\", r"\midrule"]
        parts += [" & ".join(latex_escape(c) for c in row) + r" \\" for row in rows]
        parts += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(parts)


def jsonable(obj: object) -> object:
    """NaN and infinities -> None (JSON has neither), tuples -> lists, numpy scalars -> Python numbers."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def to_json(study: dict) -> str:
    return json.dumps(jsonable(study), indent=2, allow_nan=False)


# ---- figures ----------------------------------------------------------------------------------------------

def _figure() -> tuple[Figure, Axes]:
    fig = Figure(figsize=(6.5, 4))  # the Agg canvas directly: no pyplot state, no display
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig: Figure, ax: Axes, path: Path, title: str, xlabel: str, ylabel: str) -> Path:
    ax.set_title(title), ax.set_xlabel(xlabel), ax.set_ylabel(ylabel), ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def plot_by_steps(runs: list[dict], key: str, ylabel: str, path: Path) -> Path | None:
    """``metrics[key]`` ({num_steps: value}) against the number of steps: a dot per seed, a line through the
    experiment's means. None (nothing drawn) when no run has ``key``."""
    by_exp = {}
    for r in runs:
        for steps, value in (r["metrics"].get(key) or {}).items():
            if value is not None:
                by_exp.setdefault(r["experiment"], {}).setdefault(int(steps), []).append(float(value))
    if not by_exp:
        return None
    fig, ax = _figure()
    for i, (experiment, points) in enumerate(sorted(by_exp.items())):
        steps = sorted(points)
        offset = 0.06 * (i - (len(by_exp) - 1) / 2)  # side by side, so seeds of different experiments don't hide
        (line,) = ax.plot([s + offset for s in steps], [np.mean(points[s]) for s in steps], label=experiment)
        for s in steps:
            ax.scatter([s + offset] * len(points[s]), points[s], s=14, color=line.get_color(), alpha=0.7)
    ax.set_xticks(sorted({s for points in by_exp.values() for s in points}))
    return _save(fig, ax, path, f"{ylabel} by number of steps (dot: one seed)", "reasoning steps", ylabel)


def plot_seeds(runs: list[dict], excluded_runs: list[dict], path: Path) -> Path:
    """Strip plot of per-seed accuracy per experiment; excluded runs drawn as grey crosses, not in the mean."""
    names = sorted({r["experiment"] for r in runs + excluded_runs})
    fig, ax = _figure()
    for i, name in enumerate(names):
        acc = [r["metrics"]["acc"] for r in runs if r["experiment"] == name]
        ax.scatter(i + np.linspace(-0.1, 0.1, len(acc)), acc, s=20, zorder=3, label="seed" if i == 0 else None)
        if acc:
            ax.hlines(np.mean(acc), i - 0.25, i + 0.25, color="black", label="mean" if i == 0 else None)
        bad = [r["metrics"]["acc"] for r in excluded_runs if r["experiment"] == name]
        ax.scatter([i] * len(bad), bad, marker="x", color="grey", label="excluded" if bad else None)
    ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
    return _save(fig, ax, path, "Accuracy per seed", "experiment", "accuracy")


def write_figures(runs: list[dict], out_dir: Path) -> list[Path]:
    """figures/acc_by_seed.png, acc_vs_steps.png and iterations_vs_steps.png (the last two when there is data)."""
    fig_dir = Path(out_dir) / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    kept, _ = split_runs(runs)
    written = [plot_seeds(kept, [r for r in runs if not r["passed_warm_start"]], fig_dir / "acc_by_seed.png"),
               plot_by_steps(kept, "acc_by_steps", "accuracy", fig_dir / "acc_vs_steps.png"),
               plot_by_steps(kept, "iterations_by_steps", "LRU iterations", fig_dir / "iterations_vs_steps.png")]
    return [p for p in written if p is not None]


def write_report(runs: list[dict], problems: list[dict] | None, out_dir: str | Path, latex: bool = True,
                 main: str = MAIN) -> dict:
    """Write report.md, report.json, report.tex (when ``latex``) and figures/*.png into ``out_dir``; return the
    study (what report.json holds)."""
    study = build_study(runs, problems, main)  # validates before anything is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    study["figures"] = [str(p.relative_to(out)) for p in write_figures(runs, out)]
    (out / "report.md").write_text(to_markdown(study) + "\n" + "\n".join(f"![{Path(f).stem}]({f})"
                                                                        for f in study["figures"]) + "\n")
    (out / "report.json").write_text(to_json(study) + "\n")
    if latex:
        (out / "report.tex").write_text(to_latex(study))
    return study
