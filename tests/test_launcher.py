"""scripts/train_lru.sh itself, as a user runs it, with a tiny budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import models
from rl.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[1]
BUDGET = ["trainer.steps=2", "trainer.sft_steps=2", "trainer.sft_batch_size=4", "trainer.prompts_per_step=2",
          "rollout.n=2", "rollout.max_new_tokens=8", "data.eval_size=2", "trainer.minibatch_size=4",
          "trainer.micro_batch_size=4", "logging.progress=false"]


def launch(*args, **env):
    # The interpreter running the tests has the project; the launcher is told to use it.
    return subprocess.run(["bash", "scripts/train_lru.sh", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "WANDB_MODE": "disabled", "NUM_SAMPLES": "200",
                                            "PYTHON": sys.executable, **env})


@pytest.mark.slow  # resume itself is also tested in tests/rl/test_driver.py, in the default run
@pytest.mark.timeout(600)
def test_launcher_trains_a_group_and_resumes(tmp_path):
    result = launch("mla_only", *BUDGET, OUTPUT_DIR=str(tmp_path), EXPERIMENT_NAME="smoke")
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = tmp_path / "smoke"
    assert (run_dir / "checkpoints" / "step_000002" / "COMPLETE").is_file()
    assert "group: mla_only" in (run_dir / "config.yaml").read_text()
    assert [r["step"] for r in read_metrics(run_dir)] == [0, 1, 2]
    again = launch("mla_only", *BUDGET[1:], "trainer.steps=3", OUTPUT_DIR=str(tmp_path), EXPERIMENT_NAME="smoke")
    assert again.returncode == 0 and "resuming" in again.stderr
    assert [r["step"] for r in read_metrics(run_dir)] == [0, 1, 2, 3]


def test_launcher_trains_on_a_data_dir_it_generates(tmp_path):
    result = launch("mla_only", *BUDGET, OUTPUT_DIR=str(tmp_path), EXPERIMENT_NAME="files",
                    DATA_DIR=str(tmp_path / "data"))
    assert result.returncode == 0, result.stdout + result.stderr
    config = (tmp_path / "files" / "config.yaml").read_text()
    assert "source: parquet" in config and str(tmp_path / "data" / "train.parquet") in config
    assert (tmp_path / "data" / "test_more_steps.parquet").is_file()


def test_launcher_refuses_an_interpreter_without_the_project(tmp_path):
    bare_python = tmp_path / "python"  # another environment's interpreter: no site-packages, no project
    bare_python.write_text(f"#!/bin/sh\nexec {sys.executable} -I -S \"$@\"\n")
    bare_python.chmod(0o755)
    bare = launch("mla_only", PYTHON=str(bare_python), OUTPUT_DIR=str(tmp_path))
    assert bare.returncode == 2 and "cannot import the project" in bare.stderr


def test_launcher_rejects_unknown_groups_and_bad_overrides(tmp_path):
    assert launch("gpt5").returncode == 2
    bad = launch("mla_only", "trainer.lr=-1", OUTPUT_DIR=str(tmp_path))
    assert bad.returncode == 2 and "trainer.lr" in bad.stderr
    lonely = launch("mla_only", NNODES="2", OUTPUT_DIR=str(tmp_path))
    assert lonely.returncode == 2 and "RAY_ADDRESS" in lonely.stderr
    no_group = launch("trainer.lr=-1", OUTPUT_DIR=str(tmp_path))  # overrides alone: the default group
    assert no_group.returncode == 2 and "trainer.lr" in no_group.stderr and "unknown group" not in no_group.stderr


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_launcher_all_trains_every_group_and_compares_them(tmp_path):
    result = launch("all", *BUDGET[1:], "trainer.steps=1", OUTPUT_DIR=str(tmp_path), EXPERIMENT_NAME="study")
    assert result.returncode == 0, result.stdout + result.stderr
    study = tmp_path / "study"
    for group in models.GROUPS:
        info = json.loads((study / group / "run_info.json").read_text())
        assert info["group"] == group  # each group trains its own architecture
        assert info["model_type"] == {"baseline": "qwen2", "looped": "looped_mla"}.get(group, "mla_lru")
    comparison = (study / "comparison.md").read_text()
    assert all(f"| {g} | test |" in comparison for g in models.GROUPS)
    params = {g: r["parameters"] for g, r in json.loads((study / "comparison.json").read_text())["runs"].items()}
    assert params["mla_only"] < params["mla_lru_adaptive"]
