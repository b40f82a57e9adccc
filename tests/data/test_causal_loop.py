"""The causal-loop task: semantics by hand, the vectorised generator against the reference interpreter,
text against the readable spec, structure of each level, keys, splits, parquet, stream."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from data.causal_loop import (
    Problem,
    ProblemStream,
    Rule,
    TaskConfig,
    build_splits,
    canonical_keys,
    concat,
    generate,
    generate_unique,
    heldout_configs,
    render,
    to_table,
)
from data.causal_loop.config import ADD_CONST, ADD_SOURCE, COND_INC, COPY, MODULO, MULTIPLY
from data.causal_loop.problem import format_state


def make(init, rules, steps=1, semantics="simultaneous", outer=(), inner_steps=1, modulus=100, level=1):
    return Problem(level=level, init=tuple(init), rules=tuple(rules), outer_rules=tuple(outer), num_steps=steps,
                   inner_steps=inner_steps, semantics=semantics, modulus=modulus)


# ---- semantics, worked by hand -----------------------------------------------------------------------

def test_simultaneous_rules_on_one_target_all_apply():
    # The reference kept only the last of `C += A; C += B`. Here: C = 3 + 1 + 2 = 6, reading old A and B.
    p = make([1, 2, 3], [Rule(ADD_SOURCE, 2, 0), Rule(ADD_SOURCE, 2, 1), Rule(ADD_CONST, 0, const=5)])
    assert p.solve() == (6, 2, 6)


def test_simultaneous_reads_old_state_sequential_reads_new():
    rules = [Rule(ADD_CONST, 0, const=5), Rule(ADD_SOURCE, 2, 0)]  # A = A + 5; C = C + A
    assert make([1, 2, 3], rules, semantics="simultaneous").solve() == (6, 2, 4)  # C = 3 + old A (1)
    assert make([1, 2, 3], rules, semantics="sequential").solve() == (6, 2, 9)  # C = 3 + new A (6)


def test_copy_chain_shifts_in_simultaneous_and_propagates_in_sequential():
    rules = [Rule(COPY, 1, 0), Rule(COPY, 2, 1)]  # B = A; C = B
    assert make([7, 0, 0], rules, semantics="simultaneous").trace() == [(7, 0, 0), (7, 7, 0)]
    assert make([7, 0, 0], rules, semantics="sequential").trace() == [(7, 0, 0), (7, 7, 7)]
    assert make([7, 0, 0], rules, semantics="sequential").trace(per_rule=True) == [(7, 0, 0), (7, 7, 0), (7, 7, 7)]


def test_each_op_and_the_modulus():
    # A = A * 3 (mod 10): 7 -> 21 -> 1; B = B % 4: 9 -> 1; if A > 5 then C = C + 1 (old A = 7): C 0 -> 1
    rules = [Rule(MULTIPLY, 0, const=3), Rule(MODULO, 1, const=4), Rule(COND_INC, 2, 0, const=5)]
    assert make([7, 9, 0], rules, modulus=10).solve() == (1, 1, 1)
    # Two steps: A 1 -> 3 -> 9; B 1 -> 1; C: old A was 1 then 3, never > 5, so C stays 1.
    assert make([7, 9, 0], rules, steps=3, modulus=10).solve() == (9, 1, 1)


def test_nested_loops_by_hand():
    # inner: A = A + 1 (3 times); outer: B = B + A. Step 1: A 1 -> 4, B = 4. Step 2: A -> 7, B = 11.
    p = make([1, 0], [Rule(ADD_CONST, 0, const=1)], steps=2, outer=[Rule(ADD_SOURCE, 1, 0)], inner_steps=3, level=4)
    assert p.trace() == [(1, 0), (4, 4), (7, 11)]
    assert p.answer() == "A=7, B=11"
    assert "Repeat 2 times: apply the inner rules 3 times, then the outer rules once." in p.question()


def test_prompt_states_semantics_modulus_and_answer_format():
    p = make([1, 2], [Rule(ADD_SOURCE, 1, 0)], steps=3, semantics="sequential", modulus=50)
    q = p.question()
    assert "Variables: A=1, B=2\nRules:\n1. B = B + A\nApply all the rules 3 times." in q
    assert "sequential" in q and "modulo 50" in q and q.endswith("<answer> </answer> as: A=?, B=?")
    assert p.chat_prompt() == [{"role": "user", "content": q}]
    assert p.base_prompt().endswith(f"User: {q}\nAssistant:")
    assert p.solution() == ("<think>\nstep 0: A=1, B=2\nstep 1: A=1, B=3\nstep 2: A=1, B=4\nstep 3: A=1, B=5\n"
                            "</think>\n<answer>A=1, B=5</answer>")


# ---- the vectorised generator equals the reference --------------------------------------------------

CONFIGS = [
    TaskConfig(),
    TaskConfig(levels=(1, 2), num_vars=(2, 6), num_steps=(1, 6), semantics=("sequential",), extra_self_rules=3),
    TaskConfig(levels=(3, 4), num_vars=(3, 8), inner_steps=(1, 4), modulus=7, init_values=(0, 6),
               constant_range=(0, 6), multiplier_range=(0, 6), modulo_range=(1, 7)),
    TaskConfig(modulus=1_000_000, init_values=(0, 999_999), multiplier_range=(2, 999_999), constant_range=(0, 10**5)),
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_batch_simulation_equals_reference_interpreter(cfg):
    batch = generate(cfg, 1500, seed=1)
    for i in range(len(batch)):
        p = batch.problem(i)
        expected = np.array(p.trace())
        got = batch.trace[i, : p.num_steps + 1, : p.num_vars]
        assert np.array_equal(got, expected), (i, p)
        assert (batch.trace[i, p.num_steps:] == batch.trace[i, p.num_steps]).all()  # past the end: unchanged


@pytest.mark.parametrize("cfg", CONFIGS)
def test_columnar_text_equals_readable_spec(cfg):
    batch = generate(cfg, 600, seed=2)
    questions = render.questions(batch)
    answers = render.answers(batch)
    solutions = render.solutions(batch)
    bases = render.base_prompts(questions)
    compact = render.compact_questions(batch)
    assert len(questions) == len(answers) == len(solutions) == len(compact) == len(batch)
    for i in range(len(batch)):
        p = batch.problem(i)
        assert questions[i].as_py() == p.question()
        assert compact[i].as_py() == p.compact_question()
        assert answers[i].as_py() == p.answer()
        assert solutions[i].as_py() == p.solution()
        assert bases[i].as_py() == p.base_prompt()


def test_generation_is_deterministic_per_seed():
    a, b, c = generate(TaskConfig(), 500, 3), generate(TaskConfig(), 500, 3), generate(TaskConfig(), 500, 4)
    assert np.array_equal(canonical_keys(a), canonical_keys(b))
    assert not np.array_equal(canonical_keys(a), canonical_keys(c))
    assert render.questions(a).equals(render.questions(b))


# ---- structure of each level ------------------------------------------------------------------------

def _edges(p: Problem) -> set[tuple[int, int]]:
    return {(r.source, r.target) for r in p.rules + p.outer_rules if r.source >= 0}


def _has_cycle(n: int, edges: set[tuple[int, int]]) -> bool:
    reach = {v: {t for s, t in edges if s == v} for v in range(n)}
    for _ in range(n):
        reach = {v: r | {w for u in r for w in reach[u]} for v, r in reach.items()}
    return any(v in reach[v] for v in range(n))


def test_levels_have_their_structure():
    batch = generate(TaskConfig(num_vars=(3, 6)), 800, seed=5)
    seen = set()
    for i in range(len(batch)):
        p = batch.problem(i)
        edges, n = _edges(p), p.num_vars
        seen.add(p.level)
        if p.level == 1:  # a chain: n-1 edges, no cycle, every variable but the root reads another
            assert len(edges) == n - 1 and not _has_cycle(n, edges)
        elif p.level == 2:  # one cycle through all variables
            assert len(edges) == n and _has_cycle(n, edges)
            assert {s for s, _ in edges} == {t for _, t in edges} == set(range(n))
        elif p.level == 3:  # acyclic, and some variable is fed by two different variables
            assert not _has_cycle(n, edges)
            fan_in = {t: {s for s, tt in edges if tt == t} for t in range(n)}
            assert max(len(v) for v in fan_in.values()) >= 2
        else:  # nested: an inner cycle, outer rules, inner repetitions
            inner = {(r.source, r.target) for r in p.rules if r.source >= 0}
            assert p.outer_rules and p.inner_steps >= 2 and _has_cycle(n, inner)
    assert seen == {1, 2, 3, 4}


# ---- keys, splits, held-out --------------------------------------------------------------------------

def test_keys_ignore_order_of_commuting_rules_only():
    batch = generate(TaskConfig(levels=(1,), num_vars=(4, 4)), 50, seed=6)
    simultaneous = np.flatnonzero(~batch.sequential)[0]
    sequential = np.flatnonzero(batch.sequential)[0]
    for i, same in ((simultaneous, True), (sequential, False)):
        one = batch.take(np.array([i]))
        swapped = batch.take(np.array([i]))
        targets = swapped.target[0]
        # Swap two used slots with different targets: same problem only under simultaneous semantics.
        r, s = 0, next(k for k in range(1, swapped.op.shape[1]) if targets[k] != targets[0] and swapped.op[0, k] >= 0)
        for field in (swapped.op, swapped.target, swapped.source, swapped.const, swapped.phase):
            field[0, [r, s]] = field[0, [s, r]]
        assert (canonical_keys(one)[0] == canonical_keys(swapped)[0]) == same


def test_keys_do_not_depend_on_batch_padding():
    narrow = generate(TaskConfig(num_vars=(3, 3)), 20, seed=7)
    wide = concat([narrow, generate(TaskConfig(num_vars=(8, 8)), 5, seed=8)])
    assert wide.init.shape[1] > narrow.init.shape[1]
    assert np.array_equal(canonical_keys(wide)[:20], canonical_keys(narrow))


def test_splits_are_disjoint_and_deduplicated():
    cfg = TaskConfig(levels=(1, 2), num_vars=(2, 3), num_steps=(1, 2), init_values=(0, 3))
    splits = build_splits(cfg, num_train=2000, num_test=300, seed=0, heldout=heldout_configs(cfg), num_heldout=100)
    keys = {name: set(k.tolist()) for name, (_, k) in splits.items()}
    for name, (batch, k) in splits.items():
        assert len(set(k.tolist())) == len(k) == len(batch), name  # no duplicate within a split
        assert np.array_equal(canonical_keys(batch), k)
    names = list(keys)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not keys[a] & keys[b], (a, b)


def test_duplicates_can_be_allowed_but_never_across_splits():
    cfg = TaskConfig(levels=(1,), num_vars=(2, 2), num_steps=(1, 1), init_values=(0, 1), semantics=("sequential",),
                     extra_self_rules=0, op_weights={"copy": 1, "add_const": 1})
    splits = build_splits(cfg, num_train=300, num_test=5, seed=0, dedup=False)
    train_keys = splits["train"][1]
    assert len(np.unique(train_keys)) < len(train_keys)  # a tiny space: duplicates were kept
    assert not set(train_keys.tolist()) & set(splits["test"][1].tolist())


def test_trivial_problems_are_dropped_unless_allowed():
    # Fixed points (final state == initial state) are answered by echoing the question.
    cfg = TaskConfig(levels=(1,), num_vars=(2, 2), num_steps=(1, 1), init_values=(0, 2), extra_self_rules=0)
    batch, _ = generate_unique(cfg, 100, np.random.default_rng(0), np.zeros(0, np.uint64))
    assert (batch.final != batch.init).any(axis=1).all()
    stream = ProblemStream(cfg, seed=0, chunk_size=64).next_batch(200)
    assert (stream.final != stream.init).any(axis=1).all()
    allowed, _ = generate_unique(cfg.replace(allow_trivial=True), 100, np.random.default_rng(0),
                                 np.zeros(0, np.uint64))
    assert (allowed.final == allowed.init).all(axis=1).any()


def test_too_small_a_setting_fails_with_advice():
    cfg = TaskConfig(levels=(1,), num_vars=(2, 2), num_steps=(1, 1), init_values=(0, 1), semantics=("sequential",),
                     extra_self_rules=0, op_weights={"copy": 1, "add_const": 1})
    with pytest.raises(ValueError, match="too few distinct problems.*allow duplicates"):
        generate_unique(cfg, 5000, np.random.default_rng(0), np.zeros(0, np.uint64))


def test_heldout_splits_go_beyond_training():
    cfg = TaskConfig(num_vars=(3, 4), num_steps=(2, 3))
    held = heldout_configs(cfg)
    more_steps = generate(held["test_more_steps"], 200, 0)
    more_vars = generate(held["test_more_vars"], 200, 0)
    assert more_steps.num_steps.min() > 3 and more_vars.num_vars.min() > 4
    with pytest.raises(ValueError, match="must all exceed"):
        heldout_configs(cfg, more_steps=(3, 5))


# ---- config validation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"levels": (1, 5)}, r"unknown level\(s\) \[5\]; valid levels are \[1, 2, 3, 4\]"),
    ({"num_vars": (5, 3)}, "num_vars"),
    ({"num_vars": (2, 4)}, "levels 3 and 4 need at least 3 variables"),
    ({"init_values": (0, 100)}, "init_values"),
    ({"op_weights": {"divide": 1.0}}, r"unknown operation\(s\) \['divide'\]; valid names are"),
    ({"op_weights": {"copy": 1.0}}, "at least one self operation"),
    ({"semantics": ("parallel",)}, "valid values are"),
    ({"modulus": 1}, "modulus"),
])
def test_bad_config_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TaskConfig(**kwargs)


def test_config_accepts_lists_from_yaml():
    assert TaskConfig(levels=[1, 2], num_vars=[3, 4]).levels == (1, 2)


# ---- verl-schema tables -------------------------------------------------------------------------------

def test_table_follows_verl_schema_and_matches_problems():
    batch = generate(TaskConfig(), 40, seed=9)
    rows = to_table(batch, "test", index_offset=100).to_pylist()
    for i, row in enumerate(rows):
        p = batch.problem(i)
        assert row["data_source"] == "causal_loop" and row["ability"] == "reasoning"
        assert row["prompt"] == p.chat_prompt()
        assert row["reward_model"] == {"style": "rule", "ground_truth": {
            "answer": p.answer(), "initial": ", ".join(f"{'ABCDEFGHIJ'[j]}={v}" for j, v in enumerate(p.init))}}
        info = row["extra_info"]
        assert (info["split"], info["index"], info["level"], info["num_vars"], info["num_steps"]) == (
            "test", 100 + i, p.level, p.num_vars, p.num_steps)
        assert info["semantics"] == p.semantics and info["solution"] == p.solution()
    base = to_table(batch, "test", template="base").to_pylist()
    assert base[0]["prompt"][0]["content"] == batch.problem(0).base_prompt()
    with pytest.raises(ValueError, match="valid templates"):
        to_table(batch, "test", template="llama")


# ---- the stream -----------------------------------------------------------------------------------------

def test_stream_is_deterministic_and_resumes_exactly():
    cfg = TaskConfig()
    full = ProblemStream(cfg, seed=11, chunk_size=64)
    reference = [full.next_batch(50) for _ in range(5)]  # crosses chunk boundaries
    resumed = ProblemStream(cfg, seed=11, chunk_size=64)
    first = [resumed.next_batch(50) for _ in range(2)]
    state = resumed.state_dict()
    again = ProblemStream(cfg, seed=11, chunk_size=64)
    again.load_state_dict(state)
    rest = [again.next_batch(50) for _ in range(3)]
    for a, b in zip(reference, first + rest, strict=True):
        assert np.array_equal(canonical_keys(a), canonical_keys(b))
    with pytest.raises(ValueError, match="same seed"):
        ProblemStream(cfg, seed=12).load_state_dict(state)


def test_stream_iterator_resumes_between_problems_and_excludes_test_keys():
    cfg = TaskConfig(levels=(1,), num_vars=(2, 2), num_steps=(1, 1), init_values=(0, 3))
    test_keys = canonical_keys(generate(cfg, 200, seed=0))
    stream = ProblemStream(cfg, seed=1, chunk_size=32, exclude_keys=test_keys)
    it = iter(stream)
    head = [next(it) for _ in range(45)]
    state = stream.state_dict()
    other = ProblemStream(cfg, seed=1, chunk_size=32, exclude_keys=test_keys)
    other.load_state_dict(state)
    tail = [next(iter(other)) for _ in range(1)]
    assert tail[0] == next(it)
    batch = ProblemStream(cfg, seed=1, chunk_size=32, exclude_keys=test_keys).next_batch(500)
    assert not set(canonical_keys(batch).tolist()) & set(test_keys.tolist())
    assert all(isinstance(p, Problem) for p in head)


def test_arrow_join_keeps_rows_whose_pieces_are_all_null():
    # Guards the workaround in render._concat: pyarrow drops such rows without the leading constant piece.
    pieces = pa.array([None, "x"], pa.string())
    assert render._concat(pieces, pieces).to_pylist() == ["", "xx"]


def test_compact_question_states_the_same_problem_in_a_third_of_the_tokens():
    from data.tokenizer import build_tokenizer
    from rl.prompts import encode_prompt

    batch = generate(TaskConfig(levels=(1, 2, 4), num_vars=(3, 4), num_steps=(2, 4)), 300, seed=5)
    full, compact = to_table(batch, "test"), to_table(batch, "test", question_style="compact")
    p = batch.problem(0)
    # the state, the rules in order, the loop, the semantics and the modulus: every fact of the full prompt
    text = compact.column("prompt")[0].as_py()[0]["content"]
    assert text.startswith(format_state(p.init) + "\n")
    assert f", {p.semantics}, modulo {p.modulus}" in text and all(r.text() in text for r in p.rules)
    assert full.column("reward_model").equals(compact.column("reward_model"))
    tok = build_tokenizer()
    n_full = [len(encode_prompt(tok, r, "chat")) for r in full.to_pylist()]
    n_compact = [len(encode_prompt(tok, r, "chat")) for r in compact.to_pylist()]
    assert sum(n_compact) < 0.45 * sum(n_full)
    assert all(tok.unk_token_id not in encode_prompt(tok, r, "chat") for r in compact.to_pylist())
    with pytest.raises(ValueError, match="question_style"):
        to_table(batch, "test", question_style="short")
