"""The environment interface: a problem is JSON data, an episode turns model text into rewards.

    problem = env.sample(rng)            # JSON-able dict (checkpointed with the run)
    episode = env.reset(problem)         # episode.prompt: the text the model continues
    result  = episode.step(model_text)   # StepResult(reward, done, message)

`message` (when not done) is text appended after the model's turn before it continues: a tool
result and the next assistant header, for instance. Rewards are exact: 1.0 for a verified
answer, 0.0 for anything else. Bad model output (nothing, garbage, a crashing or endless
program) is reward 0 and `done`, never an exception.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Optional

import numpy as np


@dataclasses.dataclass(frozen=True)
class StepResult:
    reward: float
    done: bool
    message: Optional[str] = None  # appended after the model's text when not done


class Episode(abc.ABC):
    """One conversation with an environment (stateful; one per trajectory)."""

    prompt: str

    @abc.abstractmethod
    def step(self, text: str) -> StepResult:
        """Score (or answer) one model turn."""


class Environment(abc.ABC):
    """A task distribution with a checker."""

    name: str = ""
    stop: tuple[str, ...] = ()  # stop strings that end a model turn
    max_turns: int = 1

    @abc.abstractmethod
    def sample(self, rng: np.random.Generator) -> dict[str, Any]:
        """A new problem (plain JSON data)."""

    @abc.abstractmethod
    def reset(self, problem: dict[str, Any]) -> Episode:
        """A fresh episode of `problem`."""


def first_line(text: str) -> str:
    """The text up to its first newline, stripped: where a one-line answer is read."""
    return text.split("\n", 1)[0].strip()
