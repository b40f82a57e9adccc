"""What the splits hold: rows in random order, every requested step count in every split, keys blind to
renamed variables (against a brute-force canonical form), no renamed duplicates across splits, the
validation split, and the distinct-problem count of the tiny preset's setting."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from data.causal_loop import (
    Problem,
    Rule,
    TaskConfig,
    build_splits,
    canonical_keys,
    generate,
    generate_unique,
    heldout_configs,
    simulate,
)
from data.causal_loop.config import ADD_CONST, ADD_SOURCE, COND_INC, COPY, MODULO, MULTIPLY
from data.causal_loop.generator import PAD, PAD_PHASE, ProblemBatch, nontrivial

# Settings with few distinct values, so that ties between variables (the hard case for a canonical order)
# are common: equal initial values, equal constants, one op per group.
SYMMETRIC = dict(init_values=(0, 1), constant_range=(1, 1), multiplier_range=(2, 2), modulo_range=(2, 2))
ORACLE_CONFIGS = [
    TaskConfig(levels=(1, 2), num_vars=(2, 3), num_steps=(1, 1), init_values=(0, 2), extra_self_rules=0),
    TaskConfig(levels=(1, 2, 3, 4), num_vars=(3, 5), num_steps=(1, 2), **SYMMETRIC),
    TaskConfig(levels=(2,), num_vars=(2, 5), num_steps=(1, 1), op_weights={"copy": 1, "add_const": 1}, **SYMMETRIC),
    TaskConfig(levels=(3, 4), num_vars=(3, 5), num_steps=(1, 1), inner_steps=(2, 2), extra_self_rules=2,
               op_weights={"copy": 1, "add_source": 1, "add_const": 1}, **SYMMETRIC),
    TaskConfig(levels=(3,), num_vars=(5, 5), num_steps=(1, 1), extra_self_rules=0, semantics=("simultaneous",),
               op_weights={"copy": 1, "add_const": 1}, **{**SYMMETRIC, "init_values": (0, 0)}),
]


# ---- a brute-force canonical form: the reference for the keys --------------------------------------------

def _form(p: Problem, name: tuple[int, ...]) -> tuple:
    """``p`` with variable j renamed to ``name[j]``, as a tuple; commuting rules in a fixed order (simultaneous
    mode: stably by target, so the order of rules on one target stays)."""
    init = [0] * p.num_vars
    for j, value in enumerate(p.init):
        init[name[j]] = value

    def rules(rs: tuple[Rule, ...]) -> tuple:
        out = [(name[r.target], r.op, name[r.source] if r.source >= 0 else -1, r.const) for r in rs]
        return tuple(sorted(out, key=lambda rule: rule[0]) if p.semantics == "simultaneous" else out)

    return p.semantics, p.num_steps, p.inner_steps, p.modulus, tuple(init), rules(p.rules), rules(p.outer_rules)


def brute_canonical(p: Problem) -> tuple:
    """The smallest form over all renamings: equal exactly for problems that are renamings of each other."""
    return min(_form(p, name) for name in itertools.permutations(range(p.num_vars)))


def rename(batch: ProblemBatch, name: np.ndarray) -> ProblemBatch:
    """The batch with variable j of row b renamed ``name[b, j]`` (a permutation of the used variables), in
    the initial state, the rules and the trace."""
    out = batch.take(np.arange(len(batch)))
    np.put_along_axis(out.init, name, batch.init, axis=1)
    out.target = np.take_along_axis(name, batch.target.astype(np.int64), axis=1).astype(np.int8)
    renamed_source = np.take_along_axis(name, np.maximum(batch.source, 0).astype(np.int64), axis=1)
    out.source = np.where(batch.source == PAD, PAD, renamed_source).astype(np.int8)
    np.put_along_axis(out.trace, np.broadcast_to(name[:, None], batch.trace.shape), batch.trace, axis=2)
    return out


def random_renaming(batch: ProblemBatch, rng: np.random.Generator) -> np.ndarray:
    """(B, V) a random permutation of each row's used variables; padding variables keep their index."""
    j = np.arange(batch.init.shape[1])
    return np.argsort(np.where(j < batch.num_vars[:, None], rng.random(batch.init.shape), 2 + j), axis=1)


