"""Vectorised generation of causal-loop problems: structure sampling, simulation and canonical keys.

Problems are held column-wise in a ``ProblemBatch`` (numpy arrays, one row per problem) because
the targets (250K problems/s with prompt text) rule out building Python objects per problem.
``problem.py`` is the readable specification; ``batch.problem(i)`` turns one row into a ``Problem``
and the tests hold the two equal.

Notation: B problems, V variable slots, R rule slots, N steps. Padding: variables beyond
``num_vars`` hold 0, rule slots beyond a problem's rules have ``op == -1`` and sit at the end.
Rule slots of phase 0 (inner) come before those of phase 1 (outer, level 4 only).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data.causal_loop.config import (
    ADD_CONST,
    ADD_SOURCE,
    COND_INC,
    COPY,
    MAX_VARS,
    MODULO,
    MULTIPLY,
    SELF_OPS,
    SOURCE_OPS,
    TaskConfig,
)
from data.causal_loop.problem import Problem, Rule

PAD = -1
INNER, OUTER, PAD_PHASE = 0, 1, 2


@dataclass
class ProblemBatch:
    """B problems, column-wise. Shapes in the field comments."""

    level: np.ndarray  # (B,) int8
    num_vars: np.ndarray  # (B,) int8
    num_steps: np.ndarray  # (B,) int16
    inner_steps: np.ndarray  # (B,) int16, 1 unless level 4
    sequential: np.ndarray  # (B,) bool
    init: np.ndarray  # (B, V) int32
    op: np.ndarray  # (B, R) int8, PAD for unused slots
    target: np.ndarray  # (B, R) int8
    source: np.ndarray  # (B, R) int8, PAD when the op reads no other variable
    const: np.ndarray  # (B, R) int32
    phase: np.ndarray  # (B, R) int8: INNER, OUTER or PAD_PHASE
    modulus: int
    trace: np.ndarray | None = None  # (B, N+1, V) int32: state after every step; filled by simulate()

    def __len__(self) -> int:
        return len(self.level)

    @property
    def final(self) -> np.ndarray:
        """(B, V) final state."""
        return self.trace[:, -1]

    def take(self, index: np.ndarray) -> ProblemBatch:
        """Rows ``index`` (an integer or boolean array) as a new batch."""
        fields = {name: value[index] for name, value in vars(self).items() if isinstance(value, np.ndarray)}
        return ProblemBatch(modulus=self.modulus, **fields)

    def problem(self, i: int) -> Problem:
        """Row ``i`` as a ``Problem`` (the readable form; slow, for tests, examples and SFT data)."""
        rules = {INNER: [], OUTER: []}
        for r in range(self.op.shape[1]):
            if self.op[i, r] != PAD:
                rule = Rule(int(self.op[i, r]), int(self.target[i, r]), int(self.source[i, r]), int(self.const[i, r]))
                rules[int(self.phase[i, r])].append(rule)
        return Problem(
            level=int(self.level[i]),
            init=tuple(int(v) for v in self.init[i, : self.num_vars[i]]),
            rules=tuple(rules[INNER]),
            outer_rules=tuple(rules[OUTER]),
            num_steps=int(self.num_steps[i]),
            inner_steps=int(self.inner_steps[i]),
            semantics="sequential" if self.sequential[i] else "simultaneous",
            modulus=self.modulus,
        )


def concat(batches: list[ProblemBatch]) -> ProblemBatch:
    """Concatenate batches, padding variable, rule and step axes to the widest."""
    assert batches and all(b.modulus == batches[0].modulus for b in batches), "batches differ in modulus"
    v = max(b.init.shape[1] for b in batches)
    r = max(b.op.shape[1] for b in batches)
    n = max(b.trace.shape[1] for b in batches) if batches[0].trace is not None else 0

    def pad(a: np.ndarray, width: int, fill: int, axis: int = 1) -> np.ndarray:
        widths = [(0, 0)] * a.ndim
        widths[axis] = (0, width - a.shape[axis])
        return np.pad(a, widths, constant_values=fill)

    def pad_trace(t: np.ndarray) -> np.ndarray:
        t = pad(t, v, 0, axis=2)
        # Steps past a problem's end repeat its final state, as simulate() writes them.
        return np.concatenate([t, np.repeat(t[:, -1:], n - t.shape[1], axis=1)], axis=1)

    return ProblemBatch(
        level=np.concatenate([b.level for b in batches]),
        num_vars=np.concatenate([b.num_vars for b in batches]),
        num_steps=np.concatenate([b.num_steps for b in batches]),
        inner_steps=np.concatenate([b.inner_steps for b in batches]),
        sequential=np.concatenate([b.sequential for b in batches]),
        init=np.concatenate([pad(b.init, v, 0) for b in batches]),
        op=np.concatenate([pad(b.op, r, PAD) for b in batches]),
        target=np.concatenate([pad(b.target, r, 0) for b in batches]),
        source=np.concatenate([pad(b.source, r, PAD) for b in batches]),
        const=np.concatenate([pad(b.const, r, 0) for b in batches]),
        phase=np.concatenate([pad(b.phase, r, PAD_PHASE) for b in batches]),
        modulus=batches[0].modulus,
        trace=np.concatenate([pad_trace(b.trace) for b in batches]) if n else None,
    )


# ---- structure sampling ----------------------------------------------------------------------------


def _draw_ops(rng: np.random.Generator, cfg: TaskConfig, ops: tuple[int, ...], shape) -> np.ndarray:
    return rng.choice(np.array(ops, dtype=np.int8), size=shape, p=cfg.op_probs(ops))


def _draw_consts(rng: np.random.Generator, cfg: TaskConfig, op: np.ndarray) -> np.ndarray:
    """A constant for every rule, drawn from the range its op uses (unused by copy / add_source)."""
    const = rng.integers(cfg.constant_range[0], cfg.constant_range[1] + 1, size=op.shape)
    mult = rng.integers(cfg.multiplier_range[0], cfg.multiplier_range[1] + 1, size=op.shape)
    mod = rng.integers(cfg.modulo_range[0], cfg.modulo_range[1] + 1, size=op.shape)
    const = np.where(op == MULTIPLY, mult, np.where(op == MODULO, mod, const))
    return np.where((op == COPY) | (op == ADD_SOURCE), 0, const).astype(np.int64)


def _structure(rng: np.random.Generator, level: int, n: int, v: int) -> tuple[np.ndarray, ...]:
    """Edges of each level over roles 0..v-1: (targets, sources, phases), each (n, E); source PAD = self op."""
    def full(x) -> np.ndarray:
        return np.full((n, len(x)), x, dtype=np.int64) if np.ndim(x) == 1 else x

    roles = np.arange(v)
    if level == 1:  # linear chain: role 0 <- const, role i <- role i-1
        return full(roles), full(np.concatenate([[PAD], roles[:-1]])), np.zeros((n, v), np.int64)
    if level == 2:  # simple cycle: role i <- role i-1, role 0 <- role v-1
        return full(roles), full(np.roll(roles, 1)), np.zeros((n, v), np.int64)
    if level == 3:  # multi-path convergence: a random DAG rooted at role 0; the sink reads two branches
        earlier = (rng.random((n, v - 2)) * np.arange(1, v - 1)).astype(np.int64)  # role i reads a role < i
        second = (rng.random((n, 1)) * (v - 2)).astype(np.int64)  # sink's other input: a role < v-2
        targets = full(np.concatenate([roles[:-1], [v - 1, v - 1]]))
        sources = np.concatenate([np.full((n, 1), PAD), earlier, np.full((n, 1), v - 2), second], axis=1)
        return targets, sources, np.zeros((n, v + 1), np.int64)
    # level 4, nested loops: inner cycle over roles 0..v-2; outer: accumulator role v-1 reads a random
    # inner role, and a random inner role gets a constant rule (it perturbs the inner loop each outer step).
    inner = roles[:-1]
    reads = (rng.random((n, 1)) * (v - 1)).astype(np.int64)
    perturbed = (rng.random((n, 1)) * (v - 1)).astype(np.int64)
    targets = np.concatenate([full(inner), np.full((n, 1), v - 1), perturbed], axis=1)
    sources = np.concatenate([full(np.roll(inner, 1)), reads, np.full((n, 1), PAD)], axis=1)
    phases = np.concatenate([np.zeros((n, v - 1), np.int64), np.ones((n, 2), np.int64)], axis=1)
    return targets, sources, phases


def _sample_group(rng: np.random.Generator, cfg: TaskConfig, level: int, n: int, v: int) -> ProblemBatch:
    """n problems of one level and one variable count."""
    targets, sources, phases = _structure(rng, level, n, v)
    # Extra constant rules on random roles, in the inner phase; a random count per problem.
    extra = cfg.extra_self_rules
    if extra:
        n_extra = rng.integers(0, extra + 1, size=(n, 1))
        extra_tgt = rng.integers(0, v - 1 if level == 4 else v, size=(n, extra))
        extra_phase = np.where(np.arange(extra) < n_extra, INNER, PAD_PHASE)
        targets = np.concatenate([targets, extra_tgt], axis=1)
        sources = np.concatenate([sources, np.full((n, extra), PAD)], axis=1)
        phases = np.concatenate([phases, extra_phase], axis=1)
    op = np.where(sources == PAD, _draw_ops(rng, cfg, SELF_OPS, sources.shape),
                  _draw_ops(rng, cfg, SOURCE_OPS, sources.shape)).astype(np.int8)
    op[phases == PAD_PHASE] = PAD
    # Shuffle the listed order within each phase (it matters in sequential mode), pads last.
    order = np.lexsort((rng.random(phases.shape), phases), axis=1)

    def take(a: np.ndarray) -> np.ndarray:
        return np.take_along_axis(a, order, axis=1)

    targets, sources, phases, op = take(targets), take(sources), take(phases), take(op)
    # Variables get random names: role -> variable through a random permutation per problem.
    perm = np.argsort(rng.random((n, v)), axis=1)

    def rename(a: np.ndarray) -> np.ndarray:
        return np.where(a == PAD, PAD, np.take_along_axis(perm, np.maximum(a, 0), axis=1))

    lo, hi = cfg.num_steps
    # Sorted, longest first (steps are drawn independently of everything else, so this changes no
    # distribution): the simulation then runs on slices. sample() must scatter the rows to a random
    # permutation of their places afterwards, or the output order follows the step count.
    steps = -np.sort(-rng.integers(lo, hi + 1, size=n))
    inner = rng.integers(cfg.inner_steps[0], cfg.inner_steps[1] + 1, size=n) if level == 4 else np.ones(n, int)
    semantics = rng.choice([s == "sequential" for s in cfg.semantics], size=n)
    return ProblemBatch(
        level=np.full(n, level, np.int8),
        num_vars=np.full(n, v, np.int8),
        num_steps=steps.astype(np.int16),
        inner_steps=inner.astype(np.int16),
        sequential=semantics.astype(bool),
        init=rng.integers(cfg.init_values[0], cfg.init_values[1] + 1, size=(n, v), dtype=np.int32),
        op=op,
        target=np.where(op == PAD, 0, rename(targets)).astype(np.int8),
        source=np.where(op == PAD, PAD, rename(sources)).astype(np.int8),
        const=np.where(op == PAD, 0, _draw_consts(rng, cfg, op)).astype(np.int32),
        phase=phases.astype(np.int8),
        modulus=cfg.modulus,
    )


def sample(cfg: TaskConfig, n: int, rng: np.random.Generator) -> ProblemBatch:
    """n problems drawn from ``cfg`` (levels and variable counts uniform), simulated, in random order."""
    if n < 1:
        raise ValueError(f"n={n}: need at least one problem")
    levels = np.array(cfg.levels)[rng.integers(0, len(cfg.levels), size=n)]
    nvars = rng.integers(cfg.num_vars[0], cfg.num_vars[1] + 1, size=n)
    placed = []
    for level in cfg.levels:
        for v in range(cfg.num_vars[0], cfg.num_vars[1] + 1):
            # A random permutation of the group's places: its rows come sorted by steps (_sample_group), and
            # rows in index order made every batch a hard-to-easy curriculum and generate_unique, which keeps
            # the first rows it draws, fill small splits with the longest problems only.
            rows = rng.permutation(np.flatnonzero((levels == level) & (nvars == v)))
            if len(rows):
                group = _sample_group(rng, cfg, level, len(rows), v)
                group.trace = _run_sorted(group).transpose(1, 0, 2)
                placed.append((rows, group))
    return _scatter(n, placed)


def _scatter(n: int, placed: list[tuple[np.ndarray, ProblemBatch]]) -> ProblemBatch:
    """One batch of n rows from groups placed at the given rows, padded to the widest group."""
    widest = concat([group.take(slice(0, 1)) for _, group in placed])  # empty-width template, padded right
    out = ProblemBatch(
        **{name: np.zeros((n, *value.shape[1:]), value.dtype) for name, value in vars(widest).items()
           if isinstance(value, np.ndarray)},
        modulus=widest.modulus,
    )
    out.op[:], out.source[:], out.phase[:] = PAD, PAD, PAD_PHASE
    for rows, group in placed:
        for name, value in vars(group).items():
            if isinstance(value, np.ndarray):
                target = getattr(out, name)
                target[(rows, *(slice(0, d) for d in value.shape[1:]))] = value
                if name == "trace":  # past its last step a problem stays put
                    target[rows, value.shape[1]:, : value.shape[2]] = value[:, -1:]
    return out


# ---- simulation ------------------------------------------------------------------------------------


def _slot_coefficients(batch: ProblemBatch) -> dict[str, np.ndarray]:
    """Every op except modulo as ``alpha*cur + beta*read + gamma + delta*(read > const)``, (R, B) each.

    Computed once per batch (slot-major, so a slot's column is contiguous) so that a rule application
    is a few vector ops instead of a select over six ops: simulation is most of the generator's time.
    """
    op, c = batch.op.T, batch.const.T.astype(np.int64)

    def one(mask: np.ndarray) -> np.ndarray:
        return mask.astype(np.int64)

    rows = np.arange(len(batch))[None] * batch.init.shape[1]
    return {
        "alpha": one((op == ADD_CONST) | (op == ADD_SOURCE) | (op == COND_INC)) + np.where(op == MULTIPLY, c, 0),
        "beta": one((op == COPY) | (op == ADD_SOURCE)),
        "gamma": np.where(op == ADD_CONST, c, 0),
        "delta": one(op == COND_INC),
        "threshold": c,
        "is_mod": op == MODULO,
        "mod": np.maximum(c, 1),
        "target": rows + batch.target.T,  # flat index of the target in a (B, V) state
        "source": rows + np.maximum(batch.source.T, 0),
        "phase": np.ascontiguousarray(batch.phase.T),
    }


def _apply_slot(coef: dict, r: int, k: int, active: np.ndarray, sequential: np.ndarray, state: np.ndarray,
                old: np.ndarray, modulus: int) -> None:
    """Apply rule slot ``r`` of the first ``k`` problems where ``active`` (k,), in place on the flat state."""
    def pick(name: str) -> np.ndarray:
        return coef[name][r, :k]  # slices, not gathers: rows are sorted by steps

    tgt, src = pick("target"), pick("source")
    cur = state[tgt]
    # Sequential rules read the running state; simultaneous ones read the state before the rule set.
    read = np.where(sequential, state[src], old[src])
    new = pick("alpha") * cur + pick("beta") * read + pick("gamma") + pick("delta") * (read > pick("threshold"))
    new = np.where(pick("is_mod"), cur % pick("mod"), new) % modulus
    state[tgt] = np.where(active, new, cur)


def _apply_phase(batch: ProblemBatch, coef: dict, state: np.ndarray, k: int, phase: int,
                 active: np.ndarray) -> None:
    old = state.copy()
    for r in range(batch.op.shape[1]):
        slot_active = active & (coef["phase"][r, :k] == phase)
        if slot_active.any():
            _apply_slot(coef, r, k, slot_active, batch.sequential[:k], state, old, batch.modulus)


def _run_sorted(work: ProblemBatch) -> np.ndarray:
    """Trace (N+1, B, V) of a batch whose rows are sorted by steps, longest first, so the problems still
    running at step n are a prefix of the rows and every slot is a slice, not a gather."""
    coef = _slot_coefficients(work)
    state = work.init.astype(np.int64).reshape(-1)  # a copy; int64 so value*constant cannot overflow
    steps = [state.copy()]
    has_outer = bool((work.phase == OUTER).any())
    for n in range(int(work.num_steps.max())):
        k = int(np.sum(work.num_steps > n))
        for rep in range(int(work.inner_steps[:k].max())):
            _apply_phase(work, coef, state, k, INNER, rep < work.inner_steps[:k])
        if has_outer:
            _apply_phase(work, coef, state, k, OUTER, np.ones(k, bool))
        steps.append(state.copy())
    return np.stack(steps).astype(np.int32).reshape(len(steps), len(work), -1)


def simulate(batch: ProblemBatch) -> ProblemBatch:
    """Run every problem and store the state after every step in ``batch.trace`` (B, N+1, V).

    Levels run separately (only level 4 has inner repetitions and outer rules, so mixing them would
    spend work on masked-out rows), each sorted by number of steps.
    """
    num_states = int(batch.num_steps.max()) + 1
    batch.trace = np.empty((len(batch), num_states, batch.init.shape[1]), np.int32)
    for level in np.unique(batch.level):
        rows = np.flatnonzero(batch.level == level)
        rows = rows[np.argsort(-batch.num_steps[rows], kind="stable")]
        trace = _run_sorted(batch.take(rows))  # (n+1, b, V)
        batch.trace[rows, : len(trace)] = trace.transpose(1, 0, 2)
        batch.trace[rows, len(trace):] = trace[-1][:, None]  # past its last step a problem stays put
    return batch


def nontrivial(batch: ProblemBatch) -> np.ndarray:
    """(B,) bool: the final state differs from the initial state (else echoing the question answers it)."""
    return (batch.final != batch.init).any(axis=1)


# ---- canonical keys ----------------------------------------------------------------------------------
#
# A problem renamed (variables permuted consistently in the initial state and the rules) is the same
# problem, so the key hashes the problem with its variables in a canonical order: an order computed from
# the problem alone, such that a renamed copy gets its variables in the same order. Colour refinement
# (1-dimensional Weisfeiler-Leman) on the rules as an edge-labelled graph gives every variable a colour
# that a renaming carries along; ties left when it is stable are broken by individualising one variable
# and refining again (the individualisation-refinement of nauty; McKay & Piperno, J. Symb. Comp. 2014).
# Breaking a tie by "the lowest index in the first tied cell", with no search over the other choices, is
# exact when every cell it splits is an orbit (its variables are interchangeable by a symmetry of the
# problem). That is known for trees and cycles (compact graphs; Tinhofer, Computing 1991), and the tests
# check it against a brute-force canonical form over all renamings for every structure the generator
# draws (a chain, a cycle, a tree plus one converging edge, a cycle plus an accumulator), on settings
# built to be symmetric. Where it failed, a renamed copy would get another key (a missed duplicate); two
# different problems never share a key beyond a 64-bit collision, since the hash covers the whole
# renamed problem.

_MIX = np.uint64(0x9E3779B97F4A7C15)
_NONE = np.uint64(0xFFFFFFFFFFFFFFFF)  # the colour of padding variables, so they sort last
_SELF, _OUT, _PICKED = np.uint64(0x5E1F), np.uint64(0x0B7), np.uint64(0x91C4ED)


def _splitmix(x: np.ndarray) -> np.ndarray:
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _combine(h: np.ndarray, x: np.ndarray) -> np.ndarray:
    return _splitmix(h * _MIX + x.astype(np.uint64, copy=False))


@dataclass
class _RuleGraph:
    """The rules of b problems as edge-labelled graphs on their V variables (R rule slots)."""

    label: np.ndarray  # (b, R) uint64: hash of (phase, op, const, position among the slots whose order matters)
    target: np.ndarray  # (b, R) int64
    source: np.ndarray  # (b, R) int64, 0 where the rule reads no other variable
    used: np.ndarray  # (b, R) bool: the slot holds a rule
    reads: np.ndarray  # (b, R) bool: the slot holds a rule that reads another variable
    width: int  # V, the batch's padded width

    def take(self, rows: np.ndarray) -> _RuleGraph:
        return _RuleGraph(**{name: value[rows] if isinstance(value, np.ndarray) else value
                             for name, value in vars(self).items()})


def _slot_positions(phase: np.ndarray, target: np.ndarray, sequential: np.ndarray) -> np.ndarray:
    """(b, R) each slot's place among the earlier slots whose order relative to it is part of the problem:
    those of its phase in sequential mode, those of its phase and target in simultaneous mode."""
    group = phase.astype(np.int64) * 256 + np.where(sequential[:, None], 255, target)  # targets < MAX_VARS < 255
    earlier = np.tri(phase.shape[1], k=-1, dtype=bool)  # (R, R): slot r' comes before slot r
    return np.count_nonzero((group[:, :, None] == group[:, None, :]) & earlier, axis=2)


def _rule_graph(batch: ProblemBatch, rows: np.ndarray) -> _RuleGraph:
    """The graph of problems ``rows`` of the batch."""
    phase, op, const, seq = batch.phase[rows], batch.op[rows], batch.const[rows], batch.sequential[rows]
    target, source = batch.target[rows].astype(np.int64), batch.source[rows].astype(np.int64)
    used = phase != PAD_PHASE
    reads = used & (source != PAD)
    source = np.maximum(source, 0)
    label = _splitmix(_pack((phase, 2), (op + 1, 4), (_slot_positions(phase, target, seq), 8), (const, 31)))
    return _RuleGraph(label=label, target=target, source=source, used=used, reads=reads,
                      width=batch.init.shape[1])


def _sum_into(values: np.ndarray, var: np.ndarray, valid: np.ndarray, width: int) -> np.ndarray:
    """(b, V) sums of (b, R) ``values`` into variable ``var`` where ``valid`` (uint64, wrapping)."""
    b = len(values)
    flat = np.where(valid, np.arange(b)[:, None] * width + var, b * width)  # invalid -> a spare bin
    out = np.zeros(b * width + 1, np.uint64)
    np.add.at(out, flat, values)  # unbuffered: repeated bins all count
    return out[:-1].reshape(b, width)


def _refine(g: _RuleGraph, colour: np.ndarray) -> np.ndarray:
    """One round of colour refinement, (b, V) -> (b, V): a variable's new colour hashes its colour, its rules
    (each with the colour of the variable it reads) and the rules that read it (with their target's colour).
    Sums of hashes make the neighbourhoods multisets; a rule's position is in its label, so order counts."""
    read = np.where(g.reads, np.take_along_axis(colour, g.source, axis=1), _SELF)
    written = np.take_along_axis(colour, g.target, axis=1)
    incoming = _sum_into(_combine(g.label, read), g.target, g.used, g.width)
    outgoing = _sum_into(_combine(g.label ^ _OUT, written), g.source, g.reads, g.width)
    return _combine(_combine(colour, incoming), outgoing)


def _num_cells(colour: np.ndarray, num_vars: np.ndarray) -> np.ndarray:
    """(b,) number of distinct colours among the used variables (padding sorts last, as _NONE)."""
    c = np.sort(colour, axis=1)
    first = np.ones(c.shape, bool)
    first[:, 1:] = c[:, 1:] != c[:, :-1]
    return (first & (np.arange(c.shape[1]) < num_vars[:, None])).sum(axis=1)


def _individualise(colour: np.ndarray) -> None:
    """Give one variable of the first tied cell (smallest shared colour) a colour of its own, in place."""
    tied = (colour[:, :, None] == colour[:, None, :]).sum(axis=2) > 1  # (b, V); padding is never picked:
    shared = np.where(tied & (colour != _NONE), colour, _NONE).min(axis=1)  # the caller only passes ties
    pick = np.argmax(colour == shared[:, None], axis=1)  # the lowest index in the cell
    rows = np.arange(len(colour))
    colour[rows, pick] = _splitmix(colour[rows, pick] ^ _PICKED)


def _canonical_order(batch: ProblemBatch) -> np.ndarray:
    """(B, V): ``order[b, k]`` is the variable of problem b named k in its canonical form (padding last).

    The initial values are the first colours; most problems have distinct ones and are done without a
    round. The others refine until their colouring is discrete, splitting a tie whenever it stops growing.
    Each row stops on its own, so its colours, and its key, do not depend on the other rows of the batch.
    """
    used = np.arange(batch.init.shape[1]) < batch.num_vars[:, None]
    colour = np.where(used, _splitmix(batch.init.astype(np.uint64) + _MIX), _NONE)
    cells = _num_cells(colour, batch.num_vars)
    rows = np.flatnonzero(cells < batch.num_vars)
    graph = _rule_graph(batch, rows)
    while len(rows):
        nv = batch.num_vars[rows]
        new = np.where(used[rows], _refine(graph, colour[rows]), _NONE)
        new_cells = _num_cells(new, nv)
        grew = new_cells > cells[rows]
        colour[rows[grew]], cells[rows[grew]] = new[grew], new_cells[grew]
        if not grew.all():  # stable and not discrete: split a tie and refine again
            stuck, sub = rows[~grew], colour[rows[~grew]]
            _individualise(sub)
            colour[stuck], cells[stuck] = sub, cells[stuck] + 1
        going = cells[rows] < nv
        rows, graph = rows[going], graph.take(going) if not going.all() else graph
    return np.argsort(colour, axis=1, kind="stable")


def canonical_keys(batch: ProblemBatch) -> np.ndarray:
    """(B,) uint64: equal for the same problem, up to renaming its variables and the listed order of rules
    that commute.

    The variables are renamed into their canonical order (see the comment above), then the whole problem
    is hashed. In simultaneous mode only the order among rules on the same target matters, so
    slots are stably sorted by (phase, target) first; in sequential mode the listed order is part of the
    problem. A 64-bit hash: a collision (about 1 in 10^8 among a million problems) drops one extra problem
    from a split, never lets a duplicate through.
    """
    order = _canonical_order(batch)  # (B, V)
    name = np.argsort(order, axis=1)  # (B, V): variable -> its canonical name
    init = np.take_along_axis(batch.init, order, axis=1)
    target = np.take_along_axis(name, batch.target.astype(np.int64), axis=1)
    source = np.where(batch.source == PAD, PAD, np.take_along_axis(name, np.maximum(batch.source, 0).astype(np.int64),
                                                                   axis=1))
    return _hash_problem(batch, init, target, source)


def _pack(*fields: tuple[np.ndarray, int]) -> np.ndarray:
    """Integer arrays of at most the given bit widths, side by side in one uint64 (injective, so hashing the
    packed word is hashing the fields, in one pass instead of one per field)."""
    packed, shift = np.uint64(0), 0
    for value, bits in fields:
        value = np.asarray(value, np.int64)
        assert value.size == 0 or 0 <= value.min() <= value.max() < 1 << bits, (value.min(), value.max(), bits)
        packed, shift = packed | (value.astype(np.uint64) << np.uint64(shift)), shift + bits
    assert shift <= 64, shift
    return packed


def _hash_problem(batch: ProblemBatch, init: np.ndarray, target: np.ndarray, source: np.ndarray) -> np.ndarray:
    """(B,) uint64 hash of the header, the initial state and the rules (with ``init``, ``target`` and ``source``
    in place of the batch's own), commuting slots sorted."""
    # Slots sorted by (phase, target, listed place) in simultaneous mode, (phase, listed place) in sequential.
    sort_key = np.where(batch.sequential[:, None], 0, target.astype(np.int64))
    order = np.argsort((batch.phase.astype(np.int64) * 256 + sort_key) * 256 + np.arange(batch.op.shape[1]), axis=1)
    rules = _pack((batch.phase, 2), (batch.op + 1, 4), (target, 8), (source + 1, 8), (batch.const, 31))  # (B, R)
    rules = np.take_along_axis(rules, order, axis=1)
    used_slot = (rules & np.uint64(3)) != PAD_PHASE  # the phase, in the low bits
    header = _pack((batch.sequential, 1), (batch.num_steps, 16), (batch.inner_steps, 16), (batch.num_vars, 8),
                   (np.full(len(batch), batch.modulus), 21))
    used_var = np.arange(batch.init.shape[1]) < batch.num_vars[:, None]
    # Each word hashed with its place (so order counts), padding left out (so the padded width does not
    # count), the hashes summed: one pass over (B, 1 + V + R) instead of a loop over columns.
    words = np.concatenate([header[:, None], init, rules], axis=1).astype(np.uint64)
    valid = np.concatenate([np.ones((len(batch), 1), bool), used_var, used_slot], axis=1)
    place = np.concatenate([[0], 1 + np.arange(init.shape[1]), 1 + MAX_VARS + np.arange(rules.shape[1])])
    mixed = np.where(valid, _combine(_splitmix(place.astype(np.uint64) + _MIX), words), np.uint64(0))
    return _splitmix(mixed.sum(axis=1, dtype=np.uint64))
