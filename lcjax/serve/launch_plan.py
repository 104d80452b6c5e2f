"""The memory plan of a `python -m lcjax.serve` launch, computed before any weight is loaded.

`--plan` prints it and exits; every other launch computes it when one device's memory is known
(`--device-memory`, else a GPU/TPU's `memory_stats()['bytes_limit']`; on CPU only when given)
and stops with `check_fits`'s one-line message when not one `--max-model-len` sequence fits.

Page rule: with the plan known and no `--num-pages`, each KV pool gets
`min(max_num_seqs x pages_per_seq + 1, plan.num_pages)` pages: never more than the slots can
use, never more than the memory left beside the weights and the headroom holds. Fewer pages
than the slots need only make requests wait for pages at admission (the engine's page policy).

KV placement: `--kv-retrieval a2ats` adds the codes and codebooks to the device; with `--a2ats
offload=host` the full-attention pools live in host memory (`--host-memory`, default half the
RAM), so the same device holds many more sequences and the planned page count grows with it;
`--sparse-verify` adds the page key bounds (lcjax/serve/plan_kv.py). When more sequences fit than
`--max-num-seqs` slots, the launch says so: the slots, not the memory, then cap concurrency.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
from typing import Any, Optional

from lcjax.config import Config
from lcjax.serve.plan import MemoryPlan, parse_device_memory, serving_plan
from lcjax.serve.plan_kv import add_host_memory_flag, kv_settings

DEFAULT_MAX_MODEL_LEN = 512  # the server's default, capped by max_position_embeddings


def add_flags(group: argparse._ArgumentGroup) -> None:
    """The server's memory plan flags: --plan, --device-memory, --host-memory."""
    group.add_argument("--plan", action="store_true",
                       help="print the memory plan of this model, mesh and --quant and exit (no "
                            "weights are loaded)")
    group.add_argument("--device-memory", metavar="NAME|SIZE",
                       help="memory of one device (h100, h200, 141GB, 80GiB); default: a GPU/TPU's "
                            "bytes_limit, none on CPU (no fit check)")
    add_host_memory_flag(group)


def model_config(args: argparse.Namespace) -> tuple[Config, str]:
    """(Config, title) of the model the flags serve, read without loading weights."""
    from lcjax.config_io import load_config, resolve_config_path
    from lcjax.serve import loading

    if args.checkpoint or getattr(args, "lora", None):
        run_dir = pathlib.Path(args.checkpoint or args.lora).absolute()
        if not (run_dir / loading.RUN_CONFIG).is_file():
            raise ValueError(f"{run_dir} is not a training run directory: {loading.RUN_CONFIG} "
                             "is missing (written by `python -m lcjax.train`)")
        return load_config(run_dir / loading.RUN_CONFIG), run_dir.name
    if args.hf_model:
        from lcjax.convert.hf import config_from_checkpoint

        return config_from_checkpoint(args.hf_model), pathlib.Path(args.hf_model).absolute().name
    if args.config is None:
        from lcjax.serve.cli import default_run_dir

        run_dir = default_run_dir()
        if loading.latest_step(run_dir) is not None:
            return load_config(run_dir / loading.RUN_CONFIG), run_dir.absolute().name
    names = args.config or ["tiny"]
    config = load_config([resolve_config_path(c) for c in names], args.overrides)
    vocab = loading.ByteTokenizer.vocab_size  # random models grow their vocab to the tokenizer's
    if config.model.vocab_size < vocab:
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, vocab_size=vocab))
    return config, " + ".join(names) + " (random)"


def device_memory(flag: Optional[str]) -> Optional[int]:
    """Bytes of one device: `--device-memory`, else the accelerator's bytes_limit, else None."""
    if flag is not None:
        return parse_device_memory(flag)
    import jax

    device = jax.local_devices()[0]
    if device.platform == "cpu":
        return None
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - a backend without memory stats: plan bytes only
        return None
    return stats.get("bytes_limit")


def mesh_devices(mesh_cfg: Any) -> int:
    """Devices the serving mesh uses (lcjax.serve.sharding.serving_mesh's rule)."""
    sizes = [s * d for s, d in zip(mesh_cfg.ici_sizes, mesh_cfg.dcn_sizes)]
    if -1 not in sizes:
        return math.prod(sizes)
    import jax

    return jax.device_count()


def launch_plan(args: argparse.Namespace, mesh_cfg: Any, parallel: Any,
                device_bytes: Optional[int], rules_given: bool = True) -> tuple[MemoryPlan, str]:
    """(plan, title) for the flags' model, mesh, `--quant` and engine sizes; with
    `rules_given=False`, under the rules the server picks (plan.serving_plan)."""
    config, title = model_config(args)
    config = dataclasses.replace(config, mesh=mesh_cfg, parallel=parallel)
    max_len = args.max_model_len or min(DEFAULT_MAX_MODEL_LEN, config.model.max_position_embeddings)
    plan = serving_plan(config, mesh_cfg, mesh_devices(mesh_cfg), args.quant, max_len,
                        args.page_size, device_bytes, num_speculative_tokens=args.num_speculative_tokens,
                        rules_given=rules_given, **kv_settings(args))
    return plan, title


def planned_num_pages(plan: MemoryPlan, max_num_seqs: int) -> Optional[int]:
    """The page rule of the module docstring (None when the plan knows no device memory)."""
    if plan.num_pages is None:
        return None
    return min(max_num_seqs * plan.pages_per_sequence + 1, plan.num_pages)


def plan_message(plan: MemoryPlan, pages: int, max_num_seqs: int) -> str:
    """The launch's line on the plan; says when the slots, not the memory, cap concurrency."""
    where = " (KV pages in host memory)" if plan.offload else ""
    text = (f"memory plan: {plan.max_sequences} sequences of {plan.max_model_len} tokens fit per "
            f"device{where}; {pages} KV pages per pool")
    if plan.max_sequences > max_num_seqs:
        text += (f"; --max-num-seqs {max_num_seqs} caps concurrency (raise it to admit up to "
                 f"{plan.max_sequences})")
    return text
