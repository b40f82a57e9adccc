"""Ray actors: the rollout worker, the trainer and the reward-scorer pool. Each exposes a few coarse methods;
batches cross actor boundaries as one typed container (``RolloutBatch``, ``ScoredBatch``)."""

from __future__ import annotations

import copy
import math
import os

import numpy as np
import ray
import torch
from transformers import AutoModelForCausalLM

import models  # noqa: F401  (registers mla_lru with the Auto classes in every actor process)
from models import ValueHeadModel
from rl import checkpoint
from rl.heldout import response_iterations
from rl.reward_scorer import RewardRunner, ScoredBatch
from rl.rollout import RolloutBatch, SamplingParams, TorchRolloutEngine, logprob_parity
from rl.sft import sft_step, warm_start_optimizer
from rl.trainer import PPOSettings, PPOTrainer


def _threads() -> None:
    torch.set_num_threads(max(1, int(os.environ.get("LRU_RL_THREADS", os.cpu_count() or 1))))


def _model_from(config, state_dict: dict, device: str):
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(state_dict)
    return model.to(device)


@ray.remote
class RolloutWorker:
    """Holds a copy of the policy; generates; takes new weights every step. Not restarted when it dies: a
    restarted worker would sample from its initial weights; the driver reports the death and stops."""

    def __init__(self, config, state_dict: dict, pad_token_id: int, device: str, backend: str = "torch",
                 temperature: float = 1.0, vllm_kwargs: dict | None = None):
        _threads()
        if backend == "vllm":
            from rl.vllm_rollout import VLLMRolloutEngine  # imported only when used: vLLM is an optional extra

            model = _model_from(config, state_dict, "cpu")  # saved for the engine, which places it itself
            self.engine = VLLMRolloutEngine(model, pad_token_id, temperature=temperature, **(vllm_kwargs or {}))
        else:
            self.engine = TorchRolloutEngine(_model_from(config, state_dict, device), pad_token_id)

    def generate(self, prompts: list[list[int]], params: SamplingParams, seeds: list[int]) -> RolloutBatch:
        batch = self.engine.generate(prompts, params, seeds)
        return RolloutBatch(**{k: v.cpu() for k, v in vars(batch).items()})

    def load_weights(self, state_dict: dict) -> None:
        self.engine.load_weights(state_dict)

    def weights_checksum(self) -> float:
        if not hasattr(self.engine, "model"):  # the vLLM engine: its logprob parity is the sync check
            raise NotImplementedError("the vllm backend has no checksum; see rollout/logprob_diff_*")
        return _checksum(self.engine.model)


def _checksum(model) -> float:
    return float(sum(p.detach().double().sum() * (i + 1) for i, p in enumerate(model.state_dict().values())))


