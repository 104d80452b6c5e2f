"""Arithmetic with exact answers, written as Python asserts a code model can continue:

    assert 1 + 3 == 4
    assert 2 + 0 == 2
    assert 3 + 1 ==

The model must write the digits of the answer (then end the line); reward 1 iff the first line
of its output, stripped, is exactly the answer's decimal digits, 0 otherwise (no partial
credit). Operands are drawn uniformly from [0, max_operand], so the default (4) keeps every
answer a single digit: easy enough that a tiny code model starts above zero and can improve.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from lcjax.rl.envs.base import Environment, Episode, StepResult, first_line


@dataclasses.dataclass(frozen=True)
class ArithmeticConfig:
    max_operand: int = 4
    few_shot: int = 2  # solved examples before the question
    ops: str = "+"  # any of "+-*"; subtraction keeps answers >= 0

    def __post_init__(self):
        if not (isinstance(self.max_operand, int) and self.max_operand >= 1):
            raise ValueError(f"env.arithmetic.max_operand={self.max_operand!r}: expected an integer >= 1")
        if not (isinstance(self.few_shot, int) and self.few_shot >= 0):
            raise ValueError(f"env.arithmetic.few_shot={self.few_shot!r}: expected an integer >= 0")
        if not self.ops or set(self.ops) - set("+-*"):
            raise ValueError(f"env.arithmetic.ops={self.ops!r}: expected a non-empty subset of '+-*'")


def _solve(a: int, op: str, b: int) -> int:
    return {"+": a + b, "-": a - b, "*": a * b}[op]


class _ArithmeticEpisode(Episode):
    def __init__(self, problem: dict[str, Any]):
        lines = [f"assert {a} {op} {b} == {_solve(a, op, b)}" for a, op, b in problem["shots"]]
        a, op, b = problem["question"]
        self.answer = str(_solve(a, op, b))
        self.prompt = "\n".join(lines + [f"assert {a} {op} {b} =="])

    def step(self, text: str) -> StepResult:
        return StepResult(float(first_line(text) == self.answer), True)


class ArithmeticEnv(Environment):
    name = "arithmetic"
    stop = ("\n",)

    def __init__(self, cfg: ArithmeticConfig = ArithmeticConfig()):
        self.cfg = cfg

    def _draw(self, rng: np.random.Generator) -> list:
        op = self.cfg.ops[int(rng.integers(len(self.cfg.ops)))]
        a, b = (int(x) for x in rng.integers(0, self.cfg.max_operand + 1, size=2))
        if op == "-" and b > a:
            a, b = b, a
        return [a, op, b]

    def sample(self, rng: np.random.Generator) -> dict[str, Any]:
        return {"shots": [self._draw(rng) for _ in range(self.cfg.few_shot)], "question": self._draw(rng)}

    def reset(self, problem: dict[str, Any]) -> Episode:
        return _ArithmeticEpisode(problem)
