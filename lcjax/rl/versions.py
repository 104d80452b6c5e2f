"""The policy-version window of asynchronous rollout (pure Python bookkeeping, no arrays).

A group (G trajectories of one prompt) is *started* on the newest live version and stays on it
until its last trajectory finishes (one version per trajectory, start to end). Finished groups
are *buffered* (or dropped when the online filter finds no signal in them) until the learner
*takes* them into a batch. Each learner step makes version `learner_version + 1`, which the
rollout *loads* at once: the window of live versions is the newest plus every version that
still has running groups.

Rules, with K = staleness and B = groups per learner batch:
- admission: the newest version starts a group only while its own outstanding groups (running
  or buffered, not yet trained) number fewer than `per_version` = B + S (default S = B). The S
  spare groups are what lets the learner skip the long tail: it needs B finished groups, not all
  of them;
- the learner at version u may take a batch only when (a) B groups are buffered, and (b) no
  group of a version <= u - K is still running: those would be trained at version >= u + 1,
  more than K behind. So the learner, not the rollout, waits for the long tail, and the window
  advances (its oldest version is evicted) only when that version's groups are done;
- a batch takes every buffered group of version u - K (they could not wait for another step;
  at most B + S of them, by admission), then the oldest versions first (finish order within a
  version) until it holds B: B to B + S groups (`max_batch`). So every trained group has
  learner_version - version <= K, and no finished group is ever dropped for being stale.
With K = 0 the learner waits for every group of its own version: synchronous RL.
"""

from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass
class GroupRecord:
    """Where one group is: its version, and "running" | "buffered" | "trained" | "filtered"."""

    gid: int
    version: int
    state: str = "running"
    finish_order: int = -1
    trained_at: Optional[int] = None  # learner version that trained it


class VersionWindow:
    """See the module docstring. Raises RuntimeError if an invariant would break."""

    def __init__(self, staleness: int, groups_per_step: int, per_version: Optional[int] = None,
                 learner_version: int = 0):
        if staleness < 0:
            raise ValueError(f"staleness={staleness} must be >= 0")
        if groups_per_step < 1:
            raise ValueError(f"groups_per_step={groups_per_step} must be >= 1")
        per_version = 2 * groups_per_step if per_version is None else per_version
        if per_version < groups_per_step:
            raise ValueError(f"per_version={per_version} must be >= groups_per_step={groups_per_step}")
        self.staleness, self.batch, self.per_version = staleness, groups_per_step, per_version
        self.learner_version = learner_version
        self.newest = learner_version  # the rollout's newest loaded version
        self.groups: dict[int, GroupRecord] = {}
        self._next_gid = 0
        self._finished = 0
        self.max_live = 1  # most versions ever live at once (K + 1 at most)

    @property
    def max_batch(self) -> int:
        """The most groups one batch can hold (the forced rest of one version)."""
        return max(self.batch, self.per_version)

    # ------------------------------------------------------------------------------ queries
    def _where(self, state: str) -> list[GroupRecord]:
        return [g for g in self.groups.values() if g.state == state]

    def running_versions(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for g in self._where("running"):
            out[g.version] = out.get(g.version, 0) + 1
        return out

    def live_versions(self) -> list[int]:
        """The newest version plus every version with a running group, ascending."""
        return sorted(set(self.running_versions()) | {self.newest})

    def outstanding(self, version: int) -> int:
        return sum(1 for g in self.groups.values()
                   if g.version == version and g.state in ("running", "buffered"))

    def can_start(self) -> bool:
        return self.outstanding(self.newest) < self.per_version

    def learner_ready(self) -> bool:
        """Gates (a) and (b) of the module docstring."""
        if len(self._where("buffered")) < self.batch:
            return False
        limit = self.learner_version - self.staleness
        return all(v > limit for v in self.running_versions())

    def waiting_on(self) -> dict[int, int]:
        """Running groups the learner waits for (versions <= learner_version - K), by version."""
        limit = self.learner_version - self.staleness
        return {v: n for v, n in self.running_versions().items() if v <= limit}

    # ---------------------------------------------------------------------------- transitions
    def start(self) -> GroupRecord:
        """Register a group on the newest version."""
        if not self.can_start():
            raise RuntimeError(f"version {self.newest} already has {self.per_version} outstanding groups")
        g = GroupRecord(self._next_gid, self.newest)
        self.groups[g.gid] = g
        self._next_gid += 1
        self.max_live = max(self.max_live, len(self.live_versions()))
        return g

    def finish(self, gid: int, keep: bool) -> None:
        """The group's last trajectory is done: buffer it (keep) or drop it (filtered)."""
        g = self.groups[gid]
        if g.state != "running":
            raise RuntimeError(f"group {gid} finished twice (state {g.state})")
        g.state = "buffered" if keep else "filtered"
        g.finish_order = self._finished
        self._finished += 1
        if not keep:
            del self.groups[gid]

    def take_batch(self) -> list[int]:
        """The B group ids the learner trains at learner_version (oldest versions first)."""
        if not self.learner_ready():
            raise RuntimeError("take_batch() while the learner is not ready")
        limit = self.learner_version - self.staleness
        ready = sorted(self._where("buffered"), key=lambda g: (g.version, g.finish_order))
        forced = [g for g in ready if g.version <= limit]
        rest = [g for g in ready if g.version > limit]
        batch = forced + rest[: max(self.batch - len(forced), 0)]
        if len(batch) > self.max_batch:  # cannot happen under the admission rule
            raise RuntimeError(f"{len(forced)} groups of version <= {limit} exceed max_batch={self.max_batch}")
        for g in batch:
            if self.learner_version - g.version > self.staleness:
                raise RuntimeError(f"group {g.gid} of version {g.version} is more than "
                                   f"{self.staleness} behind learner version {self.learner_version}")
            g.state, g.trained_at = "trained", self.learner_version
        for g in batch:
            del self.groups[g.gid]
        return [g.gid for g in batch]

    def publish(self) -> int:
        """The learner made a new version; the rollout loads it (the window then evicts every
        version below the newest with no running group). Returns the new version."""
        self.learner_version += 1
        self.newest = self.learner_version
        live = self.live_versions()
        if len(live) > self.staleness + 1:
            raise RuntimeError(f"{len(live)} versions live ({live}) > staleness + 1")
        self.max_live = max(self.max_live, len(live))
        return self.newest

    # ---------------------------------------------------------------------------- persistence
    def state_dict(self) -> dict:
        return {"learner_version": self.learner_version}
