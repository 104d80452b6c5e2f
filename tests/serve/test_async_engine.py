"""AsyncEngine's threading contract, against a scripted stand-in for the Engine (fast, exact).

The API tests (test_api.py) run the same wrapper over the real Engine; here a fake engine makes
the wrapper's own properties checkable: one token per request per step, counted calls.
"""

import asyncio
import threading
import time

import pytest

from lcjax.serve.async_engine import AsyncEngine, EngineError, EngineShutdown
from lcjax.serve.outputs import EngineStats, RequestOutput
from lcjax.serve.sampling import SamplingParams


class FakeEngine:
    """Emits token 7 for every running request each step; finishes at max_tokens."""

    def __init__(self):
        self.requests = {}  # id -> (prompt, params, generated)
        self.aborted = []
        self.steps = 0
        self.fail_next = 0
        self.thread_ids = set()
        self.step_delay = 0.0

    def add_request(self, prompt, params, request_id=None):
        self.thread_ids.add(threading.get_ident())
        if not prompt:
            raise ValueError("prompt is empty")
        self.requests[request_id] = (list(prompt), params, [])
        return request_id

    def abort(self, request_id):
        self.thread_ids.add(threading.get_ident())
        if self.requests.pop(request_id, None) is not None:
            self.aborted.append(request_id)

    def has_unfinished(self):
        return bool(self.requests)

    def step(self):
        self.thread_ids.add(threading.get_ident())
        self.steps += 1
        time.sleep(self.step_delay)
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("device on fire")
        outputs = []
        for rid, (prompt, params, generated) in list(self.requests.items()):
            generated.append(7)
            done = len(generated) >= params.max_tokens
            outputs.append(RequestOutput(rid, prompt, list(generated), [7], "x" * len(generated), "x",
                                         finished=done, finish_reason="length" if done else None,
                                         first_token_time=time.monotonic(), arrival_time=time.monotonic()))
            if done:
                del self.requests[rid]
        return outputs

    def stats(self):
        return EngineStats(num_waiting=0, num_running=len(self.requests), free_pages=10 - len(self.requests),
                           total_pages=10, num_compilations=0, generated_tokens_total=0, prompt_tokens_total=0)


@pytest.fixture
def fake():
    engine = FakeEngine()
    wrapper = AsyncEngine(engine)
    yield engine, wrapper
    wrapper.shutdown(drain=False, timeout=5.0)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_outputs_in_order_and_only_the_engine_thread_calls_the_engine(fake):
    engine, wrapper = fake

    async def main():
        outs = [o async for o in wrapper.generate([1, 2], SamplingParams(max_tokens=4), "a")]
        return outs

    outs = run(main())
    assert [len(o.token_ids) for o in outs] == [1, 2, 3, 4]
    assert outs[-1].finished and not any(o.finished for o in outs[:-1])
    assert engine.thread_ids == {wrapper._thread.ident}
    assert wrapper.stats().num_running == 0


def test_idle_thread_sleeps(fake):
    engine, wrapper = fake
    run(_drain(wrapper.generate([1], SamplingParams(max_tokens=2))))
    steps = engine.steps
    time.sleep(0.2)
    assert engine.steps == steps  # no stepping (or spinning) without requests
    run(_drain(wrapper.generate([1], SamplingParams(max_tokens=2))))  # and it wakes up again
    assert engine.steps == steps + 2


async def _drain(agen):
    return [o async for o in agen]


def test_consumer_stopping_early_aborts(fake):
    engine, wrapper = fake
    engine.step_delay = 0.01

    async def main():
        gen = wrapper.generate([1], SamplingParams(max_tokens=1000), "early")
        async for _ in gen:
            break
        await gen.aclose()

    run(main())
    _wait(lambda: engine.aborted == ["early"])
    assert not engine.requests


def test_cancelled_consumer_aborts(fake):
    engine, wrapper = fake
    engine.step_delay = 0.01

    async def main():
        task = asyncio.create_task(_drain(wrapper.generate([1], SamplingParams(max_tokens=1000), "cancel")))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())
    _wait(lambda: engine.aborted == ["cancel"])


def test_rejected_request_raises_value_error_and_group_is_all_or_nothing(fake):
    engine, wrapper = fake
    engine.step_delay = 0.01

    async def main():
        with pytest.raises(ValueError, match="prompt is empty"):
            await wrapper.add_request([], SamplingParams())
        with pytest.raises(ValueError):
            await wrapper.add_requests([([1], SamplingParams(max_tokens=1000), "ok"),
                                        ([], SamplingParams(), "bad")])

    run(main())
    _wait(lambda: "ok" in engine.aborted and not engine.requests)


def test_step_exception_fails_requests_and_keeps_serving(fake):
    engine, wrapper = fake
    engine.fail_next = 1

    async def main():
        with pytest.raises(EngineError, match="device on fire"):
            await _drain(wrapper.generate([1], SamplingParams(max_tokens=3), "doomed"))
        return await _drain(wrapper.generate([1], SamplingParams(max_tokens=3), "fine"))

    outs = run(main())
    assert outs[-1].finished and "doomed" in engine.aborted
    assert wrapper.num_step_errors == 1 and wrapper._thread.is_alive()


def test_n_requests_share_one_stream(fake):
    _, wrapper = fake

    async def main():
        stream = await wrapper.add_requests([([1], SamplingParams(max_tokens=2), f"r{i}") for i in range(3)])
        return [o async for o in stream]

    outs = run(main())
    assert sorted(o.request_id for o in outs if o.finished) == ["r0", "r1", "r2"]
    assert len(outs) == 6


def test_shutdown_without_drain_ends_streams_with_abort(fake):
    engine, wrapper = fake
    engine.step_delay = 0.01

    async def main():
        stream = await wrapper.add_request([1], SamplingParams(max_tokens=10_000), "long")
        await stream.__anext__()
        threading.Thread(target=wrapper.shutdown, kwargs={"drain": False}).start()
        return [o async for o in stream]

    outs = run(main())
    assert outs[-1].finish_reason == "abort" and outs[-1].finished
    _wait(lambda: not wrapper._thread.is_alive())

    async def late():
        await wrapper.add_request([1], SamplingParams())

    with pytest.raises(EngineShutdown):
        run(late())


def test_shutdown_with_drain_finishes_running_requests(fake):
    engine, wrapper = fake
    engine.step_delay = 0.005

    async def main():
        stream = await wrapper.add_request([1], SamplingParams(max_tokens=20), "drained")
        threading.Thread(target=wrapper.shutdown, kwargs={"drain": True}).start()
        return [o async for o in stream]

    outs = run(main())
    assert outs[-1].finish_reason == "length" and len(outs[-1].token_ids) == 20


def _wait(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)
