"""Multi-turn arithmetic with a calculator tool, in the serving chat and tool-call formats.

The prompt is the server's chat template (lcjax.serve.chat_template) with one tool,
`calculator(expression)`. A model turn that calls it in the LongCat format

    <longcat_tool_call>{"name": "calculator", "arguments": {"expression": "12*7"}}</longcat_tool_call>

(parsed by lcjax.serve.tool_parser) gets the result back as a `<|tool|>` block and a new
assistant header, and continues; a turn without a call is the final answer: reward 1 iff its
first line is exactly the answer. Expressions are evaluated by a small AST walker (numbers and
+ - * / // % ** with bounded operands), never `eval`. More than `max_turns` turns is reward 0.
"""

from __future__ import annotations

import ast
import json
import operator
from typing import Any

import numpy as np

from lcjax.rl.envs.base import Environment, Episode, StepResult, first_line
from lcjax.serve.chat_template import DEFAULT_TEMPLATE, ChatTemplate
from lcjax.serve.tool_parser import parse_tool_calls

TOOL = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                   "required": ["expression"]}}}

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
        ast.Pow: operator.pow}


def calculate(expression: str) -> str:
    """The value of an arithmetic expression as text, or "error: ..." (never raises)."""

    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) \
                and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = value(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 1e6):
                raise ValueError("power too large")
            return _OPS[type(node.op)](left, right)
        raise ValueError(f"unsupported {type(node).__name__}")

    try:
        if len(expression) > 200:
            raise ValueError("expression too long")
        result = value(ast.parse(expression, mode="eval").body)
        if isinstance(result, float) and result.is_integer():
            result = int(result)
        return str(result)
    except (ValueError, SyntaxError, ZeroDivisionError, OverflowError, TypeError,
            RecursionError) as err:
        return f"error: {err}"


class _CalculatorEpisode(Episode):
    def __init__(self, problem: dict[str, Any], template: ChatTemplate, max_turns: int):
        self.answer, self.max_turns, self.turns = str(problem["answer"]), max_turns, 0
        messages = [{"role": "user", "content": f"What is {problem['question']}?"}]
        self.prompt = template.render(messages, add_generation_prompt=True, tools=[TOOL])

    def step(self, text: str) -> StepResult:
        self.turns += 1
        _, calls = parse_tool_calls(text, names=["calculator"])
        if not calls:
            return StepResult(float(first_line(text) == self.answer), True)
        if self.turns >= self.max_turns:
            return StepResult(0.0, True)
        try:
            expression = json.loads(calls[0]["arguments"]).get("expression", "")
        except (ValueError, AttributeError):
            expression = ""
        result = calculate(str(expression))
        return StepResult(0.0, False, f"\n<|tool|>\n{result}\n<|assistant|>\n")


class CalculatorEnv(Environment):
    name = "calculator"
    stop = ("\n<|", "</longcat_tool_call>")

    def __init__(self, max_operand: int = 20, max_turns: int = 3, template: str = DEFAULT_TEMPLATE):
        if max_operand < 1 or max_turns < 1:
            raise ValueError(f"calculator max_operand={max_operand}, max_turns={max_turns}: expected >= 1")
        self.max_operand, self.max_turns = max_operand, max_turns
        self.template = ChatTemplate(template)

    def sample(self, rng: np.random.Generator) -> dict[str, Any]:
        a, b = (int(x) for x in rng.integers(1, self.max_operand + 1, size=2))
        return {"question": f"{a} * {b}", "answer": a * b}

    def reset(self, problem: dict[str, Any]) -> Episode:
        return _CalculatorEpisode(problem, self.template, self.max_turns)
