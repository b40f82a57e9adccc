"""rl.study_report on synthetic runs: exclusions, missing experiments, one seed, pairing by seed; the JSON's
numbers are checked against rl.stats called directly on the same per-seed values."""

import json

import numpy as np
import pytest

from rl import stats
from rl import study_report as report

EXPERIMENTS = {"baseline": 0.50, "mla_only": 0.47, "mla_only_matched": 0.51, "mla_lru_fixed": 0.53,
               "mla_lru_adaptive": 0.57, "looped": 0.52}
LRU = {"mla_lru_fixed": 4.0, "mla_lru_adaptive": 2.5, "looped": 4.0}


def make_run(experiment: str, seed: int, passed: bool = True, acc: float | None = None) -> dict:
    """A run whose accuracy is the experiment's level plus a seed effect shared by all experiments."""
    rng = np.random.default_rng([sum(map(ord, experiment)), seed])  # stable (str hashes vary per process)
    acc = EXPERIMENTS[experiment] + 0.08 * np.sin(seed) + rng.normal(0, 0.01) if acc is None else acc
    it = LRU.get(experiment)
    it = None if it is None else it + (rng.normal(0, 0.1) if experiment == "mla_lru_adaptive" else 0.0)
    return {"experiment": experiment, "seed": seed, "passed_warm_start": passed,
            "metrics": {"acc": float(acc), "acc_by_steps": {str(k): float(acc) - 0.05 * k for k in (2, 3, 4)},
                        "iterations_mean": it, "wall_s": 100.0 + seed,
                        "iterations_by_steps": None if it is None else {str(k): it + 0.1 * k for k in (2, 3, 4)}}}


def make_runs(seeds: range = range(5)) -> list[dict]:
    return [make_run(e, s) for e in EXPERIMENTS for s in seeds]


def values(runs: list[dict], experiment: str, metric: str, seeds: list[int]) -> np.ndarray:
    by_seed = {r["seed"]: r["metrics"][metric] for r in runs if r["experiment"] == experiment}
    return np.array([by_seed[s] for s in seeds])


def row_of(rows: list[dict], name: str, metric: str = "acc") -> dict:
    (row,) = [r for r in rows if r["name"] == name and r["metric"] == metric]
    return row


def test_json_numbers_match_rl_stats():
    runs = make_runs()
    study = report.build_study(runs)
    row = row_of(study["preregistered"], "iteration vs parameters")
    a, b = values(runs, "mla_lru_adaptive", "acc", row["seeds"]), values(runs, "mla_only_matched", "acc", row["seeds"])
    cmp = stats.compare_paired(a, b)
    assert row["seeds"] == [0, 1, 2, 3, 4] and row["mean_diff"] == pytest.approx(np.mean(a - b))
    assert row["p"] == cmp.p and row["chosen"] == cmp.chosen == "permutation" and row["reason"] == cmp.reason
    assert row["tests"]["t-test"]["p"] == pytest.approx(stats.paired_ttest(a, b).p)
    assert row["d_z"] == pytest.approx(stats.cohens_dz(a, b))
    assert row["rank_biserial"] == pytest.approx(stats.rank_biserial(a, b))
    assert row["ci"]["low"] == pytest.approx(stats.bootstrap_mean_diff(a, b, "BCa").low)
    assert row["mde"]["mde_dz"] == pytest.approx(stats.minimum_detectable_effect(5, alpha=0.05 / 5).mde_dz)
    assert row["mde"]["mde_raw"] == pytest.approx(row["mde"]["mde_dz"] * np.std(a - b, ddof=1))
    assert row["min_p_permutation"] == pytest.approx(2 / 32)  # 5 seeds: the exact test cannot reach 0.05
    family = [r["p"] for r in study["preregistered"]]
    assert [r["p_adjusted"] for r in study["preregistered"]] == pytest.approx(stats.adjust_pvalues(family, "holm"))
    assert len(study["preregistered"]) == 5  # four contrasts, "what halting saves" on accuracy and iterations
    halting = row_of(study["preregistered"], "what halting saves", "iterations_mean")
    assert halting["mean_diff"] == pytest.approx(-1.5, abs=0.2)


def test_exploratory_contrasts_are_main_vs_the_rest_minus_the_planned_ones_with_bh():
    study = report.build_study(make_runs())
    rows = study["exploratory"]
    assert {r["experiment_b"] for r in rows} == {"baseline", "looped", "mla_only"}  # fixed and matched are planned
    assert all(r["family"] == "exploratory" and r["experiment_a"] == "mla_lru_adaptive" for r in rows)
    assert [r["p_adjusted"] for r in rows] == pytest.approx(stats.adjust_pvalues([r["p"] for r in rows], "bh"))
    assert all(r["adjustment"] == "bh over 3 tests" for r in rows)


