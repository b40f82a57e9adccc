"""rl.compare: paired tests on the same problems, worked out by hand."""

from __future__ import annotations

import json

import pytest

from rl.compare import compare, main, mcnemar_p, wilson


def write_run(path, before: list[int], after: list[int], index=None):
    (path / "evals").mkdir(parents=True)
    index = index or list(range(len(before)))
    for step, acc in ((0, before), (10, after)):
        record = {"acc": acc, "acc_sampled": acc, "index": index}
        (path / "evals" / f"step_{step:06d}.json").write_text(json.dumps({"test": record}))
    (path / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward/mean": 0.5, "time/step": 2.0}) + "\n")


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
    write_run(tmp_path / "other", [0] * 10, [0] * 10, index=list(range(100, 110)))
    with pytest.raises(ValueError, match="different 'test' problems"):
        compare([tmp_path / "baseline", tmp_path / "other"])
    with pytest.raises(SystemExit):
        main([str(tmp_path / "cmp"), "--out", str(tmp_path / "x")])  # no evals: a clear usage error
    assert "no evals/step_" in capsys.readouterr().err
