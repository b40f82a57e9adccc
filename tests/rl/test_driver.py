"""The driver end to end on a local Ray cluster: checkpoints, metrics, weights pushed to the workers,
resume giving the same curve as an uninterrupted run, Ctrl-C leaving a resumable checkpoint."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import types

import pytest
import ray
import torch

from rl.config import load_config
from rl.driver import Run
from rl.evaluate import main as evaluate_main
from rl.tracking import read_metrics

TINY = ["trainer.sft_steps=3", "trainer.sft_batch_size=4", "trainer.prompts_per_step=4", "rollout.n=2",
        "rollout.max_new_tokens=12", "data.eval_size=4", "trainer.minibatch_size=8", "trainer.micro_batch_size=4",
        "trainer.eval_every=2", "trainer.save_every=2", "logging.wandb_mode=disabled", "logging.progress=false"]


def run(tmp, *overrides):
    return Run(load_config(None, [*TINY, f"logging.run_dir={tmp}", *overrides]))


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_run_writes_checkpoints_metrics_and_syncs_weights(tmp_path):
    r = run(tmp_path, "trainer.steps=2", "algorithm.advantage=gae")
    r.train()
    assert (tmp_path / "config.yaml").is_file()
    # step 0 (after the warm start) is saved, so PPO killed before its first save does not redo the warm start
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000000", "step_000002"]
    assert (tmp_path / "checkpoints" / "step_000002" / "critic" / "value_head.safetensors").is_file()
    rows = read_metrics(tmp_path)
    assert [row["step"] for row in rows] == [0, 1, 2]
    for key in ("reward/mean", "train/pg_loss", "train/value_loss", "train/explained_variance", "train/kl_ref",
                "train/entropy", "train/clipfrac", "train/approx_kl", "train/grad_norm", "train/lru_iterations",
                "response/length_mean", "throughput/tokens_per_s", "time/rollout", "time/score", "time/train",
                "time/sync", "eval/test/acc", "eval/test/acc_sampled", "eval/test_more_vars/acc"):
        assert key in rows[2], key
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 2 and "test/acc" in summary["heldout_before_ppo"] and summary["curves"]
    assert (tmp_path / "curves" / "reward.png").read_bytes()[:4] == b"\x89PNG"
    assert "after warm start" in (tmp_path / "report.md").read_text()
    trainer_sum = ray.get(r.trainer.weights_checksum.remote())
    assert ray.get(r.workers[0].weights_checksum.remote()) == trainer_sum  # the pushed weights are the trainer's
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["model_type"] == "mla_lru" and info["parameters"] > 0 and info["packages"]["torch"] == torch.__version__
    assert info["cpu"]["capability"] == torch.backends.cpu.get_cpu_capability()  # the kernels results depend on
    evals = sorted(p.name for p in (tmp_path / "evals").iterdir())
    assert evals == ["step_000000.json", "step_000002.json"]
    final = json.loads((tmp_path / "evals" / "step_000002.json").read_text())
    assert sum(final["test"]["acc"]) / len(final["test"]["acc"]) == pytest.approx(rows[2]["eval/test/acc"])
    assert final["test"]["key"] == [row["extra_info"]["key"] for row in r.data.eval_sets["test"]]
    iterations = final["test"]["lru_iterations"]  # per greedy response token, for relating halting to difficulty
    assert len(iterations) == len(final["test"]["acc"])
    assert all(1.0 <= i <= 4 for i in iterations)  # the tiny preset's lru_max_iterations
    assert sum(iterations) / len(iterations) == pytest.approx(rows[2]["eval/test/lru_iterations"])
    # The evaluation command on the run's last checkpoint reproduces what the run logged.
    assert evaluate_main([str(tmp_path), "--samples", "0", "--out", str(tmp_path / "eval.json"),
                          "--record", str(tmp_path / "record.json")]) == 0
    assert json.loads((tmp_path / "record.json").read_text()) == final  # the record the run wrote, reproduced
    again = json.loads((tmp_path / "eval.json").read_text())["sets"]
    for split in ("test", "test_more_vars"):
        assert again[split]["greedy_acc"] == rows[2][f"eval/{split}/acc"]
        assert again[split]["sampled_acc"] == rows[2][f"eval/{split}/acc_sampled"]
        assert again[split]["greedy_responses"] == final[split]["response"]


def test_resume_continues_the_same_curve(tmp_path):
    run(tmp_path / "full", "trainer.steps=4").train()
    run(tmp_path / "split", "trainer.steps=2").train()
    run(tmp_path / "split", "trainer.steps=4").train()  # resumes from step 2
    full, split = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "split")
    assert [r["step"] for r in split] == [0, 1, 2, 3, 4]
    for a, b in zip(full, split, strict=True):
        for key in ("reward/mean", "train/pg_loss", "train/kl_ref", "response/length_mean", "eval/test/score"):
            if key in a:
                assert a[key] == pytest.approx(b[key], abs=1e-6), (a["step"], key)


def test_rerun_with_another_config_is_refused(tmp_path):
    run(tmp_path, "trainer.steps=1").train()
    with pytest.raises(ValueError, match="different config.*algorithm.kl_coef"):
        run(tmp_path, "trainer.steps=1", "algorithm.kl_coef=0.5")


def test_parquet_source(tmp_path):
    from data.causal_loop.__main__ import main as write_dataset

    write_dataset(["--local_dir", str(tmp_path / "data"), "--num_samples", "40", "--num_test", "8", "--num_heldout",
                   "4", "--levels", "1", "--num_vars", "2,2", "--quiet"])
    files = [f"data.train_files=[{tmp_path / 'data' / 'train.parquet'}]",
             f"data.eval_files=[{tmp_path / 'data' / 'test.parquet'}, {tmp_path / 'data' / 'test_more_vars.parquet'}]"]
    run(tmp_path / "run", "data.source=parquet", *files, "trainer.steps=2").train()
    rows = read_metrics(tmp_path / "run")
    assert "eval/test/acc" in rows[-1] and "eval/test_more_vars/acc" in rows[-1]


@pytest.mark.timeout(180)
def test_two_rollout_workers(tmp_path):
    r = run(tmp_path, "trainer.steps=1", "rollout.workers=2", "trainer.prompts_per_step=3")
    r.train()
    assert read_metrics(tmp_path)[-1]["step"] == 1


def test_a_plan_the_cluster_cannot_place_is_refused(tmp_path):
    with pytest.raises(ValueError, match="cannot place this run: CPU needs"):
        run(tmp_path, "trainer.steps=1", "rollout.workers=20")


def test_fewer_nodes_than_nnodes_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("NNODES", "3")
    with pytest.raises(ValueError, match="NNODES=3 but the Ray cluster has 1 live node"):
        run(tmp_path, "trainer.steps=1")


@pytest.mark.timeout(300)
def test_interrupt_saves_a_resumable_checkpoint(tmp_path):
    args = [sys.executable, "-m", "rl.driver", *TINY, "trainer.steps=200", "trainer.save_every=100",
            f"logging.run_dir={tmp_path}"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and len(read_metrics(tmp_path)) < 3:
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    last = read_metrics(tmp_path)[-1]["step"]
    assert (tmp_path / "checkpoints" / f"step_{last:06d}" / "COMPLETE").is_file()
    assert "stopping after this step" in out


def test_a_stop_arriving_while_a_step_is_logged_still_ends_on_a_saved_step(tmp_path):
    """The signal lands after the step decided it was not the last (here: while step 1 is logged): the run
    must not break there unsaved; it stops after the next step, evaluated and saved."""
    r = run(tmp_path, "trainer.steps=10", "trainer.save_every=100", "trainer.eval_every=100")
    log = r.logger.log

    def log_then_signal(step, metrics, *args, **kwargs):
        log(step, metrics, *args, **kwargs)
        if step == 1:
            r._request_stop(signal.SIGINT, None)

    r.logger.log = log_then_signal
    r.train()
    last = read_metrics(tmp_path)[-1]["step"]
    assert last == 2
    assert (tmp_path / "checkpoints" / f"step_{last:06d}" / "COMPLETE").is_file()


DIGITS_REWARD = '''
def score(data_source, solution_str, ground_truth, extra_info=None):
    """A toy task on the causal-loop prompts: the share of digits in the response."""
    return sum(c.isdigit() for c in solution_str) / max(len(solution_str), 1)
'''


@pytest.mark.timeout(300)
def test_ppo_raises_the_mean_reward_end_to_end(tmp_path):
    reward = tmp_path / "digits.py"
    reward.write_text(DIGITS_REWARD)
    r = run(tmp_path / "run", f"reward.function={reward}:score", "trainer.sft_steps=0", "trainer.steps=24",
            "trainer.lr=2e-3", "algorithm.advantage=grpo", "algorithm.kl_coef=0", "rollout.n=4",
            "trainer.prompts_per_step=4", "trainer.minibatch_size=16", "trainer.micro_batch_size=16",
            "trainer.eval_every=100", "trainer.save_every=100", "model.group=mla_lru_adaptive")
    r.train()
    rewards = [row["reward/mean"] for row in read_metrics(tmp_path / "run") if "reward/mean" in row]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.15, rewards


def test_progress_bar_shows_kl_to_the_reference_or_else_the_approximate_kl():
    with_kl = Run._headline({"reward/mean": 0.5, "reward/acc": 0.25, "train/kl_ref": 0.02, "train/approx_kl": 0.001,
                             "time/step": 2.04})
    assert with_kl == {"reward": "0.500", "acc": "0.25", "kl": "0.0200", "s/step": "2.0"}
    without = Run._headline({"reward/mean": 0.5, "train/approx_kl": 0.001})
    assert without == {"reward": "0.500", "acc": "nan", "approx_kl": "0.0010", "s/step": "nan"}


def test_validation_split_is_evaluated_between_and_test_only_before_and_after(tmp_path):
    r = run(tmp_path, "trainer.steps=2", "trainer.eval_every=1", "data.validation_size=2",
            "trainer.warm_start_min_acc=1.0")
    r.train()
    rows = {row["step"]: row for row in read_metrics(tmp_path)}
    assert "eval/validation/acc" in rows[1] and "eval/test/acc" not in rows[1]  # tuning touches validation only
    assert "eval/test/acc" in rows[0] and "eval/test/acc" in rows[2]
    assert rows[0]["sft/passed"] == 0.0 and rows[0]["sft/criterion_acc"] == rows[0]["eval/validation/acc"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["warm_start_passed"] is False  # the 100% criterion is missed: flagged, kept out of comparisons
    assert summary["warm_start_loss_last"] == rows[0]["sft/loss_last"]
    keys = [set(row["extra_info"]["key"] for row in r.data.eval_sets[name]) for name in ("validation", "test")]
    assert not keys[0] & keys[1]


def test_answer_only_warm_start_targets_hold_no_intermediate_state():
    from rl.prompts import warm_start_target

    row = {"extra_info": {"solution": "<think>\nstep 0: A=1\nstep 1: A=2\n</think>\n<answer>A=2</answer>"},
           "reward_model": {"ground_truth": {"answer": "A=2", "initial": "A=1"}}}
    assert warm_start_target(row, "trace") == row["extra_info"]["solution"]
    answer_only = warm_start_target(row, "answer")
    assert answer_only == "<think>\n</think>\n<answer>A=2</answer>" and "step" not in answer_only
    from rewards.causal_loop import compute_score

    assert compute_score("causal_loop", answer_only, row["reward_model"]["ground_truth"])["score"] == 1.0


def test_warm_start_loss_criterion():
    """Exact-match accuracy lags the loss: the loss criterion flags a warm start still on the plateau."""
    class Stub:
        data = types.SimpleNamespace(eval_sets={"test": []})

        def __init__(self, **trainer):
            self.cfg = load_config(None, [f"trainer.{k}={v}" for k, v in trainer.items()])

    def check(metrics, **trainer):
        return Run._warm_start_check(Stub(**trainer), metrics)["sft/passed"]

    metrics = {"eval/test/acc": 0.08, "sft/loss_last": 0.142}
    assert check(metrics, warm_start_max_loss=0.25) == 1.0
    assert check(metrics, warm_start_max_loss=0.1) == 0.0
    assert check(metrics, warm_start_max_loss=0.25, warm_start_min_acc=0.1) == 0.0  # both must hold
    assert check({"eval/test/acc": 0.08}, warm_start_max_loss=0.1) == 1.0  # no warm start, no loss to check
