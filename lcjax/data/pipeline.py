"""The grain pipeline: documents -> tokens -> packed rows -> global batch -> this host's rows.

    source[split] -> shuffle(seed, new order each epoch) -> repeat -> tokenize (+eos)
      -> [mp_prefetch: num_workers processes, which die with this one] -> chunk to <= S
      -> first-fit pack (shuffled bins)
      -> batch(global_batch) -> rows [h * B/H, (h+1) * B/H) of host h

Every host runs the same pipeline and keeps its slice of each global batch, so the global batch
at step t is the same for any host count (and the concatenation of the hosts' batches in host
order is what one host would see). The price is that every host tokenizes every document;
that is cheap next to a train step at the sizes this repo trains on its own.

The iterator state is JSON (grain's own), identical on every host, and restores exactly: a
restored iterator yields bit for bit the batches the uninterrupted one would have.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
from typing import Any, Iterator

import grain
import numpy as np

from lcjax.data import chat
from lcjax.data.packing import Chunk, Tokenize, pack
from lcjax.data.sources import document_source
from lcjax.data.spec import DataSpec, check
from lcjax.data.tokenizer import Tokenizer, train_or_load_tokenizer

Batch = dict[str, np.ndarray]  # inputs, targets, segment_ids, positions: int32 [B, S]; loss_mask f32
STATE_VERSION = 1
# Open rows of the first-fit packer. On the stdlib at S=128, 8 rows leave 1.4% padding and 64 rows
# 0.7%; a restore re-reads at most this many rows' worth of documents.
MIN_PACKING_BINS = 64
# Thread prefetch of tokenized documents in each reading process (overlaps the train step).
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=256)


class DataIterator(grain.DatasetIterator):
    """This host's batches, forever (the corpus repeats, reshuffled every epoch).

    `get_state()` is JSON-serialisable and records the settings that shape the stream;
    `set_state()` refuses a state saved under different ones. Call `close()` to stop workers.
    """

    def __init__(self, inner: grain.DatasetIterator, meta: dict[str, Any], spec: DataSpec,
                 host_index: int, host_count: int):
        super().__init__(inner)
        self.meta, self.spec = meta, spec
        self.host_index, self.host_count = host_index, host_count

    def __next__(self) -> Batch:
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return {"data": dict(self.meta), "pipeline": self._parent.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        saved = state.get("data", {}) if isinstance(state, dict) else {}
        diff = [f"{k}={saved.get(k)!r} (now {v!r})" for k, v in self.meta.items() if saved.get(k) != v]
        if diff or "pipeline" not in state:
            raise ValueError("data iterator state was saved with " + (", ".join(diff) or "no settings")
                             + ": restore with the same data settings and tokenizer, or start "
                             "the data stream afresh without the saved state")
        self._parent.set_state(state["pipeline"])


def make_iterator(spec: DataSpec, tokenizer: Tokenizer, split: str = "train",
                  host_index: int | None = None, host_count: int | None = None,
                  template=None) -> DataIterator:
    """Shuffled, repeating batches of `split` for one host.

    Args:
      spec: corpus and batch shape.
      tokenizer: the tokenizer (its ids must be < the model's vocab_size; the trainer checks).
      split: "train" or "heldout".
      host_index, host_count: this host and the number of hosts; default `jax.process_index()`
        and `jax.process_count()`.
      template: for data.source="chat", the chat template conversations are rendered with
        (`lcjax.serve.chat_template.resolve_chat_template`); only assistant tokens are trained.
    Returns a DataIterator of dicts: inputs, targets, segment_ids, positions int32
      [global_batch / host_count, seq_len] and loss_mask float32 of the same shape.
    """
    host_index, host_count = _hosts(host_index, host_count)
    per_host = spec.per_host_batch(host_count)
    source = document_source(spec, split)
    docs = shuffled_documents(source, spec.shuffle_seed).map(_tokenize(spec, tokenizer, template))
    ds = docs.to_iter_dataset(_READ_OPTIONS)
    if spec.num_workers:  # before packing: the document order, hence every batch, stays the same
        _absl_flags_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=spec.num_workers),
                            worker_init_fn=functools.partial(exit_with_parent, os.getpid()))
    chunks = grain.experimental.FlatMapIterDataset(ds, Chunk(spec.seq_len, len(source)))
    rows = pack(chunks, spec.seq_len, _num_bins(spec), seed=spec.shuffle_seed)
    batches = rows.batch(spec.global_batch, drop_remainder=True).map(
        _HostRows(host_index * per_host, per_host))
    meta = {"version": STATE_VERSION, "split": split, "tokenizer": tokenizer.fingerprint,
            "num_documents": len(source),
            **{k: getattr(spec, k) for k in ("source", "path", "text_field", "seq_len",
                                            "global_batch", "shuffle_seed", "heldout_fraction",
                                            "num_workers")},
            **({"chat_template": _template_source(template)} if spec.source == "chat" else {})}
    return DataIterator(iter(batches), meta, spec, host_index, host_count)


def shuffled_documents(source, seed: int) -> grain.MapDataset:
    """`source` repeated forever, each epoch in its own order drawn from `seed`."""
    return grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)


def make_eval_batches(spec: DataSpec, tokenizer: Tokenizer, num_batches: int,
                      host_index: int | None = None, host_count: int | None = None,
                      template=None) -> list[Batch]:
    """The first `num_batches` batches of the held-out split: in file order, one pass, no shuffle.

    Fewer batches come back when the split runs out; the last one is padded with empty rows
    (loss_mask 0), so every batch has the training shape.
    """
    check(isinstance(num_batches, int) and num_batches >= 1, "num_batches", num_batches,
          "a positive integer")
    host_index, host_count = _hosts(host_index, host_count)
    per_host = spec.per_host_batch(host_count)
    ds = grain.MapDataset.source(document_source(spec, "heldout")).map(
        _tokenize(spec, tokenizer, template))
    rows = pack(grain.experimental.FlatMapIterDataset(ds.to_iter_dataset(_READ_OPTIONS),
                                                      Chunk(spec.seq_len)),
                spec.seq_len, _num_bins(spec), seed=None)
    take = _HostRows(host_index * per_host, per_host)
    out = []
    for batch in rows.batch(spec.global_batch, drop_remainder=False):
        out.append(take.map(_pad_rows(batch, spec.global_batch)))
        if len(out) == num_batches:
            break
    check(bool(out), "heldout_fraction", spec.heldout_fraction,
          "a value that holds out some non-empty documents (every held-out document is empty)")
    return out


def iterator_state_to_json(it: grain.DatasetIterator) -> str:
    """`it.get_state()` as JSON text, e.g. for `orbax.checkpoint.args.JsonSave` or a file."""
    return json.dumps(it.get_state(), sort_keys=True, default=_json_scalar)


def restore_iterator_from_json(it: grain.DatasetIterator, text: str) -> grain.DatasetIterator:
    """Set `it` to the state in `text` (from `iterator_state_to_json`); returns `it`."""
    it.set_state(json.loads(text))
    return it


def tokenizer_training_texts(spec: DataSpec, template=None) -> Iterator[str]:
    """Train-split documents in a fixed pseudo-random order (seed 0, not `shuffle_seed`: the
    tokenizer should not change with the data order), read lazily; conversations rendered."""
    docs = grain.MapDataset.source(document_source(spec, "train")).shuffle(seed=0)
    for i in range(len(docs)):
        yield chat.render_text(docs[i], _need_template(spec, template)) if spec.source == "chat" else docs[i]


def tokenizer_for(spec: DataSpec, directory: str | os.PathLike, vocab_size: int,
                  template=None) -> Tokenizer:
    """Load `directory/tokenizer.json`, or train it on `spec`'s train split and save it there."""
    return train_or_load_tokenizer(directory, vocab_size, tokenizer_training_texts(spec, template),
                                   max_bytes=spec.tokenizer_train_bytes)


# ---------------------------------------------------------------- helpers


def _need_template(spec: DataSpec, template):
    if template is None:
        raise ValueError("data: source='chat' needs a chat template to render conversations: pass "
                         "template=lcjax.serve.chat_template.resolve_chat_template(...) (the trainer "
                         "does, from data.chat_template)")
    return template


def _tokenize(spec: DataSpec, tokenizer: Tokenizer, template) -> grain.transforms.Map:
    if spec.source == "chat":
        return chat.ChatTokenize(tokenizer, _need_template(spec, template))
    return Tokenize(tokenizer)


def _template_source(template) -> str:
    """What identifies a template in the iterator state: a hash of its source text."""
    import hashlib

    return hashlib.sha256(str(getattr(template, "source", "")).encode()).hexdigest()[:16]


class _HostRows(grain.transforms.Map):
    """Rows [start, start + count) of a global batch."""

    def __init__(self, start: int, count: int):
        self.start, self.count = start, count

    def map(self, batch: Batch) -> Batch:
        return {k: v[self.start:self.start + self.count] for k, v in batch.items()}


def _hosts(host_index: int | None, host_count: int | None) -> tuple[int, int]:
    if host_index is None or host_count is None:
        import jax

        host_index = jax.process_index() if host_index is None else host_index
        host_count = jax.process_count() if host_count is None else host_count
    check(isinstance(host_count, int) and host_count >= 1, "host_count", host_count,
          "a positive integer")
    check(isinstance(host_index, int) and 0 <= host_index < host_count, "host_index", host_index,
          f"an integer in [0, host_count={host_count})")
    return host_index, host_count


def exit_with_parent(parent_pid: int, worker_index: int = 0, worker_count: int = 1,
                     poll_seconds: float = 0.5) -> None:
    """In a grain worker: exit as soon as the process that started it is gone.

    A trainer killed with SIGKILL (or by the OOM killer) runs no cleanup, so its workers, each
    holding a copy of the source and tokenizer, would live on. A daemon thread compares
    `os.getppid()` with the parent's pid (an orphan is re-parented) every `poll_seconds`.
    Not PR_SET_PDEATHSIG: that fires when the *thread* that spawned the worker exits, and grain
    spawns workers from pool threads.
    """
    del worker_index, worker_count  # grain's worker_init_fn signature

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(poll_seconds)
        os._exit(1)  # no cleanup to run: the consumer of this worker's output is gone

    threading.Thread(target=watch, name="lcjax-exit-with-parent", daemon=True).start()


def _absl_flags_parsed() -> None:
    # grain's process prefetch reads absl flags (a profiler switch), which raise until parsed;
    # programs not started by absl.app (ours use argparse) have to mark them parsed (defaults).
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _num_bins(spec: DataSpec) -> int:
    return max(spec.global_batch, MIN_PACKING_BINS)


def _pad_rows(batch: Batch, rows: int) -> Batch:
    missing = rows - len(batch["inputs"])
    return {k: np.concatenate([v, np.zeros((missing, *v.shape[1:]), v.dtype)]) if missing else v
            for k, v in batch.items()}


def _json_scalar(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"iterator state holds a {type(value).__name__}, which JSON cannot store")

