"""Splits, verl-schema tables, parquet files and the endless training stream of the causal-loop task.

Splits are disjoint by canonical problem key (``canonical_keys``, blind to renamed variables): test,
held-out and validation problems are drawn first and excluded from training, and duplicates within a
split are dropped unless asked for.
Rows follow verl's parquet schema, so the same files feed verl:

    data_source  "causal_loop"
    prompt       [{"role": "user", "content": question}]   (or the base-model text, template="base")
    ability      "reasoning"
    reward_model {"style": "rule", "ground_truth": {"answer": "A=1, B=2", "initial": "A=3, B=0"}}
    extra_info   {"split", "index", "level", "num_vars", "num_steps", "inner_steps", "semantics",
                  "key", "solution"}   (solution: a worked solution for supervised warm start)
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data.causal_loop import render
from data.causal_loop.config import MAX_VARS, TaskConfig
from data.causal_loop.generator import ProblemBatch, canonical_keys, concat, nontrivial, sample

DATA_SOURCE = "causal_loop"
TEMPLATES = ("chat", "base")
QUESTION_STYLES = ("full", "compact")  # the question with its instructions' prose, or without (compact_question)


def generate(cfg: TaskConfig, n: int, seed: int) -> ProblemBatch:
    """n problems from ``cfg``, deterministic in ``seed`` (duplicates possible; see ``generate_unique``)."""
    return sample(cfg, n, np.random.default_rng(seed))


def generate_unique(cfg: TaskConfig, n: int, rng: np.random.Generator, exclude: np.ndarray,
                    dedup: bool = True) -> tuple[ProblemBatch, np.ndarray]:
    """n problems whose keys are not in ``exclude`` (sorted uint64) and, with ``dedup``, all distinct;
    trivial ones (final state == initial state) only if ``cfg.allow_trivial``. Distinct means distinct
    under ``canonical_keys``: a problem with its variables renamed is the same problem.

    Draws in rounds until n are found; fails with advice when the setting holds too few distinct
    problems (the reference's default sizes held only ~8.4K distinct problems in a 50K split).
    """
    parts, part_keys, have, drawn = [], [], 0, 0
    seen, taken = exclude, np.zeros(0, np.uint64)  # taken: distinct drawn problems that ``exclude`` holds
    while have < n:
        want = max(1024, int((n - have) * 1.05))  # duplicates are rare in any setting worth training on
        batch = sample(cfg, want, rng)
        drawn += want
        keys = canonical_keys(batch)
        keep = np.ones(len(keys), bool) if cfg.allow_trivial else nontrivial(batch)
        taken = np.union1d(taken, keys[keep & np.isin(keys, exclude)])
        keep &= ~np.isin(keys, seen)
        if dedup:
            first = np.zeros(len(keys), bool)
            first[np.unique(keys, return_index=True)[1]] = True
            keep &= first
        keep_rows = np.flatnonzero(keep)[: n - have]
        parts.append(batch.take(keep_rows))
        part_keys.append(keys[keep_rows])
        have += len(keep_rows)
        if dedup:
            seen = np.union1d(seen, keys[keep_rows])
        if have < n and drawn > 20 * n + 100_000:
            raise ValueError(_too_few_message(cfg, n, have, drawn, len(taken)))
    return concat(parts), np.concatenate(part_keys)


def _too_few_message(cfg: TaskConfig, n: int, have: int, drawn: int, taken: int) -> str:
    trivial = "" if cfg.allow_trivial else " non-trivial"
    return (
        f"{n} distinct{trivial} problems wanted, only {have} new ones found in {drawn} draws: this setting has too "
        f"few distinct problems (the draws held {have + taken} distinct ones, {taken} of them already in other splits; "
        "problems that differ only in the names of their variables count as one). Widen it (more variables or "
        "steps, wider init_values or constant ranges), ask for fewer samples, or allow duplicates "
        "(--allow_duplicates)."
    )


def heldout_configs(cfg: TaskConfig, more_steps: tuple[int, int] | None = None,
                    more_vars: tuple[int, int] | None = None) -> dict[str, TaskConfig]:
    """Generalisation settings beyond training: more steps, and more variables, than ``cfg`` draws."""
    steps = more_steps or (cfg.num_steps[1] + 1, cfg.num_steps[1] + 2)
    nvars = more_vars or (min(cfg.num_vars[1] + 1, MAX_VARS), min(cfg.num_vars[1] + 2, MAX_VARS))
    if steps[0] <= cfg.num_steps[1]:
        raise ValueError(f"heldout steps {steps}: must all exceed the training maximum num_steps={cfg.num_steps[1]}")
    if nvars[0] <= cfg.num_vars[1]:
        raise ValueError(f"heldout vars {nvars}: must all exceed the training maximum num_vars={cfg.num_vars[1]}")
    return {"test_more_steps": cfg.replace(num_steps=steps), "test_more_vars": cfg.replace(num_vars=nvars)}


def build_splits(cfg: TaskConfig, num_train: int, num_test: int, seed: int,
                 heldout: dict[str, TaskConfig] | None = None, num_heldout: int = 0,
                 dedup: bool = True, num_validation: int = 0) -> dict[str, tuple[ProblemBatch, np.ndarray]]:
    """``{split: (batch, keys)}``, all pairwise disjoint: test and held-out splits first, then validation
    (``cfg``, like train: for tuning, so that test stays unseen), then train; empty splits are left out.

    Validation comes after the evaluation splits, so adding it leaves test and held-out as they were.
    """
    rng = np.random.default_rng(seed)
    wanted = [("test", cfg, num_test)] + [(name, c, num_heldout) for name, c in (heldout or {}).items()]
    wanted += [("validation", cfg, num_validation), ("train", cfg, num_train)]
    splits, taken = {}, np.zeros(0, np.uint64)
    for name, split_cfg, size in wanted:
        if size <= 0:
            continue
        batch, keys = generate_unique(split_cfg, size, rng, taken, dedup=dedup)
        splits[name] = (batch, keys)
        taken = np.union1d(taken, keys)  # disjoint even with dedup off
    return splits


def to_table(batch: ProblemBatch, split: str, keys: np.ndarray | None = None, template: str = "chat",
             index_offset: int = 0, question_style: str = "full") -> pa.Table:
    """verl-schema rows of a batch (see the module docstring)."""
    if template not in TEMPLATES:
        raise ValueError(f"template={template!r}: valid templates are {list(TEMPLATES)}")
    if question_style not in QUESTION_STYLES:
        raise ValueError(f"question_style={question_style!r}: valid styles are {list(QUESTION_STYLES)}")
    n = len(batch)
    keys = canonical_keys(batch) if keys is None else keys
    question = render.questions(batch) if question_style == "full" else render.compact_questions(batch)
    content = question if template == "chat" else render.base_prompts(question)
    answer = render.answers(batch)
    message = pa.StructArray.from_arrays([pa.repeat("user", n), content], names=["role", "content"])
    prompt = pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32)), message)
    initial = render.states(batch.init, batch.num_vars, batch.modulus)
    ground_truth = pa.StructArray.from_arrays([answer, initial], names=["answer", "initial"])
    reward_model = pa.StructArray.from_arrays([pa.repeat("rule", n), ground_truth],
                                              names=["style", "ground_truth"])
    extra_info = pa.StructArray.from_arrays(
        [
            pa.repeat(split, n),
            pa.array(np.arange(index_offset, index_offset + n)),
            pa.array(batch.level.astype(np.int64)),
            pa.array(batch.num_vars.astype(np.int64)),
            pa.array(batch.num_steps.astype(np.int64)),
            pa.array(batch.inner_steps.astype(np.int64)),
            pa.array(["simultaneous", "sequential"]).take(batch.sequential.astype(np.int8)),
            pa.array(keys.astype(np.uint64)),
            render.solutions(batch, answer),
        ],
        names=["split", "index", "level", "num_vars", "num_steps", "inner_steps", "semantics", "key", "solution"],
    )
    return pa.table({
        "data_source": pa.repeat(DATA_SOURCE, n),
        "prompt": prompt,
        "ability": pa.repeat("reasoning", n),
        "reward_model": reward_model,
        "extra_info": extra_info,
    })


def write_parquet(table: pa.Table, path: str | Path) -> None:
    """Write atomically: a killed write never leaves a partial file under ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; give it the usual permissions
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ProblemStream:
    """An endless, seeded stream of problems for online training; resumable through ``state_dict``.

    Chunk c is drawn from ``default_rng([seed, c])``, so the stream is the same however it is
    consumed, and a restored state continues exactly where it stopped. Problems whose key is in
    ``exclude_keys`` (the test splits) are never produced, nor trivial ones unless the config allows.
    """

    def __init__(self, cfg: TaskConfig, seed: int = 0, chunk_size: int = 4096, exclude_keys: np.ndarray | None = None):
        if chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size}: need a positive chunk size")
        self.cfg, self.seed, self.chunk_size = cfg, seed, chunk_size
        self.exclude = np.unique(np.asarray(exclude_keys if exclude_keys is not None else [], np.uint64))
        self.chunk, self.offset = 0, 0
        self._buffer: ProblemBatch | None = None

    def _load_chunk(self) -> ProblemBatch:
        if self._buffer is None:
            batch = sample(self.cfg, self.chunk_size, np.random.default_rng([self.seed, self.chunk]))
            keep = ~np.isin(canonical_keys(batch), self.exclude)
            if not self.cfg.allow_trivial:
                keep &= nontrivial(batch)
            self._buffer = batch.take(keep)
        return self._buffer

    def next_batch(self, n: int) -> ProblemBatch:
        """The next n problems."""
        parts, need = [], n
        while need > 0:
            buffer = self._load_chunk()
            part = buffer.take(np.arange(self.offset, min(self.offset + need, len(buffer))))
            parts.append(part)
            need -= len(part)
            self.offset += len(part)
            if self.offset >= len(buffer):
                self._next_chunk()
        return concat(parts)

    def _next_chunk(self) -> None:
        self.chunk, self.offset, self._buffer = self.chunk + 1, 0, None

    def __iter__(self):
        """Problems one by one; ``state_dict()`` taken between two of them resumes at the next."""
        while True:
            buffer = self._load_chunk()
            while self.offset < len(buffer):
                self.offset += 1
                yield buffer.problem(self.offset - 1)
            self._next_chunk()

    def state_dict(self) -> dict:
        return {"seed": self.seed, "chunk": self.chunk, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed") != self.seed:
            raise ValueError(f"stream state has seed {state.get('seed')}, this stream {self.seed}: use the same seed")
        self.chunk, self.offset, self._buffer = int(state["chunk"]), int(state["offset"]), None
