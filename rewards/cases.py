"""What the reward checker (``python -m rewards.check``) feeds a reward function.

Three sets, all built from a problem's own ground truth so that they fit any causal-loop split:

    hostile_inputs(answer)   inputs no reward may raise on or score with a non-finite number
    fuzz_strategy(answers)   a hypothesis strategy over random strings and shuffled answer fragments
    sanity_cases(row, w)     the task's sanity table: the worked solution (must score correct_score) and
                             echoes, answerless responses and answer-block tricks, each with the most it
                             may score (its honest worth under the scheme of ``rewards.causal_loop``)

Ceilings are upper bounds, so a stricter reward (0/1 accuracy, say) passes them all; a lenient one that
pays a hedge, an echo or a look-alike more than it is worth does not.
"""

# No ``from __future__ import annotations``: like rewards/causal_loop.py, this file stays loadable by path.
import math
from typing import NamedTuple

from hypothesis import strategies as st

from rewards.causal_loop import parse_assignments

FULLWIDTH = {ord(str(d)): 0xFF10 + d for d in range(10)}  # '5' -> U+FF15, which int() and \d accept
CYRILLIC = str.maketrans("ABCEHKMOPTX", "\u0410\u0412\u0421\u0415\u041d\u041a\u041c\u041e\u0420\u0422\u0425")
TAGS = ["<answer>", "</answer>", "<think>", "</think>"]


class Weights(NamedTuple):
    """The scheme's weights, to state ceilings in: full marks, the format score, the partial-credit weight."""
    correct: float
    format: float
    partial: float


class Case(NamedTuple):
    kind: str            # its row in the sanity table
    response: object
    ceiling: float       # the most it may score
    exact: bool = False  # it must score exactly ``ceiling`` (a worked solution)


def hostile_inputs(answer: str) -> list[tuple[str, object]]:
    """(name, response) pairs; ``answer`` is a right answer, so look-alikes of it are the tempting ones."""
    block = f"<answer>{answer}</answer>"
    return [
        ("None", None), ("bytes", block.encode()), ("an int", 12345), ("a float NaN", math.nan), ("a list", [block]),
        ("empty string", ""), ("whitespace only", " \n\t"), ("NUL characters", "\x00" * 100),
        ("a megabyte of filler", "x" * 1_000_000), ("a megabyte of digits", "1" * 1_000_000),
        ("a megabyte of filler, then the answer", "x" * 1_000_000 + block),
        ("answer-tag flood", "<answer>" * 10_000), ("closing-tag flood", "</answer>" * 10_000),
        ("think-tag flood", "<think>" * 100_000),
        ("tag flood around the answer", "<answer>" * 10_000 + block + "</answer>" * 10_000),
        ("megabyte answer block", "<answer>" + "A=1, " * 200_000 + "</answer>"),
        ("100k-digit value", "<answer>A=" + "9" * 100_000 + "</answer>"),
        ("nested tags", f"<answer><think><answer>{answer}</think></answer>"),
        ("unclosed think", "<think>" + answer), ("unclosed answer", "<answer>" + answer),
        ("fullwidth digits", block.translate(FULLWIDTH)), ("Cyrillic look-alike letters", block.translate(CYRILLIC)),
        ("zero-width spaces", "\u200b".join(block)), ("byte-order mark", "\ufeff" + block),
        ("right-to-left override", "\u202e" + block), ("combining accents", block.replace("=", "\u0301=")),
        ("lone surrogate", "\ud800" + block),
        ("NaN values", "<answer>A=nan, B=NaN</answer>"), ("infinite values", "<answer>A=inf, B=-inf, C=1e309</answer>"),
        ("hex and float values", "<answer>A=0x10, B=1.5</answer>"), ("bare NaN", "NaN"), ("bare infinity", "-inf"),
    ]


def fuzz_strategy(answers: list[str]) -> st.SearchStrategy:
    """Random text, non-strings, and strings glued from tags and the answers' own ``NAME=VALUE`` pairs
    (random text alone almost never forms an answer block, so it would never reach the parser)."""
    pairs = sorted({p.strip() for a in answers for p in a.split(",")})
    fragments = TAGS + pairs + ["=", ", ", ",", " ", "\n", "-", "\u200b", "\uff15", "\u0410", "nan", "9" * 25]
    glued = st.lists(st.sampled_from(fragments), max_size=40).map("".join)
    return st.one_of(st.text(max_size=200), glued, st.none(), st.binary(max_size=64), st.integers(), st.floats())


def _fmt(values: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items())