def shuffle_commuting(batch: ProblemBatch, rng: np.random.Generator) -> ProblemBatch:
    """Simultaneous rows: the groups of rules on one target (per phase) in a random order, each group's own
    order kept; sequential rows unchanged. The same problem."""
    priority = np.take_along_axis(rng.random(batch.init.shape), batch.target.astype(np.int64), axis=1)
    priority = np.where(batch.sequential[:, None], 0.0, priority)
    slot = np.arange(batch.op.shape[1])
    order = np.lexsort((slot + np.zeros_like(priority), priority, batch.phase), axis=1)
    out = batch.take(np.arange(len(batch)))
    for name in ("op", "target", "source", "const", "phase"):
        setattr(out, name, np.take_along_axis(getattr(batch, name), order, axis=1))
    return out


def test_brute_force_reference_by_hand():
    # A = A + 1; B = B + A  and, renamed A <-> B,  B = B + 1; A = A + B: the same problem, one canonical form.
    one = Problem(1, (3, 5), (Rule(ADD_CONST, 0, const=1), Rule(ADD_SOURCE, 1, 0)), (), 1, 1, "simultaneous", 10)
    two = Problem(1, (5, 3), (Rule(ADD_CONST, 1, const=1), Rule(ADD_SOURCE, 0, 1)), (), 1, 1, "simultaneous", 10)
    other = Problem(1, (5, 3), (Rule(ADD_CONST, 0, const=1), Rule(ADD_SOURCE, 1, 0)), (), 1, 1, "simultaneous", 10)
    assert brute_canonical(one) == brute_canonical(two) != brute_canonical(other)
    assert sorted(one.solve()) == sorted(two.solve()) == [4, 8]  # A=4, B=8 and B=4, A=8


# ---- defect 1: the order of the rows -------------------------------------------------------------------

def test_row_order_is_independent_of_steps_level_and_vars():
    # The sampler used to return each (level, num_vars) group sorted by steps: corr(index, num_steps) = -0.97.
    batch = generate(TaskConfig(num_vars=(3, 6), num_steps=(2, 6)), 40_000, seed=0)
    index = np.arange(len(batch))
    for field in ("num_steps", "level", "num_vars", "inner_steps", "sequential"):
        r = np.corrcoef(index, getattr(batch, field).astype(float))[0, 1]
        assert abs(r) < 5 / np.sqrt(len(batch)), (field, r)  # 5 standard errors of r under independence
    # Within one group, too: a run of equal step counts as long as the sorted one would be is impossible.
    group = np.flatnonzero((batch.level == 2) & (batch.num_vars == 4))
    assert np.mean(np.diff(batch.num_steps[group]) == 0) < 0.3  # 1/5 for i.i.d. steps, ~1 when sorted


def test_row_order_is_deterministic_in_the_seed():
    cfg = TaskConfig(num_steps=(2, 6))
    a, b, c = generate(cfg, 2000, seed=5), generate(cfg, 2000, seed=5), generate(cfg, 2000, seed=6)
    assert np.array_equal(a.num_steps, b.num_steps) and np.array_equal(canonical_keys(a), canonical_keys(b))
    assert not np.array_equal(a.num_steps, c.num_steps)


def _chi2_pvalue(values: np.ndarray, support: range) -> float:
    """p-value of ``values`` being uniform over ``support`` (chi-square goodness of fit)."""
    counts = np.array([np.sum(values == v) for v in support])
    assert counts.sum() == len(values), f"values outside {support}"
    return stats.chisquare(counts).pvalue


