"""Metrics: a JSONL file in the run directory always, wandb (offline unless asked) beside it."""

from __future__ import annotations

import json
import math
from pathlib import Path


def _plain(value):
    value = float(value) if hasattr(value, "item") or isinstance(value, int | float) else value
    return None if isinstance(value, float) and not math.isfinite(value) else value


class MetricsLogger:
    def __init__(self, run_dir: Path, config: dict, wandb_mode: str = "offline", project: str = "lru-rl",
                 name: str | None = None):
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self.path = Path(run_dir) / "metrics.jsonl"
        self.run = None
        if wandb_mode != "disabled":
            import wandb  # imported only when used: it is slow to import

            self.run = wandb.init(project=project, name=name or Path(run_dir).name, dir=str(run_dir),
                                  mode=wandb_mode, config=config, id=Path(run_dir).name, resume="allow",
                                  settings=wandb.Settings(silent=True, console="off"))

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.run is not None:
            self.run.log({k: v for k, v in row.items() if isinstance(v, int | float)}, step=step)

    def truncate_after(self, step: int) -> None:
        """On resume: drop rows logged after the checkpoint, so the curve has no duplicated steps."""
        if not self.path.is_file():
            return
        rows = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in rows))

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


def run_info(model, group: str) -> dict:
    """What a run trained, recorded beside its config: architecture, parameter count, code and packages."""
    import importlib.metadata
    import platform
    import subprocess

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

    commit = git("rev-parse", "HEAD")
    return {"group": group, "model_class": type(model).__name__, "model_type": model.config.model_type,
            "parameters": sum(p.numel() for p in model.parameters()),
            "git_commit": commit, "git_dirty": bool(git("status", "--porcelain")) if commit else None,
            "python": platform.python_version(),
            "packages": {p: version(p) for p in ("torch", "transformers", "ray", "numpy", "pyarrow", "wandb")}}
