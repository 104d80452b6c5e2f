"""The initial policy: (Config, variables, tokenizer) from a training run (its tokenizer.json
and newest checkpoint) or a Hugging Face directory (config.json + safetensors, and the
directory's tokenizer.json with tokenizer_config.json's special tokens); lcjax.serve.loading
does the reading."""

from __future__ import annotations

import os
import pathlib

from lcjax.rl.config import PolicyConfig
from lcjax.serve.loading import RUN_CONFIG, load_hf_model, load_run


def load_policy(cfg: PolicyConfig):
    """(Config, {"params", "router_bias"}, tokenizer); ValueError says how to get a missing one."""
    if cfg.format == "random":
        from lcjax.config_io import load_config, resolve_config_path
        from lcjax.serve.loading import random_model
        return random_model(load_config(resolve_config_path(cfg.path)))
    path = pathlib.Path(cfg.path)
    if not path.is_absolute() and not path.exists():
        repo = pathlib.Path(__file__).resolve().parents[2]
        if (repo / path).exists():
            path = repo / path
    if not path.is_dir():
        raise ValueError(f"policy.path={cfg.path!r} does not exist. The default policy is the run "
                         f"`python -m lcjax.train` writes to runs/stdlib_tiny (about 4 minutes on "
                         f"2 CPU cores): run it first, or set policy.path to a run or Hugging Face "
                         f"directory")
    fmt = cfg.format
    if fmt == "auto":
        fmt = "run" if (path / RUN_CONFIG).is_file() else "hf"
    if fmt == "run":
        if not (path / "checkpoints").is_dir() or not any(
                p.name.isdigit() for p in (path / "checkpoints").iterdir()):
            raise ValueError(f"policy.path={cfg.path!r} holds no finished checkpoint yet: let "
                             f"`python -m lcjax.train` finish (or run it) first")
        return load_run(os.fspath(path))
    return load_hf_model(os.fspath(path))
