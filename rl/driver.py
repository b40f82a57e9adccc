"""The single controller: one process owns the PPO loop and drives the Ray actors.

    python -m rl.driver --config rl/presets/tiny.yaml trainer.steps=40 logging.run_dir=outputs/my_run

Each step, as in the PPO paper's algorithm box:
    1. prompts from the stream (or parquet)          4. advantages, PPO epochs on the trainer
    2. rollout on the workers                         5. new weights pushed to the workers
    3. scores from the reward pool, while the          6. metrics logged; evaluation and checkpoints
       trainer computes old/reference logprobs and        every few steps
       values
Re-running with the same run directory resumes from its last complete checkpoint. Ctrl-C or SIGTERM
finishes the current step, saves, and exits.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import ray
import torch
import yaml
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM

import models
from data.tokenizer import build_tokenizer, load_tokenizer
from models import convert
from rl import checkpoint
from rl.actors import SCORER_CPUS, TRAINER_CPUS, WORKER_CPUS, RewardScorerPool, RolloutWorker, TrainerWorker
from rl.config import ExperimentConfig, load_config
from rl.heldout import evaluate_split, heldout_params, split_metrics, split_record
from rl.prompts import PromptSource, encode_prompt, warm_start_target
from rl.report import write_report
from rl.rollout import SamplingParams, concat_rollouts, step_seed
from rl.tracking import WARM_START_FILE, MetricsLogger, read_metrics, run_info
from rl.trainer import PPOSettings


def build_model_and_tokenizer(cfg: ExperimentConfig):
    """The policy's starting point: a local checkpoint (``model.path``) or the group's tiny preset. A Qwen2
    checkpoint for an MLA group is retrofitted first (``retrofit``); the baseline takes it as it is."""
    if cfg.model.path:
        path = Path(cfg.model.path)
        if not (path / "config.json").is_file():
            raise ValueError(f"model.path={cfg.model.path!r}: no transformers checkpoint there (no config.json)")
        if cfg.model.group != "baseline" and AutoConfig.from_pretrained(path).model_type in convert.SOURCE_TYPES:
            path = retrofit(cfg, path)
        model = AutoModelForCausalLM.from_pretrained(path)
        expected = {"looped": models.LoopedForCausalLM}.get(cfg.model.group, models.LatentReasoningForCausalLM)
        if cfg.model.group != "baseline" and not isinstance(model, expected):
            raise ValueError(f"model.group={cfg.model.group!r} needs a {expected.__name__} checkpoint or a Qwen2 one "
                             f"to convert (models.convert), but {path} is {model.config.model_type}")
        return model, load_tokenizer(path)
    tokenizer = build_tokenizer()
    vocab = -(-len(tokenizer) // 8) * 8  # a multiple of 8
    config = models.tiny_config(cfg.model.group, match_params=cfg.model.match_params, vocab_size=vocab,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                **cfg.model.overrides)
    torch.manual_seed(cfg.trainer.seed)
    return AutoModelForCausalLM.from_config(config), tokenizer


RETROFIT_DIR = "retrofit"  # the converted copy of model.path, inside the run directory


def retrofit(cfg: ExperimentConfig, source: Path) -> Path:
    """The MLA group's conversion of the Qwen2 checkpoint ``source`` (``models.convert``), made once per run
    directory and reused on resume: written to a temporary folder, then renamed, so a half-written copy is
    never read. Calibrated on the task's text through the checkpoint's tokenizer."""
    out = Path(cfg.logging.run_dir) / RETROFIT_DIR
    want = {"source": str(source.resolve()), "group": cfg.model.group, "kv_lora_rank": cfg.model.retrofit_kv_lora_rank,
            "qk_rope_head_dim": cfg.model.retrofit_qk_rope_head_dim, "overrides": cfg.model.overrides}
    if convert.is_converted(out):
        have = json.loads((out / "convert_info.json").read_text())
        if have.get("request") == want:
            return out
        raise ValueError(f"{out} holds a conversion of {have.get('request')}, not {want}: use another run directory")
    tmp = out.with_name(RETROFIT_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = load_tokenizer(source)
    convert.convert(source, cfg.model.group, tmp, want["kv_lora_rank"], want["qk_rope_head_dim"],
                    convert.calibration_batch(tokenizer), request=want, **cfg.model.overrides)
    tmp.rename(out)
    return out


class Run:
    """The actors and state of one training run."""

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.dir = Path(cfg.logging.run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._record_config()
        device = "cuda" if cfg.trainer.device == "auto" and torch.cuda.is_available() else (
            "cpu" if cfg.trainer.device == "auto" else cfg.trainer.device)
        model, self.tokenizer = build_model_and_tokenizer(cfg)
        (self.dir / "run_info.json").write_text(json.dumps(run_info(model, cfg.model.group), indent=2))
        self.data = PromptSource(cfg.data, cfg.data.seed)
        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False,
                     **({} if os.environ.get("RAY_ADDRESS") else {"num_cpus": os.cpu_count() or 2}))
        weights, config, pad = model.state_dict(), model.config, self.tokenizer.pad_token_id
        self.has_lru = bool(getattr(config, "use_lru", False))
        self._check_resources(device)
        gpu = {"num_gpus": 1} if device == "cuda" else {}
        settings = PPOSettings.from_config(cfg)
        self.trainer = TrainerWorker.options(num_cpus=TRAINER_CPUS, **gpu).remote(
            config, weights, settings, cfg.algorithm.advantage == "gae", device, cfg.trainer.seed)
        self.workers = [RolloutWorker.options(num_cpus=WORKER_CPUS, **gpu).remote(
            config, weights, pad, device, cfg.rollout.backend, cfg.rollout.temperature, cfg.rollout.vllm_kwargs)
            for _ in range(cfg.rollout.workers)]
        self.scorers = RewardScorerPool(cfg.reward.function, cfg.reward.kwargs, cfg.reward.timeout_s,
                                        cfg.reward.workers)
        self.params = SamplingParams(temperature=cfg.rollout.temperature, top_k=cfg.rollout.top_k,
                                     top_p=cfg.rollout.top_p, repetition_penalty=cfg.rollout.repetition_penalty,
                                     max_new_tokens=cfg.rollout.max_new_tokens, n=cfg.rollout.n,
                                     stop_token_ids=(self.tokenizer.eos_token_id,))
        self.logger = MetricsLogger(self.dir, cfg.to_dict(), tuple(cfg.logging.backends), cfg.logging.wandb_mode,
                                    cfg.logging.project)
        self.stop_requested = False

    def _check_resources(self, device: str) -> None:
        """Refuse a plan the cluster cannot place, instead of waiting forever for an actor to start."""
        cfg = self.cfg
        need = {"CPU": TRAINER_CPUS + WORKER_CPUS * cfg.rollout.workers + SCORER_CPUS * cfg.reward.workers}
        if device == "cuda":
            need["GPU"] = 1 + cfg.rollout.workers
        nodes = sum(node["Alive"] for node in ray.nodes())
        wanted = int(os.environ.get("NNODES", "1"))  # set by scripts/train_lru.sh
        if nodes < wanted:
            raise ValueError(f"NNODES={wanted} but the Ray cluster has {nodes} live node(s): start Ray on the "
                             "other nodes ('ray start --address=<head>:6379') or lower NNODES")
        have = ray.cluster_resources()
        short = {k: (v, have.get(k, 0)) for k, v in need.items() if have.get(k, 0) < v - 1e-9}
        if short:
            raise ValueError("the Ray cluster cannot place this run: "
                             + ", ".join(f"{k} needs {n:g}, has {h:g}" for k, (n, h) in short.items())
                             + "; lower rollout.workers / reward.workers or add nodes")

    def _record_config(self) -> None:
        path = self.dir / "config.yaml"
        text = yaml.safe_dump(self.cfg.to_dict(), sort_keys=False)
        if path.is_file() and yaml.safe_load(path.read_text()) != self.cfg.to_dict():
            previous = yaml.safe_load(path.read_text())
            changed = sorted(f"{s}.{k}" for s in previous for k in previous[s]
                             if previous[s][k] != self.cfg.to_dict().get(s, {}).get(k))
            if changed != ["trainer.steps"]:  # extending a run is fine; anything else is another experiment
                raise ValueError(f"{self.dir} holds a run with a different config ({', '.join(changed)}); "
                                 "resume it with the same config or pick another logging.run_dir")
        path.write_text(text)

    # ---- one step ------------------------------------------------------------------------------------

    def rollout(self, prompts: list[list[int]], params: SamplingParams, seeds: list[int]):
        parts = [p for p in np.array_split(np.arange(len(prompts)), len(self.workers)) if len(p)]
        refs = [w.generate.remote([prompts[i] for i in p], params, [seeds[i] for i in p])
                for w, p in zip(self.workers, parts, strict=False)]
        batches = ray.get(refs)
        return batches[0] if len(batches) == 1 else concat_rollouts(batches, [p.tolist() for p in parts],
                                                                    self.tokenizer.pad_token_id)

    def decode(self, batch) -> list[str]:
        return [self.tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
                for ids, mask in zip(batch.response_ids, batch.response_mask, strict=True)]

    def step(self, step: int) -> dict:
        times, start = {}, time.perf_counter()
        rows = self.data.next_rows(self.cfg.trainer.prompts_per_step)
        prompts = [encode_prompt(self.tokenizer, r, self.cfg.data.template) for r in rows]
        seeds = [step_seed(self.cfg.trainer.seed, step, str(i)) for i in range(len(rows))]
        batch = self.rollout(prompts, self.params, seeds)
        times["time/rollout"] = time.perf_counter() - start
        t = time.perf_counter()
        texts = self.decode(batch)
        answered = [rows[i] for i in batch.prompt_index.tolist()]  # the row each response answers
        score_refs = self.scorers.submit([r["data_source"] for r in answered], texts,
                                         [r["reward_model"]["ground_truth"] for r in answered],
                                         [r["extra_info"] for r in answered])
        evaluated = self.trainer.logprobs_and_values.remote(batch)  # meanwhile
        scored = self.scorers.collect(score_refs)
        ray.get(evaluated)
        times["time/score"] = time.perf_counter() - t
        t = time.perf_counter()
        metrics = ray.get(self.trainer.update.remote(scored.scores, step_seed(self.cfg.trainer.seed, step, "update")))
        times["time/train"] = time.perf_counter() - t
        t = time.perf_counter()
        self._push_weights()
        times["time/sync"] = time.perf_counter() - t
        if self.cfg.logging.sample_every and step % self.cfg.logging.sample_every == 0:
            self.logger.log_samples(step, self._samples(rows, batch.prompt_index.tolist(), texts, scored))
        lengths = batch.response_lengths.float()
        tokens = float(lengths.sum() + batch.prompt_mask.sum())
        return {**{k if k.startswith("rollout/") else f"train/{k}": v for k, v in metrics.items()}, **times,
                "reward/mean": float(np.mean(scored.scores)), "reward/std": float(np.std(scored.scores)),
                **{f"reward/{k}": float(np.nanmean(v)) for k, v in scored.parts.items()},
                "reward/errors": sum(e is not None for e in scored.errors),
                "response/length_mean": float(lengths.mean()), "response/length_max": float(lengths.max()),
                "time/step": time.perf_counter() - start,
                "throughput/tokens_per_s": tokens / (time.perf_counter() - start)}

    def _samples(self, rows: list[dict], index: list[int], texts: list[str], scored) -> list[dict]:
        """The first response to each of the first ``logging.num_samples`` prompts, with its reward."""
        picked = [index.index(i) for i in range(min(self.cfg.logging.num_samples, len(rows)))]
        return [{"data_source": rows[index[k]]["data_source"], "prompt": rows[index[k]]["prompt"][-1]["content"],
                 "response": texts[k], "ground_truth": rows[index[k]]["reward_model"]["ground_truth"],
                 "extra_info": {key: rows[index[k]]["extra_info"].get(key) for key in ("level", "num_vars",
                                                                                       "num_steps", "key")},
                 "score": scored.scores[k], "parts": {name: v[k] for name, v in scored.parts.items()}}
                for k in picked]

    def score(self, rows: list[dict], texts: list[str]):
        """Scores of responses to ``rows`` (one row per response), from the reward pool."""
        return self.scorers.collect(self.scorers.submit(
            [r["data_source"] for r in rows], texts, [r["reward_model"]["ground_truth"] for r in rows],
            [r["extra_info"] for r in rows]))

    def evaluate_heldout(self, step: int | None, every_split: bool = True) -> dict:
        """Greedy and sampled accuracy on the held-out splits (``rl.heldout``, as ``python -m rl.evaluate``
        computes it): all of them, or with ``every_split=False`` the validation split alone when there is one
        (test is touched only before and after PPO). Each problem's results go to evals/step_N.json for the
        paired tests (not for ``step=None``: an evaluation inside the warm start), with each greedy response's
        LRU iterations for a model with an LRU."""
        params = heldout_params(self.cfg.rollout, self.tokenizer.eos_token_id)
        iterations = (lambda batch: ray.get(self.trainer.response_iterations.remote(batch))) if self.has_lru else None
        sets = self.data.eval_sets
        if not every_split and "validation" in sets:
            sets = {"validation": sets["validation"]}
        out, records = {}, {}
        for name, rows in sets.items():
            prompts = [encode_prompt(self.tokenizer, r, self.cfg.data.template) for r in rows]
            result = evaluate_split(name, rows, prompts, self.rollout, self.score, self.decode, params,
                                    self.cfg.trainer.seed, iterations)
            out.update(split_metrics(name, rows, result))
            records[name] = split_record(rows, result)
        if step is None:
            return out
        path = self.dir / "evals" / f"step_{step:06d}.json"
        path.parent.mkdir(exist_ok=True)
        path.with_suffix(".tmp").write_text(json.dumps(records))
        path.with_suffix(".tmp").replace(path)
        return out

    @staticmethod
    def _headline(metrics: dict) -> dict[str, str]:
        """The progress bar's numbers. KL to the reference exists only with a KL term (otherwise the
        reference is never run); the step's approximate KL to the rollout policy is shown instead."""
        name, key = ("kl", "train/kl_ref") if "train/kl_ref" in metrics else ("approx_kl", "train/approx_kl")
        nan = float("nan")
        return {"reward": f"{metrics['reward/mean']:.3f}", "acc": f"{metrics.get('reward/acc', nan):.2f}",
                name: f"{metrics.get(key, nan):.4f}", "s/step": f"{metrics.get('time/step', nan):.1f}"}

    def save(self, step: int) -> str:
        return ray.get(self.trainer.save.remote(str(self.dir), step, self.tokenizer, {"data": self.data.state_dict()}))

    # ---- the warm start ------------------------------------------------------------------------------

    def _sft_batch(self) -> tuple[list[list[int]], list[list[int]]]:
        rows = self.data.next_rows(self.cfg.trainer.sft_batch_size)
        eos = self.tokenizer.eos_token_id
        return ([encode_prompt(self.tokenizer, r, self.cfg.data.template) for r in rows],
                [self.tokenizer(warm_start_target(r, self.cfg.data.warm_start_targets),
                                add_special_tokens=False)["input_ids"] + [eos] for r in rows])

    def _push_weights(self) -> None:
        weights = self.trainer.weights.remote()
        ray.get([w.load_weights.remote(weights) for w in self.workers])

    def warm_start(self, start: int) -> None:
        """Supervised steps on worked solutions, from step ``start`` (0, or where a killed run stopped): the loss
        of every step logged, held-out accuracy every ``sft_eval_every`` steps, a checkpoint every
        ``sft_save_every``. Then the warm-started model is evaluated and logged as PPO step 0."""
        cfg = self.cfg.trainer
        if start == 0 and self.cfg.model.path:
            # A pretrained (or retrofitted) start: its accuracy before the warm start, as sft step 0 — after a
            # conversion, the accuracy the recovery fine-tune starts from (the baseline's is the source's).
            self._push_weights()
            heldout = self.evaluate_heldout(None, every_split=False)
            self.logger.log_warm_start(0, {f"sft/{k}": v for k, v in heldout.items()})
        with tqdm(total=cfg.sft_steps, initial=start, desc="warm start", disable=not self.cfg.logging.progress) as bar:
            while start < cfg.sft_steps:
                end = min(_next_multiple(start, every) for every in (50, cfg.sft_save_every, cfg.sft_eval_every,
                                                                      cfg.sft_steps) if every)
                batches = [self._sft_batch() for _ in range(start, end)]
                losses = ray.get(self.trainer.sft.remote(batches, self.tokenizer.pad_token_id))
                for i, loss in enumerate(losses):
                    self.logger.log_warm_start(start + i + 1, {"sft/loss": loss})
                bar.update(len(losses))
                bar.set_postfix(loss=f"{np.mean(losses):.4f}")
                start = end
                if cfg.sft_eval_every and end % cfg.sft_eval_every == 0 and end < cfg.sft_steps:
                    self._push_weights()
                    heldout = self.evaluate_heldout(None, every_split=False)
                    self.logger.log_warm_start(end, {f"sft/{k}": v for k, v in heldout.items()})
                if end % cfg.sft_save_every == 0 and end < cfg.sft_steps:
                    ray.get(self.trainer.save_warm_start.remote(str(self.dir), end, self.tokenizer,
                                                                {"data": self.data.state_dict()}))
        ray.get(self.trainer.sft_end.remote())
        self._push_weights()
        losses = [r["sft/loss"] for r in read_metrics(self.dir, WARM_START_FILE) if "sft/loss" in r]
        metrics = {"sft/loss_first": losses[0], "sft/loss_last": float(np.mean(losses[-10:])),
                   **self.evaluate_heldout(0)}
        self.logger.log(0, {**metrics, **self._warm_start_check(metrics)})

    def _warm_start_check(self, metrics: dict) -> dict:
        """Whether the model PPO starts from passed the warm-start criterion: greedy accuracy on validation (or
        test, or the first held-out set) >= ``trainer.warm_start_min_acc``, and the warm start's last loss
        (``sft/loss_last``; none without a warm start) <= ``trainer.warm_start_max_loss`` when that is set."""
        cfg = self.cfg.trainer
        split = "validation" if "eval/validation/acc" in metrics else (
            "test" if "eval/test/acc" in metrics else next(iter(self.data.eval_sets)))
        acc, loss = metrics[f"eval/{split}/acc"], metrics.get("sft/loss_last")
        missed = []
        if acc < cfg.warm_start_min_acc:
            missed.append(f"eval/{split}/acc {acc:.3f} < trainer.warm_start_min_acc {cfg.warm_start_min_acc}")
        if cfg.warm_start_max_loss is not None and loss is not None and loss > cfg.warm_start_max_loss:
            missed.append(f"sft/loss_last {loss:.3f} > trainer.warm_start_max_loss {cfg.warm_start_max_loss}")
        if missed:
            print(f"warning: the warm start missed its criterion ({'; '.join(missed)}); the run is flagged in "
                  "summary.json and kept out of comparisons", file=sys.stderr)
        return {"sft/passed": float(not missed), "sft/criterion_acc": acc}

    # ---- the loop ------------------------------------------------------------------------------------

    def train(self) -> Path:
        start = self._resume()
        if start is None:  # no PPO checkpoint yet: the warm start (resumed if a killed run left one), step 0
            sft_start = self._resume_warm_start()
            if self.cfg.trainer.sft_steps:
                self.warm_start(sft_start)  # logs the held-out evaluation of the warm-started model as step 0
            else:
                metrics = self.evaluate_heldout(0)  # the "before PPO" point of the report
                self.logger.log(0, {**metrics, **self._warm_start_check(metrics)})
            self.save(0)  # PPO killed before its first save resumes here, not before the warm start
            shutil.rmtree(checkpoint.warm_start_dir(self.dir), ignore_errors=True)
            start = 0
        previous = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        steps = self.cfg.trainer.steps
        try:
            with tqdm(range(start + 1, steps + 1), initial=start, total=steps, desc="ppo",
                      disable=not self.cfg.logging.progress) as bar:
                for step in bar:
                    metrics = self.step(step)
                    # Read the flag once: a signal that lands later in this step must not skip its save and
                    # still break (it stops the run after the next step instead, saved).
                    stopping = self.stop_requested
                    last = step == steps or stopping
                    if step % self.cfg.trainer.eval_every == 0 or last:
                        metrics.update(self.evaluate_heldout(step, every_split=last))
                    self.logger.log(step, metrics)
                    bar.set_postfix(self._headline(metrics))
                    if step % self.cfg.trainer.save_every == 0 or last:
                        self.save(step)
                    if stopping:
                        break
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.logger.close()
        write_report(self.dir)
        return self.dir

    def _resume(self) -> int | None:
        """The PPO step of the latest complete checkpoint, loaded into the actors; None if there is none."""
        latest = checkpoint.latest_checkpoint(self.dir)
        if latest is None:
            return None
        extra = ray.get(self.trainer.load.remote(str(latest)))
        self.data.load_state_dict(extra["data"])
        self._push_weights()
        self.logger.truncate_after(extra["step"])
        print(f"resuming {self.dir} from step {extra['step']}", file=sys.stderr)
        return extra["step"]

    def _resume_warm_start(self) -> int:
        """The warm-start step a killed run checkpointed (its state loaded into the trainer), else 0."""
        cfg = self.cfg.trainer
        found = checkpoint.complete_checkpoint(checkpoint.warm_start_dir(self.dir)) if cfg.sft_steps else None
        if found is None:
            if cfg.sft_steps:
                ray.get(self.trainer.sft_begin.remote(cfg.sft_lr, cfg.sft_steps))
            self.logger.truncate_after(-1, warm_start_step=0)
            return 0
        extra = ray.get(self.trainer.load_warm_start.remote(str(found), cfg.sft_lr, cfg.sft_steps))
        self.data.load_state_dict(extra["data"])
        self.logger.truncate_after(-1, warm_start_step=extra["sft_step"])
        print(f"resuming {self.dir} inside the warm start, from its step {extra['sft_step']}", file=sys.stderr)
        return extra["sft_step"]

    def _request_stop(self, signum, frame) -> None:
        if self.stop_requested:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.stop_requested = True
        print("\nstopping after this step (checkpoint will be saved); Ctrl-C again to abort", file=sys.stderr)


def _next_multiple(step: int, every: int) -> int:
    return (step // every + 1) * every


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML preset (default: rl/presets/tiny.yaml)")
    parser.add_argument("overrides", nargs="*", help="section.field=value")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config or Path(__file__).parent / "presets" / "tiny.yaml", args.overrides)
    except ValueError as e:
        parser.error(str(e))
    run = Run(cfg)
    try:
        run.train()
    except ray.exceptions.RayActorError as e:
        latest = checkpoint.latest_checkpoint(run.dir)
        print(f"error: an actor died ({e.__class__.__name__}: {e}); the last checkpoint is {latest}. "
              "Re-run the same command to resume from it.", file=sys.stderr)
        return 1
    print(f"run directory: {run.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