@pytest.mark.parametrize("num_test", [30, 400])  # 30: the small split that held only 3-step problems
def test_every_split_holds_every_step_count_in_proportion(num_test):
    cfg = TaskConfig(levels=(1, 2, 3), num_vars=(3, 5), num_steps=(2, 3))
    heldout = heldout_configs(cfg, more_steps=(4, 6))
    splits = build_splits(cfg, num_train=2000, num_test=num_test, seed=0, heldout=heldout, num_heldout=num_test)
    assert set(splits) == {"test", "test_more_steps", "test_more_vars", "train"}
    for name, (batch, _) in splits.items():
        _assert_ranges_in_proportion(batch, heldout.get(name, cfg), name)


def _assert_ranges_in_proportion(batch: ProblemBatch, cfg: TaskConfig, name: str) -> None:
    """Every step count and variable count of ``cfg`` is in ``batch``, about uniformly."""
    for field, (lo, hi) in (("num_steps", cfg.num_steps), ("num_vars", cfg.num_vars)):
        values = getattr(batch, field)
        assert set(np.unique(values)) == set(range(lo, hi + 1)), (name, field, np.bincount(values))
        assert _chi2_pvalue(values, range(lo, hi + 1)) > 1e-3, (name, field, np.bincount(values))


def test_stream_batches_are_not_a_curriculum():
    from data.causal_loop import ProblemStream

    batch = ProblemStream(TaskConfig(num_steps=(2, 6)), seed=0, chunk_size=4096).next_batch(4000)
    first, last = batch.num_steps[:2000].mean(), batch.num_steps[2000:].mean()
    assert abs(first - last) < 0.15, (first, last)  # sorted, the halves differed by ~2.4 steps


# ---- defect 2: keys blind to renaming ----------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), levels=st.sets(st.integers(1, 4), min_size=1),
       symmetric=st.booleans(), low=st.integers(3, 8), extra=st.integers(0, 3))
def test_renamed_problem_has_the_same_key(seed, levels, symmetric, low, extra):
    cfg = TaskConfig(levels=tuple(sorted(levels)), num_vars=(low, min(low + 3, 10)), extra_self_rules=extra,
                     **(SYMMETRIC if symmetric else {}))
    rng = np.random.default_rng(seed)
    batch = generate(cfg, 200, seed=seed)
    renamed = shuffle_commuting(rename(batch, random_renaming(batch, rng)), rng)
    # It is the same problem: simulating the renamed copy gives the renamed trace.
    trace = renamed.trace.copy()
    assert np.array_equal(simulate(renamed).trace, trace)
    assert np.array_equal(canonical_keys(renamed), canonical_keys(batch))


@pytest.mark.parametrize("cfg", ORACLE_CONFIGS)
def test_keys_partition_problems_like_the_brute_force_canonical_form(cfg):
    # Same key <=> same problem up to renaming, on settings where renamed duplicates and ties are frequent.
    batch = generate(cfg, 1500, seed=1)
    keys = canonical_keys(batch).tolist()
    problems = [batch.problem(i) for i in range(len(batch))]
    key_of_form, form_of_key, spellings = {}, {}, {}
    for key, p in zip(keys, problems, strict=True):
        form = brute_canonical(p)
        assert key_of_form.setdefault(form, key) == key, "a renamed copy got another key"
        assert form_of_key.setdefault(key, form) == form, "two different problems share a key"
        spellings.setdefault(form, set()).add(_form(p, tuple(range(p.num_vars))))
    assert any(len(s) > 1 for s in spellings.values())  # the sample does hold renamed copies (else vacuous)


def _renaming_invariants(batch: ProblemBatch) -> list[tuple]:
    """What a renaming keeps, per row: header, sorted initial and final values, sorted rule contents."""
    used = batch.phase != PAD_PHASE
    return [(bool(batch.sequential[i]), int(batch.num_steps[i]), int(batch.inner_steps[i]), int(batch.num_vars[i]),
             tuple(sorted(batch.init[i, : batch.num_vars[i]])), tuple(sorted(batch.final[i, : batch.num_vars[i]])),
             tuple(sorted(zip(batch.phase[i, used[i]], batch.op[i, used[i]], batch.const[i, used[i]],
                              batch.source[i, used[i]] == PAD, strict=True))))
            for i in range(len(batch))]


