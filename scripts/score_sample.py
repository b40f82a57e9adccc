"""Score a sample of a causal-loop split with a reward function: a check of the data and the reward.

    python scripts/score_sample.py outputs/data/causal_loop/test.parquet --reward rewards.causal_loop:compute_score

Three kinds of response per problem: the worked solution (must score full marks), the initial state
echoed as the answer (a reward hack: must not beat the format score) and no answer at all (zero).
Prints the mean score of each kind by level; exits non-zero if the reward disagrees.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from rewards.loading import load_reward_fn  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parquet", type=Path, help="a split written by python -m data.causal_loop")
    parser.add_argument("--reward", default="rewards.causal_loop:compute_score", help="module:function or file.py:fn")
    parser.add_argument("--num", type=int, default=500, help="problems to score")
    args = parser.parse_args(argv)
    if not args.parquet.is_file():
        parser.error(f"{args.parquet}: no such file; generate it with python -m data.causal_loop --local_dir DIR")
    try:
        reward = load_reward_fn(args.reward)
    except ValueError as e:
        parser.error(str(e))
    rows = pq.read_table(args.parquet).slice(0, args.num).to_pylist()
    means: dict[tuple[str, int], list[float]] = defaultdict(list)
    for row in rows:
        truth, info = row["reward_model"]["ground_truth"], row["extra_info"]
        think = info["solution"].split("<answer>")[0]
        responses = {"solution": info["solution"], "echo": f"{think}<answer>{truth['initial']}</answer>",
                     "no_answer": think}
        for kind, response in responses.items():
            result = reward(row["data_source"], response, truth, info)
            value = result["score"] if isinstance(result, dict) else float(result)
            means[(kind, info["level"])].append(value)
    levels = sorted({level for _, level in means})
    print(f"{len(rows)} problems from {args.parquet}, reward {args.reward}")
    print("response    " + "".join(f"  level {lv}" for lv in levels))
    for kind in ("solution", "echo", "no_answer"):
        cells = [sum(v) / len(v) if (v := means.get((kind, lv))) else float("nan") for lv in levels]
        print(f"{kind:<12}" + "".join(f"{c:9.3f}" for c in cells))
    solved = all(v == 1.0 for (kind, _), vs in means.items() if kind == "solution" for v in vs)
    hacked = any(v > 0.1 for (kind, _), vs in means.items() if kind != "solution" for v in vs)
    if not solved or hacked:
        print("FAILED: worked solutions must score 1.0 and echo / no-answer responses at most 0.1", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
