"""The reward checker: each bad reward in bad_rewards.py is flagged by the check aimed at it (and only by
it), the project's reward passes everything, and --explain, --compare, --responses and --data work on
real inputs. Small budgets (--num, --fuzz-examples) keep each run well under a few seconds."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data.causal_loop import TaskConfig, generate_unique, to_table, write_parquet
from rewards import check
from rewards.causal_loop import compute_score
from rewards.loading import load_reward_fn

ROOT = Path(__file__).resolve().parents[2]
BAD = f"{Path(__file__).parent / 'bad_rewards.py'}"
GOOD = "rewards.causal_loop:compute_score"
TRUTH = {"answer": "A=5, B=3, C=8", "initial": "A=1, B=3, C=2"}
SMALL = ["--num", "12", "--fuzz-examples", "30"]


def run(capsys, *argv: str) -> tuple[int, str]:
    code = check.main(list(argv))
    out, err = capsys.readouterr()
    return code, out + err


def failed_checks(output: str) -> set[str]:
    return {line.split()[1] for line in output.splitlines() if line.startswith("FAIL")}


def test_project_reward_passes_every_check(capsys):
    code, out = run(capsys, GOOD, *SMALL)
    assert code == 0, out
    assert failed_checks(out) == set() and "0 failed" in out
    for check_name in check.CHECKS:
        assert f"PASS  {check_name}" in out


def test_project_reward_file_passes_with_defaults_from_the_command_line():
    # The real entry point, default budget, the file form verl uses: exit 0.
    proc = subprocess.run([sys.executable, "-m", "rewards.check", "rewards/causal_loop.py:compute_score"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "on 50 problems" in proc.stdout and "400 hypothesis examples" in proc.stdout


def test_raising_on_none_is_flagged(capsys):
    code, out = run(capsys, f"{BAD}:raises_on_none", *SMALL)
    assert code == 1
    assert failed_checks(out) == {"robust"}
    assert "hostile inputs fail; first: None None: raised AttributeError: \"'NoneType' object has no attribute " \
           "'strip'\"" in out
    assert "fuzzing found None: raised AttributeError" in out  # hypothesis shrinks to the smallest input


def test_paying_for_echoes_is_flagged(capsys):
    code, out = run(capsys, f"{BAD}:pays_for_echoes", *SMALL)
    assert code == 1
    assert failed_checks(out) == {"sanity"}
    echo = next(line for line in out.splitlines() if line.startswith("FAIL  sanity       echo of the initial state:"))
    assert "(ceiling 0.1), e.g. '<think>" in echo and "</answer>'" in echo


def test_non_determinism_is_flagged(capsys):
    code, out = run(capsys, f"{BAD}:noisy", *SMALL)
    assert code == 1
    assert failed_checks(out) == {"determinism"}
    assert "responses scored differently on a second call" in out


def test_slow_reward_is_flagged(capsys):
    code, out = run(capsys, f"{BAD}:slow", "--num", "2", "--fuzz-examples", "5")
    assert code == 1
    assert failed_checks(out) == {"timing"}
    line = next(line for line in out.splitlines() if line.startswith("FAIL  timing"))
    assert "too slow: median 1" in line and "limit 5 ms median" in line  # 10 ms sleep, plus the call


def test_max_ms_sets_the_timing_limit(capsys):
    code, out = run(capsys, f"{BAD}:slow", "--num", "2", "--checks", "timing", "--max-ms", "100")
    assert code == 0 and "PASS  timing" in out and "limit 100 ms median" in out


def test_weights_state_the_scheme_under_test(capsys):
    # A format score of 0.2 breaks the default ceilings, and passes once the checker is told the scheme.
    code, out = run(capsys, f"{BAD}:zero_point_two_format", *SMALL, "--checks", "sanity")
    assert code == 1 and "echo of the initial state: " in out
    code, out = run(capsys, f"{BAD}:zero_point_two_format", *SMALL, "--checks", "sanity", "--format-score", "0.2")
    assert code == 0, out


def test_reward_kwargs_reach_the_function(capsys):
    code, out = run(capsys, GOOD, "--reward-kwargs", '{"format_score": 0.2}', "--explain", "<think>s</think>x",
                    "--ground-truth", "A=1")
    assert code == 0 and "score         0\n" in out  # no answer block: still 0
    code, out = run(capsys, GOOD, *SMALL, "--checks", "sanity", "--reward-kwargs", '{"format_score": 0.2}',
                    "--format-score", "0.2")
    assert code == 0 and "echo of the initial state: 0.2 on all 12 problems (ceiling 0.2)" in out


def test_a_hang_is_reported_not_waited_for(monkeypatch):
    monkeypatch.setattr(check, "CALL_TIMEOUT_S", 0.2)

    def hangs_on_tag_floods(data_source, solution_str, ground_truth, extra_info=None):
        try:
            while isinstance(solution_str, str) and solution_str.count("<answer>") > 100:
                pass
        except Exception:  # a catch-all in the reward must not swallow the checker's interrupt
            return 1.0
        return 0.0

    row = check.load_problems(None, 1, 0)[0][0]
    verdict = check.check_hostile(hangs_on_tag_floods, row)
    assert not verdict.ok
    assert "answer-tag flood" in verdict.reason and "hung for more than 0.2 s" in verdict.reason


def test_fuzzing_finds_and_shrinks_a_failure():
    def fails_on_long_digit_runs(data_source, solution_str, ground_truth, extra_info=None):
        if isinstance(solution_str, str) and "9" * 25 in solution_str and "=" in solution_str:
            raise ZeroDivisionError("digits")
        return 0.0

    rows = check.load_problems(None, 4, 0)[0]
    verdict = check.check_fuzz(fails_on_long_digit_runs, rows, examples=300, seed=0)
    assert not verdict.ok and verdict.reason.endswith(": raised ZeroDivisionError: 'digits'")
    found = verdict.reason.removeprefix("fuzzing found ").split(": raised")[0]
    assert "9" * 25 in found and len(found) < 40, found  # shrunk to little more than the two fragments


@pytest.mark.parametrize("result, score", [(0.5, 0.5), (1, 1.0), (np.float32(0.25), 0.25), ({"score": 0.1}, 0.1)])
def test_score_of_accepts_numbers_and_score_dicts(result, score):
    assert check.score_of(result) == score


@pytest.mark.parametrize("result, message", [
    (math.nan, "must be finite"), ({"score": math.inf}, "must be finite"), (None, "want a float"),
    (True, "want a float"), ("1.0", "want a float"), ({"acc": 1.0}, "want a float"), ([1.0], "want a float"),
])
def test_score_of_rejects_non_scores(result, message):
    with pytest.raises(ValueError, match=message):
        check.score_of(result)


def test_unknown_check_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        check.main([GOOD, "--checks", "robust,speed"])
    assert e.value.code == 2 and "--checks speed: unknown; valid checks are robust,determinism,timing,sanity" \
        in capsys.readouterr().err


def test_bad_reward_spec_is_an_error_not_a_traceback(capsys):
    code, out = run(capsys, "rewards.causal_loop:nope")
    assert code == 2 and "error: reward function 'rewards.causal_loop:nope'" in out


# ---- --explain -------------------------------------------------------------------------------------------

def test_explain_prints_the_parts(capsys):
    response = "<think>s</think><answer>A=5, B=3, C=0</answer>"
    code, out = run(capsys, GOOD, "--explain", response, "--ground-truth", json.dumps(TRUTH))
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"ground truth  {json.dumps(TRUTH)}"
    # one of the two changed variables (A, C) right: 0.1 + 0.5 * 1/2
    assert lines[2:6] == ["score         0.35", "acc           0", "format        1", "partial       0.5"]
    assert lines[6].startswith("time ")


def test_explain_against_the_first_problem_and_from_stdin(capsys, monkeypatch):
    row = check.load_problems(None, 1, 0)[0][0]
    monkeypatch.setattr(sys, "stdin", type("In", (), {"read": lambda self: row["extra_info"]["solution"]})())
    code, out = run(capsys, GOOD, "--explain", "-")
    assert code == 0
    assert json.dumps(row["reward_model"]["ground_truth"]) in out and "score         1\n" in out


def test_explain_reports_a_failure_and_takes_an_answer_string_as_ground_truth(capsys):
    row = {"data_source": "causal_loop", "reward_model": {"ground_truth": TRUTH}, "extra_info": None}
    assert check.explain(load_reward_fn(f"{BAD}:raises_on_none"), row, None) == 1
    out = capsys.readouterr().out
    assert "error         raised AttributeError: \"'NoneType' object has no attribute 'strip'\"" in out
    code, out = run(capsys, GOOD, "--explain", "<answer>A=5</answer>", "--ground-truth", "A=5")
    assert code == 0 and 'ground truth  "A=5"' in out and "score         1\n" in out


# ---- --compare -------------------------------------------------------------------------------------------

def test_compare_lists_where_two_functions_disagree(capsys):
    code, out = run(capsys, GOOD, "--compare", f"{BAD}:pays_for_echoes", "--num", "12")
    assert code == 1
    assert f"{GOOD} vs {BAD}:pays_for_echoes" in out
    header = out.splitlines()[1]
    total, differ = int(header.split()[0]), int(header.split(", ")[1].split()[0])
    assert 0 < differ < total and header.endswith("scored differently")
    # the echo is where they part: 0.1 for the project's reward, more for the one that pays for echoes
    assert any(line.startswith("  echo of the initial state: 0.1 vs 0.") for line in out.splitlines())
    lines = out.splitlines()
    assert lines[2].split() == ["kind", "n", "differ"]
    table = {line[:42].strip(): line.split()[-2:] for line in lines[3:] if line[:1] not in " 0123456789"}
    assert set(table) == {"one changed variable wrong", "echo of the initial state",
                          "echo of the initial state, no reasoning"}  # worked solutions, hostile inputs agree
    assert all(n == "12" and 0 < int(d) <= 12 for n, d in table.values())
    assert "18 other kinds (" in out and ") score the same" in out


def test_compare_a_function_with_its_file_form_agrees(capsys):
    code, out = run(capsys, GOOD, "--compare", "rewards/causal_loop.py:compute_score", "--num", "5")
    assert code == 0 and ", 0 scored differently" in out


# ---- --responses -----------------------------------------------------------------------------------------

def write_run(run_dir: Path) -> None:
    """A run directory as rl/driver.py leaves it (evals/step_N.json) plus the samples.jsonl of recorded
    responses: two at level 1 recorded right, one at level 2 recorded with a score the reward does not give."""
    (run_dir / "evals").mkdir(parents=True)
    evals = {"test": {"acc": [1.0, 0.0, 1.0, 0.0], "acc_sampled": [1.0, 1.0, 0.0, 0.0], "index": [0, 1, 2, 3],
                      "level": [1, 1, 2, 2], "num_vars": [3, 3, 3, 3], "num_steps": [2, 2, 2, 2]}}
    (run_dir / "evals" / "step_000000.json").write_text(json.dumps({"test": {**evals["test"], "acc": [0.0] * 4}}))
    (run_dir / "evals" / "step_000010.json").write_text(json.dumps(evals))
    right = "<think>s</think><answer>A=5, B=3, C=8</answer>"
    echo = "<think>s</think><answer>A=1, B=3, C=2</answer>"
    samples = [(0, right, 1, 1.0), (10, echo, 1, 0.1), (10, echo, 2, 0.5)]
    lines = [json.dumps({"step": step, "data_source": "causal_loop", "prompt": "p", "response": response,
                         "ground_truth": TRUTH, "extra_info": {"level": level}, "score": score,
                         "parts": {"acc": float(score == 1.0)}}) for step, response, level, score in samples]
    (run_dir / "samples.jsonl").write_text("\n".join(lines) + "\n")


def test_responses_rescores_a_run_by_level(capsys, tmp_path):
    write_run(tmp_path / "run")
    code, out = run(capsys, GOOD, "--responses", str(tmp_path / "run"))
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0] == f"re-scored 3 responses from {tmp_path / 'run' / 'samples.jsonl'}, steps 0-10 with {GOOD}"
    assert lines[1].split() == ["level", "n", "recorded", "new", "agree"]
    # level 1: recorded 1.0 and 0.1, re-scored the same; level 2: recorded 0.5 for an echo worth 0.1
    assert lines[2].split() == ["1", "2", "0.550", "0.550", "1.000"]
    assert lines[3].split() == ["2", "1", "0.500", "0.100", "0.000"]
    assert lines[4].split() == ["all", "3", "0.533", "0.400", "0.667"]
    # the evals file: the latest step's recorded accuracy, said to be not re-scorable
    assert "step_000010.json: recorded accuracy by level (evals files hold no responses" in lines[5]
    assert lines[7].split() == ["test", "1", "2", "0.500", "1.000"]
    assert lines[8].split() == ["test", "2", "2", "0.500", "0.000"]


def test_responses_rescores_the_greedy_answers_an_evals_file_recorded(capsys, tmp_path):
    (tmp_path / "run" / "evals").mkdir(parents=True)
    right, echo = "<think>s</think><answer>A=5, B=3, C=8</answer>", "<think>s</think><answer>A=1, B=3, C=2</answer>"
    record = {"acc": [1.0, 0.0], "acc_sampled": [1.0, 0.0], "score": [1.0, 0.5], "response": [right, echo],
              "response_sampled": [right, echo], "ground_truth": [TRUTH, TRUTH], "data_source": ["causal_loop"] * 2,
              "index": [0, 1], "key": [11, 12], "level": [1, 2], "num_vars": [3, 3], "num_steps": [2, 2]}
    (tmp_path / "run" / "evals" / "step_000004.json").write_text(json.dumps({"test": record}))  # as rl.heldout writes
    code, out = run(capsys, GOOD, "--responses", str(tmp_path / "run"))
    lines = out.splitlines()
    assert code == 0 and "re-scored the 2 greedy held-out responses" in lines[0]
    assert lines[2].split() == ["1", "1", "1.000", "1.000", "1.000"]
    assert lines[3].split() == ["2", "1", "0.500", "0.100", "0.000"]  # recorded 0.5 for an echo worth 0.1


def test_responses_with_another_function_and_compare(capsys, tmp_path):
    write_run(tmp_path / "run")
    code, out = run(capsys, f"{BAD}:pays_for_echoes", "--responses", str(tmp_path / "run"))
    assert code == 0 and out.splitlines()[2].split()[:2] == ["1", "2"]
    code, out = run(capsys, GOOD, "--compare", f"{BAD}:pays_for_echoes", "--responses", str(tmp_path / "run"))
    assert code == 1 and "3 responses, 2 scored differently" in out  # the two echoes


def test_responses_errors_name_the_file_and_line(capsys, tmp_path):
    code, out = run(capsys, GOOD, "--responses", str(tmp_path))
    assert code == 2 and "no samples.jsonl or evals/step_*.json there" in out
    (tmp_path / "samples.jsonl").write_text('{"data_source": "c", "response": "x", "ground_truth": "A=1"}\nnot json\n')
    code, out = run(capsys, GOOD, "--responses", str(tmp_path))
    assert code == 2 and f"{tmp_path / 'samples.jsonl'}:2: not JSON" in out


# ---- --data ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Path:
    """A real test split, written by the project's data code."""
    batch, keys = generate_unique(TaskConfig(levels=(1, 2, 3, 4)), 16, np.random.default_rng(7), np.zeros(0, np.uint64))
    path = tmp_path_factory.mktemp("data") / "test.parquet"
    write_parquet(to_table(batch, "test", keys), path)
    return path


