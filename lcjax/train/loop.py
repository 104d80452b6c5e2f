"""The training loop: set-up, resume, the step loop with logging / eval / checkpoints, summary.

A thin shell around the pure `train_step`: step N+1 is dispatched before step N's metrics are
read, so the host never stalls the device except at checkpoint steps. A step's metrics include
the norm of its update, so reading them before a save proves the state about to be saved is
finite. SIGINT / SIGTERM stop the loop at a step boundary (`signals.py`), where the state, its
optimizer and the data iterator agree, and save there.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import signal
import time
from typing import Optional

import jax
import numpy as np
from tqdm import tqdm

from lcjax.config import Config
from lcjax.config_io import dump_config
from lcjax.model import BIAS_COLLECTION
from lcjax.parallel import is_primary, make_mesh, rules_for, use_parallelism
from lcjax.train import data_setup
from lcjax.train.checkpoint import RunCheckpoints, check_writable, restore_init
from lcjax.train.flops import device_peak_flops, train_flops_per_token
from lcjax.train.growth import stack_layers
from lcjax.train.metrics import MetricsWriter
from lcjax.train.signals import StopRequest
from lcjax.train.state import (abstract_state, batch_sharding, create_optimizer, init_state,
                               state_shardings)
from lcjax.train.step import eval_step, train_step


class NonFiniteLoss(RuntimeError):
    """Raised when a step's loss or update is NaN/inf; names the step and the last good checkpoint."""


@dataclasses.dataclass
class TrainSummary:
    """What a finished (or interrupted) run reports."""

    run_dir: str
    start_step: int
    final_step: int
    losses: list  # training loss per step run in this process, in order
    initial_eval_loss: float  # held-out cross-entropy, nats per token
    final_eval_loss: float
    tokens_per_second: float
    mfu: Optional[float]
    checkpoint: Optional[str]
    interrupted: bool = False
    initial_eval_bpb: float = math.nan  # the same in bits per utf-8 byte (tokenizer-independent)
    final_eval_bpb: float = math.nan
    stop_signal: Optional[str] = None  # "SIGINT" / "SIGTERM" when a signal stopped the run
    exit_code: int = 0  # 0, or 128 + the signal number (130 / 143) when a signal stopped it

    def table(self) -> str:
        mfu = "-" if self.mfu is None else f"{100 * self.mfu:.1f}%"
        def loss(nats, bpb):
            if not math.isfinite(nats):
                return "-"
            return f"{nats:.4f} nats/token" + (f", {bpb:.3f} bits/byte" if math.isfinite(bpb) else "")
        rows = [("run directory", self.run_dir), ("steps", f"{self.start_step} -> {self.final_step}"),
                ("held-out loss, start", loss(self.initial_eval_loss, self.initial_eval_bpb)),
                ("held-out loss, end", loss(self.final_eval_loss, self.final_eval_bpb)),
                ("train loss, last", f"{self.losses[-1]:.4f}" if self.losses else "-"),
                ("tokens / s", f"{self.tokens_per_second:,.0f}"), ("MFU", mfu),
                ("checkpoint", self.checkpoint or "-")]
        return "\n".join(f"{k:<22}{v}" for k, v in rows)


def _evaluate(state, batches, eval_fn, sharding) -> dict:
    """Held-out cross-entropy in nats per token and, when batches carry target_bytes, bits per byte."""
    total, count, nbytes = 0.0, 0.0, 0.0
    for batch in batches:
        out = jax.device_get(eval_fn(state, data_setup.to_global(batch, sharding)))
        total, count = total + float(out["ce_sum"]), count + float(out["tokens"])
        nbytes += float(out.get("bytes", 0.0))
    result = {"loss": total / max(count, 1.0)}
    if nbytes > 0:
        result["bits_per_byte"] = total / (nbytes * math.log(2.0))
    return result


def with_target_bytes(batches: list, token_bytes) -> list:
    """Eval batches plus [b, S] float32 `target_bytes`: the utf-8 bytes of each target token."""
    return [{**b, "target_bytes": token_bytes[np.asarray(b["targets"])].astype(np.float32)}
            for b in batches]


