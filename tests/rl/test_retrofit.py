"""``model.path`` = a Qwen2 checkpoint for every group: the MLA groups are retrofitted (models/convert.py) into
the run directory once and reused; the baseline takes the checkpoint as it is; end to end for all four."""

from __future__ import annotations

import json

import pytest
import ray
import torch

import models
from data.tokenizer import build_tokenizer
from rl.config import load_config
from rl.driver import RETROFIT_DIR, Run, build_model_and_tokenizer
from rl.tracking import WARM_START_FILE, read_metrics
from tests.rl.test_driver import TINY

FOUR_GROUPS = ("baseline", "mla_only", "mla_lru_fixed", "mla_lru_adaptive")


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    """A tiny "pretrained" Qwen2 (random weights) with the task tokenizer, saved as a local checkpoint is."""
    path = tmp_path_factory.mktemp("qwen2")
    tokenizer = build_tokenizer()
    config = models.tiny_config("baseline", vocab_size=-(-len(tokenizer) // 8) * 8,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    from transformers import Qwen2ForCausalLM

    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def config(run_dir, path, group, *overrides):
    return load_config(None, [*TINY, f"logging.run_dir={run_dir}", f"model.path={path}", f"model.group={group}",
                              *overrides])


def test_mla_groups_convert_once_per_run_directory(qwen2_dir, tmp_path):
    cfg = config(tmp_path, qwen2_dir, "mla_lru_adaptive", "model.retrofit_kv_lora_rank=48")
    model, tokenizer = build_model_and_tokenizer(cfg)
    assert isinstance(model, models.LatentReasoningForCausalLM)
    assert (model.config.kv_lora_rank, model.config.lru_residual_gate) == (48, True)
    info = tmp_path / RETROFIT_DIR / "convert_info.json"
    stamp = info.stat().st_mtime_ns
    build_model_and_tokenizer(cfg)  # a resume reuses the copy
    assert info.stat().st_mtime_ns == stamp and json.loads(info.read_text())["logit_error"] is not None
    with pytest.raises(ValueError, match="holds a conversion of"):
        build_model_and_tokenizer(config(tmp_path, qwen2_dir, "mla_only"))
    baseline, _ = build_model_and_tokenizer(config(tmp_path / "b", qwen2_dir, "baseline"))
    assert baseline.config.model_type == "qwen2" and not (tmp_path / "b" / RETROFIT_DIR).exists()


def test_what_cannot_be_retrofitted_is_refused(qwen2_dir, tmp_path):
    with pytest.raises(ValueError, match="group='looped'"):
        build_model_and_tokenizer(config(tmp_path, qwen2_dir, "looped"))
    with pytest.raises(ValueError, match="model.retrofit_kv_lora_rank"):
        load_config(None, ["model.retrofit_kv_lora_rank=8"])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_all_four_groups_train_from_one_checkpoint(qwen2_dir, tmp_path):
    """BASE_MODEL for every group: warm start then PPO from the one checkpoint, with a tiny budget."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for group in FOUR_GROUPS:
            run = Run(config(tmp_path / group, qwen2_dir, group, "trainer.steps=1"))
            run.train()
            rows = read_metrics(tmp_path / group)
            assert any("reward/mean" in row for row in rows), group
            before = [r for r in read_metrics(tmp_path / group, WARM_START_FILE) if r.get("sft/step") == 0]
            assert before and "sft/eval/test/acc" in before[0], group  # accuracy before the recovery warm start
            assert (tmp_path / group / RETROFIT_DIR).is_dir() == (group != "baseline")
    finally:
        ray.shutdown()
