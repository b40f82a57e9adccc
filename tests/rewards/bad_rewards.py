"""Reward functions with one bug each, for tests/rewards/test_check.py: the checker must flag each one.

Loaded by file path (``tests/rewards/bad_rewards.py:slow``), as verl loads reward files.
"""

import random
import time

from rewards.causal_loop import compute_score


def raises_on_none(data_source, solution_str, ground_truth, extra_info=None):
    """Strips the response first: fine on every string, AttributeError on None (an empty rollout)."""
    return compute_score(data_source, solution_str.strip(), ground_truth, extra_info)


def pays_for_echoes(data_source, solution_str, ground_truth, extra_info=None):
    """Drops the initial state from the ground truth, so partial credit counts the variables the rules never
    change: echoing the question earns them for free."""
    answer = ground_truth.get("answer") if isinstance(ground_truth, dict) else ground_truth
    return compute_score(data_source, solution_str, answer, extra_info)


def noisy(data_source, solution_str, ground_truth, extra_info=None):
    """Breaks ties between wrong answers with random noise: the same response scores differently each call."""
    result = compute_score(data_source, solution_str, ground_truth, extra_info)
    if result["score"] < 1.0:
        result["score"] -= random.random() * 1e-3
    return result


def slow(data_source, solution_str, ground_truth, extra_info=None):
    """Right scores, 10 ms a call (say, a model or a subprocess per response)."""
    time.sleep(0.01)
    return compute_score(data_source, solution_str, ground_truth, extra_info)


def zero_point_two_format(data_source, solution_str, ground_truth, extra_info=None):
    """A different scheme, not a bug: format score 0.2 (correct 1.0 > 0.2 + 0.5). --compare must see it."""
    return compute_score(data_source, solution_str, ground_truth, extra_info, format_score=0.2)
