"""The trainer's side of lcjax.data: tokenizer for the run, iterators, global device batches."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from lcjax.config import Config
from lcjax.data import (Tokenizer, iterator_state_to_json, make_eval_batches, make_iterator,
                        restore_iterator_from_json, tokenizer_for)
from lcjax.parallel import LOGICAL_AXIS_RULES

_DATA_PARALLEL = ("data", "fsdp", "expert")


def run_tokenizer(config: Config) -> Tokenizer:
    """The run's tokenizer: loaded from run_dir, or trained on the train split and saved there."""
    tokenizer = tokenizer_for(config.data, config.train.run_dir, config.model.vocab_size)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ValueError(f"tokenizer in {config.train.run_dir} has {tokenizer.vocab_size} tokens but "
                         f"model.vocab_size={config.model.vocab_size}: raise model.vocab_size or "
                         f"use a new train.run_dir")
    return tokenizer


def check_batch(config: Config, mesh: Mesh) -> None:
    """global_batch must split over the data-parallel devices (and the hosts)."""
    shards = math.prod(mesh.shape[a] for a in _DATA_PARALLEL)
    if config.data.global_batch % shards:
        raise ValueError(f"data.global_batch={config.data.global_batch} is not divisible by the "
                         f"{shards} data-parallel devices (mesh data x fsdp x expert): change one")
    config.data.per_host_batch(jax.process_count())


def train_iterator(config: Config, tokenizer: Tokenizer):
    return make_iterator(config.data, tokenizer, "train")


def eval_batches(config: Config, tokenizer: Tokenizer) -> list[dict]:
    return make_eval_batches(config.data, tokenizer, config.train.eval_batches)


def iterator_state(iterator) -> dict:
    """JSON-able state for the checkpoint (orbax JsonSave)."""
    return {"iterator": iterator_state_to_json(iterator)}


def restore_iterator(iterator, state: dict) -> None:
    restore_iterator_from_json(iterator, state["iterator"])


def to_global(batch: dict, sharding: NamedSharding) -> dict:
    """This host's rows of each [B, S] array -> one global array sharded over the batch axes."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def axis_rules():
    """Context in which the model's logical activation constraints resolve onto the mesh."""
    return nn.logical_axis_rules(LOGICAL_AXIS_RULES)
