"""A reward function that raises, hangs or returns garbage costs one response its score, never the run."""

from __future__ import annotations

import math

from rl.reward_scorer import RewardRunner, ScoredBatch

REWARD = '''
import time
def score(data_source, solution_str, ground_truth, extra_info=None):
    if solution_str == "raise":
        raise RuntimeError("bad sample")
    if solution_str == "hang":
        time.sleep(60)
    if solution_str == "nan":
        return float("nan")
    if solution_str == "text":
        return "high"
    if solution_str == "parts":
        return {"score": 0.5, "acc": 0.0, "note": "ignored"}
    return float(solution_str == ground_truth)
'''


def test_failures_score_zero_with_the_error(tmp_path):
    path = tmp_path / "reward.py"
    path.write_text(REWARD)
    runner = RewardRunner(f"{path}:score", timeout_s=0.3)
    responses = ["42", "raise", "hang", "nan", "text", "parts", "41"]
    out = runner.score(["x"] * 7, responses, ["42"] * 7)
    assert out.scores == [1.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.0]
    assert out.errors[0] is None and out.errors[5] is None and out.errors[6] is None
    assert "RuntimeError: bad sample" in out.errors[1]
    assert "timed out after 0.3 s" in out.errors[2]
    assert "need a finite number" in out.errors[3] and "need a finite number" in out.errors[4]
    assert out.parts["acc"][5] == 0.0 and math.isnan(out.parts["acc"][0])


def test_the_project_reward_through_the_runner():
    runner = RewardRunner("rewards.causal_loop:compute_score", kwargs={"format_score": 0.2})
    out = runner.score(["causal_loop"] * 2, ["<think>x</think><answer>A=1</answer>", "nothing"],
                       [{"answer": "A=2", "initial": "A=0"}] * 2)
    assert out.scores == [0.2, 0.0] and out.parts["format"] == [1.0, 0.0]


def test_extend_keeps_parts_aligned():
    a = ScoredBatch([1.0], {"acc": [1.0]}, [None])
    a.extend(ScoredBatch([0.0, 0.5], {"format": [1.0, 0.0]}, [None, "e"]))
    assert a.scores == [1.0, 0.0, 0.5] and a.errors == [None, None, "e"]
    assert a.parts["format"][1:] == [1.0, 0.0] and math.isnan(a.parts["format"][0])
    assert a.parts["acc"][0] == 1.0 and math.isnan(a.parts["acc"][2])


def test_accuracy_is_the_acc_part_else_the_score():
    mixed = ScoredBatch([1.0, 0.0], {"acc": [1.0, math.nan]}, [None, "ValueError: boom"])
    assert mixed.accuracy() == [1.0, 0.0]  # a response whose reward raised has no acc: counted wrong
    assert ScoredBatch([0.5, 1.0], {}, [None, None]).accuracy() == [0.5, 1.0]
