"""The training loop: set-up, resume, the step loop with logging / eval / checkpoints, summary.

A thin shell around the pure `train_step`: step N+1 is dispatched before step N's metrics are
read, so the host never stalls the device except at checkpoint steps (read first, so a
non-finite state is never saved).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Optional

import jax
from tqdm import tqdm

from lcjax.config import Config
from lcjax.config_io import dump_config
from lcjax.parallel import is_primary, make_mesh, rules_for, use_parallelism
from lcjax.train import data_setup
from lcjax.train.checkpoint import RunCheckpoints, restore_params
from lcjax.train.flops import device_peak_flops, train_flops_per_token
from lcjax.train.growth import stack_layers
from lcjax.train.metrics import MetricsWriter
from lcjax.train.state import (abstract_state, batch_sharding, create_optimizer, init_state,
                               state_shardings)
from lcjax.train.step import eval_step, train_step


class NonFiniteLoss(RuntimeError):
    """Raised when a step's loss is NaN/inf; names the step and the last good checkpoint."""


@dataclasses.dataclass
class TrainSummary:
    """What a finished (or interrupted) run reports."""

    run_dir: str
    start_step: int
    final_step: int
    losses: list  # training loss per step run in this process, in order
    initial_eval_loss: float
    final_eval_loss: float
    tokens_per_second: float
    mfu: Optional[float]
    checkpoint: Optional[str]
    interrupted: bool = False

    def table(self) -> str:
        mfu = "-" if self.mfu is None else f"{100 * self.mfu:.1f}%"
        rows = [("run directory", self.run_dir), ("steps", f"{self.start_step} -> {self.final_step}"),
                ("held-out loss, start", f"{self.initial_eval_loss:.4f}"),
                ("held-out loss, end", f"{self.final_eval_loss:.4f}"),
                ("train loss, last", f"{self.losses[-1]:.4f}" if self.losses else "-"),
                ("tokens / s", f"{self.tokens_per_second:,.0f}"), ("MFU", mfu),
                ("checkpoint", self.checkpoint or "-")]
        return "\n".join(f"{k:<22}{v}" for k, v in rows)


def _evaluate(state, batches, eval_fn, sharding) -> float:
    total, count = 0.0, 0.0
    for batch in batches:
        out = jax.device_get(eval_fn(state, data_setup.to_global(batch, sharding)))
        total, count = total + float(out["ce_sum"]), count + float(out["tokens"])
    return total / max(count, 1.0)


def _initial_state(config, tx, mesh, shardings):
    state = init_state(config, tx, mesh)
    if not config.train.init_from:
        return state
    abstract, _ = abstract_state(config, tx)
    old = restore_params(config.train.init_from, None)
    # growth=stack repeats the checkpoint's layers; growth=none needs identical shapes.
    params = stack_layers(old, abstract.params)
    params = jax.device_put(params, shardings.params)
    return state.replace(params=params, opt_state=tx.init(params))


def train(config: Config, stop_after: Optional[int] = None) -> TrainSummary:
    """Run (or resume) training as configured; `stop_after` ends early after that many steps."""
    cfg = config.train
    os.makedirs(cfg.run_dir, exist_ok=True)
    if is_primary():  # run files and console output come from process 0 only
        dump_config(config, os.path.join(cfg.run_dir, "config.yaml"))
    tokenizer = data_setup.run_tokenizer(config)
    mesh = make_mesh(config.mesh)
    data_setup.check_batch(config, mesh)
    tx = create_optimizer(config)
    abstract, _ = abstract_state(config, tx)
    shardings = state_shardings(config, tx, mesh)
    rows = batch_sharding(mesh, rules_for(config))
    ckpt = RunCheckpoints(cfg.run_dir, cfg.keep_checkpoints, cfg.async_checkpoint)
    iterator = data_setup.train_iterator(config, tokenizer, rows)
    latest = ckpt.latest_step() if cfg.resume else None
    if latest is not None:
        state, data_state = ckpt.restore(latest, abstract, shardings)
        data_setup.restore_iterator(iterator, data_state)
    else:
        state = _initial_state(config, tx, mesh, shardings)
    start = int(jax.device_get(state.step))
    eval_batches = data_setup.eval_batches(config, tokenizer, rows)
    with use_parallelism(mesh, config.parallel):  # mesh, rules, EP / quantized TP comm
        step_fn = jax.jit(functools.partial(train_step, config=config, tx=tx),
                          in_shardings=(shardings, rows), out_shardings=(shardings, None),
                          donate_argnums=0)
        eval_fn = jax.jit(functools.partial(eval_step, config=config), in_shardings=(shardings, rows))
        return _loop(config, state, start, iterator, eval_batches, step_fn, eval_fn, rows, ckpt,
                     stop_after)


