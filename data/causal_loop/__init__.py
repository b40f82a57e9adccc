"""The causal-loop task: variables, update rules applied for N steps, answer = the final state.

    from data.causal_loop import TaskConfig, generate, ProblemStream
    batch = generate(TaskConfig(levels=(1, 2)), n=1000, seed=0)
    print(batch.problem(0).question())
"""

from data.causal_loop.config import LEVELS, OP_NAMES, SEMANTICS, TaskConfig
from data.causal_loop.dataset import (
    DATA_SOURCE,
    ProblemStream,
    build_splits,
    generate,
    generate_unique,
    heldout_configs,
    to_table,
    write_parquet,
)
from data.causal_loop.generator import ProblemBatch, canonical_keys, concat, sample, simulate
from data.causal_loop.problem import Problem, Rule, format_state

__all__ = ["DATA_SOURCE", "LEVELS", "OP_NAMES", "SEMANTICS", "Problem", "ProblemBatch", "ProblemStream", "Rule",
           "TaskConfig", "build_splits", "canonical_keys", "concat", "format_state", "generate", "generate_unique",
           "heldout_configs", "sample", "simulate", "to_table", "write_parquet"]
