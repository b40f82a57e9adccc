"""Check a reward function before training with it, on the problems it will score.

    python -m rewards.check rewards.causal_loop:compute_score                  # all checks (exit 1 if one fails)
    python -m rewards.check my_rewards.py:compute_score --data outputs/data/causal_loop/test.parquet
    python -m rewards.check rewards/causal_loop.py:compute_score --explain '<think>..</think><answer>A=1</answer>'
    python -m rewards.check my_rewards.py:compute_score --compare rewards.causal_loop:compute_score
    python -m rewards.check rewards.causal_loop:compute_score --responses outputs/run

The function is named as the trainer names it: ``pkg.module:fn``, ``pkg://pkg.module:fn`` or ``file.py:fn``
(a file is loaded the way verl loads one, outside ``sys.modules``). Problems come from ``--data`` (a
verl-schema parquet) or are generated in-process with ``data.causal_loop``. Checks, one verdict line each:

    robust       hostile inputs (None, bytes, megabyte strings, look-alikes, tag floods, ...) and hypothesis
                 fuzzing: the function never raises and always returns a finite score
    determinism  every sample response scores the same on a second pass, made in reverse order
    timing       median and worst time per call over the sample responses; FAIL if the median is over --max-ms
    sanity       worked solutions score --correct-score; echoes, answerless responses and answer-block tricks
                 score no more than their honest worth (the table in rewards/cases.py)

``--explain`` prints the parts of one score, ``--compare`` lists the responses two functions score
differently (exit 1 if any), ``--responses RUN_DIR`` re-scores what a run's policy wrote.
"""

# No ``from __future__ import annotations``, as in rewards/causal_loop.py.
import argparse
import functools
import json
import math
import numbers
import signal
import statistics
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from rewards import cases
from rewards.causal_loop import DEFAULT
from rewards.loading import load_reward_fn

CHECKS = ("robust", "determinism", "timing", "sanity")
CALL_TIMEOUT_S = 10.0  # one call longer than this is a hang: reported, and the check goes on
HOSTILE_LIMIT_S = 1.0  # a megabyte input may take a while, not this long: reward workers would stall on it
VERL_COLUMNS = ("data_source", "prompt", "reward_model", "extra_info")
TOLERANCE = 1e-9


class Outcome(NamedTuple):
    result: object       # what the function returned (None if it raised)
    score: float | None  # its finite score, or None
    error: str | None    # why there is no score: raised, hung, or returned something that is not a score
    seconds: float


class Verdict(NamedTuple):
    ok: bool
    check: str
    reason: str                  # one line, with the offending input shortened
    details: tuple[str, ...] = ()  # further failures, a line each


def short(value: object, width: int = 80) -> str:
    """An input as one printable line of about ``width`` characters: ``ascii`` shows look-alikes and
    zero-width characters as escapes; a long input keeps its head and its tail (where the answer block
    is) and says how long it was.

    >>> print(short("<think>" + "x" * 1000 + "</think><answer>A=1</answer>", 60))
    '<think>xxxxxx...hink><answer>A=1</answer>' (1,035 chars)
    """
    text = ascii(value)
    if len(text) <= width:
        return text
    size = f"{len(value):,} chars" if isinstance(value, str | bytes) else f"{len(text):,} chars of repr"
    tail = (width - 20) * 2 // 3
    return f"{text[:width - 20 - tail]}...{text[-tail:]} ({size})"


# ---- problems and calls ----------------------------------------------------------------------------------