def test_different_problems_keep_different_keys():
    # 200K problems of the default setting, mostly distinct: every group of equal keys must agree on all
    # that a renaming keeps. A 64-bit hash collides with probability ~1e-9 here.
    batch = generate(TaskConfig(), 200_000, seed=2)
    keys = canonical_keys(batch)
    unique, inverse = np.unique(keys, return_inverse=True)
    repeated = np.flatnonzero(np.bincount(inverse) > 1)
    rows = np.flatnonzero(np.isin(inverse, repeated))
    by_key = {}
    for key, inv in zip(keys[rows].tolist(), _renaming_invariants(batch.take(rows)), strict=True):
        assert by_key.setdefault(key, inv) == inv, "two problems a renaming cannot map onto each other share a key"
    assert len(unique) > 0.95 * len(batch)


def test_keys_by_hand():
    # The pair of test_brute_force_reference_by_hand through the batch path: one key; the third: another.
    one = Problem(1, (3, 5), (Rule(ADD_CONST, 0, const=1), Rule(ADD_SOURCE, 1, 0)), (), 1, 1, "simultaneous", 10)
    two = Problem(1, (5, 3), (Rule(ADD_CONST, 1, const=1), Rule(ADD_SOURCE, 0, 1)), (), 1, 1, "simultaneous", 10)
    other = Problem(1, (5, 3), (Rule(ADD_CONST, 0, const=1), Rule(ADD_SOURCE, 1, 0)), (), 1, 1, "simultaneous", 10)
    assert _key_of(one) == _key_of(two) != _key_of(other)
    # Sequential: the listed order is part of the problem, renamed or not.
    def seq(p: Problem) -> Problem:
        return Problem(1, p.init, p.rules, (), 1, 1, "sequential", 10)

    swapped = Problem(1, (3, 5), one.rules[::-1], (), 1, 1, "sequential", 10)
    assert _key_of(seq(one)) == _key_of(seq(two)) != _key_of(swapped)


def test_symmetric_cycle_gets_one_key_whatever_the_rotation():
    # A = C, B = A, C = B with equal values: every variable looks alike, so a tie must be split; all 6
    # renamings (3 rotations x 2 listed orders) are the same problem.
    def cycle(order):
        rules = [Rule(COPY, t, s) for t, s in order]
        return Problem(2, (1, 1, 1), tuple(rules), (), 2, 1, "simultaneous", 10)
    base = [(0, 2), (1, 0), (2, 1)]
    keys = set()
    for name in itertools.permutations(range(3)):
        renamed = [(name[t], name[s]) for t, s in base]
        keys.add(_key_of(cycle(renamed)))
    assert len(keys) == 1
    mixed = Problem(2, (1, 1, 1), (Rule(COPY, 0, 2), Rule(COPY, 1, 0), Rule(MULTIPLY, 2, const=2)), (), 2, 1,
                    "simultaneous", 10)
    assert _key_of(mixed) not in keys


def _key_of(p: Problem) -> int:
    """The key of one readable problem, built as a one-row batch."""
    rules = [(r, 0) for r in p.rules] + [(r, 1) for r in p.outer_rules]

    def column(get, dtype) -> np.ndarray:
        return np.array([[get(r, phase) for r, phase in rules]], dtype)

    batch = ProblemBatch(
        level=np.array([p.level], np.int8), num_vars=np.array([p.num_vars], np.int8),
        num_steps=np.array([p.num_steps], np.int16), inner_steps=np.array([p.inner_steps], np.int16),
        sequential=np.array([p.semantics == "sequential"]), init=np.array([p.init], np.int32),
        op=column(lambda r, _: r.op, np.int8), target=column(lambda r, _: r.target, np.int8),
        source=column(lambda r, _: r.source, np.int8), const=column(lambda r, _: r.const, np.int32),
        phase=column(lambda _, phase: phase, np.int8), modulus=p.modulus)
    return int(canonical_keys(batch)[0])


