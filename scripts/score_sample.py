"""Check a reward function on a causal-loop split before training: ``python -m rewards.check --data``.

    python scripts/score_sample.py outputs/data/causal_loop/test.parquet --reward my_rewards.py:compute_score

Kept for scripts/train_lru.sh and older notes; every check lives in ``rewards/check.py`` (run it for
--explain, --compare, --responses and the other options). Exits non-zero if a check fails.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from rewards import check  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parquet", help="a split written by python -m data.causal_loop")
    parser.add_argument("--reward", default="rewards.causal_loop:compute_score", help="module:function or file.py:fn")
    parser.add_argument("--num", type=int, default=500, help="problems to check (default 500)")
    args = parser.parse_args(argv)
    return check.main([args.reward, "--data", args.parquet, "--num", str(args.num)])


if __name__ == "__main__":
    sys.exit(main())
