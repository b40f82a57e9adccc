"""The checker's sanity table for one problem with worked-out ceilings, the project's reward against it,
and the doctests of the rewards package."""

from __future__ import annotations

import doctest

import pytest

import rewards.causal_loop
import rewards.check
from rewards.cases import Weights, hostile_inputs, sanity_cases
from rewards.causal_loop import compute_score

# A = 1 -> 5 and C = 2 -> 8 change; B = 3 does not.
ROW = {"data_source": "causal_loop", "prompt": [{"role": "user", "content": "Variables: A=1, B=3, C=2 ..."}],
       "reward_model": {"ground_truth": {"answer": "A=5, B=3, C=8", "initial": "A=1, B=3, C=2"}},
       "extra_info": {"solution": "<think>\nstep 1: A=5, B=3, C=8\n</think>\n<answer>A=5, B=3, C=8</answer>"}}
W = Weights(correct=1.0, format=0.1, partial=0.5)

TABLE = {
    # kind: (ceiling, what rewards.causal_loop scores)
    "worked solution": (1.0, 1.0),
    "reasoning only, no answer block": (0.1, 0.0),
    "empty response": (0.1, 0.0),
    "the prompt echoed": (0.1, 0.0),
    "answer outside the tags": (0.1, 0.0),
    "two answer blocks, wrong then right": (0.1, 0.0),
    "two answer blocks, right then wrong": (0.1, 0.0),
    "nested answer tags": (0.1, 0.0),
    "unclosed answer tag": (0.1, 0.0),
    "answer-tag flood before the answer": (0.1, 0.0),
    "a variable named twice (hedged values)": (0.1, 0.0),
    "fullwidth digits": (0.1, 0.0),
    "zero-width spaces in the answer": (0.1, 0.0),
    "extra variable": (0.6, 0.1),           # not exactly right: below full marks; the scheme pays the format
    "Cyrillic look-alike names": (0.1, 0.0),
    "missing variable": (0.6, 0.1),
    # A wrong (A + 10**24, congruent mod 100), C right: worth 0.1 + 0.5 * 1/2; 25 digits are malformed here
    "huge number congruent to the answer": (0.35, 0.0),
    "one changed variable wrong": (0.35, 0.35),  # A=6: 0.1 + 0.5 * 1/2
    "echo of the initial state": (0.1, 0.1),
    "echo of the initial state, no reasoning": (0.1, 0.0),
}


def test_sanity_table_for_one_problem():
    table = {case.kind: case for case in sanity_cases(ROW, W)}
    assert list(table) == list(TABLE)
    for kind, (ceiling, score) in TABLE.items():
        case = table[kind]
        assert case.ceiling == pytest.approx(ceiling), kind
        assert compute_score("causal_loop", case.response, ROW["reward_model"]["ground_truth"])["score"] == \
            pytest.approx(score), kind
    assert table["worked solution"].exact and not table["echo of the initial state"].exact


def test_trivial_problem_has_no_echo_rows():
    # Nothing changes: the echo is the right answer, so it is not a trick.
    row = {**ROW, "reward_model": {"ground_truth": {"answer": "A=1, B=3", "initial": "A=1, B=3"}}}
    kinds = {case.kind for case in sanity_cases(row, W)}
    assert "echo of the initial state" not in kinds and "one changed variable wrong" not in kinds


def test_other_tasks_get_only_the_answerless_rows():
    row = {"data_source": "gsm8k", "prompt": "2+2?", "reward_model": {"ground_truth": "4"}, "extra_info": {}}
    assert [c.kind for c in sanity_cases(row, W)] == ["reasoning only, no answer block", "empty response",
                                                      "the prompt echoed"]


def test_hostile_inputs_on_the_project_reward():
    # Four put text before an intact right answer block, which is then still right; all others are malformed.
    intact = {"a megabyte of filler, then the answer", "byte-order mark", "right-to-left override", "lone surrogate"}
    for name, response in hostile_inputs("A=5, B=3, C=8"):
        result = compute_score("causal_loop", response, ROW["reward_model"]["ground_truth"])
        assert result["score"] == (1.0 if name in intact else 0.0), name


@pytest.mark.parametrize("module", [rewards.causal_loop, rewards.check])
def test_doctests(module):
    assert doctest.testmod(module).failed == 0