def _initial_state(config, tx, mesh, shardings):
    state = init_state(config, tx, mesh)
    if not config.train.init_from:
        return state
    abstract, _ = abstract_state(config, tx)
    bias = None
    if _is_hf_directory(config.train.init_from):  # a converted / downloaded HF checkpoint
        from lcjax.convert import load_hf_checkpoint

        _, variables = load_hf_checkpoint(config.train.init_from, config)
        old, bias = variables["params"], variables.get(BIAS_COLLECTION)
    else:
        old, bias = restore_init(config.train.init_from)
    # growth=stack repeats the checkpoint's layers; growth=none needs identical shapes.
    params = stack_layers(old, abstract.params)
    params = jax.device_put(params, shardings.params)
    state = state.replace(params=params)
    if bias is not None:
        bias = stack_layers(bias, abstract.router_bias)
        state = state.replace(router_bias=jax.device_put(bias, shardings.router_bias))
    # LoRA keeps its fresh adapters' optimizer state; full fine-tuning restarts Adam on the params.
    return state if state.lora is not None else state.replace(opt_state=tx.init(params))


def _is_hf_directory(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and not os.path.isdir(
        os.path.join(path, "checkpoints"))


def check_platform(config: Config) -> None:
    """Refuse what this JAX process cannot run as configured (rather than silently downcast)."""
    for key in ("dtype", "param_dtype"):
        value = getattr(config.model, key)
        if value == "float64" and not jax.config.jax_enable_x64:
            raise ValueError(f"config: model.{key}={value!r} cannot run: JAX computes in float64 "
                             "only with JAX_ENABLE_X64=1 (else it silently uses float32); use "
                             "float32 / bfloat16, or set JAX_ENABLE_X64=1")


def train(config: Config, stop_after: Optional[int] = None) -> TrainSummary:
    """Run (or resume) training as configured; `stop_after` ends early after that many steps.

    SIGINT / SIGTERM (in the main thread) end the run at the next step boundary with a
    checkpoint there; the summary then says which signal and the exit code a CLI should use.
    """
    cfg = config.train
    check_platform(config)
    with StopRequest() as stop:
        check_writable(cfg.run_dir)
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
        try:
            iterator = data_setup.train_iterator(config, tokenizer, rows)
            latest = ckpt.latest_step() if cfg.resume else None
            if latest is not None:
                state, data_state = ckpt.restore(latest, abstract, shardings)
                data_setup.restore_iterator(iterator, data_state)
            else:
                state = _initial_state(config, tx, mesh, shardings)
            eval_batches = with_target_bytes(data_setup.eval_batches(config, tokenizer, rows),
                                             tokenizer.token_bytes())
        except BaseException:
            ckpt.close()
            raise
        start = int(jax.device_get(state.step))
        with use_parallelism(mesh, config.parallel):  # mesh, rules, EP / quantized TP comm
            step_fn = jax.jit(functools.partial(train_step, config=config, tx=tx),
                              in_shardings=(shardings, rows), out_shardings=(shardings, None),
                              donate_argnums=0)
            eval_fn = jax.jit(functools.partial(eval_step, config=config),
                              in_shardings=(shardings, rows))
            return _loop(config, state, start, iterator, eval_batches, step_fn, eval_fn, rows, ckpt,
                         stop_after, stop, None if latest is None else ckpt.path(latest))


def _stop_agreed_in_step() -> bool:
    """Whether processes agree on a stop through the step's metrics (needed with several).

    A signal reaches each process at its own moment; acting on it directly, one process would
    skip a collective the others wait in. So each process feeds its flag into the next step's
    batch, the step reduces it over all rows, and every process reads the same value from the
    same step's metrics: all stop after the same step. One process acts on its flag at once.
    """
    return jax.process_count() > 1


def _with_stop_flag(batch: dict, requested: bool) -> dict:
    """This host's rows plus a [b, 1] `stop` column (1 where this process was asked to stop)."""
    rows = len(next(iter(batch.values())))
    return {**batch, "stop": np.full((rows, 1), int(requested), np.int32)}


def _loop(config, state, start, iterator, eval_batches, step_fn, eval_fn, rows, ckpt, stop_after,
          stop: StopRequest, restored: Optional[str]):
    cfg = config.train
    primary = is_primary()
    writer = MetricsWriter(cfg.run_dir, enabled=primary, resume_step=start)
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    tokens_per_step = config.data.global_batch * config.data.seq_len
    peak = device_peak_flops()
    # `saved`: the newest checkpoint known complete and finite; `saved_step`: the step whose
    # state needs no save on a stop (the restored checkpoint, or a fresh init the seed recreates).
    losses, pending, saved, saved_step = [], None, restored, start
    initial_eval = final_eval = {"loss": math.nan}
    # The bar shows on terminals; logs and CI get the periodic `step ...` lines instead.
    bar = tqdm(total=end, initial=start, desc="train", unit="step", dynamic_ncols=True,
               disable=None if primary else True)
    log = bar.write if primary else (lambda _: None)
    t0, zero_share, timed_from = time.perf_counter(), 0.0, start
    agree, agreed = _stop_agreed_in_step(), False

    def stop_now() -> bool:
        return agreed if agree else stop.requested

    def read(step, metrics):
        nonlocal zero_share, t0, timed_from, agreed
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        agreed = agreed or values.pop("stop_requested", 0.0) > 0
        if step == start + 1:  # time from the end of the first (compiling) step
            t0, timed_from = time.perf_counter(), step
        if not (math.isfinite(values["loss"]) and math.isfinite(values["update_norm"])):
            raise NonFiniteLoss(
                f"non-finite training at step {step} (loss {values['loss']}, update norm "
                f"{values['update_norm']}); that state was not saved; last good checkpoint: "
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
            lam = f"  afa-lambda {values['afa_lambda']:.3f}" if "afa_lambda" in values else ""
            log(f"step {step:>6}  loss {values['loss']:.4f}  ce {values['ce']:.4f}  "
                f"zero-share {zero_share:.2f}{lam}  {tok_s:,.0f} tok/s")

    def save(step):
        nonlocal saved, saved_step
        ckpt.save(step, state, data_setup.iterator_state(iterator))
        saved, saved_step = ckpt.path(step), step

    step = start
    try:
        if not stop_now():
            initial_eval = _evaluate(state, eval_batches, eval_fn, rows)
            writer.write(start, initial_eval, prefix="eval")
        for next_step in range(start + 1, end + 1):
            if stop_now():  # a step boundary: state, optimizer and iterator agree here
                break
            batch = data_setup.to_global(_with_stop_flag(next(iterator), stop.requested), rows)
            state, metrics = step_fn(state, batch)
            step = next_step
            if pending is not None:
                read(*pending)
            pending = (step, metrics)
            bar.update(1)
            if step % cfg.checkpoint_every == 0 or step == end:
                read(*pending)
                pending = None
                save(step)
            if cfg.eval_every and step % cfg.eval_every == 0 and step != end and not stop_now():
                writer.write(step, _evaluate(state, eval_batches, eval_fn, rows), "eval")
        if pending is not None:
            read(*pending)
        if stop_now() and saved_step != step:
            save(step)
    finally:
        bar.close()
        ckpt.close()
    interrupted = stop_now() and step < end
    signum = stop.signum or signal.SIGTERM  # stopped by a peer process's signal: as SIGTERM
    elapsed = time.perf_counter() - t0
    if interrupted:  # a preempted job has seconds left: skip the final evaluation
        log(f"{signal.Signals(signum).name}: stopped at step {step}; checkpoint: {saved or 'none'}; "
            "run the same command again to resume")
    else:
        final_eval = _evaluate(state, eval_batches, eval_fn, rows)
        writer.write(step, final_eval, prefix="eval")
    writer.close()
    tok_s = tokens_per_step * (step - timed_from) / max(elapsed, 1e-9)
    mfu = None if not peak else (train_flops_per_token(config.model, config.data.seq_len, zero_share)
                                 * tok_s / (peak * jax.device_count()))
    return TrainSummary(run_dir=os.path.abspath(cfg.run_dir), start_step=start, final_step=step,
                        losses=losses, initial_eval_loss=initial_eval["loss"],
                        final_eval_loss=final_eval["loss"],
                        initial_eval_bpb=initial_eval.get("bits_per_byte", math.nan),
                        final_eval_bpb=final_eval.get("bits_per_byte", math.nan),
                        tokens_per_second=tok_s, mfu=mfu, checkpoint=saved, interrupted=interrupted,
                        stop_signal=signal.Signals(signum).name if interrupted else None,
                        exit_code=128 + signum if interrupted else 0)
