"""rl.compare: paired tests on the same problems, worked out by hand."""

from __future__ import annotations

import json

import pytest
import yaml

from rl.compare import compare, main, mcnemar_p, wilson


def write_run(path, before: list[int], after: list[int], keys=None, group=None, seed=0, first_keys=None):
    """A run directory as rl.driver leaves it: evals/step_N.json with per-problem records (problem keys, and
    indices 0..n-1 as in every file), metrics.jsonl and config.yaml. ``first_keys``: another order (or other
    problems) in the first evaluation."""
    (path / "evals").mkdir(parents=True)
    keys = keys or [1000 + i for i in range(len(before))]
    for step, acc, k in ((0, before, first_keys or keys), (10, after, keys)):
        record = {"acc": acc, "acc_sampled": acc, "index": list(range(len(acc))), "key": k,
                  "data_source": ["causal_loop"] * len(acc)}
        (path / "evals" / f"step_{step:06d}.json").write_text(json.dumps({"test": record}))
    (path / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward/mean": 0.5, "time/step": 2.0}) + "\n")
    config = {"model": {"group": group or path.name}, "trainer": {"seed": seed}}
    (path / "config.yaml").write_text(yaml.safe_dump(config))


def test_mcnemar_exact_by_hand():
    import numpy as np

    # 6 problems flipped wrong -> right, none right -> wrong: two-sided binomial p = 2 * 0.5**6
    before, after = np.zeros(10), np.array([1] * 6 + [0] * 4)
    assert mcnemar_p(before, after) == pytest.approx(2 * 0.5**6)
    assert mcnemar_p(after, after) == pytest.approx(1.0)


def test_wilson_interval_by_hand():
    import numpy as np

    # 6/10, z = 1.959964: centre (6 + z^2/2) / (10 + z^2), half-width z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n)
    low, high = wilson(np.array([1] * 6 + [0] * 4))
    assert (low, high) == pytest.approx((0.31267, 0.83182), abs=1e-4)


def test_compare_tables_runs_and_refuses_different_problems(tmp_path, capsys):
    write_run(tmp_path / "baseline", [0] * 10, [1] * 2 + [0] * 8)
    write_run(tmp_path / "mla_lru_adaptive", [0] * 10, [1] * 6 + [0] * 4)
    result = compare([tmp_path / "baseline", tmp_path / "mla_lru_adaptive"])
    lru = next(r for r in result["rows"] if r["run"] == "mla_lru_adaptive")
    assert lru["acc_before"] == 0.0 and lru["acc_after"] == 0.6
    assert lru["p_ppo_vs_warm_start"] == pytest.approx(2 * 0.5**6)
    assert lru["p_vs_baseline"] == pytest.approx(2 * 0.5**4)  # 4 problems only the LRU run gets right
    assert lru["sampled_after"] == 0.6 and lru["p_sampled_ppo_vs_warm_start"] == pytest.approx(2 * 0.5**6)
    # Holm over five tests: p-values 0.5, 0.5 (baseline's 2 flips, greedy and sampled), 0.03125 twice, 0.125
    # -> sorted 0.03125 x5, 0.03125 x4 (monotone: 0.15625), 0.125 x3 = 0.375, then 0.5 x2 = 1.0 (capped)
    assert lru["p_ppo_vs_warm_start_holm"] == pytest.approx(5 * 0.03125)
    assert lru["p_vs_baseline_holm"] == pytest.approx(3 * 0.125)
    assert main([str(tmp_path / "baseline"), str(tmp_path / "mla_lru_adaptive"), "--out", str(tmp_path / "cmp")]) == 0
    assert "| mla_lru_adaptive | test | 10 | 0.000 | 0.600" in (tmp_path / "cmp" / "comparison.md").read_text()
    assert (tmp_path / "cmp" / "curves" / "reward.png").is_file()
    assert result["runs"]["mla_lru_adaptive"]["seed"] == 0
    with pytest.raises(SystemExit):
        main([str(tmp_path / "cmp"), "--out", str(tmp_path / "x")])  # no evals: a clear usage error
    assert "no evals/step_" in capsys.readouterr().err


def test_runs_on_other_problems_with_the_same_indices_are_refused(tmp_path):
    # Another data.seed: the same 0..9 indices, other problems. Pairing by index would have compared them.
    write_run(tmp_path / "baseline", [0] * 10, [1] * 10)
    write_run(tmp_path / "mla_only", [0] * 10, [1] * 10, keys=[2000 + i for i in range(10)])
    with pytest.raises(ValueError, match=r"mla_only, step_000000.json, split 'test': evaluated on different problems"
                                         r" from baseline's last evaluation \(10 of its 10 problems are not there"):
        compare([tmp_path / "baseline", tmp_path / "mla_only"])
    write_run(tmp_path / "mla_lru_fixed", [0] * 10, [1] * 10, first_keys=[1000 + i for i in range(9)] + [1007])
    with pytest.raises(ValueError, match=r"mla_lru_fixed, step_000000.json, split 'test': 1 problem key\(s\) "
                                         "appear twice"):
        compare([tmp_path / "baseline", tmp_path / "mla_lru_fixed"])


def test_problems_are_paired_by_key_not_by_position(tmp_path):
    # The baseline gets problems 0 and 1 right; the other run problems 0..5, but lists them in reverse order.
    keys = [1000 + i for i in range(10)]
    write_run(tmp_path / "baseline", [0] * 10, [1] * 2 + [0] * 8)
    write_run(tmp_path / "mla_only", [1] * 2 + [0] * 8, [0] * 4 + [1] * 6, keys=keys[::-1], first_keys=keys)
    row = next(r for r in compare([tmp_path / "baseline", tmp_path / "mla_only"])["rows"] if r["run"] == "mla_only")
    # By key: only mla_only right on problems 2..5 (4), never the other way: p = 2 * 0.5**4. (By position it
    # would be 6 against 2: p = 2 * (1 + 8 + 28) / 256.)
    assert row["p_vs_baseline"] == pytest.approx(2 * 0.5**4)
    # Within the run: the warm start got problems 0, 1 right (listed first), PPO 0..5: 4 flips right, none wrong.
    assert row["p_ppo_vs_warm_start"] == pytest.approx(2 * 0.5**4)
    assert row["acc_before"] == 0.2 and row["acc_after"] == 0.6


def test_a_record_without_problem_keys_is_refused_with_the_fix(tmp_path):
    write_run(tmp_path / "baseline", [0] * 4, [1] * 4)
    write_run(tmp_path / "old", [0] * 4, [1] * 4)
    path = tmp_path / "old" / "evals" / "step_000000.json"
    records = json.loads(path.read_text())
    del records["test"]["key"]
    path.write_text(json.dumps(records))
    with pytest.raises(ValueError, match=r"old, step_000000.json, split 'test': the record has no problem key .*"
                                         r"re-evaluate .*`python -m rl.evaluate`"):
        compare([tmp_path / "baseline", tmp_path / "old"])
    records["test"]["key"] = [1000, None, 1002, 1003]
    path.write_text(json.dumps(records))
    with pytest.raises(ValueError, match="no problem key"):
        compare([tmp_path / "baseline", tmp_path / "old"])


def test_a_missing_split_is_refused(tmp_path):
    write_run(tmp_path / "baseline", [0] * 4, [1] * 4)
    write_run(tmp_path / "mla_only", [0] * 4, [1] * 4)
    path = tmp_path / "mla_only" / "evals" / "step_000010.json"
    path.write_text(json.dumps({"heldout": json.loads(path.read_text())["test"]}))
    with pytest.raises(ValueError, match=r"mla_only, step_000010.json, split 'test': no such split"):
        compare([tmp_path / "baseline", tmp_path / "mla_only"])


def test_several_seeds_of_one_group_are_refused_not_pooled(tmp_path):
    # Two seeds of a group are evaluated on the same problems: their McNemar tables must never be pooled.
    write_run(tmp_path / "baseline_s0", [0] * 4, [1] * 4, group="baseline", seed=0)
    write_run(tmp_path / "baseline_s1", [0] * 4, [1] * 4, group="baseline", seed=1)
    write_run(tmp_path / "adaptive_s1", [0] * 4, [1] * 4, group="mla_lru_adaptive", seed=1)
    with pytest.raises(ValueError, match=r"baseline_s0 \(trainer.seed=0\), baseline_s1 \(trainer.seed=1\) are all "
                                         r"model.group='baseline'.*never pools.*rl.study_report"):
        compare([tmp_path / "baseline_s0", tmp_path / "adaptive_s1", tmp_path / "baseline_s1"])
    # One seed per group (even different seeds), or one group's variants with one seed: tests per run.
    result = compare([tmp_path / "baseline_s0", tmp_path / "adaptive_s1"])
    assert [r["run"] for r in result["rows"]] == ["baseline_s0", "adaptive_s1"]
    assert [r["seed"] for r in result["runs"].values()] == [0, 1]
    write_run(tmp_path / "baseline_kl", [0] * 4, [1] * 4, group="baseline", seed=0)
    assert len(compare([tmp_path / "baseline_s0", tmp_path / "baseline_kl"])["rows"]) == 2
