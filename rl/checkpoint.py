"""Atomic, resumable checkpoints: a step directory is written under a temporary name and renamed into
place only when complete, so a killed write never leaves a checkpoint that loads as valid.

    run_dir/checkpoints/step_000010/{policy/ (safetensors + config + tokenizer), critic/, state.pt, COMPLETE}
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

COMPLETE = "COMPLETE"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"


def save_checkpoint(run_dir: Path, step: int, policy, tokenizer, critic, state: dict) -> Path:
    """Write step ``step``; ``state`` holds the optimiser, scheduler, RNG and data-stream states."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".tmp_{final.name}_{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    policy.save_pretrained(tmp / "policy")
    tokenizer.save_pretrained(tmp / "policy")
    if critic is not None:
        critic.save_pretrained(tmp / "critic")
    torch.save(state, tmp / "state.pt")
    (tmp / COMPLETE).write_text(str(step))
    if final.exists():  # re-saving a step (after a resume): replace the old one
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None. Incomplete ones are ignored."""
    root = Path(run_dir) / "checkpoints"
    complete = [d for d in root.glob("step_*") if (d / COMPLETE).is_file()] if root.is_dir() else []
    return max(complete, key=lambda d: int(d.name.split("_")[1]), default=None)


def load_state(checkpoint: Path) -> dict:
    if not (checkpoint / COMPLETE).is_file():
        raise ValueError(f"{checkpoint} is not a complete checkpoint (no {COMPLETE} marker)")
    return torch.load(checkpoint / "state.pt", weights_only=False)
