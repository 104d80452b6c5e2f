"""`python -m lcjax.generate PROMPT`: complete a prompt from the terminal, streaming tokens.

    python -m lcjax.generate "def fibonacci(n):"                 # the default training run
    python -m lcjax.generate --checkpoint runs/my_run --temperature 0.8 --top-p 0.95 "import os"
    python -m lcjax.generate --hf-model path/to/LongCat-Flash --chat "Write a haiku about MoE"
    echo "class Stack:" | python -m lcjax.generate -              # the prompt from stdin

The model comes from the same flags as `python -m lcjax.serve` (a training run directory, a
Hugging Face checkpoint, or a randomly initialised preset) and runs in the serving engine, so
the sampling options mean what they mean over HTTP (temperature 0 is greedy; top-p / top-k /
min-p, penalties, stop strings, seed). `--chat` wraps the prompt in the model's chat template as
one user message. Errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Optional, Sequence

PROG = "python -m lcjax.generate"
TextStream = Any  # a text stream: read() for the prompt; write() / flush() for the output


def build_parser() -> argparse.ArgumentParser:
    summary, _, details = __doc__.partition("\n\n")
    p = argparse.ArgumentParser(prog=PROG, description=summary.split(": ", 1)[1], epilog=details,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="+", help="prompt text (words are joined by spaces); '-' reads stdin")
    model = p.add_argument_group("model (default: the default training run, else random tiny)")
    source = model.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", metavar="RUN_DIR", help="a training run directory")
    source.add_argument("--hf-model", metavar="DIR", help="a Hugging Face LongCat-Flash directory")
    model.add_argument("--config", metavar="YAML", action="append",
                       help="model preset or YAML for a randomly initialised model")
    model.add_argument("--chat", action="store_true",
                       help="render the prompt as one user message with the chat template")
    model.add_argument("--chat-template", metavar="FILE", help="Jinja2 chat template for --chat")
    sampling = p.add_argument_group("sampling (as in the server's API)")
    sampling.add_argument("--max-tokens", type=int, default=128)
    sampling.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    sampling.add_argument("--top-p", type=float, default=1.0)
    sampling.add_argument("--top-k", type=int, default=0)
    sampling.add_argument("--min-p", type=float, default=0.0)
    sampling.add_argument("--repetition-penalty", type=float, default=1.0)
    sampling.add_argument("--presence-penalty", type=float, default=0.0)
    sampling.add_argument("--frequency-penalty", type=float, default=0.0)
    sampling.add_argument("--stop", action="append", default=[], metavar="TEXT",
                          help="stop string (repeatable)")
    sampling.add_argument("--seed", type=int, default=0, help="sampling seed and random init")
    sampling.add_argument("--num-samples", type=int, default=1, help="completions, one after another")
    sampling.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--max-model-len", type=int, help="prompt + completion tokens (default: fits)")
    p.add_argument("--no-stream", action="store_true", help="print each completion when finished")
    p.add_argument("--traceback", action="store_true", help="on an error, show the Python stack")
    return p


def sampling_params(args: argparse.Namespace, seed: int):
    from lcjax.serve.sampling import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p,
                          repetition_penalty=args.repetition_penalty,
                          presence_penalty=args.presence_penalty,
                          frequency_penalty=args.frequency_penalty, stop=tuple(args.stop),
                          seed=seed, ignore_eos=args.ignore_eos)


def prompt_text(args: argparse.Namespace, stdin: TextStream) -> str:
    text = stdin.read() if args.prompt == ["-"] else " ".join(args.prompt)
    if not text:
        raise ValueError("the prompt is empty")
    return text


def stream(engine, prompt_ids: list, params, out: TextStream, live: bool) -> Any:
    """Run one request to completion, writing its text as it arrives; the final output."""
    request_id = engine.add_request(prompt_ids, params)
    final = None
    while final is None:
        for output in engine.step():
            if output.request_id != request_id:
                continue
            if live and output.delta_text:
                out.write(output.delta_text)
                out.flush()
            if output.finished:
                final = output
    if final.finish_reason == "error":
        raise ValueError(f"generation failed: {final.error}")
    if not live:
        out.write(final.text)
    return final


def run(args: argparse.Namespace, stdin: TextStream = None, out: TextStream = None,
        err: TextStream = None) -> int:
    """Load the model, then stream `--num-samples` completions of the prompt to `out`."""
    from lcjax.serve.chat_template import resolve_chat_template
    from lcjax.serve.cli import load_model
    from lcjax.serve.engine import Engine, EngineConfig

    stdin, out, err = stdin or sys.stdin, out or sys.stdout, err or sys.stderr
    text = prompt_text(args, stdin)
    # Sampling values are checked before the (slow) model load; top_k again against the vocab.
    sampling_params(args, args.seed).validate(vocab_size=2**31 - 1)
    model = load_model(args)
    if args.chat:
        template = resolve_chat_template(args.chat_template, model.tokenizer)
        text = template.render([{"role": "user", "content": text}], add_generation_prompt=True)
    prompt_ids = model.tokenizer.encode(text)
    limit = model.config.model.max_position_embeddings
    max_len = args.max_model_len or min(limit, len(prompt_ids) + args.max_tokens + 1)
    if len(prompt_ids) + 1 > max_len:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens; --max-model-len={max_len} "
                         "leaves no room for a completion")
    engine = Engine(model.config, model.variables, model.tokenizer,
                    EngineConfig(max_num_seqs=1, max_model_len=max_len, seed=args.seed))
    for i in range(args.num_samples):
        if args.num_samples > 1:
            out.write(f"\n--- sample {i + 1} ---\n")
        if not args.chat:
            out.write(text)
        final = stream(engine, prompt_ids, sampling_params(args, args.seed + i), out,
                       live=not args.no_stream)
        out.write("\n")
        out.flush()
        print(f"[{final.num_generated_tokens} tokens, finish: {final.finish_reason}]", file=err)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    from lcjax.cli import run_main

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config and (args.checkpoint or args.hf_model):
        parser.error("--config picks a randomly initialised model; --checkpoint / --hf-model bring their own")
    for name, low in (("max_tokens", 1), ("num_samples", 1)):
        if getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)}: must be >= {low}")
    return run_main("lcjax.generate", lambda: run(args), args.traceback)


if __name__ == "__main__":
    sys.exit(main())
