"""Rollout on the serve engine: one Engine per live policy version, so a trajectory is decoded
by one version from its first token to its last.

Each Engine (continuous batching, paged cache) holds the variables of exactly one version.
Starting a group adds G requests to the engine of the newest version; a multi-turn trajectory's
next turn (prompt + output + environment message) goes back to the *same* engine. Loading a new
version takes an idle engine (no unfinished request: its version was evicted) and swaps its
variables, so weights move from the learner to the rollout without a restart or a recompile:
the engines share one set of jitted steps, whose variables are an argument.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np

from lcjax.config import ModelConfig
from lcjax.rl.config import RolloutConfig
from lcjax.rl.envs.base import Environment, Episode
from lcjax.serve.engine import Engine, EngineConfig
from lcjax.serve.sampling import SamplingParams


_SHARED_STEPS: dict = {}  # (ModelConfig, EngineConfig) -> Engine.compiled_steps every engine shares


@dataclasses.dataclass
class Trajectory:
    """One sample: the token sequence the policy saw, which tokens it generated and their
    rollout logprobs, the version that generated every one of them, and the reward."""

    gid: int
    version: int
    episode: Episode
    tokens: list[int]
    gen_mask: list[bool]
    logprobs: list[float]
    versions_used: set = dataclasses.field(default_factory=set)  # engines' versions seen (1)
    reward: float = 0.0
    done: bool = False
    turns: int = 0
    generated: int = 0
    finish_reason: Optional[str] = None


@dataclasses.dataclass
class Group:
    gid: int
    version: int
    problem: dict
    trajectories: list[Trajectory]

    @property
    def rewards(self) -> np.ndarray:
        return np.array([t.reward for t in self.trajectories], np.float32)

    @property
    def done(self) -> bool:
        return all(t.done for t in self.trajectories)


class Rollout:
    """Engines per version, groups in flight, trajectories stepped through their environment."""

    def __init__(self, model_cfg: ModelConfig, tokenizer: Any, cfg: RolloutConfig,
                 env: Environment, max_versions: int, seed: int = 0):
        self.model_cfg, self.tokenizer, self.cfg, self.env = model_cfg, tokenizer, cfg, env
        self.engine_config = EngineConfig(
            max_num_seqs=cfg.max_num_seqs, max_model_len=cfg.max_model_len, page_size=cfg.page_size,
            prefill_chunk=cfg.prefill_chunk, max_prefill_seqs=min(cfg.max_prefill_seqs, cfg.max_num_seqs),
            seed=seed)
        self.max_versions = max_versions
        self.engines: dict[int, Engine] = {}  # version -> engine
        self._idle: list[Engine] = []
        self.groups: dict[int, Group] = {}
        self._requests: dict[str, Trajectory] = {}
        self._rng = np.random.default_rng(seed)
        self.tokens_generated = 0

    # ---------------------------------------------------------------------------- versions
    def _new_engine(self, variables: dict) -> Engine:
        engine = Engine(self.model_cfg, variables, self.tokenizer, self.engine_config)
        key = (self.model_cfg, self.engine_config)
        # Engines of one configuration share compiled steps (variables are an argument), so a
        # new version's engine, or a new run in the same process, compiles nothing again.
        if key in _SHARED_STEPS:
            engine.share_steps(_SHARED_STEPS[key])
        else:
            _SHARED_STEPS[key] = engine.compiled_steps
        return engine

    def load(self, version: int, variables: dict) -> None:
        """Make `version` live (its variables on an idle engine, or a new one)."""
        if version in self.engines:
            raise ValueError(f"version {version} is already loaded")
        if len(self.engines) >= self.max_versions:
            raise RuntimeError(f"{len(self.engines)} versions live ({sorted(self.engines)}); "
                               f"evict one first (at most {self.max_versions})")
        if self._idle:
            engine = self._idle.pop()
            engine.variables = variables
        else:
            engine = self._new_engine(variables)
        self.engines[version] = engine

    def evict(self, version: int) -> None:
        engine = self.engines[version]
        if engine.has_unfinished():
            raise RuntimeError(f"version {version} still has running trajectories")
        del self.engines[version]
        self._idle.append(engine)

    def running_versions(self) -> set[int]:
        return {v for v, e in self.engines.items() if e.has_unfinished()}

    # ------------------------------------------------------------------------------ groups
    def sampling_params(self) -> SamplingParams:
        """One turn's sampling settings (the benchmark replaces this to force long-tailed
        lengths)."""
        return SamplingParams(max_tokens=self.cfg.max_tokens, temperature=self.cfg.temperature,
                              top_p=self.cfg.top_p, stop=tuple(self.env.stop), logprobs=0,
                              seed=int(self._rng.integers(0, 2**31)))

    def _submit(self, traj: Trajectory, tokens: list[int]) -> bool:
        """Queue the trajectory's next turn on its version's engine; False if it cannot fit."""
        if len(tokens) >= self.cfg.max_model_len:
            return False
        rid = self.engines[traj.version].add_request(tokens, self.sampling_params())
        self._requests[rid] = traj
        return True

    def start_group(self, gid: int, version: int, problem: dict) -> Group:
        """G trajectories of `problem` on `version` (must be loaded)."""
        if version not in self.engines:
            raise ValueError(f"version {version} is not loaded (live: {sorted(self.engines)})")
        trajs = []
        for _ in range(self.cfg.group_size):
            episode = self.env.reset(problem)
            prompt = self.tokenizer.encode(episode.prompt)
            t = Trajectory(gid, version, episode, list(prompt), [False] * len(prompt), [0.0] * len(prompt))
            if not self._submit(t, t.tokens):
                raise ValueError(f"prompt of {len(prompt)} tokens does not fit rollout.max_model_len="
                                 f"{self.cfg.max_model_len}")
            trajs.append(t)
        group = Group(gid, version, problem, trajs)
        self.groups[gid] = group
        return group

    def has_unfinished(self) -> bool:
        return any(e.has_unfinished() for e in self.engines.values())

    def step(self) -> list[Group]:
        """One engine step per version with work; the groups whose every trajectory finished."""
        finished = []
        for version, engine in sorted(self.engines.items()):
            if not engine.has_unfinished():
                continue
            for out in engine.step():
                traj = self._requests.get(out.request_id)
                if traj is None:
                    continue
                traj.versions_used.add(version)
                traj.tokens.extend(out.new_token_ids)
                traj.gen_mask.extend([True] * len(out.new_token_ids))
                lps = [lp.logprob for lp in out.logprobs or []]
                if len(lps) != len(out.new_token_ids):  # cannot happen with logprobs=0
                    raise RuntimeError("engine returned logprobs for a different number of tokens")
                traj.logprobs.extend(lps)
                traj.generated += len(out.new_token_ids)
                self.tokens_generated += len(out.new_token_ids)
                if out.finished:
                    del self._requests[out.request_id]
                    self._end_turn(traj, out.text, out.finish_reason)
                    group = self.groups[traj.gid]
                    if traj.done and group.done:
                        finished.append(self.groups.pop(traj.gid))
        return finished

    def _end_turn(self, traj: Trajectory, text: str, reason: Optional[str]) -> None:
        traj.turns += 1
        traj.finish_reason = reason
        try:
            result = traj.episode.step(text)
        except Exception:  # noqa: BLE001 - a broken checker scores the sample 0, never the run
            traj.reward, traj.done = 0.0, True
            return
        traj.reward = float(result.reward)
        if result.done or reason == "error":
            traj.done = True
            return
        message = self.tokenizer.encode(result.message or "")
        if len(traj.tokens) + len(message) >= self.cfg.max_model_len:
            traj.reward, traj.done = 0.0, True  # out of context: the episode ends unsolved
            return
        traj.tokens.extend(message)
        traj.gen_mask.extend([False] * len(message))
        traj.logprobs.extend([0.0] * len(message))
        self._submit(traj, traj.tokens)