@ray.remote
class TrainerWorker:
    """Policy (actor), critic (value head on its own copy of the backbone) and frozen reference."""

    def __init__(self, config, state_dict: dict, settings: PPOSettings, with_critic: bool, device: str, seed: int):
        _threads()
        self.device, self.seed = device, seed
        self.policy = _model_from(config, state_dict, device)
        self.settings, self.with_critic = settings, with_critic
        self._rebuild()
        self.pending = None

    def _rebuild(self) -> None:
        """Reference and critic start from the current policy (after the warm start, if any)."""
        torch.manual_seed(self.seed)  # the value head's initialisation: runs must be reproducible
        reference = copy.deepcopy(self.policy)
        critic = ValueHeadModel(copy.deepcopy(self.policy)).to(self.device) if self.with_critic else None
        self.trainer = PPOTrainer(self.policy, reference, critic, self.settings)

    # ---- the warm start: begin, steps in chunks (checkpointed between them), end -------------------------

    def sft_begin(self, lr: float, total_steps: int) -> None:
        self.sft_optimizer, self.sft_scheduler = warm_start_optimizer(self.policy, lr, total_steps=total_steps)

    def sft(self, batches: list[tuple[list[list[int]], list[list[int]]]], pad_token_id: int) -> list[float]:
        """Supervised steps on (prompts, responses) batches -> their losses."""
        losses = []
        for prompts, responses in batches:
            losses.append(sft_step(self.policy, self.sft_optimizer, prompts, responses, pad_token_id))
            self.sft_scheduler.step()
        return losses

    def sft_end(self) -> None:
        self.sft_optimizer = self.sft_scheduler = None
        self._rebuild()

    def save_warm_start(self, run_dir: str, sft_step: int, tokenizer, extra: dict) -> str:
        state = {"sft_step": sft_step, "sft_optimizer": self.sft_optimizer.state_dict(),
                 "sft_scheduler": self.sft_scheduler.state_dict(), "torch_rng": torch.get_rng_state(), **extra}
        final = checkpoint.warm_start_dir(run_dir)
        return str(checkpoint.write_checkpoint(final, self.policy, tokenizer, None, state, sft_step))

    def load_warm_start(self, path: str, lr: float, total_steps: int) -> dict:
        state = checkpoint.load_state(checkpoint.Path(path))
        self._load_policy(f"{path}/policy")
        self.sft_begin(lr, total_steps)
        self.sft_optimizer.load_state_dict(state["sft_optimizer"])
        self.sft_scheduler.load_state_dict(state["sft_scheduler"])
        torch.set_rng_state(state["torch_rng"])
        return {k: v for k, v in state.items() if k not in ("sft_optimizer", "sft_scheduler", "torch_rng")}

    def _load_policy(self, path: str) -> None:
        self.policy.load_state_dict(AutoModelForCausalLM.from_pretrained(path).state_dict())

    # ---- PPO ---------------------------------------------------------------------------------------------

    def logprobs_and_values(self, rollout: RolloutBatch) -> None:
        """Old / reference logprobs and values of a rollout, kept for ``update`` (they need no scores)."""
        self.policy.eval()
        self.pending = self.trainer.logprobs_and_values(_to(rollout, self.device))
        self.pending_index = rollout.prompt_index.to(self.device)
        # The rollout's logprobs against the trainer's (as verl logs them): drift between the backends shows.
        self.parity = {} if self.settings.old_logprobs_from_rollout else logprob_parity(
            rollout.logprobs, self.pending.old_logprobs.cpu(), rollout.response_mask)

    def response_iterations(self, batch: RolloutBatch) -> np.ndarray | None:
        """The policy's mean LRU iterations over each response's tokens (``rl.heldout``; None without an LRU)."""
        return response_iterations(self.policy, _to(batch, self.device))

    def update(self, scores: list[float], seed: int) -> dict[str, float]:
        exp = self.trainer.add_scores(self.pending, torch.tensor(scores, device=self.device), self.pending_index)
        self.policy.train()
        metrics = {**self.trainer.update(exp, generator=torch.Generator().manual_seed(seed)), **self.parity}
        self.policy.eval()
        self.pending = None
        return metrics

    def weights(self) -> dict:
        return {k: v.detach().cpu() for k, v in self.policy.state_dict().items()}

    def weights_checksum(self) -> float:
        return _checksum(self.policy)

    def save(self, run_dir: str, step: int, tokenizer, extra: dict) -> str:
        state = {"trainer": self.trainer.state_dict(), "step": step, "torch_rng": torch.get_rng_state(),
                 "reference": {k: v.cpu() for k, v in self.trainer.reference.state_dict().items()}, **extra}
        return str(checkpoint.save_checkpoint(run_dir, step, self.policy, tokenizer, self.trainer.critic, state))

    def load(self, path: str) -> dict:
        state = checkpoint.load_state(checkpoint.Path(path))
        self._load_policy(f"{path}/policy")
        self._rebuild()
        self.trainer.reference.load_state_dict(state["reference"])
        if self.trainer.critic is not None:
            critic = ValueHeadModel.from_pretrained(f"{path}/critic")
            self.trainer.critic.load_state_dict(critic.state_dict())
        self.trainer.load_state_dict(state["trainer"])
        torch.set_rng_state(state["torch_rng"])
        return {k: v for k, v in state.items() if k not in ("trainer", "reference", "torch_rng")}


def _to(batch: RolloutBatch, device: str) -> RolloutBatch:
    return RolloutBatch(**{k: v.to(device) for k, v in vars(batch).items()})


RewardScorer = ray.remote(max_restarts=1)(RewardRunner)  # stateless: safe to restart
# Logical CPU shares: PPO runs its phases one after another, so the shares need not add up to the cores
# used; they only tell Ray how many actors fit on a node.
TRAINER_CPUS, WORKER_CPUS, SCORER_CPUS = 0.5, 0.25, 0.1


class RewardScorerPool:
    """Splits a batch over ``workers`` scorer actors; ``submit`` returns at once, ``collect`` waits."""

    def __init__(self, spec: str, kwargs: dict, timeout_s: float, workers: int):
        self.actors = [RewardScorer.options(num_cpus=SCORER_CPUS).remote(spec, kwargs, timeout_s)
                       for _ in range(workers)]

    def submit(self, data_sources: list, responses: list[str], ground_truths: list, extra_infos: list) -> list:
        size = math.ceil(len(responses) / len(self.actors))
        return [actor.score.remote(data_sources[i: i + size], responses[i: i + size], ground_truths[i: i + size],
                                   extra_infos[i: i + size])
                for actor, i in zip(self.actors, range(0, len(responses), size), strict=False)]

    @staticmethod
    def collect(refs: list) -> ScoredBatch:
        out = ScoredBatch()
        for part in ray.get(refs):
            out.extend(part)
        return out
