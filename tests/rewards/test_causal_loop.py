"""The causal-loop reward: the scheme with exact values, a table of attacks, properties over random
strings, the batch function equal to the single one, bounded time on hostile input."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rewards.causal_loop import RewardConfig, compute_score, compute_score_batch, parse_assignments

# A = 1 -> 5 and C = 2 -> 8 change; B = 3 does not.
TRUTH = {"answer": "A=5, B=3, C=8", "initial": "A=1, B=3, C=2"}
THINK = "<think>\nstep 1: A=3, B=3, C=5\nstep 2: A=5, B=3, C=8\n</think>\n"


def score(response, truth=TRUTH, **kw):
    return compute_score("causal_loop", response, truth, **kw)


def answer(content: str, think: str = THINK) -> str:
    return f"{think}<answer>{content}</answer>"


ATTACKS = [
    # (what, response, expected score)
    ("right, with reasoning", answer("A=5, B=3, C=8"), 1.0),
    ("right, no think block", answer("A=5, B=3, C=8", think=""), 1.0),
    ("right, other order and spacing", answer(" C = 8 ,A=5,B=3 "), 1.0),
    ("right, leading zeros", answer("A=05, B=3, C=8"), 1.0),
    ("echo of the initial state", answer("A=1, B=3, C=2"), 0.1),
    ("echo, no think block", answer("A=1, B=3, C=2", think=""), 0.0),
    ("all wrong, well formed", answer("A=0, B=0, C=0"), 0.1),
    ("one of two changed variables right: 0.1 + 0.5 * 1/2", answer("A=5, B=3, C=0"), 0.35),
    ("unchanged variable right earns nothing", answer("A=0, B=3, C=0"), 0.1),
    ("two answer blocks, wrong then right", answer("A=1, B=3, C=2") + "<answer>A=5, B=3, C=8</answer>", 0.0),
    ("two identical right blocks", answer("A=5, B=3, C=8") + "<answer>A=5, B=3, C=8</answer>", 0.0),
    ("several values for one variable", answer("A=1, A=5, B=3, C=8"), 0.0),
    ("extra variable", answer("A=5, B=3, C=8, D=0"), 0.1),
    ("missing variable", answer("A=5, C=8"), 0.1),
    ("lower-case names are other variables", answer("a=5, b=3, c=8"), 0.1),
    ("answer outside the tags", THINK + "A=5, B=3, C=8", 0.0),
    ("unclosed tag", THINK + "<answer>A=5, B=3, C=8", 0.0),
    ("closing tag first", THINK + "</answer>A=5, B=3, C=8<answer>", 0.0),
    ("upper-case tags", THINK + "<ANSWER>A=5, B=3, C=8</ANSWER>", 0.0),
    ("huge number (21 digits)", answer("A=" + "9" * 21 + ", B=3, C=8"), 0.0),
    ("big but valid number, C right: 0.1 + 0.5 * 1/2", answer("A=" + "9" * 20 + ", B=3, C=8"), 0.35),
    ("negative number", answer("A=-95, B=3, C=8"), 0.35),
    ("cyrillic A look-alike", answer("\u0410=5, B=3, C=8"), 0.0),
    ("fullwidth digits", answer("A=\uff15, B=3, C=8"), 0.0),
    ("arabic-indic digits", answer("A=\u0665, B=3, C=8"), 0.0),
    ("trailing comma", answer("A=5, B=3, C=8,"), 0.0),
    ("words instead of numbers", answer("A=five, B=3, C=8"), 0.0),
    ("empty answer", answer(""), 0.0),
    ("empty string", "", 0.0),
    ("None", None, 0.0),
    ("bytes", b"<answer>A=5, B=3, C=8</answer>", 0.0),
    ("an int", 12345, 0.0),
    ("megabyte of filler, then the right answer", "x" * 1_000_000 + answer("A=5, B=3, C=8"), 1.0),
    ("megabyte-long answer block", answer("A=5, " * 200_000 + "B=3, C=8"), 0.0),
    ("a hundred thousand think tags", "<think>" * 100_000, 0.0),
]


@pytest.mark.parametrize("what, response, expected", ATTACKS, ids=[a[0] for a in ATTACKS])
def test_attack_table(what, response, expected):
    result = score(response)
    assert result["score"] == pytest.approx(expected)
    assert result["acc"] == (1.0 if expected == 1.0 else 0.0)


def test_parts_of_a_partial_answer():
    assert score(answer("A=5, B=3, C=0")) == pytest.approx({"score": 0.35, "acc": 0.0, "format": 1.0, "partial": 0.5})


def test_answer_string_ground_truth_counts_every_variable():
    # Without the initial state every variable counts: the echo gets B right, 0.1 + 0.5 * 1/3.
    assert score(answer("A=1, B=3, C=2"), truth="A=5, B=3, C=8")["score"] == pytest.approx(0.1 + 0.5 / 3)


@pytest.mark.parametrize("truth", [None, {}, {"answer": 5}, {"answer": "garbage"}, 3.5, ["A=5"]])
def test_bad_ground_truth_scores_zero(truth):
    assert score(answer("A=5, B=3, C=8"), truth=truth)["score"] == 0.0


def test_weights_are_configurable_like_verl_reward_kwargs():
    wrong = answer("A=5, B=3, C=0")
    assert score(wrong, format_score=0.0, partial_credit=0.0)["score"] == 0.0
    assert score(wrong, config=RewardConfig(correct_score=2.0, format_score=0.2, partial_credit=1.0))["score"] == 0.7
    with pytest.raises(ValueError, match="must exceed format_score"):
        RewardConfig(correct_score=0.5)


def test_parse_assignments():
    assert parse_assignments("A=1, B = -2 ,C=3") == {"A": 1, "B": -2, "C": 3}
    for bad in ("", "A=1,", "A=1 B=2", "A==1", "A=1.5", "1=A", "A=1, A=1", "A=" + "1" * 21):
        assert parse_assignments(bad) is None, bad


# ---- properties ------------------------------------------------------------------------------------------

FRAGMENTS = ["<answer>", "</answer>", "<think>", "</think>", "A=5", "A=1", "B=3", "C=8", "C=2", "D=4", ", ", ",",
             "=", " ", "\n", "\u0410", "\uff15", "A", "5", "-", "9" * 25]
hostile = st.one_of(st.text(max_size=300), st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join))


@settings(max_examples=600, deadline=None)
@given(hostile)
def test_any_string_gets_a_bounded_score_and_only_right_answers_beat_the_format_score(text):
    result = score(text)
    assert set(result) == {"score", "acc", "format", "partial"}
    assert 0.0 <= result["score"] <= 1.0
    right = "<answer>" in text and parse_assignments(
        text.partition("<answer>")[2].partition("</answer>")[0]) == {"A": 5, "B": 3, "C": 8}
    if result["acc"] == 1.0:
        assert right and result["score"] == 1.0
    else:
        assert result["score"] <= 0.1 + 0.5 * result["partial"] + 1e-12
        if result["partial"] == 0.0:
            assert result["score"] <= 0.1


@settings(max_examples=300, deadline=None)
@given(hostile)
def test_echoing_the_initial_state_never_beats_the_format_score(prefix):
    assert score(prefix + answer("A=1, B=3, C=2"))["score"] <= 0.1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(hostile, st.sampled_from([TRUTH, "A=5, B=3, C=8", None, {"answer": "A=1"}])), max_size=30))
def test_batch_equals_single(pairs):
    responses = [r for r, _ in pairs]
    truths = [t for _, t in pairs]
    assert compute_score_batch(None, responses, truths) == [score(r, t) for r, t in pairs]


def test_batch_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="one ground truth per response"):
        compute_score_batch(None, ["a", "b"], [TRUTH])


@pytest.mark.timeout(20)
def test_hostile_megabyte_inputs_finish():
    # Would take minutes with a backtracking blow-up; each is linear here. A guard, not a speed claim.
    for text in ("<answer>" + "A=1" * 300_000 + "</answer>", "<answer>" + " " * 1_000_000 + "</answer>",
                 "<answer>" + "A" * 2000 + "</answer>", "<answer>" + ("A=1, " * 400)[:-2] + "=" * 10 + "</answer>"):
        assert score(text)["score"] == 0.0
