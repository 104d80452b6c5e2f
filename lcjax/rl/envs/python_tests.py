"""Write a Python function; reward 1 iff its unit tests pass in the sandbox (sandbox.py).

The prompt is a signature and docstring; the model writes the body. The program run is the
prompt, the model's text, then the problem's asserts: exit status 0 within the limits is
reward 1; a syntax error, a failing assert, an exception, a timeout or an endless loop is 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lcjax.rl.envs.base import Environment, Episode, StepResult
from lcjax.rl.envs.sandbox import run_python

PROBLEMS = (
    {"prompt": 'def add(a, b):\n    """Return a + b."""\n', "tests": ["add(1, 2) == 3", "add(-4, 4) == 0"]},
    {"prompt": 'def square(x):\n    """Return x squared."""\n', "tests": ["square(3) == 9", "square(-2) == 4"]},
    {"prompt": 'def is_even(n):\n    """Return True if n is even."""\n',
     "tests": ["is_even(4) is True", "is_even(7) is False"]},
    {"prompt": 'def first(items):\n    """Return the first element of items."""\n',
     "tests": ["first([5, 6]) == 5", "first('ab') == 'a'"]},
    {"prompt": 'def negate(x):\n    """Return -x."""\n', "tests": ["negate(2) == -2", "negate(0) == 0"]},
    {"prompt": 'def length(s):\n    """Return the number of items in s."""\n',
     "tests": ["length([1, 2, 3]) == 3", "length('') == 0"]},
)


class _PythonEpisode(Episode):
    def __init__(self, problem: dict[str, Any], timeout: float):
        self.problem, self.timeout = problem, timeout
        self.prompt = problem["prompt"]

    def step(self, text: str) -> StepResult:
        tests = "\n".join(f"assert {t}" for t in self.problem["tests"])
        program = f"{self.prompt}{text}\n\n{tests}\n"
        result = run_python(program, timeout=self.timeout, cpu_seconds=max(1, int(self.timeout)))
        return StepResult(float(result.ok), True)


class PythonTestsEnv(Environment):
    name = "python_tests"
    stop = ("\ndef ", "\nclass ", "\nassert ", "\nif __name__")

    def __init__(self, timeout: float = 3.0, problems=PROBLEMS):
        if timeout <= 0:
            raise ValueError(f"env.timeout={timeout}: expected > 0 seconds")
        self.timeout, self.problems = timeout, tuple(problems)

    def sample(self, rng: np.random.Generator) -> dict[str, Any]:
        return dict(self.problems[int(rng.integers(len(self.problems)))])

    def reset(self, problem: dict[str, Any]) -> Episode:
        return _PythonEpisode(problem, self.timeout)
