"""The RL controller: rollout, environment rewards, version window, learner, in one loop.

Each iteration: start groups while admission allows (lcjax.rl.versions); if the learner is
free and ready, take a batch and train it; one engine step per live version; score finished
groups (online filtering drops groups whose rewards are all equal). In "async" mode the
learner's update runs in the background (a thread, XLA releasing the GIL, or a child process
with its own XLA thread pool: `learner.placement`), so rollout of the current
version continues while it trains and the long tail of old versions keeps decoding; when the
update ends the new version is published to the rollout at once. In "sync" mode (staleness 0,
one batch per version, update inline) the same loop is synchronous RL: generate, wait for the
longest trajectory, train, repeat.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import time
from typing import Callable, Optional

import numpy as np

from lcjax.rl.checkpoint import RLCheckpoints
from lcjax.rl.config import RLRunConfig, learner_placement, make_env
from lcjax.rl.learner import Learner, build_batch
from lcjax.rl.learner_process import ProcessLearner
from lcjax.rl.objective import group_advantages, informative
from lcjax.rl.rollout import Group, Rollout
from lcjax.rl.versions import VersionWindow


@dataclasses.dataclass
class RunSummary:
    steps: int
    wall_s: float
    samples: int
    rewards: list  # mean reward of the groups finished during each step
    staleness_hist: dict
    run_dir: str
    interrupted: bool = False
    rollout_tokens: int = 0
    learner_tokens: int = 0
    learner_s: float = 0.0


class RLRun:
    """One run; `run()` drives it to `rl.steps` learner steps (or a stop request)."""

    def __init__(self, cfg: RLRunConfig, policy, log: Callable[[str], None] = print,
                 stop: Optional[Callable[[], bool]] = None, write_files: bool = True):
        self.cfg, self.log, self.stop = cfg, log, stop or (lambda: False)
        self.write_files = write_files
        config, variables, tokenizer = policy
        self.model_cfg = config.model if hasattr(config, "model") else config
        loop = cfg.rl
        self.env = make_env(cfg.env)
        t_max = cfg.rollout.max_tokens * (cfg.env.max_turns if cfg.env.name == "calculator" else 1)
        self.placement = learner_placement(cfg.learner, loop.mode)
        make_learner = ProcessLearner if self.placement == "process" else Learner
        self.learner = make_learner(self.model_cfg, variables, cfg.learner, cfg.objective, t_max)
        try:
            self._init_rest(loop, tokenizer)
        except BaseException:
            self.learner.close()  # no learner process outlives a run that failed to start
            raise

    def _init_rest(self, loop, tokenizer) -> None:
        """Checkpoint restore, version window and rollout engines."""
        self.rng = np.random.default_rng(loop.seed)
        self.staleness_hist: dict[int, int] = {}
        self.rewards: list[float] = []
        self.pending_problems: list[dict] = []
        self.ckpt = RLCheckpoints(loop.run_dir, loop.keep_checkpoints) if self.write_files else None
        start = 0
        if self.write_files and loop.resume and self.ckpt.latest_step() is not None:
            start = self._restore(self.ckpt.latest_step())
        self.window = VersionWindow(loop.effective_staleness, loop.groups_per_step,
                                    loop.per_version, learner_version=start)
        self.rollout = Rollout(self.model_cfg, tokenizer, self.cfg.rollout, self.env,
                               loop.effective_staleness + 1, seed=loop.seed + start)
        self.rollout.load(start, self.learner.variables())
        self.buffer: dict[int, Group] = {}
        self.problems: dict[int, dict] = {}  # gid -> problem of every outstanding group
        self.trained_versions: list[tuple[int, int]] = []  # (learner version, group version)
        self._finished_rewards: list[float] = []
        self.learner_tokens = 0
        self.learner_s = 0.0

    # ------------------------------------------------------------------------ checkpoints
    def _meta(self) -> dict:
        return {"version": self.learner.version, "rng": self.rng.bit_generator.state,
                "pending_problems": [self.problems[g] for g in sorted(self.problems)],
                "staleness_hist": {str(k): v for k, v in self.staleness_hist.items()},
                "rewards": self.rewards}

    def _restore(self, step: int) -> int:
        state, meta = self.ckpt.restore(step, self.learner.get_state())
        self.learner.set_state(state)
        self.rng.bit_generator.state = meta["rng"]
        self.pending_problems = list(meta["pending_problems"])
        self.staleness_hist = {int(k): v for k, v in meta["staleness_hist"].items()}
        self.rewards = list(meta["rewards"])
        metrics = os.path.join(self.cfg.rl.run_dir, "metrics.jsonl")
        if os.path.exists(metrics):  # steps after the checkpoint will be redone
            with open(metrics) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
            with open(metrics, "w") as f:
                f.writelines(kept)
        self.log(f"resumed from {self.ckpt.directory}/{step} (version {self.learner.version}, "
                 f"{len(self.pending_problems)} groups restarted)")
        return self.learner.version

    def _save(self) -> None:
        if self.ckpt is not None:
            self.ckpt.save(self.learner.version, self.learner.get_state(), self._meta())

    # ------------------------------------------------------------------------------- loop
    def _start_groups(self) -> None:
        while self.window.can_start():
            problem = self.pending_problems.pop(0) if self.pending_problems else self.env.sample(self.rng)
            g = self.window.start()
            self.problems[g.gid] = problem
            self.rollout.start_group(g.gid, g.version, problem)

    def _on_finished(self, group: Group) -> None:
        rewards = group.rewards
        self._finished_rewards.extend(rewards.tolist())
        keep = informative(rewards) or not self.cfg.objective.filter_equal_groups
        self.window.finish(group.gid, keep)
        if keep:
            self.buffer[group.gid] = group
        else:
            del self.problems[group.gid]

    def _make_batch(self, gids: list[int]):
        groups = [self.buffer.pop(g) for g in gids]
        for g in gids:
            del self.problems[g]
        u = self.learner.version
        rows = []
        for group in groups:
            self.trained_versions.append((u, group.version))
            gap = u - group.version
            self.staleness_hist[gap] = self.staleness_hist.get(gap, 0) + 1
            adv = group_advantages(group.rewards[None, :], self.cfg.objective.adv_eps)[0]
            for traj, a in zip(group.trajectories, adv):
                if traj.versions_used - {group.version}:
                    raise RuntimeError(f"trajectory of group {group.gid} mixed versions {traj.versions_used}")
                rows.append({"tokens": traj.tokens, "gen_mask": traj.gen_mask,
                             "logprobs": traj.logprobs, "advantage": float(a)})
        self.learner_tokens += sum(int(np.sum(r["gen_mask"])) for r in rows)
        return build_batch(rows, self.max_rows, self.cfg.rollout.max_model_len), groups

    @property
    def max_rows(self) -> int:
        return self.window.max_batch * self.cfg.rollout.group_size

    def _train(self, batch) -> dict:
        t0 = time.perf_counter()
        metrics = self.learner.step(batch)
        self.learner_s += time.perf_counter() - t0
        return metrics

    def _publish(self) -> None:
        version = self.window.publish()
        live = set(self.window.live_versions())
        for v in sorted(self.rollout.engines):
            if v not in live:
                self.rollout.evict(v)
        self.rollout.load(version, self.learner.variables())

    def _log_step(self, metrics: dict, groups: list[Group], t_start: float) -> None:
        finished = self._finished_rewards
        self._finished_rewards = []
        reward = float(np.mean(finished)) if finished else float("nan")
        self.rewards.append(reward)
        record = {"step": self.learner.version, "reward_mean": reward,
                  "trained_reward_mean": float(np.mean([g.rewards.mean() for g in groups])),
                  "groups_trained": len(groups), "samples_finished": len(finished),
                  "staleness_max": max(u - v for u, v in self.trained_versions[-len(groups):]),
                  "live_versions": len(self.rollout.engines),
                  "wall_s": time.perf_counter() - t_start, **metrics}
        if self.write_files:
            with open(os.path.join(self.cfg.rl.run_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.learner.version % self.cfg.rl.log_every == 0:
            self.log(f"step {record['step']:4d}  reward {reward:.3f}  loss {metrics['loss']:+.4f}  "
                     f"staleness<= {record['staleness_max']}  live {record['live_versions']}  "
                     f"{record['wall_s']:.1f}s")

    def warmup(self) -> None:
        """Compile the learner's batch shapes (the clock of `run` does not include this)."""
        self.learner.warmup(self.max_rows, self.cfg.rollout.max_model_len)

    def run(self) -> RunSummary:
        loop = self.cfg.rl
        asynchronous = loop.mode == "async"
        pool = concurrent.futures.ThreadPoolExecutor(1) if asynchronous else None
        future, in_training = None, []
        t_start = time.perf_counter()
        samples, interrupted = 0, False
        try:
            while True:
                if future is not None and future.done():
                    metrics = future.result()
                    future = None
                    self._publish()
                    self._log_step(metrics, in_training, t_start)
                    samples += sum(len(g.trajectories) for g in in_training)
                    if self.learner.version % loop.checkpoint_every == 0 or self.learner.version >= loop.steps:
                        self._save()
                    if self.stop():
                        interrupted = True
                if self.learner.version >= loop.steps or interrupted:
                    break
                if future is None and self.stop():
                    self._save()
                    interrupted = True
                    break
                self._start_groups()
                if future is None and self.window.learner_ready():
                    batch, in_training = self._make_batch(self.window.take_batch())
                    if asynchronous:
                        future = pool.submit(self._train, batch)
                    else:
                        done = concurrent.futures.Future()
                        done.set_result(self._train(batch))
                        future = done
                        continue
                if self.rollout.has_unfinished():
                    for group in self.rollout.step():
                        self._on_finished(group)
                elif future is not None:
                    concurrent.futures.wait([future])
                elif not self.window.learner_ready() and not self.window.can_start():
                    raise RuntimeError("RL loop stalled: no running trajectory, learner not ready")
        finally:
            if future is not None and not future.done():
                future.result()
            if pool is not None:
                pool.shutdown()
            if self.ckpt is not None:
                self.ckpt.close()
            self.learner.close()
        return RunSummary(steps=self.learner.version, wall_s=time.perf_counter() - t_start,
                          samples=samples, rewards=self.rewards, staleness_hist=self.staleness_hist,
                          run_dir=loop.run_dir, interrupted=interrupted,
                          rollout_tokens=self.rollout.tokens_generated,
                          learner_tokens=self.learner_tokens, learner_s=self.learner_s)
