"""The RL run's configuration: frozen dataclasses, loaded like training's (YAML layers, then
dotted `key=value` overrides, errors naming the key; lcjax.config_io.load_dataclass).

Top-level sections: `policy` (where the initial weights come from), `env`, `rollout` (the serve
engines and sampling), `objective` (lcjax.rl.objective), `learner` (the optimizer) and `rl`
(the loop: mode, staleness, steps, run directory, checkpoints).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from lcjax.config_checks import check as _check
from lcjax.config_checks import check_choice as _check_choice
from lcjax.config_checks import finite as _finite
from lcjax.rl.cpu_split import auto_placement, check_cpus
from lcjax.rl.envs.arithmetic import ArithmeticConfig
from lcjax.rl.objective import ObjectiveConfig

ENVIRONMENTS = ("arithmetic", "python_tests", "calculator")


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    """path: a training run directory (config.yaml, tokenizer.json, checkpoints/) or a Hugging
    Face LongCat directory; format "auto" tells them apart by config.yaml. A Hugging Face
    directory gives the weights (config.json + safetensors, lcjax.convert) and the tokenizer:
    its tokenizer.json (required), with bos / eos taken from tokenizer_config.json when it names
    them, else config.json's ids (`python -m lcjax.convert` copies a run's tokenizer.json
    along). format "random":
    path is a model preset (configs/models, e.g. tiny), randomly initialised with a byte
    tokenizer (for tests and benchmarks of the machinery, not for learning)."""

    path: str = "runs/stdlib_tiny"
    format: str = "auto"  # "auto" | "run" | "hf" | "random"

    def __post_init__(self):
        _check(bool(self.path), "policy.path", self.path, "a run or Hugging Face directory")
        _check_choice("policy.format", self.format, ("auto", "run", "hf", "random"))


@dataclasses.dataclass(frozen=True)
class EnvConfig:
    name: str = "arithmetic"
    arithmetic: ArithmeticConfig = ArithmeticConfig()
    timeout: float = 3.0  # python_tests: wall-clock seconds per program
    calculator_max_operand: int = 20
    max_turns: int = 3  # calculator: model turns per episode

    def __post_init__(self):
        _check_choice("env.name", self.name, ENVIRONMENTS)
        _check(_finite(self.timeout) and self.timeout > 0, "env.timeout", self.timeout, "> 0 seconds")
        _check(self.calculator_max_operand >= 1, "env.calculator_max_operand",
               self.calculator_max_operand, ">= 1")
        _check(self.max_turns >= 1, "env.max_turns", self.max_turns, ">= 1")


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """Sampling (temperature 1, no filters by default: the rollout logprobs are then those of
    the policy itself) and the serve engines' capacity."""

    group_size: int = 8  # G samples per prompt
    max_tokens: int = 4  # per model turn; T_max of the loss normalisation
    temperature: float = 1.0
    top_p: float = 1.0
    max_num_seqs: int = 64  # slots per engine
    max_model_len: int = 128
    page_size: int = 16
    prefill_chunk: int = 64
    max_prefill_seqs: int = 16

    def __post_init__(self):
        for key in ("group_size", "max_tokens", "max_num_seqs", "max_model_len", "page_size",
                    "prefill_chunk", "max_prefill_seqs"):
            value = getattr(self, key)
            _check(isinstance(value, int) and value >= 1, f"rollout.{key}", value, "an integer >= 1")
        _check(self.group_size >= 2, "rollout.group_size", self.group_size,
               ">= 2 (advantages are relative to the group)")
        _check(_finite(self.temperature) and self.temperature > 0, "rollout.temperature",
               self.temperature, "> 0 (sampling; the loss needs the sampled policy's logprobs)")
        _check(_finite(self.top_p) and 0 < self.top_p <= 1, "rollout.top_p", self.top_p, "in (0, 1]")


