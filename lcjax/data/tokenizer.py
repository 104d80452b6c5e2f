"""Byte-level BPE tokenizer (HF `tokenizers`): trained once on the train split, then loaded.

Ids 0, 1, 2 are `<pad>`, `<s>` (bos) and `</s>` (eos), matching `ModelConfig.pad/bos/eos_token_id`.
Every byte has a token, so any text round-trips; special-token strings inside text (a literal
"</s>" in an HTML parser) are encoded as ordinary text, never as the special ids.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
from typing import Iterable, Iterator, Sequence

import numpy as np
import tokenizers
from jaxtyping import Int
from tokenizers import decoders, models, pre_tokenizers, trainers

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD, BOS, EOS)  # ids 0, 1, 2 in this order
FILENAME = "tokenizer.json"
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # the byte alphabet plus the special tokens


class Tokenizer:
    """A thin wrapper: plain-Python ids in and out, no special tokens added by `encode`."""

    pad_id, bos_id, eos_id = 0, 1, 2

    def __init__(self, hf: tokenizers.Tokenizer):
        for i, token in enumerate(SPECIAL_TOKENS):
            got = hf.token_to_id(token)
            if got != i:
                raise ValueError(f"tokenizer: special token {token!r} has id {got}, expected {i}; "
                                 f"retrain it with `train_or_load_tokenizer` (delete {FILENAME})")
        hf.encode_special_tokens = True  # "</s>" typed in a document is text, not eos
        self.hf = hf

    def __getstate__(self):
        # Grain pickles the tokenizer into worker processes; HF's own pickle drops the
        # encode_special_tokens switch, so go through the constructor again.
        return {"json": self.to_json()}

    def __setstate__(self, state):
        self.__init__(tokenizers.Tokenizer.from_str(state["json"]))

    @property
    def vocab_size(self) -> int:
        """Number of ids `encode` can produce (may be below the requested size on tiny corpora)."""
        return self.hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int] | Int[np.ndarray, "N"]) -> str:
        """Text of `ids`; special tokens (padding, bos, eos) are dropped."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)

    def token_bytes(self) -> Int[np.ndarray, "V"]:
        """UTF-8 bytes each id stands for (0 for the special tokens), for bits per byte.

        Byte-level BPE spells every byte as one alphabet character, so a token's byte count is
        the length of its string; summed over an encoding it is the text's byte length.
        """
        out = np.zeros(self.vocab_size, np.int32)
        for i in range(len(SPECIAL_TOKENS), self.vocab_size):
            out[i] = len(self.hf.id_to_token(i) or "")
        return out

    def to_json(self) -> str:
        """The whole tokenizer as the `tokenizer.json` text (for checkpoints)."""
        return self.hf.to_str()

    @classmethod
    def from_json(cls, text: str) -> "Tokenizer":
        return cls(tokenizers.Tokenizer.from_str(text))

    @property
    def fingerprint(self) -> str:
        """Short content hash: iterator states remember which tokenizer produced them."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def save(self, directory: str | os.PathLike) -> pathlib.Path:
        """Write `directory/tokenizer.json` atomically (hosts sharing a directory may race)."""
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / FILENAME
        tmp = directory / f".{FILENAME}.{os.getpid()}.tmp"
        tmp.write_text(self.to_json())
        os.replace(tmp, path)
        return path


def train_or_load_tokenizer(directory: str | os.PathLike, vocab_size: int, texts: Iterable[str],
                            max_bytes: int = 4_000_000) -> Tokenizer:
    """Load `directory/tokenizer.json`, or train a byte-level BPE on `texts` and save it there.

    Args:
      directory: where `tokenizer.json` lives; created when missing.
      vocab_size: the model's vocabulary size V; trained ids are all < V (the trainer may stop
        early on a small corpus). At least 259: 256 bytes + 3 special tokens.
      texts: training documents, read lazily and only when no tokenizer is saved yet.
      max_bytes: stop reading `texts` after this many utf-8 bytes (bounds the training time).
    Raises ValueError if vocab_size is too small or a saved tokenizer has more than vocab_size ids.
    """
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"tokenizer: vocab_size={vocab_size!r} is invalid: expected an integer >= "
                         f"{MIN_VOCAB_SIZE} (256 byte tokens + {len(SPECIAL_TOKENS)} special tokens); "
                         "raise model.vocab_size")
    if max_bytes < 1:
        raise ValueError(f"tokenizer: max_bytes={max_bytes!r} is invalid: expected >= 1")
    path = pathlib.Path(directory) / FILENAME
    if path.is_file():
        tok = Tokenizer(tokenizers.Tokenizer.from_file(str(path)))
        if tok.vocab_size > vocab_size:
            raise ValueError(f"tokenizer: {path} has {tok.vocab_size} ids but vocab_size={vocab_size}; "
                             "delete it to retrain, or raise model.vocab_size")
        return tok
    tok = _train(vocab_size, _capped(texts, max_bytes))
    tok.save(directory)
    return tok


def _train(vocab_size: int, texts: Iterator[str]) -> Tokenizer:
    hf = tokenizers.Tokenizer(models.BPE())
    # GPT-2 style: split on the GPT-2 regex, map bytes to printable characters, merge within words.
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    hf.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(hf)


def _capped(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    """`texts` until `max_bytes` utf-8 bytes; the last one is cut to fit."""
    left = max_bytes
    for text in texts:
        data = text.encode("utf-8", errors="replace")
        if len(data) >= left:
            yield data[:left].decode("utf-8", errors="ignore")
            return
        left -= len(data)
        yield text
