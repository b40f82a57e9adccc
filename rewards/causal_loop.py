"""Reward for the causal-loop task, with verl's signature. Plain Python: no torch, no state.

    compute_score(data_source, solution_str, ground_truth, extra_info=None) -> {"score": float, …}

``solution_str`` is the model's response only (what verl passes), never prompt + response: the
prompt contains an example answer line and instruction text. The scheme (all weights configurable):

    no parseable answer                      0.0   (no / several <answer> blocks, malformed content)
    exactly right                            correct_score (1.0)
    otherwise                                format_score (0.1) if <think>…</think> comes before the answer
                                             + partial_credit (0.5) x fraction of the variables whose value
                                               changed from the initial state that the answer gets right,
                                               counted only when it names exactly the problem's variables

An answer block is exactly one ``<answer>…</answer>`` holding ``NAME=INT`` pairs separated by commas
(ASCII only, at most 20 digits a value, each name once). Variables that the rules leave unchanged earn
no partial credit, so echoing the initial state scores at most the format score. ``ground_truth`` is
``{"answer": "A=1, B=2", "initial": "A=3, B=0"}`` (as written by ``data.causal_loop``) or just the
answer string, in which case every variable counts for partial credit.

Parts returned beside ``score``: ``acc`` (1.0 if exactly right), ``format`` (1.0 for the requested
format, right or wrong) and ``partial`` (the fraction above). Every input gets a score in time linear
in its length; nothing raises.

>>> truth = {"answer": "A=5, B=3", "initial": "A=1, B=3"}
>>> compute_score("causal_loop", "<think>step 1: A=5, B=3</think><answer>A=5, B=3</answer>", truth)["score"]
1.0
>>> compute_score("causal_loop", "<think>copy</think><answer>A=1, B=3</answer>", truth)["score"]  # echo
0.1
>>> compute_score("causal_loop", "A=5, B=3", truth)["score"]  # no tags
0.0
"""

# No ``from __future__ import annotations`` here: verl loads a reward file with spec_from_file_location +
# exec_module and never puts it in sys.modules, and @dataclass with string annotations looks the class's
# module up in sys.modules (to spot ClassVar), which fails there. Real annotations need no look-up.
import re
from dataclasses import dataclass

# One assignment and a whole answer. The grammar is unambiguous (a comma between items, digits never
# matched by \s), so a backtracking engine still matches in linear time; the length cap bounds it further.
_PAIR = r"([A-Za-z_][A-Za-z0-9_]{0,15})\s*=\s*(-?[0-9]{1,20})"
_PAIRS = re.compile(_PAIR, re.ASCII)
_ANSWER = re.compile(rf"\s*{_PAIR}\s*(?:,\s*{_PAIR}\s*)*", re.ASCII)
_MAX_PAIRS = 64


@dataclass(frozen=True)
class RewardConfig:
    correct_score: float = 1.0
    format_score: float = 0.1
    partial_credit: float = 0.5
    max_answer_chars: int = 2048  # longer answer blocks are malformed (bounds the parsing work)

    def __post_init__(self) -> None:
        if not self.correct_score > self.format_score + self.partial_credit:
            raise ValueError(
                f"correct_score={self.correct_score} must exceed format_score + partial_credit = "
                f"{self.format_score + self.partial_credit}, or a wrong answer could outscore a right one"
            )
        if self.format_score < 0 or self.partial_credit < 0:
            raise ValueError("format_score and partial_credit must be >= 0")
        if self.max_answer_chars < 1:
            raise ValueError(f"max_answer_chars={self.max_answer_chars}: must be positive")


DEFAULT = RewardConfig()


def parse_assignments(text: str, max_chars: int = DEFAULT.max_answer_chars) -> dict[str, int] | None:
    """``"A=1, B=2"`` -> ``{"A": 1, "B": 2}``; None if malformed, too long, or a name appears twice.

    >>> parse_assignments("A=1, B = -2")
    {'A': 1, 'B': -2}
    >>> parse_assignments("A=1, A=2") is None
    True
    """
    if len(text) > max_chars or _ANSWER.fullmatch(text) is None:
        return None
    pairs = _PAIRS.findall(text)
    values = {name: int(value) for name, value in pairs}
    if len(values) != len(pairs) or len(pairs) > _MAX_PAIRS:
        return None
    return values