def test_excluded_runs_are_listed_and_never_used():
    runs = make_runs()
    runs[0] = make_run("baseline", 0, passed=False, acc=0.05)  # a collapsed warm start
    study = report.build_study(runs)
    assert study["excluded"] == [{"experiment": "baseline", "seed": 0,
                                  "reason": "did not pass the warm start (passed_warm_start=False)"}]
    (baseline,) = [e for e in study["experiments"] if e["experiment"] == "baseline"]
    assert baseline["seeds"] == [1, 2, 3, 4]
    assert baseline["acc"]["estimate"] == pytest.approx(np.mean(values(runs, "baseline", "acc", [1, 2, 3, 4])))
    assert row_of(study["preregistered"], "MLA's cost")["seeds"] == [1, 2, 3, 4]
    assert "baseline seed 0 (did not pass the warm start" in report.to_markdown(study)


def test_missing_experiment_is_not_run_and_still_counts_in_holm():
    runs = [r for r in make_runs() if r["experiment"] != "looped"]
    study = report.build_study(runs)
    missing = row_of(study["preregistered"], "latent vs layer iteration at equal compute")
    assert missing["status"] == "not run" and missing["reason"] == "no included runs of looped"
    done = [r for r in study["preregistered"] if r["status"] == "run"]
    expected = stats.adjust_pvalues(np.array([r["p"] for r in done] + [1.0]), "holm")[:4]
    assert [r["p_adjusted"] for r in done] == pytest.approx(expected)
    assert "not run: no included runs of looped" in report.to_markdown(study)


def test_one_seed_and_missing_metric_are_not_run_with_reasons():
    runs = make_runs(range(1))
    study = report.build_study(runs)
    assert all(r["status"] == "not run" for r in study["preregistered"] + study["exploratory"])
    assert row_of(study["preregistered"], "MLA's cost")["reason"].startswith("1 shared seed(s) [0]")
    assert study["experiments"][0]["acc"]["note"] == "one seed: no interval"
    assert "one seed: no interval" in report.to_markdown(study)
    no_iterations = make_runs()
    for r in no_iterations:
        if r["experiment"] == "mla_lru_fixed":
            r["metrics"]["iterations_mean"] = None
    halting = row_of(report.build_study(no_iterations)["preregistered"], "what halting saves", "iterations_mean")
    assert halting["reason"] == "mla_lru_fixed has no iterations_mean values"


def test_pairing_is_by_shared_seed_and_independent_of_run_order():
    runs = [make_run("mla_only", s) for s in range(0, 5)] + [make_run("baseline", s) for s in range(2, 8)]
    study = report.build_study(runs)
    row = row_of(study["preregistered"], "MLA's cost")
    assert row["seeds"] == [2, 3, 4]
    d = values(runs, "mla_only", "acc", [2, 3, 4]) - values(runs, "baseline", "acc", [2, 3, 4])
    assert row["mean_diff"] == pytest.approx(d.mean())
    assert report.to_json(report.build_study(runs[::-1])) == report.to_json(study)


def test_the_table_of_runs_lists_every_run_with_its_warm_start_excluded_ones_too():
    runs = make_runs(range(2))
    runs[0] = make_run("baseline", 0, passed=False, acc=0.05)
    runs[0]["metrics"].update(warm_start_loss=0.41, acc_before_ppo=0.04)
    study = report.build_study(list(reversed(runs)))  # listed in (experiment, seed) order whatever the input's
    assert [(r["experiment"], r["seed"]) for r in study["runs"]] == sorted((e, s) for e in EXPERIMENTS for s in (0, 1))
    assert study["runs"][0] == {"experiment": "baseline", "seed": 0, "passed_warm_start": False,
                                "warm_start_loss": 0.41, "acc_before_ppo": 0.04, "acc": 0.05,
                                "iterations_mean": None, "iterations_steps_rho": None, "wall_s": 100.0}
    markdown = report.to_markdown(study)
    assert "| baseline | 0 | no | 0.410 | 0.040 | 0.050 | n/a | n/a | 100 |" in markdown
    assert "| baseline | 1 | yes | n/a | n/a |" in markdown  # a run without the optional metrics
    with pytest.raises(ValueError, match=r"metrics\['warm_start_loss'\] = inf"):
        report.build_study([{**make_run("baseline", 0), "metrics": {"acc": 0.5, "warm_start_loss": float("inf")}}])


