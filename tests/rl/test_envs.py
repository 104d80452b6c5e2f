"""Environments: exact rewards, the sandbox's limits, the calculator's tool-call turns."""

import json
import os
import time

import numpy as np
import pytest

from lcjax.rl.envs.arithmetic import ArithmeticConfig, ArithmeticEnv
from lcjax.rl.envs.calculator import CalculatorEnv, calculate
from lcjax.rl.envs.python_tests import PythonTestsEnv
from lcjax.rl.envs.sandbox import run_python


def test_arithmetic_exact_answers():
    env = ArithmeticEnv(ArithmeticConfig(max_operand=4, few_shot=2))
    rng = np.random.default_rng(0)
    for _ in range(50):
        problem = env.sample(rng)
        a, op, b = problem["question"]
        ep = env.reset(problem)
        assert ep.prompt.endswith(f"assert {a} {op} {b} ==") and ep.prompt.count("\n") == 2
        answer = a + b
        assert 0 <= answer <= 8
        assert ep.step(f" {answer}\n").reward == 1.0
        assert ep.step(f" {answer}").done
        for bad in (f" {answer + 1}", f" {answer}.0", f" {answer} # ok", "", "garbage", "\n" + str(answer)):
            assert env.reset(problem).step(bad).reward == 0.0
    assert json.loads(json.dumps(problem)) == problem  # problems are JSON data
    # Same seed, same problems (environment RNG state is what a checkpoint stores).
    r1, r2 = np.random.default_rng(5), np.random.default_rng(5)
    assert [env.sample(r1) for _ in range(5)] == [env.sample(r2) for _ in range(5)]
    with pytest.raises(ValueError, match="max_operand"):
        ArithmeticConfig(max_operand=0)
    with pytest.raises(ValueError, match="ops"):
        ArithmeticConfig(ops="/")


def test_sandbox_ok_failure_timeout_memory_network():
    assert run_python("print(1 + 1)").stdout.strip() == "2"
    assert not run_python("raise SystemExit(3)").ok
    t0 = time.monotonic()
    looped = run_python("while True:\n    pass\n", timeout=1.0, cpu_seconds=1)
    assert not looped.ok and time.monotonic() - t0 < 10
    assert not run_python("x = bytearray(2 << 30)\n", memory_bytes=256 << 20).ok
    net = run_python("import socket\n")
    assert not net.ok and "socket" in net.stderr
    res = run_python("import os\nprint(os.getcwd())\nopen('x', 'w').write('1')\n")
    assert res.ok and not os.path.exists(res.stdout.strip())  # temp dir removed
    with pytest.raises(ValueError, match="timeout"):
        run_python("pass", timeout=0.0)


def test_python_tests_env_rewards():
    env = PythonTestsEnv(timeout=2.0)
    problem = {"prompt": 'def add(a, b):\n    """Return a + b."""\n', "tests": ["add(1, 2) == 3"]}
    assert env.reset(problem).step("    return a + b\n").reward == 1.0
    assert env.reset(problem).step("    return a - b\n").reward == 0.0
    assert env.reset(problem).step("    )(garbage").reward == 0.0
    assert env.reset(problem).step("").reward == 0.0
    assert env.reset(problem).step("    while True:\n        pass\n").reward == 0.0
    assert env.sample(np.random.default_rng(0))["prompt"].startswith("def ")


def test_calculator_tool_turns():
    env = CalculatorEnv(max_operand=9, max_turns=3)
    problem = {"question": "7 * 8", "answer": 56}
    ep = env.reset(problem)
    assert "calculator" in ep.prompt and ep.prompt.endswith("<|assistant|>\n")
    call = '<longcat_tool_call>{"name": "calculator", "arguments": {"expression": "7*8"}}'
    r = ep.step(call)  # the stop string cut the closing tag: still parsed
    assert not r.done and r.reward == 0 and "\n56\n" in r.message and r.message.endswith("<|assistant|>\n")
    assert ep.step("56").reward == 1.0
    assert env.reset(problem).step("57").reward == 0.0
    ep = env.reset(problem)
    bad = '<longcat_tool_call>{"name": "calculator", "arguments": {"expression": "__import__(\'os\')"}}'
    r = ep.step(bad)
    assert "error" in r.message
    ep.step(call)
    assert ep.step(call).done  # out of turns: reward 0
    assert calculate("2 ** 10") == "1024" and calculate("1/0").startswith("error")
    assert calculate("9 ** 9 ** 9").startswith("error") and calculate("x").startswith("error")