def _zero() -> dict[str, float]:
    return {"score": 0.0, "acc": 0.0, "format": 0.0, "partial": 0.0}


def _right(has_think: bool, cfg: RewardConfig) -> dict[str, float]:
    return {"score": cfg.correct_score, "acc": 1.0, "format": 1.0 if has_think else 0.0, "partial": 1.0}


def _split_truth(ground_truth) -> tuple:
    """(answer text, initial-state text or None) of a ground truth (a dict or the answer string)."""
    if type(ground_truth) is dict:
        return ground_truth.get("answer"), ground_truth.get("initial")
    return ground_truth, None


def _parse_truth(answer: str, initial) -> tuple[dict[str, int], frozenset[str]] | None:
    """(values, names that changed from the initial state), or None for a malformed ground truth."""
    values = parse_assignments(answer, max_chars=1 << 20)
    if values is None:
        return None
    start = parse_assignments(initial, max_chars=1 << 20) if isinstance(initial, str) else None
    return values, frozenset(k for k, v in values.items() if start is None or start.get(k) != v)


def _score_one(response, answer, initial, cfg: RewardConfig, cache: dict) -> dict[str, float]:
    """The whole scheme for one response. ``cache`` keeps parsed ground truths across calls of a batch."""
    if type(response) is not str or type(answer) is not str:
        return _zero()
    before, tag, after = response.partition("<answer>")
    content, close, rest = after.partition("</answer>")
    # Exactly one block: no second opening tag after the first, no closing tag outside the block.
    if not close or "<answer>" in after or "</answer>" in rest or "</answer>" in before:
        return _zero()
    has_think = "</think>" in before
    if content.strip() == answer:  # fast path: the answer exactly as the ground truth writes it
        return _right(has_think, cfg)
    got = parse_assignments(content, cfg.max_answer_chars)
    if got is None:
        return _zero()
    key = (answer, initial if isinstance(initial, str) else None)
    if key not in cache:
        cache[key] = _parse_truth(*key)
    truth = cache[key]
    if truth is None:
        return _zero()
    values, changed = truth
    if got == values:
        return _right(has_think, cfg)
    partial = 0.0
    if got.keys() == values.keys() and changed:
        partial = sum(got[k] == values[k] for k in changed) / len(changed)
    fmt = 1.0 if has_think else 0.0
    return {"score": cfg.format_score * fmt + cfg.partial_credit * partial, "acc": 0.0, "format": fmt,
            "partial": partial}


def _config(config: RewardConfig | None, overrides: dict) -> RewardConfig:
    cfg = config or DEFAULT
    if overrides:
        cfg = RewardConfig(**{**cfg.__dict__, **overrides})
    return cfg


def compute_score(data_source, solution_str, ground_truth, extra_info=None, config: RewardConfig | None = None,
                  **overrides) -> dict[str, float]:
    """Score one response (verl's signature). ``overrides`` set ``RewardConfig`` fields (verl reward_kwargs)."""
    return _score_one(solution_str, *_split_truth(ground_truth), _config(config, overrides), {})


def compute_score_batch(data_sources, solution_strs, ground_truths, extra_infos=None,
                        config: RewardConfig | None = None, **overrides) -> list[dict[str, float]]:
    """Score many responses: exactly ``[compute_score(...) for each]``, faster.

    Ground truths repeat (several samples per prompt), so each distinct one is parsed once per call,
    and only when a response needs it (a well-formed answer that differs from the expected text).
    """
    cfg = _config(config, overrides)
    if len(solution_strs) != len(ground_truths):
        raise ValueError(f"{len(solution_strs)} responses but {len(ground_truths)} ground truths: "
                         "pass one ground truth per response")
    cache: dict = {}
    scores = []
    for response, truth in zip(solution_strs, ground_truths, strict=True):
        if type(truth) is dict:  # inlined _split_truth: this loop is the hot path of scoring
            scores.append(_score_one(response, truth.get("answer"), truth.get("initial"), cfg, cache))
        else:
            scores.append(_score_one(response, truth, None, cfg, cache))
    return scores
