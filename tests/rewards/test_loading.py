"""Loading a reward function by dotted path or file, with errors that say what to fix."""

from __future__ import annotations

import pytest

from rewards.causal_loop import compute_score
from rewards.loading import load_reward_fn


def test_dotted_path():
    assert load_reward_fn("rewards.causal_loop:compute_score") is compute_score


def test_file_path(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text("def score(data_source, solution_str, ground_truth, extra_info=None):\n"
                    "    return float(solution_str == ground_truth)\n")
    fn = load_reward_fn(f"{path}:score")
    assert fn("x", "42", "42") == 1.0


@pytest.mark.parametrize("spec, message", [
    ("rewards.causal_loop", "write it as 'package.module:function'"),
    ("rewards.nope:compute_score", "cannot import module 'rewards.nope'"),
    ("rewards.causal_loop:compute", "has no function 'compute'; it has"),
    ("missing_file.py:score", "no file missing_file.py"),
    ("rewards.causal_loop:parse_assignments", "must take"),
])
def test_errors_name_the_problem(spec, message):
    with pytest.raises(ValueError, match=message):
        load_reward_fn(spec)