def load_problems(data: Path | None, num: int, seed: int) -> tuple[list[dict], str]:
    """(verl-schema rows, where they came from): the first ``num`` rows of ``data``, or ``num`` distinct,
    non-trivial problems generated with the task's default config."""
    if data is not None:
        import pyarrow.parquet as pq  # only this path needs pyarrow

        if not data.is_file():
            raise ValueError(f"--data {data}: no such file; write one with python -m data.causal_loop --local_dir DIR")
        table = pq.read_table(data)
        missing = sorted(set(VERL_COLUMNS) - set(table.column_names))
        if missing:
            raise ValueError(f"--data {data}: missing verl columns {missing}; have {table.column_names}")
        if table.num_rows == 0:
            raise ValueError(f"--data {data}: no rows")
        return table.slice(0, num).to_pylist(), str(data)
    import numpy as np

    from data.causal_loop import TaskConfig, generate_unique, to_table

    batch, keys = generate_unique(TaskConfig(), num, np.random.default_rng(seed), np.zeros(0, np.uint64))
    return to_table(batch, "check", keys).to_pylist(), f"data.causal_loop TaskConfig() defaults, seed {seed}"


def answer_of(row: dict) -> str:
    truth = (row.get("reward_model") or {}).get("ground_truth")
    answer = truth.get("answer") if isinstance(truth, dict) else truth
    return answer if isinstance(answer, str) else str(answer)


def score_of(result: object) -> float:
    """The score in a reward's result; ValueError unless it is a finite number or a dict holding one."""
    value = result.get("score") if isinstance(result, dict) else result
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"returned {short(result, 60)}: want a float, or a dict with a float 'score'")
    if not math.isfinite(value):
        raise ValueError(f"returned score {value}: a score must be finite")
    return float(value)


class _Hung(BaseException):  # not an Exception: a reward's own `except Exception` must not swallow it
    pass


def _raise_hung(signum, frame):
    raise _Hung()


@contextmanager
def _time_limit(seconds: float):
    """Interrupt a call that runs past ``seconds`` (SIGALRM: main thread only; elsewhere no limit)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGALRM, _raise_hung)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def call(fn: Callable, row: dict, response: object) -> Outcome:
    """One call with verl's arguments, timed; an exception, a hang or a non-score becomes ``error``."""
    args = (row["data_source"], response, row["reward_model"]["ground_truth"], row.get("extra_info"))
    start = time.perf_counter()
    try:
        with _time_limit(CALL_TIMEOUT_S):
            start = time.perf_counter()  # the call alone, not the timer's set-up
            result = fn(*args)
            seconds = time.perf_counter() - start
    except _Hung:
        return Outcome(None, None, f"hung for more than {CALL_TIMEOUT_S:g} s", time.perf_counter() - start)
    except Exception as e:  # the function under test: any failure is the finding, reported with its input
        return Outcome(None, None, f"raised {type(e).__name__}: {short(str(e), 60)}", time.perf_counter() - start)
    try:
        return Outcome(result, score_of(result), None, seconds)
    except ValueError as e:
        return Outcome(result, None, str(e), seconds)


def fingerprint(outcome: Outcome) -> str:
    """What two calls must agree on to count as the same score: the whole result, or the kind of failure."""
    return outcome.error.split(":")[0] if outcome.error else repr(outcome.result)


def describe(outcome: Outcome) -> str:
    return outcome.error if outcome.error else f"{outcome.score:.4g}"


# ---- the checks ------------------------------------------------------------------------------------------

def check_hostile(fn: Callable, row: dict) -> Verdict:
    """Every hostile input scores finitely, without raising, in under ``HOSTILE_LIMIT_S``."""
    inputs = cases.hostile_inputs(answer_of(row))
    failures, slowest = [], (0.0, "")
    for name, response in inputs:
        out = call(fn, row, response)
        if out.error or out.seconds > HOSTILE_LIMIT_S:
            why = out.error or f"took {out.seconds:.2f} s (limit {HOSTILE_LIMIT_S:g} s)"
            failures.append(f"{name} {short(response, 50)}: {why}")
        slowest = max(slowest, (out.seconds, name))
    # verl passes extra_info=None for rows that have none
    solution = (row.get("extra_info") or {}).get("solution", f"<answer>{answer_of(row)}</answer>")
    out = call(fn, {**row, "extra_info": None}, solution)
    if out.error:
        failures.append(f"extra_info=None with {short(solution, 50)}: {out.error}")
    if failures:
        return Verdict(False, "robust", f"{len(failures)} of {len(inputs) + 1} hostile inputs fail; first: "
                       f"{failures[0]}", tuple(failures[1:5]))
    return Verdict(True, "robust", f"{len(inputs) + 1} hostile inputs (None, bytes, megabyte strings, look-alikes, "
                   f"tag floods, NaN text) score finitely; slowest {slowest[1]!r} {slowest[0] * 1e3:.1f} ms")


