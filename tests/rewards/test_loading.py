"""Loading a reward function by dotted path, verl's pkg:// form or a file, with errors that say what to fix;
and the project's reward file loading exactly the way verl loads ``reward.custom_reward_function.path``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

import rewards
from rewards.causal_loop import compute_score
from rewards.loading import load_reward_fn

REWARD_FILE = Path(rewards.__file__).parent / "causal_loop.py"
TRUTH = {"answer": "A=5, B=3, C=8", "initial": "A=1, B=3, C=2"}
RESPONSES = ["<think>s</think><answer>A=5, B=3, C=8</answer>", "<think>s</think><answer>A=5, B=3, C=0</answer>",
             "<think>s</think><answer>A=1, B=3, C=2</answer>", "A=5, B=3, C=8", None, "<answer>" * 1000]


def verl_load(path: Path, name: str):
    """What verl 0.9 does with a reward file: spec_from_file_location + module_from_spec + exec_module under
    a made-up module name, and nothing put in sys.modules."""
    module_name = f"custom_module_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module_name not in sys.modules
    return getattr(module, name)


def test_reward_file_loads_the_way_verl_loads_files():
    fn = verl_load(REWARD_FILE, "compute_score")
    assert fn is not compute_score  # a second, independent copy of the module
    for response in RESPONSES:
        assert fn("causal_loop", response, TRUTH) == compute_score("causal_loop", response, TRUTH)
    # reward_kwargs build a RewardConfig, the file's own dataclass: 0.0 * format + 0.5 * 1/2 changed right
    assert fn("causal_loop", RESPONSES[1], TRUTH, None, format_score=0.0)["score"] == 0.25


def test_batch_function_loads_the_way_verl_loads_files():
    batch = verl_load(REWARD_FILE, "compute_score_batch")
    assert batch(None, RESPONSES, [TRUTH] * len(RESPONSES)) == [compute_score(None, r, TRUTH) for r in RESPONSES]


def test_dotted_path():
    assert load_reward_fn("rewards.causal_loop:compute_score") is compute_score


@pytest.mark.parametrize("spec", ["pkg://rewards.causal_loop:compute_score", "pkg://rewards/causal_loop:compute_score"])
def test_verl_package_form(spec):
    assert load_reward_fn(spec) is compute_score


@pytest.mark.parametrize("prefix", ["", "file://"])
def test_file_form_loads_outside_sys_modules(prefix):
    before = set(sys.modules)
    fn = load_reward_fn(f"{prefix}{REWARD_FILE}:compute_score")
    assert fn is not compute_score and fn.__module__ not in sys.modules
    assert set(sys.modules) == before
    assert [fn("c", r, TRUTH) for r in RESPONSES] == [compute_score("c", r, TRUTH) for r in RESPONSES]


def test_file_path(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text("def score(data_source, solution_str, ground_truth, extra_info=None):\n"
                    "    return float(solution_str == ground_truth)\n")
    fn = load_reward_fn(f"{path}:score")
    assert fn("x", "42", "42") == 1.0


def test_file_that_fails_under_verl_fails_here_too_with_the_fix(tmp_path):
    # The bug this module once had: a dataclass with string annotations looks itself up in sys.modules.
    path = tmp_path / "dataclass_reward.py"
    path.write_text("from __future__ import annotations\nfrom dataclasses import dataclass\n\n"
                    "@dataclass\nclass Weights:\n    correct: float = 1.0\n\n"
                    "def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n    return 0.0\n")
    with pytest.raises(AttributeError):
        verl_load(path, "compute_score")
    with pytest.raises(ValueError, match="raised AttributeError.*drop the __future__ import"):
        load_reward_fn(f"{path}:compute_score")


@pytest.mark.parametrize("spec, message", [
    ("rewards.causal_loop", "write it as 'package.module:function'"),
    ("pkg://rewards.causal_loop", "write it as 'package.module:function'"),
    ("rewards.nope:compute_score", "cannot import module 'rewards.nope'"),
    ("pkg://rewards/nope:compute_score", "cannot import module 'rewards.nope'"),
    ("rewards.causal_loop:compute", "has no function 'compute'; it has"),
    ("missing_file.py:score", "no file missing_file.py"),
    ("file://missing_file.py:score", "no file missing_file.py"),
    ("rewards.causal_loop:parse_assignments", "must take"),
])
def test_errors_name_the_problem(spec, message):
    with pytest.raises(ValueError, match=message):
        load_reward_fn(spec)