def _loop(config, state, start, iterator, eval_batches, step_fn, eval_fn, rows, ckpt, stop_after):
    cfg = config.train
    primary = is_primary()
    writer = MetricsWriter(cfg.run_dir, enabled=primary)
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    tokens_per_step = config.data.global_batch * config.data.seq_len
    peak = device_peak_flops()
    initial_eval = _evaluate(state, eval_batches, eval_fn, rows)
    writer.write(start, {"loss": initial_eval}, prefix="eval")
    losses, pending, saved = [], None, None
    # The bar shows on terminals; logs and CI get the periodic `step ...` lines instead.
    bar = tqdm(total=end, initial=start, desc="train", unit="step", dynamic_ncols=True,
               disable=None if primary else True)
    log = bar.write if primary else (lambda _: None)
    t0, zero_share, timed_from = time.perf_counter(), 0.0, start

    def read(step, metrics):
        nonlocal zero_share, t0, timed_from
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if step == start + 1:  # time from the end of the first (compiling) step
            t0, timed_from = time.perf_counter(), step
        if not math.isfinite(values["loss"]):
            raise NonFiniteLoss(f"loss is {values['loss']} at step {step}; last good checkpoint: "
                                f"{saved or 'none'} (lower optimizer.learning_rate or raise grad_clip)")
        losses.append(values["loss"])
        zero_share = values["zero_share"]
        elapsed = time.perf_counter() - t0
        tok_s = tokens_per_step * (step - timed_from) / max(elapsed, 1e-9)
        values["tokens_per_second"] = tok_s
        flops = train_flops_per_token(config.model, config.data.seq_len, zero_share) * tok_s
        if peak:
            values["mfu"] = flops / (peak * jax.device_count())
        writer.write(step, values)
        bar.set_postfix(loss=f"{values['loss']:.3f}", tok_s=f"{tok_s:,.0f}")
        if step % cfg.log_every == 0:
            log(f"step {step:>6}  loss {values['loss']:.4f}  ce {values['ce']:.4f}  "
                f"zero-share {zero_share:.2f}  {tok_s:,.0f} tok/s")

    interrupted, step = False, start
    try:
        for step in range(start + 1, end + 1):
            batch = data_setup.to_global(next(iterator), rows)
            state, metrics = step_fn(state, batch)
            if pending is not None:
                read(*pending)
            pending = (step, metrics)
            bar.update(1)
            if step % cfg.checkpoint_every == 0 or step == end:
                read(*pending)
                pending = None
                ckpt.save(step, state, data_setup.iterator_state(iterator))
                saved = ckpt.path(step)
            if cfg.eval_every and step % cfg.eval_every == 0 and step != end:
                writer.write(step, {"loss": _evaluate(state, eval_batches, eval_fn, rows)}, "eval")
        if pending is not None:
            read(*pending)
    except KeyboardInterrupt:
        interrupted = True
        log(f"interrupted: saving a checkpoint at step {step}")
        ckpt.save(step, state, data_setup.iterator_state(iterator))
        saved = ckpt.path(step)
    finally:
        bar.close()
        ckpt.close()
    elapsed = time.perf_counter() - t0
    final_eval = _evaluate(state, eval_batches, eval_fn, rows)
    writer.write(step, {"loss": final_eval}, prefix="eval")
    writer.close()
    tok_s = tokens_per_step * (step - timed_from) / max(elapsed, 1e-9)
    mfu = None if not peak else (train_flops_per_token(config.model, config.data.seq_len, zero_share)
                                 * tok_s / (peak * jax.device_count()))
    return TrainSummary(run_dir=os.path.abspath(cfg.run_dir), start_step=start, final_step=step,
                        losses=losses, initial_eval_loss=initial_eval, final_eval_loss=final_eval,
                        tokens_per_second=tok_s, mfu=mfu, checkpoint=saved, interrupted=interrupted)