def test_splits_hold_no_renamed_duplicates():
    # Brute force on a small setting, where renamed copies are common: no canonical form in two splits, none
    # twice in one.
    cfg = TaskConfig(levels=(1, 2), num_vars=(2, 3), num_steps=(1, 2), init_values=(0, 3), extra_self_rules=0)
    splits = build_splits(cfg, num_train=1500, num_test=200, seed=0, heldout=heldout_configs(cfg), num_heldout=100)
    owner = {}
    for name, (batch, _) in splits.items():
        for i in range(len(batch)):
            form = brute_canonical(batch.problem(i))
            assert form not in owner, f"{name} row {i} is a renamed copy of a problem in {owner.get(form)}"
            owner[form] = name


# ---- how many distinct problems the tiny preset's setting holds ------------------------------------------

TINY = TaskConfig(levels=(1,), num_vars=(2, 2), num_steps=(1, 1), init_values=(0, 4), constant_range=(1, 3),
                  multiplier_range=(2, 2), modulo_range=(2, 3), extra_self_rules=0)  # rl/presets/tiny.yaml


def _tiny_by_enumeration() -> int:
    """Distinct non-trivial problems of TINY, enumerated: a level-1 chain on two variables is one self rule on
    the root and one source rule on the other (reading the root), in either listed order, either semantics."""
    self_rules = [(ADD_CONST, c) for c in (1, 2, 3)] + [(MULTIPLY, 2)] + [(MODULO, c) for c in (2, 3)]
    source_rules = [(COPY, 0), (ADD_SOURCE, 0)] + [(COND_INC, c) for c in (1, 2, 3)]
    forms = set()
    for (sop, sc), (op, c), root, semantics, flip in itertools.product(self_rules, source_rules, (0, 1),
                                                                       ("simultaneous", "sequential"), (False, True)):
        rules = (Rule(sop, root, const=sc), Rule(op, 1 - root, root, c))
        for init in itertools.product(range(5), repeat=2):
            p = Problem(1, init, rules[::-1] if flip else rules, (), 1, 1, semantics, 100)
            if p.solve() != p.init:
                forms.add(brute_canonical(p))
    return len(forms)


def test_tiny_setting_holds_1932_distinct_problems():
    # 6 self rules x 5 source rules x 25 initial states x (1 simultaneous + 2 sequential orders) = 2250,
    # less the trivial ones; it was 3864 when a renamed copy counted as another problem.
    assert _tiny_by_enumeration() == 1932
    batch, keys = generate_unique(TINY, 1932, np.random.default_rng(0), np.zeros(0, np.uint64))
    assert len(np.unique(keys)) == 1932 and nontrivial(batch).all()
    test = build_splits(TINY, 0, 128, seed=1)["test"][1]
    message = r"1932 distinct non-trivial problems wanted, only 1804 new ones found in \d+ draws"
    with pytest.raises(ValueError, match=message + r".*held 1932 distinct ones, 128 of them already in other splits.*"
                                         r"names of their variables count as one"):
        generate_unique(TINY, 1932, np.random.default_rng(0), np.sort(test))


# ---- the validation split ---------------------------------------------------------------------------------

def test_validation_split_is_disjoint_like_train_and_leaves_test_as_it_was():
    cfg = TaskConfig(levels=(1, 2), num_vars=(2, 4), num_steps=(1, 3))
    heldout = heldout_configs(cfg)
    without = build_splits(cfg, 500, 100, seed=3, heldout=heldout, num_heldout=50)
    with_val = build_splits(cfg, 500, 100, seed=3, heldout=heldout, num_heldout=50, num_validation=80)
    assert "validation" not in without and len(with_val["validation"][0]) == 80
    for name in ("test", *heldout):  # drawn before validation: unchanged by it
        assert np.array_equal(without[name][1], with_val[name][1]), name
    _assert_ranges_in_proportion(with_val["validation"][0], cfg, "validation")  # train's setting
    keys = {name: set(k.tolist()) for name, (_, k) in with_val.items()}
    for a, b in itertools.combinations(keys, 2):
        assert not keys[a] & keys[b], (a, b)
