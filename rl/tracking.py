"""Metrics: JSONL files in the run directory always, and the backends ``logging.backends`` names (verl's
names): ``console`` (a line per step), ``wandb`` (offline unless ``logging.wandb_mode=online``) and
``tensorboard`` (event files in ``<run>/tensorboard/``, written as the run goes:
``tensorboard --logdir outputs/`` shows every run live, overlaid).

Two curves with their own step axes: PPO (``metrics.jsonl``, step = PPO step, 0 = after the warm start)
and the warm start (``warm_start.jsonl``, step = warm-start step; its keys start with ``sft/``). Sampled
generations go to ``samples.jsonl``, a wandb table and TensorBoard text.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

BACKENDS = ("console", "wandb", "tensorboard")
METRICS_FILE, WARM_START_FILE, SAMPLES_FILE = "metrics.jsonl", "warm_start.jsonl", "samples.jsonl"
# wandb plots these against "step"
PPO_PREFIXES = ("train", "rollout", "reward", "response", "time", "throughput", "eval")


def _plain(value):
    value = float(value) if hasattr(value, "item") or isinstance(value, int | float) else value
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _numbers(row: dict) -> dict[str, float]:
    return {k: v for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _append(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def _truncate(path: Path, key: str, step: int) -> None:
    """Drop rows logged after ``step`` (on resume), so a curve has no duplicated steps."""
    if path.is_file():
        rows = [line for line in path.read_text().splitlines() if line and json.loads(line)[key] <= step]
        path.write_text("".join(line + "\n" for line in rows))


class MetricsLogger:
    def __init__(self, run_dir: Path, config: dict, backends: tuple[str, ...] = ("wandb", "tensorboard"),
                 wandb_mode: str = "offline", project: str = "lru-rl", name: str | None = None):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / METRICS_FILE
        self.backends = set(backends)
        self.run = None
        if "wandb" in self.backends and wandb_mode != "disabled":
            self.run = _wandb_run(self.dir, config, wandb_mode, project, name)
        self.writers: dict = {}  # TensorBoard writers by curve ("ppo", "warm_start"), opened on first use
        self._purge: dict[str, int] = {}

    def _writer(self, curve: str):
        if "tensorboard" not in self.backends:
            return None
        if curve not in self.writers:
            from torch.utils.tensorboard import SummaryWriter  # imported only when used

            # purge_step: events a killed run wrote after its checkpoint are hidden on resume.
            self.writers[curve] = SummaryWriter(str(self.dir / "tensorboard" / curve),
                                                purge_step=self._purge.get(curve))
        return self.writers[curve]

    def log(self, step: int, metrics: dict) -> None:
        """One PPO step's metrics (step 0: the evaluation after the warm start)."""
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        _append(self.path, row)
        self._to_backends("ppo", "step", step, row)
        if "console" in self.backends:
            shown = {k: v for k, v in _numbers(row).items() if k.startswith(("reward/mean", "train/", "eval/"))}
            print(f"step {step}: " + " ".join(f"{k}={v:.4g}" for k, v in shown.items()), flush=True)

    def log_warm_start(self, step: int, metrics: dict) -> None:
        """One warm-start step's metrics (keys ``sft/...``); its own step axis."""
        row = {"sft/step": step, **{k: _plain(v) for k, v in metrics.items()}}
        _append(self.dir / WARM_START_FILE, row)
        self._to_backends("warm_start", "sft/step", step, row)

    def _to_backends(self, curve: str, step_key: str, step: int, row: dict) -> None:
        values = _numbers(row)
        if self.run is not None:
            self.run.log(values)  # no step=: the two curves' steps are keys with their own axes
        writer = self._writer(curve)
        if writer is not None:
            for key, value in values.items():
                if key != step_key:
                    writer.add_scalar(key, value, step)
            writer.flush()

    def log_samples(self, step: int, samples: list[dict]) -> None:
        """A few prompts with their responses, rewards and reward parts, to read how the policy behaves."""
        with (self.dir / SAMPLES_FILE).open("a") as f:
            for s in samples:
                f.write(json.dumps({"step": step, **s}) + "\n")
        if self.run is not None:
            import wandb

            columns = ["step", "prompt", "response", "score", "parts"]
            self.run.log({"samples": wandb.Table(columns=columns, data=[
                [step, s["prompt"], s["response"], s["score"], json.dumps(s["parts"])] for s in samples])})
        writer = self._writer("ppo")
        if writer is not None:
            writer.add_text("samples", _markdown_samples(samples), step)
            writer.flush()

    def truncate_after(self, step: int, warm_start_step: int | None = None) -> None:
        """On resume from PPO step ``step`` (or from inside the warm start, at ``warm_start_step``): drop
        what the killed run logged after its checkpoint, in the files and in TensorBoard."""
        _truncate(self.path, "step", step if warm_start_step is None else -1)
        _truncate(self.dir / SAMPLES_FILE, "step", step if warm_start_step is None else -1)
        self._purge["ppo"] = step + 1 if warm_start_step is None else 0
        if warm_start_step is not None:
            _truncate(self.dir / WARM_START_FILE, "sft/step", warm_start_step)
            self._purge["warm_start"] = warm_start_step + 1

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        if self.run is not None:
            self.run.finish()


def _wandb_run(run_dir: Path, config: dict, mode: str, project: str, name: str | None):
    import wandb  # imported only when used: it is slow to import

    run = wandb.init(project=project, name=name or run_dir.name, dir=str(run_dir), mode=mode, config=config,
                     id=run_dir.name, resume="allow", settings=wandb.Settings(silent=True, console="off"))
    run.define_metric("step")
    run.define_metric("sft/step")
    run.define_metric("sft/*", step_metric="sft/step")
    for prefix in PPO_PREFIXES:
        run.define_metric(f"{prefix}/*", step_metric="step")
    return run


def _markdown_samples(samples: list[dict]) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", "<br>")

    lines = ["| prompt | response | score | parts |", "|---|---|---|---|"]
    lines += [f"| {cell(s['prompt'][-300:])} | {cell(s['response'])} | {s['score']:.3f} | "
              f"{cell(json.dumps(s['parts']))} |" for s in samples]
    return "\n".join(lines)


def read_metrics(run_dir: Path, file: str = METRICS_FILE) -> list[dict]:
    path = Path(run_dir) / file
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


def _cpu_model() -> str | None:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # not Linux
        import platform
        return platform.processor() or None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)


def run_info(model, group: str) -> dict:
    """What a run trained, recorded beside its config: architecture, parameter count, code and packages."""
    import importlib.metadata
    import platform
    import subprocess

    import torch

    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    from models.param_count import cache_bytes_per_token, flops_per_token

    commit = git("rev-parse", "HEAD")
    return {"group": group, "model_class": type(model).__name__, "model_type": model.config.model_type,
            "parameters": sum(p.numel() for p in model.parameters()),
            "flops_per_token": flops_per_token(model.config),  # closed form, at most K LRU/loop iterations
            "cache_bytes_per_token": cache_bytes_per_token(model.config, next(model.parameters()).dtype),
            "git_commit": commit, "git_dirty": bool(git("status", "--porcelain")) if commit else None,
            "python": platform.python_version(),
            # Floating-point results follow the kernels torch picks for this CPU: two machines with another
            # capability (AVX2, AVX512) give runs that drift apart after a few hundred steps.
            "cpu": {"model": _cpu_model(), "capability": torch.backends.cpu.get_cpu_capability()},
            "packages": {p: version(p) for p in ("torch", "transformers", "ray", "numpy", "pyarrow", "wandb")}}
