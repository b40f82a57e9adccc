"""Shared workloads of the benchmarks: realistic response mixes built from real generated problems."""

from __future__ import annotations

import random

from data.causal_loop import TaskConfig, generate, to_table


def response_mix(n: int, seed: int = 0) -> tuple[list[str], list[dict]]:
    """n (response, ground_truth) pairs: 50% right with reasoning, 25% wrong, 25% malformed."""
    rows = to_table(generate(TaskConfig(), min(n, 20_000), seed), "bench").to_pylist()
    rng = random.Random(seed)
    responses, truths = [], []
    for i in range(n):
        row = rows[i % len(rows)]
        truth = row["reward_model"]["ground_truth"]
        solution = row["extra_info"]["solution"]
        kind = rng.random()
        if kind < 0.5:
            response = solution
        elif kind < 0.75:  # wrong: the initial state as the answer, after the same reasoning
            response = solution.split("<answer>")[0] + f"<answer>{truth['initial']}</answer>"
        else:
            response = rng.choice([
                solution.replace("<answer>", ""),  # no tags
                solution + f"<answer>{truth['answer']}</answer>",  # two answer blocks
                solution.split("<answer>")[0],  # cut off before the answer
                solution.replace("=", ": "),  # wrong syntax
            ])
        responses.append(response)
        truths.append(truth)
    return responses, truths
