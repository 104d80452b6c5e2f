"""The README's first command, `python -m lcjax.train`, as a user runs it: the embedded default
learns Python (held-out loss at most 4.5 nats per token) and its printed completions look like
Python (indented lines, stdlib identifiers, no token loop)."""

import os
import pathlib
import re
import subprocess
import sys
import sysconfig

import pytest

from lcjax.train.samples import PROMPTS

MAX_HELDOUT_NATS = 4.5


def _completions(stdout: str) -> dict[str, list[str]]:
    """{"greedy": [...], "sampled": [...]} from the run's printed completions (prompt removed)."""
    out: dict[str, list[str]] = {"greedy": [], "sampled": []}
    parts = re.split(r"^--- (greedy|sampled) ---\n", stdout.split("\ncompletions (", 1)[1], flags=re.M)
    for label, body in zip(parts[1::2], parts[2::2]):
        prompt = PROMPTS[len(out[label])]
        assert body.startswith(prompt), body
        out[label].append(body[len(prompt):].rstrip("\n"))
    return out


def _stdlib_identifiers() -> set[str]:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    names: set[str] = set()
    for path in list(root.glob("*.py"))[:400]:
        names.update(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", path.read_text(errors="ignore")))
    return names


def _longest_repeat_run(text: str, width: int = 8) -> int:
    """The most consecutive repeats of any unit of up to `width` characters, e.g. "_info" x 7;
    whitespace runs (indentation) count as one space."""
    text = re.sub(r"\s+", " ", text)
    best = 1
    for w in range(1, width + 1):
        for m in re.finditer(r"(.{%d})\1+" % w, text):
            best = max(best, len(m.group(0)) // w)
    return best


def test_looks_like_python_checks_flag_a_token_loop():
    assert _longest_repeat_run("x = self._time_info_info_info_info_info_info_info") >= 7
    assert _longest_repeat_run("if n < 2:\n        return n\n    return fib(n - 1)") < 4


@pytest.mark.slow  # the whole default run: about 4 minutes on 2 cores
def test_default_run_learns_python(tmp_path):
    # As a user runs it: without the test session's fast-compile flag (LLVM optimisation off),
    # which makes the 1,750 steps ~3x slower and their float results differ from the README's.
    flags = os.environ.get("XLA_FLAGS", "").replace("--xla_backend_optimization_level=0", "").strip()
    env = dict(os.environ, XLA_FLAGS=flags)
    proc = subprocess.run([sys.executable, "-m", "lcjax.train", f"train.run_dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=1500, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    nats = float(re.search(r"held-out loss, end\s+([\d.]+) nats/token", proc.stdout).group(1))
    assert nats <= MAX_HELDOUT_NATS, proc.stdout
    identifiers = _stdlib_identifiers()
    for label, texts in _completions(proc.stdout).items():
        assert len(texts) == len(PROMPTS)
        for text in texts:
            # an indented line after the first; the last one may be only its indentation, when
            # the token limit cuts the completion right after "def f(...):\n        "
            lines = text.split("\n")[1:]
            assert any(line.startswith("    ") for line in lines), (label, text)
            words = [w for w in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text) if len(w) >= 3]
            known = sum(w in identifiers for w in words)
            assert words and known >= 0.5 * len(words), (label, text, known, len(words))
            assert _longest_repeat_run(text) < 6, (label, text)