def check_fuzz(fn: Callable, rows: list[dict], examples: int, seed: int, shrink_s: float = 2.0) -> Verdict:
    """Hypothesis draws responses (``cases.fuzz_strategy``) against the first problems; any error fails.
    Shrinking runs for at most ``shrink_s`` after the first failure; the shortest failing input is reported."""
    from hypothesis import HealthCheck, Phase, Verbosity, given, settings
    from hypothesis import seed as fixed_seed
    from hypothesis import strategies as st

    pool, found, start = rows[:16], [], time.perf_counter()

    @fixed_seed(seed)
    @settings(max_examples=examples, deadline=None, database=None, verbosity=Verbosity.quiet,
              suppress_health_check=list(HealthCheck), phases=(Phase.generate, Phase.shrink))
    @given(st.sampled_from(pool), cases.fuzz_strategy([answer_of(r) for r in pool]))
    def probe(row: dict, response: object) -> None:
        if found and time.perf_counter() - found[0][2] > shrink_s:
            return  # enough shrinking: hypothesis keeps the smallest failure it has
        out = call(fn, row, response)
        if out.error:
            found.append((response, out.error, time.perf_counter()))
            raise AssertionError(out.error)

    try:
        probe()
    except Exception:  # the failure hypothesis replays, or its report that the replay passed; `found` has it all
        pass
    seconds = time.perf_counter() - start
    if found:
        response, error, _ = min(found, key=lambda f: len(ascii(f[0])))
        return Verdict(False, "robust", f"fuzzing found {short(response)}: {error}")
    return Verdict(True, "robust", f"{examples} hypothesis examples in {seconds:.1f} s: none raised or returned "
                   "a non-finite score")


def run_calls(fn: Callable, calls: list[tuple[dict, cases.Case]], reverse: bool = False) -> list[Outcome]:
    order = range(len(calls) - 1, -1, -1) if reverse else range(len(calls))
    outcomes = {i: call(fn, calls[i][0], calls[i][1].response) for i in order}
    return [outcomes[i] for i in range(len(calls))]


def check_determinism(calls: list[tuple[dict, cases.Case]], first: list[Outcome], second: list[Outcome]) -> Verdict:
    """``second`` is the same calls made again in reverse order: a result that depends on state, time or
    randomness differs."""
    diffs = [i for i, (a, b) in enumerate(zip(first, second, strict=True)) if fingerprint(a) != fingerprint(b)]
    if not diffs:
        return Verdict(True, "determinism", f"{len(calls)} responses score the same on a second pass in reverse order")
    i = diffs[0]
    return Verdict(False, "determinism", f"{len(diffs)}/{len(calls)} responses scored differently on a second call "
                   f"({describe(first[i])}, then {describe(second[i])}), e.g. {calls[i][1].kind}: "
                   f"{short(calls[i][1].response)}")


def check_timing(calls: list[tuple[dict, cases.Case]], first: list[Outcome], max_ms: float) -> Verdict:
    """Median and worst time of a call over the sample responses; a median over ``max_ms`` fails: verl calls
    the reward once per response, on the rollout's critical path."""
    ms = [o.seconds * 1e3 for o in first]
    median, worst = statistics.median(ms), max(range(len(ms)), key=ms.__getitem__)
    reason = (f"median {median:.3f} ms, worst {ms[worst]:.3f} ms ({calls[worst][1].kind}) over {len(ms)} calls; "
              f"limit {max_ms:g} ms median")
    return Verdict(median <= max_ms, "timing", reason if median <= max_ms else f"too slow: {reason}")