@dataclasses.dataclass(frozen=True)
class LearnerConfig:
    """Adam on all parameters (router correction biases stay as loaded)."""

    learning_rate: float = 1e-4
    b1: float = 0.9
    b2: float = 0.99
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # global norm; 0 disables
    updates_per_batch: int = 1  # optimizer steps on one batch (pi_old fixed at the first)
    # Where async mode runs the update: "thread" (this process; XLA releases the GIL),
    # "process" (a child process with its own XLA thread pool, GIL and, on a CPU backend, cores:
    # lcjax.rl.learner_process), or "auto": process on a CPU backend with two or more cores
    # (async 1.44-1.52x sync vs 1.22x with a thread on 2 cores, scripts/bench_rl.py), thread on an
    # accelerator, which both would share. Sync mode always trains in this process.
    placement: str = "auto"
    # With placement=process: host cores for the learner alone, the rollout pinned to the rest
    # (lcjax.rl.cpu_split). "auto" splits them in half on a CPU backend, "all" shares every core,
    # or a list such as "1" or "2-3,6".
    cpus: str = "auto"

    def __post_init__(self):
        _check(self.placement in ("auto", "thread", "process"), "learner.placement",
               self.placement, "one of auto, thread, process")
        check_cpus(self.cpus)
        _check(_finite(self.learning_rate) and self.learning_rate > 0, "learner.learning_rate",
               self.learning_rate, "> 0")
        for key in ("b1", "b2"):
            value = getattr(self, key)
            _check(_finite(value) and 0 <= value < 1, f"learner.{key}", value, "in [0, 1)")
        _check(_finite(self.weight_decay) and self.weight_decay >= 0, "learner.weight_decay",
               self.weight_decay, ">= 0")
        _check(_finite(self.grad_clip) and self.grad_clip >= 0, "learner.grad_clip", self.grad_clip, ">= 0")
        _check(self.updates_per_batch >= 1, "learner.updates_per_batch", self.updates_per_batch, ">= 1")


def learner_placement(cfg: LearnerConfig, mode: str) -> str:
    """"thread" or "process": where the learner runs for a loop `mode` (sync: always here)."""
    if mode != "async":
        return "thread"
    if cfg.placement == "auto":
        return auto_placement()
    return cfg.placement


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """mode: "async" (DORA: rollout keeps generating while the learner trains, up to `staleness`
    versions behind) or "sync" (generate a batch with the current weights, train, repeat).
    spare_groups: groups per version beyond groups_per_step (None = groups_per_step), the slack
    that lets the learner skip the long tail (lcjax.rl.versions)."""

    mode: str = "async"
    staleness: int = 2
    steps: int = 40
    groups_per_step: int = 4
    spare_groups: Optional[int] = None
    run_dir: str = "runs/rl_arithmetic"
    log_every: int = 1
    checkpoint_every: int = 10
    keep_checkpoints: int = 2
    resume: bool = True
    seed: int = 0

    def __post_init__(self):
        _check_choice("rl.mode", self.mode, ("async", "sync"))
        for key in ("steps", "groups_per_step", "log_every", "checkpoint_every", "keep_checkpoints"):
            value = getattr(self, key)
            _check(isinstance(value, int) and value >= 1, f"rl.{key}", value, "an integer >= 1")
        _check(self.staleness >= 0, "rl.staleness", self.staleness, ">= 0")
        _check(self.spare_groups is None or self.spare_groups >= 0, "rl.spare_groups",
               self.spare_groups, "None or >= 0")

    @property
    def per_version(self) -> int:
        """Outstanding groups a version may have (sync: exactly one batch)."""
        if self.mode == "sync":
            return self.groups_per_step
        spare = self.groups_per_step if self.spare_groups is None else self.spare_groups
        return self.groups_per_step + spare

    @property
    def effective_staleness(self) -> int:
        return 0 if self.mode == "sync" else self.staleness


@dataclasses.dataclass(frozen=True)
class RLRunConfig:
    policy: PolicyConfig = PolicyConfig()
    env: EnvConfig = EnvConfig()
    rollout: RolloutConfig = RolloutConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    learner: LearnerConfig = LearnerConfig()
    rl: LoopConfig = LoopConfig()


def make_env(cfg: EnvConfig):
    """The environment named by `env.name`."""
    if cfg.name == "arithmetic":
        from lcjax.rl.envs.arithmetic import ArithmeticEnv
        return ArithmeticEnv(cfg.arithmetic)
    if cfg.name == "python_tests":
        from lcjax.rl.envs.python_tests import PythonTestsEnv
        return PythonTestsEnv(cfg.timeout)
    from lcjax.rl.envs.calculator import CalculatorEnv
    return CalculatorEnv(cfg.calculator_max_operand, cfg.max_turns)
