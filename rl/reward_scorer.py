"""Calling a user's reward function safely. No Ray here (``rl.actors`` runs this inside a pool of actors).

A reward function that raises, hangs or returns garbage on one response gives that response a score of
0 and the error text, and the run goes on: the error is logged, never fatal.
"""

from __future__ import annotations

import math
import signal
import threading
from dataclasses import dataclass, field

from rewards.loading import load_reward_fn


@dataclass
class ScoredBatch:
    scores: list[float] = field(default_factory=list)
    parts: dict[str, list[float]] = field(default_factory=dict)  # named parts (e.g. acc, format), NaN if absent
    errors: list[str | None] = field(default_factory=list)

    def accuracy(self) -> list[float]:
        """Each response's ``acc`` part (0 where a response has none, e.g. its reward raised), or its score
        for reward functions that report no ``acc``."""
        return [0.0 if math.isnan(a) else a for a in self.parts.get("acc", self.scores)]

    def extend(self, other: ScoredBatch) -> None:
        n = len(self.scores)
        for name in set(self.parts) | set(other.parts):
            self.parts.setdefault(name, [math.nan] * n).extend(other.parts.get(name, [math.nan] * len(other.scores)))
        self.scores.extend(other.scores)
        self.errors.extend(other.errors)


class _Timeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise _Timeout()


class RewardRunner:
    def __init__(self, spec: str, kwargs: dict | None = None, timeout_s: float = 5.0):
        self.fn = load_reward_fn(spec)
        self.spec, self.kwargs, self.timeout_s = spec, kwargs or {}, timeout_s

    def _call(self, data_source, response, ground_truth, extra_info):
        # SIGALRM interrupts a hung call; it only works on the main thread (where Ray runs actor methods).
        if threading.current_thread() is not threading.main_thread():
            return self.fn(data_source, response, ground_truth, extra_info, **self.kwargs)
        previous = signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, self.timeout_s)
        try:
            return self.fn(data_source, response, ground_truth, extra_info, **self.kwargs)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

    def score(self, data_sources: list, responses: list[str], ground_truths: list,
              extra_infos: list | None = None) -> ScoredBatch:
        out = ScoredBatch()
        extra_infos = extra_infos or [None] * len(responses)
        for i, args in enumerate(zip(data_sources, responses, ground_truths, extra_infos, strict=True)):
            score, parts, error = self._one(*args)
            for name in set(out.parts) | set(parts):
                out.parts.setdefault(name, [math.nan] * i).append(parts.get(name, math.nan))
            out.scores.append(score)
            out.errors.append(error)
        return out

    def _one(self, *args) -> tuple[float, dict[str, float], str | None]:
        try:
            result = self._call(*args)
        except _Timeout:
            return 0.0, {}, f"timed out after {self.timeout_s} s"
        except Exception as e:  # a user's function: any failure scores 0 and is reported, never fatal
            return 0.0, {}, f"{type(e).__name__}: {e}"
        score = result.get("score") if isinstance(result, dict) else result
        if isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score):
            return 0.0, {}, f"returned {result!r}: need a finite number or a dict with a finite 'score'"
        parts = {k: float(v) for k, v in result.items()
                 if k != "score" and isinstance(v, int | float)} if isinstance(result, dict) else {}
        return float(score), parts, None
