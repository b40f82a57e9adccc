"""Columnar text rendering: a whole ``ProblemBatch`` to Arrow string arrays.

Produces exactly the text of ``problem.py`` (the tests hold them equal). The generator's target
(250K problems/s with prompt text) leaves about 4 µs per problem, less than Python string
formatting of one prompt costs, so text is assembled from pieces: every piece (a rule line, a
``", B=7"``) is identified by an integer code, each distinct code is formatted once in Python with
the functions of ``problem.py``, and Arrow's ``take`` and one row-wise concatenation do the rest in
C++. Separators are baked into the pieces; padding (variables past ``num_vars``, unused rule slots,
steps past ``num_steps``) is a null piece and is skipped.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data.causal_loop.generator import OUTER, PAD, ProblemBatch
from data.causal_loop.problem import BASE_PREAMBLE, SEMANTICS_TEXT, VAR_NAMES, Rule


def _pieces(codes: np.ndarray, fmt: Callable[[int], str], pad: np.ndarray | None = None) -> list[pa.Array]:
    """(B, K) integer codes -> K string columns; each distinct code is formatted once; ``pad`` -> null."""
    encoded = pa.array(codes.reshape(-1)).dictionary_encode()
    table = pa.array([fmt(code) for code in encoded.dictionary.to_pylist()], pa.string())
    index = encoded.indices.to_numpy().reshape(codes.shape)
    return [table.take(pa.array(index[:, k], mask=None if pad is None else pad[:, k])) for k in range(codes.shape[1])]


def _concat(*columns: pa.Array | str) -> pa.Array:
    """Row-wise concatenation of string columns (and constant strings), null pieces skipped."""
    # pyarrow 26 drops rows whose pieces are all null under null_handling="skip" (the result comes back
    # shorter, misaligned); a leading constant piece keeps every row.
    return pc.binary_join_element_wise("", *columns, "", null_handling="skip")


def _state_pieces(values: np.ndarray, num_vars: np.ndarray, modulus: int) -> list[pa.Array]:
    """(B, V) values -> pieces ``"A=3"``, ``", B=7"``, … of ``format_state``."""
    v = np.arange(values.shape[1])
    codes = v * modulus + values.astype(np.int64)
    return _pieces(codes, lambda c: f"{', ' if c >= modulus else ''}{VAR_NAMES[c // modulus]}={c % modulus}",
                   pad=v >= num_vars[:, None])


def _rule_pieces(batch: ProblemBatch, numbered: bool = True) -> list[pa.Array]:
    """Rule lines ``"\\n1. B = B + A"`` of every slot, with the section headers baked into each first line
    (``numbered=False``: ``"\\nB = B + A"``, headers only for nested problems, as ``compact_question``)."""
    nested = (batch.phase == OUTER).any(axis=1)[:, None]
    outer = batch.phase == OUTER

    def count(mask: np.ndarray) -> np.ndarray:
        return np.cumsum(mask, axis=1, dtype=np.int16)

    number = np.where(outer, count(outer), count(~outer))  # 1-based position within its phase
    width, limit = batch.init.shape[1], int(batch.const.max()) + 1
    fields = (nested, outer, number, batch.op, batch.target, batch.source + 1, batch.const)
    radices = (2, 2, batch.op.shape[1] + 1, 6, width, width + 1, limit)
    code = np.zeros(batch.op.shape, np.int64)
    for value, radix in zip(fields, radices, strict=True):
        code = code * radix + value.astype(np.int64)

    def fmt(c: int) -> str:
        c, const = divmod(c, limit)
        c, source = divmod(c, width + 1)
        c, target = divmod(c, width)
        c, op = divmod(c, 6)
        c, number = divmod(c, batch.op.shape[1] + 1)
        is_nested, is_outer = divmod(c, 2)
        header = ""
        if number == 1 and (is_nested or numbered):
            header = ("Outer rules:\n" if is_outer else "Inner rules:\n") if is_nested else "Rules:\n"
        return f"\n{header}{f'{number}. ' if numbered else ''}{Rule(op, target, source - 1, const).text()}"

    return _pieces(code, fmt, pad=batch.op == PAD)


def _tail_pieces(batch: ProblemBatch, compact: bool = False) -> pa.Array:
    """Everything after the rules: the loop, the semantics, the modulus and the answer format (``compact``:
    the one line of ``compact_question``)."""
    nested = (batch.phase == OUTER).any(axis=1)
    fields = (nested, batch.sequential, batch.num_steps, batch.inner_steps, batch.num_vars)
    radices = (2, 2, 1 << 16, 1 << 16, 32)
    code = np.zeros(len(batch), np.int64)
    for value, radix in zip(fields, radices, strict=True):
        code = code * radix + value.astype(np.int64)

    def fmt(c: int) -> str:
        c, num_vars = divmod(c, 32)
        c, inner = divmod(c, 1 << 16)
        c, steps = divmod(c, 1 << 16)
        is_nested, sequential = divmod(c, 2)
        if compact:
            loop = f"{steps} times: inner {inner} times, then outer once" if is_nested else f"{steps} times"
            return f"\n{loop}, {'sequential' if sequential else 'simultaneous'}, modulo {batch.modulus}"
        loop = (f"Repeat {steps} times: apply the inner rules {inner} times, then the outer rules once."
                if is_nested else f"Apply all the rules {steps} times.")
        names = ", ".join(f"{VAR_NAMES[i]}=?" for i in range(num_vars))
        return (f"\n{loop} {SEMANTICS_TEXT['sequential' if sequential else 'simultaneous']} "
                f"All arithmetic is modulo {batch.modulus}.\n"
                f"What are the final values? Think inside <think> </think>, then answer inside <answer> </answer> "
                f"as: {names}")

    return _pieces(code[:, None], fmt)[0]


def questions(batch: ProblemBatch) -> pa.Array:
    """``Problem.question()`` of every row."""
    init = _state_pieces(batch.init, batch.num_vars, batch.modulus)
    return _concat("Variables: ", *init, *_rule_pieces(batch), _tail_pieces(batch))


def compact_questions(batch: ProblemBatch) -> pa.Array:
    """``Problem.compact_question()`` of every row."""
    init = _state_pieces(batch.init, batch.num_vars, batch.modulus)
    return _concat("", *init, *_rule_pieces(batch, numbered=False), _tail_pieces(batch, compact=True))


def base_prompts(question: pa.Array) -> pa.Array:
    """``Problem.base_prompt()`` from the questions."""
    return _concat(f"{BASE_PREAMBLE}User: ", question, "\nAssistant:")


def states(values: np.ndarray, num_vars: np.ndarray, modulus: int) -> pa.Array:
    """``format_state`` of every row of (B, V) ``values``: ``"A=1, B=2"``."""
    return _concat(*_state_pieces(values, num_vars, modulus))


def answers(batch: ProblemBatch) -> pa.Array:
    """``Problem.answer()`` of every row: the final state."""
    return states(batch.final, batch.num_vars, batch.modulus)


def solutions(batch: ProblemBatch, answer: pa.Array | None = None) -> pa.Array:
    """``Problem.solution()`` of every row: the initial state as step 0 and the state after every step in
    <think>, then the answer."""
    n_steps, width = batch.trace.shape[1] - 1, batch.init.shape[1]
    step = np.arange(0, n_steps + 1)[:, None]  # (N+1, 1)
    var = np.arange(width)[None, :]  # (1, V)
    values = batch.trace.astype(np.int64)  # (B, N+1, V)
    codes = ((step * width + var) * batch.modulus + values).reshape(len(batch), -1)
    pad = ((var >= batch.num_vars[:, None, None]) | (step > batch.num_steps[:, None, None])).reshape(len(batch), -1)

    def fmt(c: int) -> str:
        c, value = divmod(c, batch.modulus)
        n, v = divmod(c, width)
        return f"{'' if n == 0 else chr(10)}step {n}: {VAR_NAMES[v]}={value}" if v == 0 else \
            f", {VAR_NAMES[v]}={value}"

    answer = answers(batch) if answer is None else answer
    return _concat("<think>\n", *_pieces(codes, fmt, pad), "\n</think>\n<answer>", answer, "</answer>")
