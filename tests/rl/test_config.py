"""Typed config: presets, overrides, and errors that name the field and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from rl.config import ExperimentConfig, load_config, parse_overrides

PRESET = Path(__file__).resolve().parents[2] / "rl" / "presets" / "tiny.yaml"


def test_defaults_and_preset_are_valid():
    assert isinstance(load_config(), ExperimentConfig)
    cfg = load_config(PRESET)
    assert cfg.data.task["levels"] == [1] and cfg.algorithm.advantage == "grpo"


def test_overrides_are_typed_from_yaml():
    cfg = load_config(PRESET, ["trainer.lr=3e-4", "trainer.steps=7", "algorithm.dual_clip=null",
                               "trainer.critic_lr=1", "data.task={levels: [1, 2]}", "reward.kwargs={format_score: 0}"])
    assert cfg.trainer.lr == 3e-4 and cfg.trainer.steps == 7 and cfg.algorithm.dual_clip is None
    assert cfg.trainer.critic_lr == 1.0 and isinstance(cfg.trainer.critic_lr, float)  # ints widen to floats
    assert cfg.data.task == {"levels": [1, 2]} and cfg.reward.kwargs == {"format_score": 0}


@pytest.mark.parametrize("overrides, message", [
    (["trainer.lrr=1"], r"unknown field\(s\) \['trainer.lrr'\]; valid fields of trainer are"),
    (["optim.lr=1"], r"unknown config section\(s\) \['optim'\]; valid sections are"),
    (["trainer.lr=-1"], r"trainer.lr/critic_lr=\(-1.0, 0.0001\): must be > 0"),
    (["trainer.steps=many"], r"trainer.steps='many': expected int"),
    (["trainer.steps=true"], r"trainer.steps=True: expected int"),
    (["model.group=gpt"], r"model.group='gpt': valid groups are"),
    (["algorithm.agg=mean"], r"algorithm.agg='mean': valid modes are"),
    (["rollout.backend=sglang"], r"rollout.backend='sglang': use 'torch' or 'vllm'"),
    (["rollout.backend=vllm"], r"rollout.backend=vllm: the vllm rollout backend needs vLLM"),  # not in this env
    (["trainer.minibatch_size=16", "trainer.micro_batch_size=32"], r"must be <= trainer.minibatch_size"),
    (["trainer.lr"], r"write it as section.field=value"),
    (["data.eval_files=[test.parquet]"], r"data.train_files/eval_files=.*read only with data.source=parquet"),
    (["logging.backends=[tensorbord]"], r"logging.backends=\['tensorbord'\]: unknown \['tensorbord'\]; valid backends"),
    (["data.warm_start_targets=steps"], r"data.warm_start_targets='steps': use one of \['trace', 'answer'\]"),
    (["trainer.warm_start_min_acc=2"], r"trainer.warm_start_min_acc=2.0: an accuracy in \[0, 1\]"),
    (["trainer.warm_start_max_loss=0"], r"trainer.warm_start_max_loss=0.0: a loss > 0, or null"),
])
def test_bad_values_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(PRESET, overrides)


def test_unreadable_or_malformed_files(tmp_path):
    with pytest.raises(ValueError, match="cannot read it"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="expected a mapping of sections"):
        load_config(bad)


def test_parse_overrides_nests_by_section():
    assert parse_overrides(["a.b=1", "a.c=x", "d.e=[1, 2]"]) == {"a": {"b": 1, "c": "x"}, "d": {"e": [1, 2]}}
