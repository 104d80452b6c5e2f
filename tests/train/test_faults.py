"""Training under faults: signals at every phase, non-finite states, bad values, unwritable dirs.

The signal tests raise SIGINT / SIGTERM inside the process at a chosen point (setup, the first
compile, the initial evaluation, mid-loop, mid-save) and chain the interrupted runs; their
per-step losses must equal an uninterrupted run's exactly, and metrics.jsonl / TensorBoard must
hold each step once.
"""

import glob
import json
import math
import os
import re
import signal
import struct

import pytest

from lcjax.train import loop
from lcjax.train.checkpoint import RunCheckpoints

from .conftest import train_config


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory):
    """The uninterrupted 6-step run every interrupted chain must reproduce."""
    return loop.train(train_config(corpus, tmp_path_factory.mktemp("straight")))


def _signal_on_call(monkeypatch, owner, name, signum, on_call=1):
    """Make owner.name raise `signum` in this process on its `on_call`-th call, then run it."""
    real = getattr(owner, name)
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == on_call:
            signal.raise_signal(signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapped)


def _tensorboard_scalars(run_dir) -> dict:
    """{(tag, step): count} as TensorBoard shows them: a SessionLog START at step s discards
    the earlier-written events at steps >= s (its `purge` rule)."""
    from tensorboardX.proto import event_pb2
    events = []
    for path in sorted(glob.glob(os.path.join(run_dir, "tensorboard", "events.*"))):
        data = open(path, "rb").read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[pos + 12:pos + 12 + length])
            events.append(event)
            pos += 12 + length + 4
    shown = []
    for event in events:
        if event.HasField("session_log") and event.session_log.status == event.session_log.START:
            shown = [(tag, step) for tag, step in shown if step < event.step]
        for value in event.summary.value:
            shown.append((value.tag, event.step))
    counts = {}
    for key in shown:
        counts[key] = counts.get(key, 0) + 1
    return counts


@pytest.mark.slow  # six chained training runs plus the straight one (~100 s on 2 cores)
def test_signals_at_every_phase_resume_exactly(straight, corpus, tmp_path, monkeypatch):
    run = tmp_path / "chain"
    cfg = train_config(corpus, run)
    done = []

    # During set-up (before any step): nothing to save, nothing lost.
    with monkeypatch.context() as m:
        _signal_on_call(m, loop.data_setup, "eval_batches", signal.SIGTERM)
        s = loop.train(cfg)
    assert (s.interrupted, s.final_step, s.checkpoint, s.exit_code) == (True, 0, None, 143)
    assert s.stop_signal == "SIGTERM"
    done += s.losses

    # While the first step compiles: that step finishes and is saved.
    with monkeypatch.context() as m:
        _signal_on_call(m, loop, "train_step", signal.SIGINT)  # called while tracing
        s = loop.train(cfg)
    assert (s.final_step, s.exit_code) == (1, 130) and s.checkpoint.endswith("1")
    done += s.losses

    # During the initial evaluation of a resumed run: stops without a step or a new save.
    with monkeypatch.context() as m:
        _signal_on_call(m, loop, "_evaluate", signal.SIGTERM)
        s = loop.train(cfg)
    assert (s.start_step, s.final_step, s.losses) == (1, 1, []) and s.checkpoint.endswith("1")

    # Mid-loop, while step 2's batch is read: step 2 runs, its state and iterator are saved.
    with monkeypatch.context() as m:
        _signal_on_call(m, loop.data_setup, "to_global", signal.SIGINT, on_call=2)  # 1: eval
        s = loop.train(cfg)
    assert (s.final_step, len(s.losses)) == (2, 1) and s.checkpoint.endswith("2")
    done += s.losses

    # During the scheduled save at step 3: that save completes and is the stop's checkpoint.
    with monkeypatch.context() as m:
        _signal_on_call(m, RunCheckpoints, "save", signal.SIGTERM)
        s = loop.train(cfg)
    assert s.final_step == 3 and s.checkpoint.endswith("3") and s.interrupted
    done += s.losses

    s = loop.train(cfg)
    assert (s.start_step, s.final_step, s.interrupted, s.exit_code) == (3, 6, False, 0)
    assert math.isclose(s.final_eval_bpb, straight.final_eval_bpb) and 0 < s.final_eval_bpb < 20
    done += s.losses
    assert done == straight.losses  # exact, not approximate
    assert sorted(os.listdir(run / "checkpoints")) == ["2", "3", "6"]

    assert {"config.yaml", "tokenizer.json", "metrics.jsonl", "tensorboard"} <= set(os.listdir(run))
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert {"train/ce", "train/mtp_ce", "train/zero_share", "train/expert_load_max_over_mean",
            "train/grad_norm", "train/update_norm", "train/tokens_per_second"} <= set(rows[-2])
    train_rows = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
    assert train_rows == list(enumerate(straight.losses, start=1))  # each step once, in order
    eval_steps = [r["step"] for r in rows if "eval/loss" in r]
    assert len(eval_steps) == len(set(eval_steps))
    shown = _tensorboard_scalars(str(run))
    assert {step for (tag, step) in shown if tag == "train/loss"} == set(range(1, 7))
    assert max(shown.values()) == 1, {k: v for k, v in shown.items() if v > 1}


