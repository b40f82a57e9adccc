"""Configuration of the causal-loop task: every knob that makes a setting harder, easier or held out.

A problem is a set of integer variables with initial values and update rules applied for a number of
steps; the answer is the final state. Harder and held-out settings are a change of this config, not
new code: more variables, more steps, another op mix, a wider value range, the other semantics.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

# Operation codes. Source ops read another variable (they carry the structure of the problem);
# self ops read only their target and a constant.
COPY, ADD_CONST, ADD_SOURCE, MULTIPLY, MODULO, COND_INC = range(6)
OP_NAMES = ("copy", "add_const", "add_source", "multiply", "modulo", "cond_inc")
SOURCE_OPS = (COPY, ADD_SOURCE, COND_INC)
SELF_OPS = (ADD_CONST, MULTIPLY, MODULO)

LEVELS = {1: "linear chain", 2: "simple cycle", 3: "multi-path convergence", 4: "nested loops"}
SEMANTICS = ("simultaneous", "sequential")
MAX_VARS = 26  # variables are named A..Z


def _check_range(name: str, value: tuple[int, int], low: int, high: int) -> None:
    lo, hi = value
    if not (low <= lo <= hi <= high):
        raise ValueError(f"{name}={value!r}: need {low} <= min <= max <= {high}; pass it as (min, max)")


@dataclass(frozen=True)
class TaskConfig:
    """What problems the generator draws. Ranges are inclusive ``(min, max)`` pairs.

    levels:        which structures to draw (1 linear chain, 2 simple cycle, 3 multi-path convergence,
                   4 nested loops), uniformly.
    num_vars:      number of variables of a problem (levels 3 and 4 need at least 3).
    num_steps:     how many times the rules are applied (the outer loop for level 4).
    inner_steps:   level 4 only: how many times the inner rules run inside each outer step.
    init_values:   range of the initial values (must lie inside ``[0, modulus)``).
    constant_range: range of constants in ``add_const`` / ``cond_inc`` thresholds.
    multiplier_range / modulo_range: constants of ``multiply`` and ``modulo``.
    modulus:       all arithmetic is modulo this number, so values stay in ``[0, modulus)``.
    op_weights:    relative frequency of each operation (names in ``OP_NAMES``); source ops and self
                   ops are drawn from their own group, so each group needs a positive weight.
    semantics:     which semantics to draw from (``simultaneous`` and/or ``sequential``).
    extra_self_rules: up to this many extra constant rules (``A = A * 3``) mixed into each problem.
    allow_trivial: keep problems whose final state equals the initial state (about 0.4% with the
                   defaults). Off by default: echoing the question would answer them.
    """

    levels: tuple[int, ...] = (1, 2, 3, 4)
    num_vars: tuple[int, int] = (3, 5)
    num_steps: tuple[int, int] = (2, 4)
    inner_steps: tuple[int, int] = (2, 3)
    init_values: tuple[int, int] = (0, 9)
    constant_range: tuple[int, int] = (1, 9)
    multiplier_range: tuple[int, int] = (2, 3)
    modulo_range: tuple[int, int] = (2, 9)
    modulus: int = 100
    op_weights: dict[str, float] = field(
        default_factory=lambda: {"copy": 1.0, "add_const": 1.0, "add_source": 2.0, "multiply": 1.0, "modulo": 0.5,
                                 "cond_inc": 1.0}
    )
    semantics: tuple[str, ...] = ("simultaneous", "sequential")
    extra_self_rules: int = 1
    allow_trivial: bool = False

    def __post_init__(self) -> None:
        # Frozen dataclass: normalise list inputs (from YAML / CLI) to tuples through object.__setattr__.
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
        bad = [lv for lv in self.levels if lv not in LEVELS]
        if not self.levels or bad:
            raise ValueError(f"levels={self.levels!r}: unknown level(s) {bad}; valid levels are {sorted(LEVELS)}")
        _check_range("num_vars", self.num_vars, 2, MAX_VARS)
        if max(self.levels) >= 3 and self.num_vars[0] < 3:
            raise ValueError(f"num_vars={self.num_vars!r}: levels 3 and 4 need at least 3 variables; "
                             "raise the minimum to 3 or drop those levels")
        _check_range("num_steps", self.num_steps, 1, 64)
        _check_range("inner_steps", self.inner_steps, 1, 16)
        if not 2 <= self.modulus <= 1_000_000:
            raise ValueError(f"modulus={self.modulus}: need 2 <= modulus <= 1000000")
        _check_range("init_values", self.init_values, 0, self.modulus - 1)
        _check_range("constant_range", self.constant_range, 0, self.modulus - 1)
        _check_range("multiplier_range", self.multiplier_range, 0, self.modulus - 1)
        _check_range("modulo_range", self.modulo_range, 1, self.modulus)
        unknown = sorted(set(self.op_weights) - set(OP_NAMES))
        if unknown:
            raise ValueError(f"op_weights: unknown operation(s) {unknown}; valid names are {list(OP_NAMES)}")
        if any(w < 0 for w in self.op_weights.values()):
            raise ValueError(f"op_weights={self.op_weights!r}: weights must be >= 0")
        for group, ops in (("source", SOURCE_OPS), ("self", SELF_OPS)):
            if sum(self.op_weights.get(OP_NAMES[op], 0.0) for op in ops) <= 0:
                names = [OP_NAMES[op] for op in ops]
                raise ValueError(f"op_weights: give at least one {group} operation {names} a positive weight")
        bad_sem = [s for s in self.semantics if s not in SEMANTICS]
        if not self.semantics or bad_sem:
            raise ValueError(f"semantics={self.semantics!r}: valid values are {list(SEMANTICS)}")
        if not 0 <= self.extra_self_rules <= 8:
            raise ValueError(f"extra_self_rules={self.extra_self_rules}: need 0 <= extra_self_rules <= 8")

    def op_probs(self, ops: tuple[int, ...]) -> list[float]:
        """Normalised probabilities of ``ops`` under ``op_weights``."""
        weights = [self.op_weights.get(OP_NAMES[op], 0.0) for op in ops]
        total = sum(weights)
        return [w / total for w in weights]

    def replace(self, **changes) -> TaskConfig:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return TaskConfig(**values)
