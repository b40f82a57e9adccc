"""Prompts for training and evaluation: the endless stream or parquet files, and their token ids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from data.causal_loop import ProblemStream, TaskConfig, build_splits, heldout_configs, to_table


class PromptSource:
    """Training rows (the endless stream, or parquet files cycled) and the held-out evaluation sets."""

    def __init__(self, cfg, seed: int):
        self.cfg = cfg
        if cfg.source == "stream":
            task = TaskConfig(**cfg.task)
            splits = build_splits(task, 0, cfg.eval_size, seed + 1, heldout_configs(task), cfg.eval_size,
                                  num_validation=cfg.validation_size)
            self.eval_sets = {name: to_table(b, name, k, cfg.template, question_style=cfg.question_style).to_pylist()
                              for name, (b, k) in splits.items()}
            excluded = np.concatenate([k for _, k in splits.values()])
            self.stream = ProblemStream(task, seed=seed, chunk_size=256, exclude_keys=excluded)
        else:
            self.rows = [r for f in cfg.train_files for r in pq.read_table(f).to_pylist()]
            self.position = 0
            self.eval_sets = {Path(f).stem: pq.read_table(f).to_pylist()[: cfg.eval_size] for f in cfg.eval_files}

    def next_rows(self, n: int) -> list[dict]:
        if self.cfg.source == "stream":
            return to_table(self.stream.next_batch(n), "train", template=self.cfg.template,
                            question_style=self.cfg.question_style).to_pylist()
        rows = [self.rows[(self.position + i) % len(self.rows)] for i in range(n)]
        self.position += n
        return rows

    def state_dict(self) -> dict:
        return {"stream": self.stream.state_dict()} if self.cfg.source == "stream" else {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        if self.cfg.source == "stream":
            self.stream.load_state_dict(state["stream"])
        else:
            self.position = state["position"]


def warm_start_target(row: dict, targets: str) -> str:
    """The supervised response to a row: its worked solution ("trace"), or the answer alone ("answer",
    after an empty think block, so the format matches the reward's)."""
    if targets == "trace":
        return row["extra_info"]["solution"]
    return f"<think>\n</think>\n<answer>{row['reward_model']['ground_truth']['answer']}</answer>"


def encode_prompt(tokenizer, row: dict, template: str) -> list[int]:
    if template == "chat":
        text = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    else:
        text = row["prompt"][0]["content"]
    return tokenizer(text, add_special_tokens=False)["input_ids"]
