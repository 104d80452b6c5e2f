"""The trainer's side of lcjax.data: tokenizer for the run, iterators, global device batches."""

from __future__ import annotations

import math
import os
import shutil

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from lcjax.config import Config
from lcjax.data import (Tokenizer, iterator_state_to_json, make_eval_batches, make_iterator,
                        restore_iterator_from_json, tokenizer_for)
from lcjax.data.tokenizer import FILENAME as TOKENIZER_FILE
from lcjax.parallel import is_primary, rules_for
from lcjax.train.state import batch_axes, batch_sharding


def run_tokenizer(config: Config) -> Tokenizer:
    """The run's tokenizer: loaded from run_dir, or trained on the train split and saved there.

    With several processes, process 0 loads or trains it and the others then read its file, so
    train.run_dir must be on a filesystem every host sees (as orbax needs for the checkpoints).
    """
    run_dir = config.train.run_dir
    template = chat_template(config)
    if is_primary():
        inherit_tokenizer(config)
    tokenizer = tokenizer_for(config.data, run_dir, config.model.vocab_size, template) if is_primary() else None
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("lcjax.train: tokenizer.json saved")
        if tokenizer is None:
            if not os.path.isfile(os.path.join(run_dir, TOKENIZER_FILE)):
                raise ValueError(f"train.run_dir={run_dir!r}: process {jax.process_index()} does not "
                                 f"see the {TOKENIZER_FILE} process 0 saved there: put the run "
                                 "directory on a filesystem every host shares")
            tokenizer = tokenizer_for(config.data, run_dir, config.model.vocab_size, template)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ValueError(f"tokenizer in {config.train.run_dir} has {tokenizer.vocab_size} tokens but "
                         f"model.vocab_size={config.model.vocab_size}: raise model.vocab_size or "
                         f"use a new train.run_dir")
    return tokenizer


def inherit_tokenizer(config: Config) -> bool:
    """Copy the tokenizer.json of a `train.init_from` training run into a run directory that has
    none: a fine-tune must read its data with the token ids its initial weights were trained on,
    not a new BPE trained on the fine-tuning data. (A Hugging Face directory's tokenizer has its
    own special ids; such runs train their own.) True when copied."""
    init = config.train.init_from or ""
    source = os.path.join(init, TOKENIZER_FILE)
    target = os.path.join(config.train.run_dir, TOKENIZER_FILE)
    if (not init or os.path.isfile(target) or not os.path.isfile(source)
            or not os.path.isfile(os.path.join(init, "config.yaml"))):
        return False
    os.makedirs(config.train.run_dir, exist_ok=True)
    tmp = target + ".tmp"
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)
    return True


def chat_template(config: Config, tokenizer=None):
    """The template data.source="chat" renders with: the server's own resolution (data.chat_template
    file, else the tokenizer's, else the default), so training and serving see the same text."""
    if config.data.source != "chat":
        return None
    from lcjax.serve.chat_template import resolve_chat_template

    return resolve_chat_template(config.data.chat_template or None, tokenizer)


def check_batch(config: Config, mesh: Mesh) -> None:
    """global_batch must split over the data-parallel devices (and the hosts)."""
    axes = batch_axes(mesh, rules_for(config))
    shards = math.prod(mesh.shape[a] for a in axes)
    if config.data.global_batch % shards:
        raise ValueError(f"data.global_batch={config.data.global_batch} is not divisible by the "
                         f"{shards} data-parallel devices (mesh {' x '.join(axes)}): change one")
    host_rows(batch_sharding(mesh, rules_for(config)), config.data.global_batch)


def host_rows(sharding: NamedSharding, global_batch: int) -> tuple[int, int]:
    """(index, count) of this process's block of global-batch rows under `sharding`.

    The data pipeline hands block `index` of `count` equal blocks to this process; processes
    whose devices hold the same rows (batch replicated across hosts) get the same block.
    """
    rows = set()
    for index in sharding.addressable_devices_indices_map((global_batch, 1)).values():
        rows.update(range(*index[0].indices(global_batch)[:2]))
    first, size = min(rows), len(rows)
    if rows != set(range(first, first + size)) or first % size or global_batch % size:
        raise ValueError(f"mesh: process {jax.process_index()}'s devices hold batch rows "
                         f"{sorted(rows)} of {global_batch}, not one aligned block: order the "
                         "mesh's devices by process (hosts on the outer, dcn_* axes)")
    return first // size, global_batch // size


def train_iterator(config: Config, tokenizer: Tokenizer, sharding: NamedSharding | None = None):
    """This process's rows of each batch: its block under `sharding` (default: by process index)."""
    index, count = _block(config, sharding)
    return make_iterator(config.data, tokenizer, "train", host_index=index, host_count=count,
                         template=chat_template(config, tokenizer))


def eval_batches(config: Config, tokenizer: Tokenizer,
                 sharding: NamedSharding | None = None) -> list[dict]:
    index, count = _block(config, sharding)
    return make_eval_batches(config.data, tokenizer, config.train.eval_batches, host_index=index,
                             host_count=count, template=chat_template(config, tokenizer))


def _block(config: Config, sharding: NamedSharding | None) -> tuple[int | None, int | None]:
    return (None, None) if sharding is None else host_rows(sharding, config.data.global_batch)


def iterator_state(iterator) -> dict:
    """JSON-able state for the checkpoint (orbax JsonSave, written by process 0 only).

    The same on every process: each runs the whole pipeline and only slices its rows from the
    global batch afterwards, so process 0's copy restores every process's iterator.
    """
    return {"iterator": iterator_state_to_json(iterator)}


def restore_iterator(iterator, state: dict) -> None:
    restore_iterator_from_json(iterator, state["iterator"])


def to_global(batch: dict, sharding: NamedSharding) -> dict:
    """This host's rows of each [B, S] array -> one global array sharded over the batch axes."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
