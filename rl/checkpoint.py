"""Atomic, resumable checkpoints: a step directory is written under a temporary name and renamed into
place only when complete, so a killed write never leaves a checkpoint that loads as valid.

    run_dir/checkpoints/step_000010/{policy/ (safetensors + config + tokenizer), critic/, state.pt, COMPLETE}
    run_dir/checkpoints/warm_start/  (an unfinished warm start: policy/, state.pt with its optimiser, COMPLETE)
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

COMPLETE = "COMPLETE"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"


def warm_start_dir(run_dir: Path) -> Path:
    """The one checkpoint of an unfinished warm start (replaced as it goes; PPO's step 0 follows it)."""
    return Path(run_dir) / "checkpoints" / "warm_start"


def save_checkpoint(run_dir: Path, step: int, policy, tokenizer, critic, state: dict) -> Path:
    """Write PPO step ``step``; ``state`` holds the optimiser, scheduler, RNG and data-stream states."""
    return write_checkpoint(checkpoint_dir(run_dir, step), policy, tokenizer, critic, state, step)


def write_checkpoint(final: Path, policy, tokenizer, critic, state: dict, step: int) -> Path:
    """Write a checkpoint directory under a temporary name and rename it into place once complete."""
    tmp = final.with_name(f".tmp_{final.name}_{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    policy.save_pretrained(tmp / "policy")
    tokenizer.save_pretrained(tmp / "policy")
    if critic is not None:
        critic.save_pretrained(tmp / "critic")
    torch.save(state, tmp / "state.pt")
    (tmp / COMPLETE).write_text(str(step))
    # Replacing a checkpoint (a re-saved step, the next warm-start one): the old one is moved aside first and
    # removed last, so a kill at any point leaves a complete checkpoint (the old one is found by its name).
    old = final.with_name(f".old_{final.name}")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoint(final: Path) -> Path | None:
    """``final`` if it is complete, else the old checkpoint a replacement was interrupted after moving aside."""
    for path in (final, final.with_name(f".old_{final.name}")):
        if (path / COMPLETE).is_file():
            return path
    return None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None. Incomplete ones are ignored."""
    root = Path(run_dir) / "checkpoints"
    complete = [d for d in root.glob("step_*") if (d / COMPLETE).is_file()] if root.is_dir() else []
    return max(complete, key=lambda d: int(d.name.split("_")[1]), default=None)


def load_state(checkpoint: Path) -> dict:
    if not (checkpoint / COMPLETE).is_file():
        raise ValueError(f"{checkpoint} is not a complete checkpoint (no {COMPLETE} marker)")
    return torch.load(checkpoint / "state.pt", weights_only=False)