def test_data_from_a_parquet_split(capsys, split):
    code, out = run(capsys, GOOD, "--data", str(split), "--num", "10", "--fuzz-examples", "30")
    assert code == 0, out
    assert out.splitlines()[0] == f"checking {GOOD} on 10 problems ({split})"
    assert "worked solution: 1 on all 10 problems (want exactly 1)" in out


def test_data_errors(capsys, tmp_path, split):
    code, out = run(capsys, GOOD, "--data", str(tmp_path / "nope.parquet"))
    assert code == 2 and "no such file; write one with python -m data.causal_loop" in out
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["x"]}), tmp_path / "bad.parquet")
    code, out = run(capsys, GOOD, "--data", str(tmp_path / "bad.parquet"))
    assert code == 2 and "missing verl columns ['data_source', 'extra_info', 'reward_model']" in out


def test_score_sample_script_is_the_checker_on_a_split(capsys, split):
    spec = importlib.util.spec_from_file_location("score_sample", ROOT / "scripts" / "score_sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main([str(split), "--num", "8"]) == 0
    assert f"checking {GOOD} on 8 problems ({split})" in capsys.readouterr().out
    assert module.main([str(split), "--num", "8", "--reward", f"{BAD}:raises_on_none"]) == 1


def test_checker_and_cases_import_neither_torch_nor_ray():
    code = "import sys, rewards.check, rewards.cases; print(sorted({'torch', 'ray'} & set(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "[]", proc.stderr


def test_file_form_reward_equals_the_package_one_on_the_sanity_table():
    fn = load_reward_fn("rewards/causal_loop.py:compute_score")
    rows = check.load_problems(None, 3, 1)[0]
    for response in check.sample_responses(rows, check.cases.Weights(1.0, 0.1, 0.5)):
        row, _, text = response
        truth = row["reward_model"]["ground_truth"]
        assert fn("causal_loop", text, truth) == compute_score("causal_loop", text, truth)
