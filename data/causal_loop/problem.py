"""One causal-loop problem, its plain-Python interpreter and its text: the readable specification.

The batch generator (``generator.py``) and the columnar renderer (``render.py``) are fast versions of
what is written here; tests hold them equal to this file on thousands of random problems.

Semantics, stated in every prompt:
- **sequential**: the rules apply one at a time in the listed order; each reads the current state,
  including what the rules before it just wrote.
- **simultaneous**: every rule reads the state from before the current application of its rule set.
  Several rules on one target compose in the listed order: each transforms the target's running
  value, while its source (and a condition's variable) is read from the old state. So
  ``C = C + A; C = C + B`` gives ``C_old + A_old + B_old`` — nothing is dropped.

Level 4 (nested loops) runs ``num_steps`` outer steps; each runs the inner rules ``inner_steps``
times and then the outer rules once. Levels 1-3 have only (inner) rules and ``inner_steps == 1``.
All arithmetic is modulo ``modulus``.
"""

from __future__ import annotations

from dataclasses import dataclass

from data.causal_loop.config import ADD_CONST, ADD_SOURCE, COND_INC, COPY, MODULO, MULTIPLY

VAR_NAMES = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

SEMANTICS_TEXT = {
    "simultaneous": (
        "Updates are simultaneous: each application of a rule set reads only the values from before it, "
        "and rules on the same variable are applied to it one after another in the listed order."
    ),
    "sequential": (
        "Updates are sequential: the rules are applied one at a time in the listed order, "
        "each reading the values left by the rules before it."
    ),
}
BASE_PREAMBLE = (
    "A conversation between User and Assistant. The User gives a problem; the Assistant reasons step by step "
    "inside <think> </think> and then gives the final answer inside <answer> </answer>.\n"
)


@dataclass(frozen=True)
class Rule:
    """``target <- op(target, source, const)``; ``source`` is -1 for ops that read no other variable."""

    op: int
    target: int
    source: int = -1
    const: int = 0

    def apply(self, current: int, source_value: int, modulus: int) -> int:
        if self.op == COPY:
            value = source_value
        elif self.op == ADD_CONST:
            value = current + self.const
        elif self.op == ADD_SOURCE:
            value = current + source_value
        elif self.op == MULTIPLY:
            value = current * self.const
        elif self.op == MODULO:
            value = current % self.const
        elif self.op == COND_INC:
            value = current + 1 if source_value > self.const else current
        else:
            raise ValueError(f"unknown op code {self.op}")
        return value % modulus

    def text(self) -> str:
        t = VAR_NAMES[self.target]
        s = VAR_NAMES[self.source] if self.source >= 0 else ""
        return {
            COPY: f"{t} = {s}",
            ADD_CONST: f"{t} = {t} + {self.const}",
            ADD_SOURCE: f"{t} = {t} + {s}",
            MULTIPLY: f"{t} = {t} * {self.const}",
            MODULO: f"{t} = {t} % {self.const}",
            COND_INC: f"if {s} > {self.const} then {t} = {t} + 1",
        }[self.op]


def format_state(state: tuple[int, ...] | list[int]) -> str:
    """``(3, 7)`` -> ``"A=3, B=7"``: the answer format, also used for every step of a worked solution."""
    return ", ".join(f"{VAR_NAMES[i]}={v}" for i, v in enumerate(state))