@pytest.mark.slow  # the multi-process path; two more training runs
def test_processes_stop_after_the_same_step(straight, corpus, tmp_path, monkeypatch):
    # The multi-process path: a flag travels in the next step's batch and every process reads
    # it from that step's metrics. Signalled while step 3's batch is read: step 4 carries the
    # flag, its metrics are read after step 5 is dispatched, so the run stops after step 5.
    monkeypatch.setattr(loop, "_stop_agreed_in_step", lambda: True)
    cfg = train_config(corpus, tmp_path / "agree")
    with monkeypatch.context() as m:
        _signal_on_call(m, loop.data_setup, "to_global", signal.SIGTERM, on_call=4)  # 1: eval
        first = loop.train(cfg)
    assert (first.final_step, first.exit_code) == (5, 143) and first.checkpoint.endswith("5")
    rest = loop.train(cfg)
    assert first.losses + rest.losses == straight.losses


@pytest.mark.slow  # two more training runs
def test_a_resume_drops_metrics_an_interrupted_run_logged_past_its_checkpoint(
        straight, corpus, tmp_path):
    run = tmp_path / "killed"
    loop.train(train_config(corpus, run, "train.steps=6"), stop_after=3)
    # As after kill -9 at step 5: rows for steps 4-5 (and a torn last line) exist, checkpoint 3.
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "train/loss": 9.0}) + "\n")
        f.write(json.dumps({"step": 5, "train/loss": 9.0}) + "\n{\"step\": 5, \"tra")
    s = loop.train(train_config(corpus, run))
    assert s.start_step == 3
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["train/loss"] for r in rows if "train/loss" in r] == straight.losses
    assert len([r for r in rows if r["step"] == 3 and "eval/loss" in r]) == 1


def test_a_non_finite_optimizer_state_is_never_saved(corpus, tmp_path):
    # The loss of step 1 is finite (computed before the update); Adam's moments are not.
    cfg = train_config(corpus, tmp_path / "nan", "train.checkpoint_every=1")
    object.__setattr__(cfg.optimizer, "b2", math.nan)  # past validation, as a bug could be
    with pytest.raises(loop.NonFiniteLoss, match=r"step 1 .*last good checkpoint: none"):
        loop.train(cfg)
    assert os.listdir(tmp_path / "nan" / "checkpoints") == []


@pytest.mark.parametrize("override, message", [
    ("optimizer.learning_rate=inf", "optimizer.learning_rate=inf"),
    ("optimizer.b1=1.5", "optimizer.b1=1.5"),
    ("optimizer.b2=nan", "optimizer.b2=nan"),
    ("optimizer.eps=-1", "optimizer.eps=-1"),
    ("optimizer.weight_decay=inf", "optimizer.weight_decay=inf"),
    ("train.z_loss=nan", "train.z_loss=nan"),
])
def test_bad_optimizer_values_are_rejected_by_name(corpus, tmp_path, override, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        train_config(corpus, tmp_path, override)


def test_float64_without_x64_is_refused_before_any_work(corpus, tmp_path):
    cfg = train_config(corpus, tmp_path / "f64", "model.dtype=float64")
    with pytest.raises(ValueError, match="model.dtype='float64'.*JAX_ENABLE_X64"):
        loop.train(cfg)
    assert not (tmp_path / "f64").exists()


def test_an_unwritable_run_dir_fails_at_once_naming_it(corpus, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match=r"train\.run_dir=.*file/run.*cannot write"):
        loop.train(train_config(corpus, blocker / "run"))
    run = tmp_path / "ro"
    run.mkdir()
    (run / "checkpoints").write_text("a file where the checkpoints go")
    with pytest.raises(ValueError, match=r"train\.run_dir=.*cannot write"):
        loop.train(train_config(corpus, run))


def test_cli_errors_are_one_line_and_exit_2(corpus, tmp_path, capsys, monkeypatch):
    from lcjax.train.__main__ import main
    monkeypatch.delenv("LCJAX_TRACEBACK", raising=False)
    args = ["--config", "tiny", "data.source=text", f"data.path={corpus}",
            f"train.run_dir={tmp_path / 'r'}"]
    assert main(args + ["optimizer.b1=1.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lcjax.train: error: ") and "optimizer.b1=1.5" in err[0]
    assert main(args[:-1] + [f"train.run_dir={tmp_path / 'r' / 'x'}"] + ["model.vocab_size=0"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    with pytest.raises(ValueError, match="optimizer.b1"):
        main(args + ["optimizer.b1=1.5", "--traceback"])


def test_summary_table_of_a_stopped_run_shows_dashes():
    s = loop.TrainSummary(run_dir="r", start_step=0, final_step=0, losses=[],
                          initial_eval_loss=math.nan, final_eval_loss=math.nan,
                          tokens_per_second=0.0, mfu=None, checkpoint=None, interrupted=True)
    assert "nan" not in s.table() and re.search(r"held-out loss, end +-\n", s.table())
