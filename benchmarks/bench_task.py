"""Speed of the task layer against named peers, in one process. Prints each figure and the ratio.

    python -m benchmarks.bench_task            # all three
    python -m benchmarks.bench_task --only score

1. generation in memory (levels 1-4 mixed, prompt text included):
   ours  = sample() + render.questions() on a batch,
   peer  = row-at-a-time Python, the way per-problem generators work: Problem.solve() + Problem.question()
           for each problem (its random sampling is not even counted, which favours the peer).
2. dataset to parquet, 100K train + 1K test:
   ours  = python -m data.causal_loop in a subprocess (wall time and peak memory, imports included),
   peer  = per-problem rows -> datasets.Dataset.from_list(...).to_parquet(...), in this process.
3. scoring a realistic mix (50% right with reasoning, 25% wrong, 25% malformed):
   ours  = rewards.causal_loop.compute_score_batch,
   peer  = the usual regex scorer (re.search for the last <answer> block, dict compare), as in TinyZero.
"""

from __future__ import annotations

import argparse
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks.timing import median_seconds  # after a warm-up: the first Arrow call pays a setup
from benchmarks.workloads import response_mix
from data.causal_loop import TaskConfig, generate, render, sample
from rewards.causal_loop import compute_score_batch


def bench_generation(n: int) -> None:
    cfg = TaskConfig()
    ours = median_seconds(lambda: render.questions(sample(cfg, n, np.random.default_rng(0))))
    problems = [generate(cfg, n // 10, 1).problem(i) for i in range(n // 10)]
    peer = median_seconds(lambda: [(p.solve(), p.question()) for p in problems], repeats=3) * 10
    print(f"generation   ours {n / ours:12,.0f} problems/s   peer (row-at-a-time) {n / peer:10,.0f}/s   "
          f"ratio {peer / ours:5.1f}x   target >= 250,000/s")


def bench_parquet(n: int) -> None:
    with tempfile.TemporaryDirectory() as out:
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "data.causal_loop", "--local_dir", out, "--num_samples", str(n),
                            "--num_test", "1000", "--num_heldout", "0", "--quiet"], check=True)
            runs.append(time.perf_counter() - start)
        ours = statistics.median(runs)
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        import datasets

        start = time.perf_counter()
        batch = generate(TaskConfig(), n + 1000, 0)
        rows = []
        for i in range(len(batch)):
            p = batch.problem(i)
            rows.append({"data_source": "causal_loop", "prompt": p.chat_prompt(), "ability": "reasoning",
                         "reward_model": {"style": "rule", "ground_truth": {"answer": p.answer()}},
                         "extra_info": {"index": i, "level": p.level, "solution": p.solution()}})
        datasets.Dataset.from_list(rows).to_parquet(f"{out}/peer.parquet")
        peer = time.perf_counter() - start
    print(f"parquet      ours {ours:6.2f} s wall, {peak_mb:5.0f} MB peak   peer (datasets.from_list) {peer:6.2f} s   "
          f"ratio {peer / ours:5.1f}x   target <= 2 s, <= 500 MB")


_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def peer_score(response: str, truth: dict) -> float:
    """The common pattern: last <answer> block by regex, parse pairs, compare to the truth."""
    matches = _ANSWER.findall(response) if isinstance(response, str) else []
    if not matches:
        return 0.0
    try:
        got = dict((k.strip(), int(v)) for k, v in (pair.split("=") for pair in matches[-1].split(",")))
        want = dict((k.strip(), int(v)) for k, v in (pair.split("=") for pair in truth["answer"].split(",")))
    except ValueError:
        return 0.1
    return 1.0 if got == want else 0.1


def bench_scoring(n: int) -> None:
    responses, truths = response_mix(n)
    ours = median_seconds(lambda: compute_score_batch(None, responses, truths), repeats=3)
    peer = median_seconds(lambda: [peer_score(r, t) for r, t in zip(responses, truths, strict=True)], repeats=3)
    print(f"scoring      ours {n / ours:12,.0f} responses/s  peer (regex scorer) {n / peer:10,.0f}/s   "
          f"ratio {peer / ours:5.1f}x   target >= 500,000/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["generate", "parquet", "score"])
    parser.add_argument("--n", type=int, default=100_000)
    args = parser.parse_args()
    if args.only in (None, "generate"):
        bench_generation(args.n)
    if args.only in (None, "parquet"):
        bench_parquet(args.n)
    if args.only in (None, "score"):
        bench_scoring(2 * args.n)


if __name__ == "__main__":
    main()