def _causal_truth(ground_truth) -> tuple[dict[str, int], dict[str, int] | None] | None:
    """(answer values, initial values or None) of a causal-loop ground truth; None for any other task."""
    answer, initial = (ground_truth.get("answer"), ground_truth.get("initial")) if isinstance(ground_truth, dict) \
        else (ground_truth, None)
    values = parse_assignments(answer, max_chars=1 << 20) if isinstance(answer, str) else None
    if not values:
        return None
    return values, parse_assignments(initial, max_chars=1 << 20) if isinstance(initial, str) else None


def _prompt_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(m.get("content", "") for m in prompt or [] if isinstance(m, dict))


def sanity_cases(row: dict, w: Weights) -> list[Case]:
    """The sanity table for one verl-schema row: its worked solution (``extra_info["solution"]``), responses
    without an answer, and, for a causal-loop ground truth, the answer-block tricks."""
    solution = (row.get("extra_info") or {}).get("solution")
    think = solution.partition("<answer>")[0] if isinstance(solution, str) else "<think>\nworking\n</think>\n"
    cases = [Case("worked solution", solution, w.correct, exact=True)] if isinstance(solution, str) else []
    cases += [
        Case("reasoning only, no answer block", think, w.format),
        Case("empty response", "", w.format),
        Case("the prompt echoed", _prompt_text(row.get("prompt")), w.format),
    ]
    truth = _causal_truth((row.get("reward_model") or {}).get("ground_truth"))
    return cases + (answer_tricks(*truth, think, w) if truth else [])


def answer_tricks(values: dict[str, int], initial: dict[str, int] | None, think: str, w: Weights) -> list[Case]:
    """Responses that game an answer block. Ambiguous or malformed answers may earn the format score at
    most; answers that are not exactly right stay below full marks; wrong values earn what they are worth."""
    right, wrong = _fmt(values), _fmt({k: v + 1 for k, v in values.items()})
    first, last = next(iter(values)), list(values)[-1]
    extra = next(n for n in ("Z", "Y", "X_1") if n not in values)

    def block(content: str) -> str:
        return f"{think}<answer>{content}</answer>"

    cases = [
        Case("answer outside the tags", think + right, w.format),
        Case("two answer blocks, wrong then right", block(wrong) + f"<answer>{right}</answer>", w.format),
        Case("two answer blocks, right then wrong", block(right) + f"<answer>{wrong}</answer>", w.format),
        Case("nested answer tags", block(f"<answer>{right}</answer>"), w.format),
        Case("unclosed answer tag", f"{think}<answer>{right}", w.format),
        Case("answer-tag flood before the answer", "<answer>" * 1000 + block(right), w.format),
        Case("a variable named twice (hedged values)", block(f"{first}={values[first] + 1}, {right}"), w.format),
        Case("fullwidth digits", block(right.translate(FULLWIDTH)), w.format),
        Case("zero-width spaces in the answer", block(right.replace("=", "=\u200b")), w.format),
        Case("extra variable", block(f"{right}, {extra}=0"), w.format + w.partial),
    ]
    if right.translate(CYRILLIC) != right:
        cases.append(Case("Cyrillic look-alike names", block(right.translate(CYRILLIC)), w.format))
    if len(values) > 1:
        cases.append(Case("missing variable", block(_fmt({k: v for k, v in values.items() if k != last})),
                          w.format + w.partial))
    return cases + _value_tricks(values, initial, block, w)


def _value_tricks(values: dict[str, int], initial: dict[str, int] | None, block, w: Weights) -> list[Case]:
    """Echoes and wrong values. Only variables the rules change earn partial credit (an echo gets the
    unchanged ones right for free); a trivial problem (nothing changes) has no wrong echo to test."""
    changed = [k for k in values if initial is None or initial.get(k) != values[k]]
    if not changed:
        return []
    one_wrong = changed[0]

    def worth(got: dict[str, int]) -> float:  # the scheme's pay for a well-formed answer after reasoning
        return w.format + w.partial * sum(got[k] == values[k] for k in changed) / len(changed)

    # Congruent modulo 100 (and any divisor of 10**24): a reward comparing values modulo the task's modulus pays it.
    huge = {**values, one_wrong: values[one_wrong] + 10**24}
    off = {**values, one_wrong: values[one_wrong] + 1}
    cases = [Case("huge number congruent to the answer", block(_fmt(huge)), worth(huge)),
             Case("one changed variable wrong", block(_fmt(off)), worth(off))]
    if initial is not None and initial.keys() == values.keys():
        cases += [Case("echo of the initial state", block(_fmt(initial)), w.format),
                  Case("echo of the initial state, no reasoning", f"<answer>{_fmt(initial)}</answer>", w.format)]
    return cases
