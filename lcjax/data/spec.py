"""`DataSpec`: what the training data is and how it is cut into batches.

The trainer's `DataConfig` mirrors these fields one for one; defaults live here.
"""

from __future__ import annotations

import dataclasses

SOURCES = ("stdlib", "text", "jsonl", "parquet", "arrayrecord")
SPLITS = ("train", "heldout")


def check(cond: bool, key: str, value, expected: str) -> None:
    """Raise a ValueError naming the `data.` key, the bad value and what was expected."""
    if not cond:
        raise ValueError(f"data: {key}={value!r} is invalid: expected {expected}")


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """A corpus, its held-out split, and the packed batch shape.

    source: "stdlib" (the Python standard library's own .py files, no path needed), "text" (one
        document per file), "jsonl" (one JSON object per line), "parquet", "arrayrecord" (one
        utf-8 document per record).
    path: a file or a glob (`**` recurses) for every source but "stdlib".
    text_field: the JSONL key / Parquet column holding the document text.
    seq_len: tokens per packed row S.
    global_batch: rows per step summed over hosts; each host yields global_batch / host_count.
    shuffle_seed: document order (reshuffled every epoch) and packed-row order.
    heldout_fraction: share of documents kept out of training, chosen by a stable hash (of the
        relative path for "stdlib", of the document index otherwise; see `sources.py`).
    tokenizer_train_bytes: at most this much train-split text trains the BPE tokenizer.
    num_workers: grain worker processes that read and tokenize; 0 = in this process. The batches
        are the same for every value.
    """

    source: str = "stdlib"
    path: str = ""
    text_field: str = "text"
    seq_len: int = 128
    global_batch: int = 8
    shuffle_seed: int = 0
    heldout_fraction: float = 0.02
    tokenizer_train_bytes: int = 4_000_000
    num_workers: int = 0

    def __post_init__(self):
        check(self.source in SOURCES, "source", self.source, f"one of {list(SOURCES)}")
        if self.source == "stdlib":
            check(self.path == "", "path", self.path,
                  "'' with source='stdlib' (set data.source to text/jsonl/parquet/arrayrecord "
                  "to read your own files)")
        else:
            check(self.path != "", "path", self.path,
                  f"a file or glob pattern of {self.source} files for source={self.source!r}")
        if self.source in ("jsonl", "parquet"):
            check(self.text_field != "", "text_field", self.text_field,
                  "the name of the field/column holding the document text")
        for key, low in (("seq_len", 2), ("global_batch", 1), ("tokenizer_train_bytes", 1),
                         ("num_workers", 0)):
            value = getattr(self, key)
            check(isinstance(value, int) and value >= low, key, value, f"an integer >= {low}")
        check(isinstance(self.shuffle_seed, int) and 0 <= self.shuffle_seed < 2**32,
              "shuffle_seed", self.shuffle_seed, "an integer in [0, 2**32)")
        check(0.0 <= self.heldout_fraction < 1.0, "heldout_fraction", self.heldout_fraction,
              "a fraction in [0, 1)")

    def per_host_batch(self, host_count: int) -> int:
        """Rows each host yields per step; global_batch must split evenly over the hosts."""
        check(isinstance(host_count, int) and host_count >= 1, "host_count", host_count,
              "a positive integer")
        check(self.global_batch % host_count == 0, "global_batch", self.global_batch,
              f"a multiple of the host count {host_count}")
        return self.global_batch // host_count
