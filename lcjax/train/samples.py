"""Completions of fixed Python prompts from a run's newest checkpoint, printed after training.

The default run trains on Python sources, so three short Python prompts show at a glance what
the model learned: greedy (its most likely continuation) and sampled (temperature 0.7,
top-p 0.95, a fixed seed). Both use a repetition penalty of 1.2 (vLLM's, as the server's
`repetition_penalty`): a model this small repeats an identifier piece forever under plain
greedy decoding. They run in the serving engine, as `python -m lcjax.generate` does.
"""

from __future__ import annotations

import os
from typing import Callable

# Each prompt ends in a word. The byte-level BPE merges a newline with the next line's
# indentation ("\n   " + " if"), so a prompt ending in "\n" or in spaces would leave the model
# at a token boundary it never saw in training, and it would answer with a dedented line.
PROMPTS = ("def fibonacci(n):\n    if", "import os\n\n\ndef list_files(path):\n    for",
           "class Stack:\n    def __init__(self):\n        self")
REPETITION_PENALTY = 1.2


def completions(run_dir: str | os.PathLike, max_tokens: int = 48) -> list[tuple[str, str, str]]:
    """(prompt, greedy completion, sampled completion) for each of PROMPTS."""
    from lcjax.serve.engine import Engine, EngineConfig
    from lcjax.serve.loading import load_run
    from lcjax.serve.sampling import SamplingParams

    config, variables, tokenizer = load_run(run_dir)
    ids = [tokenizer.encode(p) for p in PROMPTS]
    max_len = min(max(map(len, ids)) + max_tokens + 1, config.model.max_position_embeddings)
    engine = Engine(config, variables, tokenizer,
                    EngineConfig(max_num_seqs=2 * len(ids), max_model_len=max_len, seed=0))
    greedy = SamplingParams(max_tokens=max_tokens, temperature=0.0,
                            repetition_penalty=REPETITION_PENALTY)
    sampled = SamplingParams(max_tokens=max_tokens, temperature=0.7, top_p=0.95, seed=0,
                             repetition_penalty=REPETITION_PENALTY)
    outs = engine.generate(ids + ids, [greedy] * len(ids) + [sampled] * len(ids))
    return [(p, outs[i].text, outs[len(ids) + i].text) for i, p in enumerate(PROMPTS)]


def print_completions(run_dir: str | os.PathLike, write: Callable[[str], None] = print,
                      max_tokens: int = 48) -> None:
    write("\ncompletions (greedy, then sampled at temperature 0.7, top-p 0.95; "
          f"repetition penalty {REPETITION_PENALTY}):")
    for prompt, greedy, sampled in completions(run_dir, max_tokens):
        for label, text in (("greedy", greedy), ("sampled", sampled)):
            write(f"--- {label} ---\n{prompt}{text}")