def check_sanity(calls: list[tuple[dict, cases.Case]], first: list[Outcome]) -> list[Verdict]:
    """One verdict per row of the sanity table (``cases.sanity_cases``), over all problems."""
    by_kind: dict[str, list[int]] = defaultdict(list)
    for i, (_, case) in enumerate(calls):
        by_kind[case.kind].append(i)
    return [_sanity_row(kind, [calls[i][1] for i in idx], [first[i] for i in idx]) for kind, idx in by_kind.items()]


def _sanity_row(kind: str, rows: list[cases.Case], outcomes: list[Outcome]) -> Verdict:
    def fine(case: cases.Case, out: Outcome) -> bool:
        if out.score is None:
            return False
        return abs(out.score - case.ceiling) <= TOLERANCE if case.exact else out.score <= case.ceiling + TOLERANCE

    bad = [j for j, (case, out) in enumerate(zip(rows, outcomes, strict=True)) if not fine(case, out)]
    want = "want exactly" if rows[0].exact else "ceiling"
    if bad:
        j = bad[0]
        return Verdict(False, "sanity", f"{kind}: {len(bad)}/{len(rows)} problems score {describe(outcomes[j])} "
                       f"({want} {rows[j].ceiling:g}), e.g. {short(rows[j].response)}")
    ceilings = sorted({round(c.ceiling, 6) for c in rows})
    limit = f"{ceilings[0]:.3g}" if len(ceilings) == 1 else f"its honest worth, {ceilings[0]:.3g} to {ceilings[-1]:.3g}"
    lo, hi = min(o.score for o in outcomes), max(o.score for o in outcomes)
    got = f"{lo:.3g} on all" if lo == hi else f"{lo:.3g} to {hi:.3g} over"
    return Verdict(True, "sanity", f"{kind}: {got} {len(rows)} problems ({want} {limit})")


def run_checks(fn: Callable, rows: list[dict], args: argparse.Namespace) -> list[Verdict]:
    selected = set(args.checks)
    w = cases.Weights(args.correct_score, args.format_score, args.partial_credit)
    verdicts = [check_hostile(fn, rows[0]), check_fuzz(fn, rows, args.fuzz_examples, args.seed)] \
        if "robust" in selected else []
    calls = [(row, case) for row in rows for case in cases.sanity_cases(row, w)]
    first = run_calls(fn, calls)
    if "determinism" in selected:
        verdicts.append(check_determinism(calls, first, run_calls(fn, calls, reverse=True)))
    if "timing" in selected:
        verdicts.append(check_timing(calls, first, args.max_ms))
    if "sanity" in selected:
        verdicts += check_sanity(calls, first)
    return verdicts


def print_verdicts(verdicts: list[Verdict]) -> int:
    for v in verdicts:
        print(f"{'PASS' if v.ok else 'FAIL'}  {v.check:<12} {v.reason}")
        for line in v.details:
            print(f"      {'':<12} also: {line}")
    failed = sum(not v.ok for v in verdicts)
    print(f"{len(verdicts) - failed} passed, {failed} failed")
    return 1 if failed else 0


# ---- one score, two functions, a run's responses -----------------------------------------------------------

def explain(fn: Callable, row: dict, response: object) -> int:
    """Print the parts of one score: the result's fields, each on a line."""
    print(f"ground truth  {json.dumps(row['reward_model']['ground_truth'], default=str)}")
    print(f"response      {short(response, 200)}")
    out = call(fn, row, response)
    if out.error:
        print(f"error         {out.error}")
        return 1
    parts = out.result if isinstance(out.result, dict) else {"score": out.result}
    for name, value in parts.items():
        print(f"{name:<14}{value:.6g}" if isinstance(value, float) else f"{name:<14}{value!r}")
    print(f"{'time':<14}{out.seconds * 1e3:.3f} ms")
    return 0


