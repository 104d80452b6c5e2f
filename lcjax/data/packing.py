"""Tokenize documents, cut them into chunks of at most S tokens, and first-fit pack the chunks.

A document becomes `ids = encode(text) + [eos]`; token t's target is token t+1 of the same
document, so the eos (the last token) has none. The target travels with its token, which is why a
document longer than S loses no target when it is cut: the last token of chunk k is trained to
predict the first token of chunk k+1. Each chunk is its own segment (positions restart at 0), so
attention never crosses a chunk or document boundary.

Packed rows (one dict per row, all [S]): inputs, targets (0 where none), loss_mask (float32, 1 where
the target is a real next token), segment_ids (1, 2, ... per chunk in the row; 0 = padding),
positions (0, 1, ... within each chunk; 0 on padding).
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np
from jaxtyping import Int

from lcjax.data.tokenizer import Tokenizer

ROW_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


class Tokenize(grain.transforms.Map):
    """str -> int32 [n] token ids ending in eos."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def map(self, text: str) -> Int[np.ndarray, "N"]:
        ids = self.tokenizer.encode(text)
        ids.append(self.tokenizer.eos_id)
        return np.asarray(ids, np.int32)


class Chunk(grain.experimental.FlatMapTransform):
    """int32 [n] ids -> chunks {inputs, targets, loss_mask} of at most `seq_len` tokens each.

    A document may also be {"ids", "trained"} (int32 [n] each, lcjax.data.chat): then only the
    targets of trained tokens count (loss_mask[t] = trained[t + 1]), and the mask is cut and
    packed with its tokens. Chunks without a single target (an empty document: just eos; a chat
    chunk with no assistant token) are dropped. On a repeating
    stream, `num_documents` consecutive empty documents (a whole epoch) raise instead of looping
    forever.
    """

    def __init__(self, seq_len: int, num_documents: int | None = None):
        self.seq_len, self.num_documents = seq_len, num_documents
        self.max_fan_out = 1 << 30  # documents of any length; grain only checks this for MapDataset
        self._empty_run = 0

    def flat_map(self, ids) -> list[dict[str, Int[np.ndarray, "C"]]]:
        trained = None
        if isinstance(ids, dict):
            ids, trained = ids["ids"], ids["trained"]
        n = len(ids)
        targets = np.zeros(n, np.int32)
        targets[:-1] = ids[1:]
        mask = np.zeros(n, np.int32)  # int until packed: grain pads every feature with zeros
        mask[:-1] = 1 if trained is None else trained[1:]
        self._empty_run = self._empty_run + 1 if not mask.any() else 0
        if self.num_documents is not None and self._empty_run >= self.num_documents:
            raise ValueError(f"data: all {self.num_documents} documents are empty: nothing to train "
                             "on; check data.path and data.text_field")
        return [{"inputs": ids[s:s + self.seq_len], "targets": targets[s:s + self.seq_len],
                 "loss_mask": mask[s:s + self.seq_len]}
                for s in range(0, n, self.seq_len) if mask[s:s + self.seq_len].any()]


def pack(chunks: grain.IterDataset, seq_len: int, num_bins: int, seed: int | None) -> grain.IterDataset:
    """First-fit pack chunks into rows of `seq_len`; `seed` None keeps rows in bin order.

    grain's packer holds `num_bins` open rows and emits all of them once a chunk fits none; its
    checkpoint is the parent state at the start of those rows plus how many were emitted.
    """
    lengths = {"inputs": seq_len, "targets": seq_len, "loss_mask": seq_len}
    packed = grain.experimental.FirstFitPackIterDataset(
        chunks, length_struct=lengths, num_packing_bins=num_bins, seed=seed or 0,
        shuffle_bins=seed is not None)
    return packed.map(_to_row)


def _to_row(packed: dict[str, Any]) -> dict[str, np.ndarray]:
    # The three features are packed identically; their segment ids and positions agree.
    return {
        "inputs": packed["inputs"].astype(np.int32),
        "targets": packed["targets"].astype(np.int32),
        "loss_mask": packed["loss_mask"].astype(np.float32),
        "segment_ids": packed["inputs_segment_ids"].astype(np.int32),
        "positions": packed["inputs_positions"].astype(np.int32),
    }