def test_iterations_steps_rho_is_summarised_over_seeds():
    runs = make_runs(range(3))
    rhos = {0: 0.10, 1: 0.30, 2: 0.20}
    for r in runs:
        if r["experiment"] == "mla_lru_adaptive":
            r["metrics"]["iterations_steps_rho"] = rhos[r["seed"]]
    study = report.build_study(runs)
    (row,) = [e for e in study["experiments"] if e["experiment"] == "mla_lru_adaptive"]
    expected = stats.mean_ci(np.array([0.10, 0.30, 0.20]))
    assert row["iterations_steps_rho"]["estimate"] == pytest.approx(0.2)
    assert row["iterations_steps_rho"]["low"] == pytest.approx(expected.low)
    (fixed,) = [e for e in study["experiments"] if e["experiment"] == "mla_lru_fixed"]
    assert fixed["iterations_steps_rho"] is None  # never recorded: n/a, not 0
    markdown = report.to_markdown(study)
    assert "iterations-steps rho mean [95% CI]" in markdown
    assert f"| 0.200 [{expected.low:.3f}, {expected.high:.3f}] |" in markdown
    assert "| mla_lru_adaptive | 1 | yes | n/a | n/a |" in markdown and " | 0.30 | " in markdown


def test_bad_tables_are_refused():
    runs = make_runs(range(2))
    with pytest.raises(ValueError, match="two runs of experiment 'baseline' with seed 0"):
        report.build_study(runs + [make_run("baseline", 0)])
    with pytest.raises(ValueError, match=r"metrics\['acc'\] = nan"):
        report.build_study([make_run("baseline", 0, acc=float("nan"))])
    with pytest.raises(ValueError, match=r"metrics\['wall_s'\] = '12 s'"):
        report.build_study([{**make_run("baseline", 0), "metrics": {"acc": 0.5, "wall_s": "12 s"}}])
    with pytest.raises(ValueError, match=r"run 0 lacks \['passed_warm_start'\]"):
        report.build_study([{"experiment": "baseline", "seed": 0, "metrics": {"acc": 0.5}}])


def test_latex_escape():
    assert report.latex_escape("mla_lru & 5% #1 {x} ~^ a<b") == (
        r"mla\_lru \& 5\% \#1 \{x\} \textasciitilde{}\textasciicircum{} a\textless{}b")


def problem_records(runs: list[dict], problems: int = 30) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"experiment": r["experiment"], "seed": r["seed"], "problem_key": f"q{i}", "num_steps": 2 + i % 3,
             "correct": int(rng.random() < r["metrics"]["acc"])} for r in runs for i in range(problems)]


def test_write_report_files_and_problem_level(tmp_path):
    runs = make_runs(range(4))
    runs[-1] = make_run("looped", 3, passed=False)
    problems = problem_records(runs)
    study = report.write_report(runs, problems, tmp_path)
    assert json.loads((tmp_path / "report.json").read_text()) == report.jsonable(study)
    assert sorted(study["figures"]) == ["figures/acc_by_seed.png", "figures/acc_vs_steps.png",
                                        "figures/iterations_vs_steps.png"]
    for name in study["figures"]:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tex = (tmp_path / "report.tex").read_text()
    assert r"\toprule" in tex and r"mla\_lru\_adaptive" in tex and "mla_lru" not in tex
    assert "## Pre-registered contrasts" in (tmp_path / "report.md").read_text()
    level = study["problem_level"]
    assert level["records_dropped"] == 30  # the excluded looped seed's problems
    entry = [c for c in level["contrasts"] if c["name"] == "MLA's cost"][0]
    kept = [p for p in problems if not (p["experiment"] == "looped" and p["seed"] == 3)]
    direct = stats.problem_level_gee(kept, "mla_only", "baseline")
    assert entry["log_odds_ratio"] == pytest.approx(direct.log_odds_ratio) and entry["p"] == pytest.approx(direct.p)


def test_problem_level_separation_is_not_run_and_latex_optional(tmp_path):
    runs = make_runs(range(3))
    problems = [{**p, "correct": 1} if p["experiment"] == "mla_only" else p for p in problem_records(runs)]
    study = report.write_report(runs, problems, tmp_path, latex=False)
    entry = [c for c in study["problem_level"]["contrasts"] if c["name"] == "MLA's cost"][0]
    assert entry["status"] == "not run" and "perfect separation" in entry["reason"]
    assert not (tmp_path / "report.tex").exists()


