"""The driver end to end with ``rollout.backend=vllm`` on a local Ray cluster: the workers sample with vLLM,
the trainer recomputes the old logprobs, and the logged parity (rollout/logprob_diff_*) is within 1e-4.
Skipped without vLLM; run with ``.venv-vllm/bin/python -m pytest -m vllm``."""

from __future__ import annotations

import pytest

vllm = pytest.importorskip("vllm", reason="needs vLLM: the .venv-vllm environment (README, the vLLM backend)")

import ray  # noqa: E402

from rl.config import load_config  # noqa: E402
from rl.driver import Run  # noqa: E402
from rl.tracking import read_metrics  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.mark.timeout(900)
def test_a_ppo_run_with_the_vllm_backend_logs_exact_parity(tmp_path):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        cfg = load_config(None, ["rollout.backend=vllm", "algorithm.old_logprobs_from_rollout=false",
                                 "algorithm.advantage=grpo", "algorithm.kl_coef=0", "model.group=mla_lru_adaptive",
                                 "trainer.sft_steps=2", "trainer.sft_batch_size=2", "trainer.steps=2",
                                 "trainer.prompts_per_step=2", "rollout.n=2", "rollout.max_new_tokens=8",
                                 "data.eval_size=2", "trainer.minibatch_size=4", "trainer.micro_batch_size=4",
                                 "trainer.eval_every=2", "trainer.save_every=2", "logging.wandb_mode=disabled",
                                 "logging.backends=[]", "logging.progress=false", f"logging.run_dir={tmp_path}"])
        Run(cfg).train()
    finally:
        ray.shutdown()
    rows = [r for r in read_metrics(tmp_path) if r["step"] > 0]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["rollout/logprob_diff_max"] <= 1e-4 for r in rows)  # the second step after a weight sync
    assert "eval/test/acc" in rows[-1]