def compare(fn: Callable, other: Callable, responses: list[tuple[dict, str, object]], show: int) -> int:
    """Score ``(row, kind, response)`` with both functions; list where the scores differ (exit 1 if anywhere)."""
    diffs, counts = [], defaultdict(lambda: [0, 0])
    for row, kind, response in responses:
        a, b = call(fn, row, response), call(other, row, response)
        same = (a.score is None and b.score is None) or (
            a.score is not None and b.score is not None and abs(a.score - b.score) <= TOLERANCE)
        counts[kind][0] += 1
        if not same:
            counts[kind][1] += 1
            diffs.append((kind, a, b, response))
    print(f"{len(responses)} responses, {len(diffs)} scored differently")
    differing = {kind: nd for kind, nd in counts.items() if nd[1]}
    if differing:
        print(f"{'kind':<42} {'n':>6} {'differ':>7}")
        for kind, (n, d) in differing.items():
            print(f"{kind:<42} {n:>6} {d:>7}")
    agreeing = [n for kind, (n, _) in counts.items() if kind not in differing]
    print(f"{len(agreeing)} {'other ' if differing else ''}kinds ({sum(agreeing)} responses) score the same")
    for kind, a, b, response in diffs[:show]:
        print(f"  {kind}: {describe(a)} vs {describe(b)}  {short(response)}")
    return 1 if diffs else 0


def sample_responses(rows: list[dict], w: cases.Weights) -> list[tuple[dict, str, object]]:
    """Worked solutions, perturbed and tricked answers for every problem, hostile inputs for the first."""
    out = [(row, case.kind, case.response) for row in rows for case in cases.sanity_cases(row, w)]
    return out + [(rows[0], "hostile input", r) for _, r in cases.hostile_inputs(answer_of(rows[0]))]


def read_samples(path: Path) -> list[dict]:
    """``samples.jsonl``: one object a line with step, data_source, prompt, response, ground_truth,
    extra_info, score and parts (the driver's record of what the policy wrote and what it scored)."""
    if not path.is_file():
        raise ValueError(f"{path}: no such file (a run writes its recorded responses there)")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e})") from e
        missing = [k for k in ("data_source", "response", "ground_truth") if k not in record]
        if missing:
            raise ValueError(f"{path}:{n}: missing {missing}; a sample needs data_source, response, ground_truth")
        rows.append(record)
    return rows


def as_row(sample: dict) -> dict:
    """A recorded sample as the verl-schema row ``call`` takes."""
    return {"data_source": sample["data_source"], "prompt": sample.get("prompt"),
            "reward_model": {"ground_truth": sample["ground_truth"]}, "extra_info": sample.get("extra_info")}


def rescore_samples(fn: Callable, samples: list[dict]) -> None:
    """Table by level: recorded mean score, the new function's mean score, and how often the two agree.
    A response the new function fails on scores 0, as the trainer's ``RewardRunner`` scores it."""
    groups: dict[object, list[tuple[float, float]]] = defaultdict(list)
    errors = 0
    for sample in samples:
        out = call(fn, as_row(sample), sample["response"])
        errors += out.score is None
        recorded = sample.get("score")
        recorded = float(recorded) if isinstance(recorded, numbers.Real) else math.nan
        level = (sample.get("extra_info") or {}).get("level", "?")
        groups[level].append((recorded, 0.0 if out.score is None else out.score))
    print(f"{'level':<7} {'n':>6} {'recorded':>9} {'new':>9} {'agree':>7}")
    everything = [pair for level in groups for pair in groups[level]]
    for level, pairs in [*sorted(groups.items(), key=lambda kv: str(kv[0])), ("all", everything)]:
        recorded = [r for r, _ in pairs if not math.isnan(r)]
        agree = [abs(r - s) <= TOLERANCE for r, s in pairs if not math.isnan(r)]
        mean_recorded = f"{statistics.fmean(recorded):.3f}" if recorded else "n/a"
        rate = f"{sum(agree) / len(agree):.3f}" if agree else "n/a"
        print(f"{level!s:<7} {len(pairs):>6} {mean_recorded:>9} {statistics.fmean(s for _, s in pairs):>9.3f} "
              f"{rate:>7}")
    if errors:
        print(f"{errors} responses made the function fail (scored 0 here); run the checks to see why")


