"""What `python -m lcjax.serve` serves: (Config, variables, tokenizer) from one of

- a training run directory (`load_run`): `config.yaml`, `tokenizer.json` and the newest orbax
  checkpoint under `checkpoints/` (params + router_bias of the TrainState);
- a Hugging Face LongCat-Flash directory (`load_hf_model`): weights via lcjax.convert, tokenizer
  and chat template from `tokenizer.json` / `tokenizer_config.json`;
- random initialisation (`random_model`), with a byte-level tokenizer: a smoke-test server.

Tokenizers served here all offer encode(str) -> ids, decode(ids) -> str, eos_id, bos_id,
vocab_size and optionally chat_template / bos_token / eos_token.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from lcjax.config import Config
from lcjax.config_io import load_config
from lcjax.data.tokenizer import FILENAME as TOKENIZER_FILE
from lcjax.data.tokenizer import Tokenizer
from lcjax.model import BIAS_COLLECTION, LongCatModel
from lcjax.run_checkpoint import restore_newest

RUN_CONFIG = "config.yaml"


def load_run(run_dir: str | os.PathLike) -> tuple[Config, dict, Tokenizer]:
    """(Config, {"params", "router_bias"}, Tokenizer) of the newest checkpoint in `run_dir`.

    Raises ValueError naming what is missing when `run_dir` is not a finished training run.
    """
    run_dir = pathlib.Path(run_dir).absolute()
    for name in (RUN_CONFIG, TOKENIZER_FILE):
        if not (run_dir / name).is_file():
            raise ValueError(f"{run_dir} is not a training run directory: {name} is missing "
                             "(written by `python -m lcjax.train`)")
    config = load_config(run_dir / RUN_CONFIG)
    tokenizer = Tokenizer.from_json((run_dir / TOKENIZER_FILE).read_text())
    # Only params and router_bias (not the optimizer state), as host arrays: the restore does
    # not depend on the mesh the run was trained on; the engine places them itself.
    boxed = jax.eval_shape(LongCatModel(config.model).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    abstract = nn.unbox({"params": boxed["params"], "router_bias": boxed[BIAS_COLLECTION]})
    state, _ = restore_newest(run_dir, abstract)
    variables = {"params": state["params"], BIAS_COLLECTION: state["router_bias"]}
    return config, variables, tokenizer


def latest_step(run_dir: str | os.PathLike) -> Optional[int]:
    """Newest finished checkpoint step of a run, or None (no run, or no checkpoint yet)."""
    directory = pathlib.Path(run_dir).absolute() / "checkpoints"
    if not directory.is_dir():
        return None
    manager = ocp.CheckpointManager(directory, item_names=("state", "data"))
    try:
        return manager.latest_step()
    finally:
        manager.close()


def random_model(config: Config, seed: int = 0) -> tuple[Config, dict, "ByteTokenizer"]:
    """Randomly initialised `config.model` with a byte-level tokenizer (vocab grown to fit it)."""
    if config.model.vocab_size < ByteTokenizer.vocab_size:
        config = dataclasses.replace(config, model=dataclasses.replace(
            config.model, vocab_size=ByteTokenizer.vocab_size))
    ids = jnp.zeros((1, 8), jnp.int32)
    variables = nn.unbox(jax.jit(LongCatModel(config.model).init)(jax.random.key(seed), ids))
    # What a checkpoint holds too; other collections init may create are not served state.
    return config, {"params": variables["params"], BIAS_COLLECTION: variables[BIAS_COLLECTION]}, ByteTokenizer()


def load_hf_model(directory: str | os.PathLike, config: Optional[Config] = None) -> tuple[Config, dict, "HFTokenizer"]:
    """A Hugging Face LongCat directory: weights via lcjax.convert, its tokenizer and template."""
    from lcjax.convert import load_hf_checkpoint

    cfg, variables = load_hf_checkpoint(directory, config)
    return cfg, variables, HFTokenizer.from_directory(directory, cfg.model.bos_token_id, cfg.model.eos_token_id)


class ByteTokenizer:
    """Ids 0-2 are <pad>, <s>, </s>; byte b is id b + 3. Any text round-trips."""

    pad_id, bos_id, eos_id = 0, 1, 2
    vocab_size = 256 + 3
    bos_token, eos_token, chat_template = "<s>", "</s>", None

    def encode(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(int(i) - 3 for i in ids if 3 <= int(i) < self.vocab_size)
        return data.decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizer.json` with the special tokens and chat template of its
    `tokenizer_config.json`. Special-token text in a prompt (from a chat template) maps to the
    special ids; decode drops special tokens."""

    def __init__(self, hf: Any, bos_id: int, eos_id: int, bos_token: str = "", eos_token: str = "",
                 chat_template: Optional[str] = None):
        self.hf, self.bos_id, self.eos_id = hf, bos_id, eos_id
        self.bos_token, self.eos_token, self.chat_template = bos_token, eos_token, chat_template

    @classmethod
    def from_directory(cls, directory: str | os.PathLike, bos_id: int, eos_id: int) -> "HFTokenizer":
        import tokenizers

        directory = pathlib.Path(directory)
        path = directory / TOKENIZER_FILE
        if not path.is_file():
            raise ValueError(f"{directory} has no {TOKENIZER_FILE} (needed to serve the model)")
        hf = tokenizers.Tokenizer.from_file(str(path))
        settings = {}
        if (directory / "tokenizer_config.json").is_file():
            settings = json.loads((directory / "tokenizer_config.json").read_text())
        bos, eos = _token_text(settings.get("bos_token")), _token_text(settings.get("eos_token"))
        bos_id = hf.token_to_id(bos) if bos and hf.token_to_id(bos) is not None else bos_id
        eos_id = hf.token_to_id(eos) if eos and hf.token_to_id(eos) is not None else eos_id
        return cls(hf, bos_id, eos_id, bos or "", eos or "", _template(settings.get("chat_template")))

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)


def _token_text(token: Any) -> Optional[str]:
    """tokenizer_config.json writes special tokens as a string or {"content": ...}."""
    if isinstance(token, dict):
        return token.get("content")
    return token


def _template(value: Any) -> Optional[str]:
    """`chat_template` is a string, or a list of {"name", "template"} (take "default")."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value}
        return named.get("default") or next(iter(named.values()), None)
    return value
