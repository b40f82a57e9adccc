"""Live monitoring and a protected warm start: TensorBoard event files hold every JSONL metric (the warm
start's curve included), samples.jsonl holds responses with their rewards, and a run killed with SIGKILL
inside the warm start, or in PPO before its first save, resumes without redoing finished work and ends
with the metrics of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rl.tracking import WARM_START_FILE, read_metrics

pytestmark = pytest.mark.slow  # five short runs of the driver, each starting Ray

BUDGET = ["trainer.sft_steps=40", "trainer.sft_batch_size=2", "trainer.sft_save_every=5", "trainer.sft_eval_every=20",
          "trainer.prompts_per_step=2", "rollout.n=2", "rollout.max_new_tokens=8", "data.eval_size=2",
          "trainer.minibatch_size=4", "trainer.micro_batch_size=4", "trainer.eval_every=2", "trainer.save_every=100",
          "trainer.steps=4", "logging.wandb_mode=disabled", "logging.progress=false", "logging.sample_every=2",
          "logging.num_samples=2"]
UNSTABLE = ("time/", "throughput/")  # wall-clock metrics differ between any two runs


def driver(run_dir, *extra) -> subprocess.Popen:
    args = [sys.executable, "-m", "rl.driver", *BUDGET, f"logging.run_dir={run_dir}", *extra]
    # Its own session, so a SIGKILL to the group takes the local Ray cluster down with the driver.
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return out


def kill_when(proc: subprocess.Popen, ready, timeout_s: float = 300) -> None:
    deadline = time.time() + timeout_s
    while not ready():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.time() < deadline, "the run never got there"
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def stable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(UNSTABLE)} for r in rows]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("monitoring") / "full"
    finish(driver(run_dir, "logging.backends=[tensorboard, console]"))
    return run_dir


def test_tensorboard_has_every_metric_and_samples_hold_responses(uninterrupted):
    rows, warm = read_metrics(uninterrupted), read_metrics(uninterrupted, WARM_START_FILE)
    for curve, logged, step_key in (("ppo", rows, "step"), ("warm_start", warm, "sft/step")):
        events = EventAccumulator(str(uninterrupted / "tensorboard" / curve)).Reload()
        jsonl = {k for r in logged for k, v in r.items() if isinstance(v, int | float) and k != step_key}
        assert jsonl and jsonl <= set(events.Tags()["scalars"]), jsonl - set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("sft/loss")] == list(range(1, 41))  # the warm start's curve
    assert "sft/eval/test/acc" in events.Tags()["scalars"]  # held-out accuracy inside the warm start
    samples = [json.loads(line) for line in (uninterrupted / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [2, 2, 4, 4]
    assert all(isinstance(s["response"], str) and "score" in s and "acc" in s["parts"] for s in samples)
    assert all(s["ground_truth"]["answer"] and s["prompt"] for s in samples)
    ppo_events = EventAccumulator(str(uninterrupted / "tensorboard" / "ppo")).Reload()
    assert "samples/text_summary" in ppo_events.Tags()["tensors"]


def test_sigkill_inside_the_warm_start_resumes_from_its_checkpoint(uninterrupted, tmp_path):
    proc = driver(tmp_path)
    kill_when(proc, lambda: len(read_metrics(tmp_path, WARM_START_FILE)) >= 10)
    assert (tmp_path / "checkpoints" / "warm_start" / "COMPLETE").is_file() and not read_metrics(tmp_path)
    out = finish(driver(tmp_path))
    resumed_at = int(out.split("inside the warm start, from its step ")[1].split()[0])
    assert resumed_at >= 5  # finished warm-start steps are not redone
    assert stable(read_metrics(tmp_path, WARM_START_FILE)) == stable(read_metrics(uninterrupted, WARM_START_FILE))
    assert stable(read_metrics(tmp_path)) == stable(read_metrics(uninterrupted))


def test_sigkill_in_ppo_before_its_first_save_keeps_the_warm_start(uninterrupted, tmp_path):
    proc = driver(tmp_path)
    kill_when(proc, lambda: any(r["step"] == 1 for r in read_metrics(tmp_path)))
    out = finish(driver(tmp_path))
    assert "from step 0" in out and "warm start" not in out  # resumed after the warm start
    assert stable(read_metrics(tmp_path)) == stable(read_metrics(uninterrupted))