def show_evals(path: Path) -> None:
    """An older ``evals/step_N.json`` without responses: per-problem greedy and sampled accuracy of each held-out
    set. It cannot be re-scored: this prints what it recorded."""
    records = json.loads(path.read_text())
    print(f"{path}: recorded accuracy by level (evals files hold no responses, so they are not re-scored)")
    print(f"{'set':<20} {'level':>5} {'n':>6} {'greedy acc':>11} {'sampled acc':>12}")
    for name, rec in records.items():
        by_level: dict[object, list[int]] = defaultdict(list)
        for i, level in enumerate(rec.get("level", [None] * len(rec["acc"]))):
            by_level[level].append(i)
        for level, idx in sorted(by_level.items(), key=lambda kv: str(kv[0])):
            greedy = statistics.fmean(rec["acc"][i] for i in idx)
            sampled = statistics.fmean(rec["acc_sampled"][i] for i in idx) if "acc_sampled" in rec else math.nan
            print(f"{name:<20} {level!s:>5} {len(idx):>6} {greedy:>11.3f} {sampled:>12.3f}")


def eval_samples(path: Path) -> list[dict]:
    """The greedy responses an ``evals/step_N.json`` recorded (written with them since the held-out evaluation
    keeps response, ground_truth, data_source and score per problem), as samples; [] for an older file."""
    records = json.loads(path.read_text())
    samples = []
    for rec in records.values():
        if not all(k in rec for k in ("response", "ground_truth", "data_source")):
            return []
        for i, response in enumerate(rec["response"]):
            samples.append({"data_source": rec["data_source"][i], "response": response,
                            "ground_truth": rec["ground_truth"][i], "score": rec.get("score", [None] * (i + 1))[i],
                            "extra_info": {"level": rec.get("level", [None] * (i + 1))[i]}})
    return samples


def rescore_run(fn: Callable, spec: str, run_dir: Path) -> int:
    samples_path = run_dir / "samples.jsonl"
    evals = sorted((run_dir / "evals").glob("step_*.json"))
    if not samples_path.is_file() and not evals:
        raise ValueError(f"--responses {run_dir}: no samples.jsonl or evals/step_*.json there; pass a run directory")
    if samples_path.is_file():
        samples = read_samples(samples_path)
        steps = sorted({s.get("step") for s in samples if isinstance(s.get("step"), int)})
        span = f", steps {steps[0]}-{steps[-1]}" if steps else ""
        print(f"re-scored {len(samples)} responses from {samples_path}{span} with {spec}")
        if samples:
            rescore_samples(fn, samples)
    if evals:
        recorded = eval_samples(evals[-1])
        if recorded:
            print(f"re-scored the {len(recorded)} greedy held-out responses of {evals[-1]} with {spec}")
            rescore_samples(fn, recorded)
        else:
            show_evals(evals[-1])
    return 0