def test_figures_without_iterations_and_with_only_excluded_runs(tmp_path):
    runs = [make_run("baseline", s) for s in range(3)] + [make_run("mla_only", 0, passed=False)]
    study = report.write_report(runs, None, tmp_path)
    assert study["figures"] == ["figures/acc_by_seed.png", "figures/acc_vs_steps.png"]
    assert study["problem_level"] is None
    assert row_of(study["preregistered"], "MLA's cost")["reason"] == "no included runs of mla_only"


# ---- the retrofit arm -------------------------------------------------------------------------------------

RETROFIT = {"retrofit_baseline": 0.5, "retrofit_mla_only": 0.49, "retrofit_mla_lru_fixed": 0.52,
            "retrofit_mla_lru_adaptive": 0.55}


def retrofit_runs(seeds: range = range(5)) -> list[dict]:
    out = []
    for name, level in RETROFIT.items():
        for s in seeds:
            rng = np.random.default_rng([sum(map(ord, name)), s])
            out.append({**make_run("baseline", s), "experiment": name})
            out[-1]["metrics"] = {**out[-1]["metrics"], "acc": level + 0.08 * np.sin(s) + rng.normal(0, 0.01)}
    return out


def test_the_retrofit_family_is_its_own_holm_family_and_the_main_one_is_unchanged():
    runs = make_runs()
    main_only = report.build_study(runs)
    study = report.build_study(runs + retrofit_runs())
    assert report.to_json({k: study[k] for k in ("preregistered", "exploratory")}) == report.to_json(
        {k: main_only[k] for k in ("preregistered", "exploratory")})  # the retrofit arm changes nothing there
    rows = study["retrofit"]
    assert [(r["experiment_a"], r["experiment_b"]) for r in rows] == [
        ("retrofit_mla_lru_adaptive", "retrofit_mla_only"), ("retrofit_mla_lru_fixed", "retrofit_mla_only"),
        ("retrofit_mla_only", "retrofit_baseline")]
    assert all(r["family"] == "retrofit" and r["status"] == "run" and r["adjustment"] == "holm over 3 tests"
               for r in rows)
    assert [r["p_adjusted"] for r in rows] == pytest.approx(stats.adjust_pvalues([r["p"] for r in rows], "holm"))
    a = values(runs + retrofit_runs(), "retrofit_mla_only", "acc", list(range(5)))
    b = values(retrofit_runs(), "retrofit_baseline", "acc", list(range(5)))
    assert rows[2]["mean_diff"] == pytest.approx(np.mean(a - b)) and rows[2]["p"] == stats.compare_paired(a, b).p
    # Exploratory: the arm's main against the arm's others and its source, not the planned pair; never across arms.
    explore = study["retrofit_exploratory"]
    assert [(r["experiment_a"], r["experiment_b"]) for r in explore] == [
        ("retrofit_mla_lru_adaptive", "baseline"), ("retrofit_mla_lru_adaptive", "retrofit_baseline"),
        ("retrofit_mla_lru_adaptive", "retrofit_mla_lru_fixed")]
    assert not any(r["experiment_b"].startswith("retrofit_") for r in study["exploratory"])
    md = report.to_markdown(study)
    assert "## Retrofit arm: pre-registered contrasts" in md and "Holm over these 3 planned tests" in md
    assert "## Retrofit arm: exploratory contrasts vs retrofit_mla_lru_adaptive" in md
    assert r"Retrofit arm: pre-registered contrasts" in report.to_latex(study)


def test_retrofit_contrasts_not_run_are_reported_with_the_reason():
    runs = make_runs() + [r for r in retrofit_runs() if r["experiment"] != "retrofit_mla_lru_fixed"]
    rows = report.build_study(runs)["retrofit"]
    fixed = [r for r in rows if r["experiment_a"] == "retrofit_mla_lru_fixed"][0]
    assert fixed["status"] == "not run" and fixed["reason"] == "no included runs of retrofit_mla_lru_fixed"
    done = [r for r in rows if r["status"] == "run"]
    expected = stats.adjust_pvalues(np.array([r["p"] for r in done] + [1.0]), "holm")[:2]
    assert [r["p_adjusted"] for r in done] == pytest.approx(expected)  # the missing test still counts, as p = 1
    untouched = report.build_study(make_runs())  # a study without the arm: all three planned tests not run
    assert [r["status"] for r in untouched["retrofit"]] == ["not run"] * 3
    assert untouched["retrofit_exploratory"] == []
    assert "not run: no included runs of retrofit_mla_only" in report.to_markdown(untouched)