@dataclass(frozen=True)
class Problem:
    level: int
    init: tuple[int, ...]
    rules: tuple[Rule, ...]  # the inner rules; all rules for levels 1-3
    outer_rules: tuple[Rule, ...]  # level 4 only
    num_steps: int
    inner_steps: int
    semantics: str
    modulus: int

    @property
    def num_vars(self) -> int:
        return len(self.init)

    @property
    def nested(self) -> bool:
        return bool(self.outer_rules)

    # ---- interpreter ---------------------------------------------------------------------------
    def _apply_rule_set(self, state: list[int], rules: tuple[Rule, ...], per_rule: list | None) -> list[int]:
        old = list(state)
        new = list(state)
        sequential = self.semantics == "sequential"
        for rule in rules:
            read = new if sequential else old
            source_value = read[rule.source] if rule.source >= 0 else 0
            new[rule.target] = rule.apply(new[rule.target], source_value, self.modulus)
            if per_rule is not None:
                per_rule.append(tuple(new))
        return new

    def trace(self, per_rule: bool = False) -> list[tuple[int, ...]]:
        """States ``[init, after step 1, …, after step N]``; with ``per_rule`` the state after every rule
        application instead (meaningful as a worked solution in sequential mode)."""
        state = list(self.init)
        states: list[tuple[int, ...]] = [tuple(state)]
        record = states if per_rule else None
        for _ in range(self.num_steps):
            for _ in range(self.inner_steps):
                state = self._apply_rule_set(state, self.rules, record)
            if self.outer_rules:
                state = self._apply_rule_set(state, self.outer_rules, record)
            if not per_rule:
                states.append(tuple(state))
        return states

    def solve(self) -> tuple[int, ...]:
        return self.trace()[-1]

    # ---- text ----------------------------------------------------------------------------------
    def question(self) -> str:
        """The problem statement (the user message of the chat prompt)."""
        names = ", ".join(f"{VAR_NAMES[i]}=?" for i in range(self.num_vars))
        if self.nested:
            rules = f"Inner rules:\n{_numbered(self.rules)}\nOuter rules:\n{_numbered(self.outer_rules)}"
            loop = (f"Repeat {self.num_steps} times: apply the inner rules {self.inner_steps} times, "
                    f"then the outer rules once.")
        else:
            rules = f"Rules:\n{_numbered(self.rules)}"
            loop = f"Apply all the rules {self.num_steps} times."
        return (
            f"Variables: {format_state(self.init)}\n{rules}\n{loop} {SEMANTICS_TEXT[self.semantics]} "
            f"All arithmetic is modulo {self.modulus}.\n"
            f"What are the final values? Think inside <think> </think>, then answer inside <answer> </answer> "
            f"as: {names}"
        )

    def compact_question(self) -> str:
        """The same problem without the instructions' prose (``question_style="compact"``): the state, the
        rules in order, and one line with the loop, the semantics and the modulus. A third of the tokens of
        ``question``, for models trained from scratch, which gain nothing from the prose."""
        if self.nested:
            rules = f"Inner rules:\n{_lines(self.rules)}\nOuter rules:\n{_lines(self.outer_rules)}"
            loop = f"{self.num_steps} times: inner {self.inner_steps} times, then outer once"
        else:
            rules, loop = _lines(self.rules), f"{self.num_steps} times"
        return f"{format_state(self.init)}\n{rules}\n{loop}, {self.semantics}, modulo {self.modulus}"

    def chat_prompt(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.question()}]

    def base_prompt(self) -> str:
        """Plain text for a base (non-chat) model; the model continues after ``Assistant:``."""
        return f"{BASE_PREAMBLE}User: {self.question()}\nAssistant:"

    def answer(self) -> str:
        """The ground truth in the answer format, without tags: ``"A=1, B=2"``."""
        return format_state(self.solve())

    def solution(self) -> str:
        """A worked solution: the initial state as step 0 and the state after every step in <think>, then
        the answer. Restating the initial values first makes every later step a local update of the line
        above it; a model trained from scratch learns to look values up much sooner this way."""
        states = self.trace()
        steps = "\n".join(f"step {n}: {format_state(s)}" for n, s in enumerate(states))
        return f"<think>\n{steps}\n</think>\n<answer>{format_state(states[-1])}</answer>"


def _numbered(rules: tuple[Rule, ...]) -> str:
    return "\n".join(f"{i}. {rule.text()}" for i, rule in enumerate(rules, start=1))


def _lines(rules: tuple[Rule, ...]) -> str:
    return "\n".join(rule.text() for rule in rules)