# ---- command line ----------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m rewards.check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reward", help="the function: pkg.module:fn, pkg://pkg.module:fn or path/file.py:fn")
    p.add_argument("--data", type=Path, help="a verl-schema parquet split (default: problems generated in-process)")
    p.add_argument("--num", type=int, default=50, help="problems to use (default 50)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated problems and of the fuzzing")
    p.add_argument("--checks", type=lambda s: s.split(","), default=list(CHECKS),
                   help=f"comma-separated subset of {','.join(CHECKS)} (default all)")
    p.add_argument("--fuzz-examples", type=int, default=400, help="hypothesis examples (default 400, about 1 s)")
    p.add_argument("--max-ms", type=float, default=5.0, help="timing fails above this median ms a call (default 5)")
    p.add_argument("--correct-score", type=float, default=DEFAULT.correct_score,
                   help="what a worked solution must score (default %(default)s)")
    p.add_argument("--format-score", type=float, default=DEFAULT.format_score,
                   help="the most a wrong or answerless response may earn (default %(default)s)")
    p.add_argument("--partial-credit", type=float, default=DEFAULT.partial_credit,
                   help="weight of the fraction of changed variables right (default %(default)s)")
    p.add_argument("--explain", metavar="RESPONSE", help="print the parts of this response's score ('-': stdin)")
    p.add_argument("--ground-truth", help="for --explain: JSON ({\"answer\": ..., \"initial\": ...}) or the "
                   "answer text (default: the first problem's)")
    p.add_argument("--compare", metavar="OTHER", help="another function: list the responses the two score differently")
    p.add_argument("--responses", type=Path, metavar="RUN_DIR", help="re-score a run's samples.jsonl, by level")
    p.add_argument("--show", type=int, default=10, help="disagreements --compare prints (default 10)")
    p.add_argument("--reward-kwargs", type=json.loads, default={}, metavar="JSON",
                   help="keyword arguments for the function, as verl's custom_reward_function.reward_kwargs")
    args = p.parse_args(argv)
    if not isinstance(args.reward_kwargs, dict):
        p.error(f"--reward-kwargs {args.reward_kwargs!r}: write a JSON object, e.g. '{{\"format_score\": 0.2}}'")
    unknown = sorted(set(args.checks) - set(CHECKS))
    if unknown:
        p.error(f"--checks {','.join(unknown)}: unknown; valid checks are {','.join(CHECKS)}")
    if args.num < 1 or args.fuzz_examples < 1 or args.max_ms <= 0:
        p.error(f"--num {args.num}, --fuzz-examples {args.fuzz_examples}, --max-ms {args.max_ms:g}: must be positive")
    return args


def _ground_truth(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # the answer string itself


def _explain_row(args: argparse.Namespace) -> dict:
    if args.ground_truth is None:
        return load_problems(args.data, 1, args.seed)[0][0]
    return {"data_source": "causal_loop", "prompt": None, "extra_info": None,
            "reward_model": {"style": "rule", "ground_truth": _ground_truth(args.ground_truth)}}


def dispatch(args: argparse.Namespace) -> int:
    fn = functools.partial(load_reward_fn(args.reward), **args.reward_kwargs)  # verl merges them into every call
    if args.explain is not None:
        return explain(fn, _explain_row(args), sys.stdin.read() if args.explain == "-" else args.explain)
    if args.compare:
        other = load_reward_fn(args.compare)
        if args.responses:
            responses = [(as_row(s), f"level {(s.get('extra_info') or {}).get('level', '?')}", s["response"])
                         for s in read_samples(args.responses / "samples.jsonl")]
        else:
            w = cases.Weights(args.correct_score, args.format_score, args.partial_credit)
            responses = sample_responses(load_problems(args.data, args.num, args.seed)[0], w)
        print(f"{args.reward} vs {args.compare}")
        return compare(fn, other, responses, args.show)
    if args.responses:
        return rescore_run(fn, args.reward, args.responses)
    rows, source = load_problems(args.data, args.num, args.seed)
    print(f"checking {args.reward} on {len(rows)} problems ({source})")
    return print_verdicts(run_checks(fn, rows, args))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return dispatch(args)
    except ValueError as e:  # bad input: a reward that does not load, a missing file; say which and how to fix
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
