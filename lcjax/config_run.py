"""The run's config sections: the corpus and batch shape, the optimizer, the training run.

Re-exported by `lcjax.config`, which composes them into `Config`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from lcjax.config_checks import check as _check
from lcjax.config_checks import check_choice as _check_choice
from lcjax.config_checks import check_positive as _check_positive
from lcjax.config_checks import finite as _finite


DATA_SOURCES = ("stdlib", "text", "jsonl", "chat", "parquet", "arrayrecord")


def check_data(cond: bool, key: str, value, expected: str) -> None:
    """Raise a ValueError naming the `data.` key, the bad value and what was expected."""
    if not cond:
        raise ValueError(f"data: {key}={value!r} is invalid: expected {expected}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """A corpus, its held-out split, and the packed batch shape.

    source: "stdlib" (the Python standard library's own .py files, no path needed), "text" (one
        document per file), "jsonl" (one JSON object per line), "chat" (supervised fine-tuning:
        one conversation per JSONL line, `{"messages": [{"role", "content"}, ...], "tools": [...]}`
        in the OpenAI / Hugging Face layout, rendered with the serving chat template and trained
        on assistant tokens only; see lcjax/data/chat.py), "parquet", "arrayrecord" (one utf-8
        document per record).
    path: a file or a glob (`**` recurses) for every source but "stdlib".
    text_field: the JSONL key / Parquet column holding the document text; for "chat", the key
        holding the message list (default "messages" when left at "text").
    chat_template: for "chat", a Jinja2 chat template file; "" takes the tokenizer's own, else
        the server's default (lcjax.serve.chat_template), so training and serving render alike.
    seq_len: tokens per packed row S.
    global_batch: rows per step summed over hosts; each host yields global_batch / host_count.
    shuffle_seed: document order (reshuffled every epoch) and packed-row order.
    heldout_fraction: share of documents kept out of training, chosen by a stable hash (of the
        relative path for "stdlib", of the document index otherwise; see `sources.py`).
    tokenizer_train_bytes: at most this much train-split text trains the BPE tokenizer.
    num_workers: grain worker processes that read and tokenize; 0 = in this process. The batches
        are the same for every value.
    skip_bad_records: what a malformed JSONL line (for "chat": also a conversation with no
        messages, a message without a string role or with content of the wrong type) or
        unreadable Parquet row does. JSONL and
        Parquet files are checked when the source opens, each file up to its first 100,000
        records or 256 MiB (`lcjax.data.sources.SCAN_RECORDS` / `SCAN_BYTES`); records past that
        are checked when read. False: raise `ValueError("<file>:<line>: ...")` (Parquet: file,
        row and column). True: the record becomes an empty document (no tokens) and each file's
        count of bad records is logged once.
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
    skip_bad_records: bool = False
    chat_template: str = ""

    def __post_init__(self):
        check_data(self.source in DATA_SOURCES, "source", self.source, f"one of {list(DATA_SOURCES)}")
        if self.source == "stdlib":
            check_data(self.path == "", "path", self.path,
                  "'' with source='stdlib' (set data.source to text/jsonl/parquet/arrayrecord "
                  "to read your own files)")
        else:
            check_data(self.path != "", "path", self.path,
                  f"a file or glob pattern of {self.source} files for source={self.source!r}")
        check_data(self.chat_template == "" or self.source == "chat", "chat_template",
                   self.chat_template, "'' unless source='chat'")
        if self.source in ("jsonl", "parquet", "chat"):
            check_data(self.text_field != "", "text_field", self.text_field,
                  "the name of the field/column holding the document text")
        for key, low in (("seq_len", 2), ("global_batch", 1), ("tokenizer_train_bytes", 1),
                         ("num_workers", 0)):
            value = getattr(self, key)
            check_data(isinstance(value, int) and value >= low, key, value, f"an integer >= {low}")
        check_data(isinstance(self.shuffle_seed, int) and 0 <= self.shuffle_seed < 2**32,
              "shuffle_seed", self.shuffle_seed, "an integer in [0, 2**32)")
        check_data(0.0 <= self.heldout_fraction < 1.0, "heldout_fraction", self.heldout_fraction,
              "a fraction in [0, 1)")
        check_data(isinstance(self.skip_bad_records, bool), "skip_bad_records",
                   self.skip_bad_records, "true or false")

    def per_host_batch(self, host_count: int) -> int:
        """Rows each host yields per step; global_batch must split evenly over the hosts."""
        check_data(isinstance(host_count, int) and host_count >= 1, "host_count", host_count,
              "a positive integer")
        check_data(self.global_batch % host_count == 0, "global_batch", self.global_batch,
              f"a multiple of the host count {host_count}")
        return self.global_batch // host_count


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with warmup then cosine/linear decay, clipping, and width-transfer (muP-style) scaling.

    With `base_hidden_size` set, width_mult = hidden_size / base_hidden_size; hidden matrices get
    init std / sqrt(width_mult) and learning rate / width_mult, embeddings and norms keep theirs,
    so the learning rate tuned at the base width carries to wider models (see train/optimizer.py).
    """

    learning_rate: float = 3e-3
    warmup_steps: int = 20
    schedule: str = "cosine"  # "cosine" | "linear" | "constant" (after warmup)
    min_lr_ratio: float = 0.1  # final lr = learning_rate * min_lr_ratio
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embeddings: bool = False  # weight decay on token / N-gram embedding tables
    grad_clip: float = 1.0  # global norm; 0 disables
    base_hidden_size: Optional[int] = None

    def __post_init__(self):
        _check(_finite(self.learning_rate) and self.learning_rate > 0, "optimizer.learning_rate",
               self.learning_rate, "a finite number > 0")
        _check(self.warmup_steps >= 0, "optimizer.warmup_steps", self.warmup_steps, ">= 0")
        _check_choice("optimizer.schedule", self.schedule, ("cosine", "linear", "constant"))
        _check(_finite(self.min_lr_ratio) and 0.0 <= self.min_lr_ratio <= 1.0,
               "optimizer.min_lr_ratio", self.min_lr_ratio, "in [0, 1]")
        for key in ("b1", "b2"):  # Adam's moment decays: 1 would never forget, > 1 diverges
            value = getattr(self, key)
            _check(_finite(value) and 0.0 <= value < 1.0, f"optimizer.{key}", value, "in [0, 1)")
        _check(_finite(self.eps) and self.eps > 0, "optimizer.eps", self.eps, "a finite number > 0")
        _check(_finite(self.weight_decay) and self.weight_decay >= 0, "optimizer.weight_decay",
               self.weight_decay, "a finite number >= 0")
        _check(_finite(self.grad_clip) and self.grad_clip >= 0, "optimizer.grad_clip",
               self.grad_clip, "a finite number >= 0 (0 disables clipping)")
        _check(self.base_hidden_size is None or self.base_hidden_size > 0,
               "optimizer.base_hidden_size", self.base_hidden_size, "None or > 0")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The training run: length, losses, logging, checkpoints, initialisation."""

    steps: int = 300
    run_dir: str = "runs/default"
    log_every: int = 10
    eval_every: int = 100  # 0 disables periodic held-out evaluation
    eval_batches: int = 4
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    resume: bool = True  # continue from the newest checkpoint in run_dir when one exists
    z_loss: float = 1e-4  # weight of mean(logsumexp(logits)^2)
    mtp_loss_weight: float = 0.3
    update_router_bias: bool = True  # aux-loss-free balancing after each step (not in LoRA runs)
    expected_ffn_topk: Optional[float] = None  # LongCat compute budget K_e (None: balance only)
    init_from: str = ""  # checkpoint directory (a run_dir) to initialise params from
    growth: str = "none"  # "none" (same shape) | "stack" (repeat a shallower model's layers)

    def __post_init__(self):
        _check_positive(self, "steps", "log_every", "checkpoint_every", "keep_checkpoints",
                        "eval_batches")
        _check(self.eval_every >= 0, "train.eval_every", self.eval_every, ">= 0")
        _check(_finite(self.z_loss) and self.z_loss >= 0, "train.z_loss", self.z_loss,
               "a finite number >= 0")
        _check(_finite(self.mtp_loss_weight) and self.mtp_loss_weight >= 0, "train.mtp_loss_weight",
               self.mtp_loss_weight, "a finite number >= 0")
        _check(self.expected_ffn_topk is None or (_finite(self.expected_ffn_topk)
                                                  and self.expected_ffn_topk > 0),
               "train.expected_ffn_topk", self.expected_ffn_topk, "None or a finite number > 0")
        _check_choice("train.growth", self.growth, ("none", "stack"))
        _check(self.growth == "none" or bool(self.init_from), "train.growth", self.growth,
               "'none' unless train.init_from names a checkpoint")


LORA_TARGET_PRESETS = {
    # MLA projections q_a, q_b, kv_a, o (not kv_b: the absorbed decode splits it), the dense
    # SwiGLU MLPs and the routed experts (per-expert adapters) of every decoder layer.
    "default": r"^layers(_\d+)?/(attn_\d+/(q_a|q_b|kv_a|o)|mlp_\d+/(gate|up|down)|moe/(gate|up|down))$",
    "attention": r"^layers(_\d+)?/attn_\d+/(q_a|q_b|kv_a|o)$",
    "mlp": r"^layers(_\d+)?/mlp_\d+/(gate|up|down)$",
    "experts": r"^layers(_\d+)?/moe/(gate|up|down)$",
    "mtp": r"^mtp/",  # the MTP head alone (its MLA and SwiGLU): draft-head training
    "all": r".",
}
AFA_ACTIVATIONS = ("none", "relu", "silu", "gelu")


@dataclasses.dataclass(frozen=True)
class AfaConfig:
    """AFA-LoRA: the adapter computes B f_t(A x), f_t(z) = lam(t) * phi(z) + (1 - lam(t)) * z.

    activation: phi, or "none" for plain LoRA (lam is 0 throughout).
    schedule: how lam falls from 1 to 0: "linear" or "cosine" (0.5 * (1 + cos(pi * p))).
    start_fraction: lam is 1 for the first start_fraction * train.steps steps.
    anneal_fraction: lam then falls to 0 over anneal_fraction * train.steps steps and stays 0 to
        the end, so the adapter is linear (mergeable) when the run finishes. The paper's exact
        form and schedule are not public; these are settings (lcjax/lora/afa.py).
    """

    activation: str = "none"
    schedule: str = "linear"
    start_fraction: float = 0.0
    anneal_fraction: float = 0.5

    def __post_init__(self):
        _check_choice("lora.afa.activation", self.activation, AFA_ACTIVATIONS)
        _check_choice("lora.afa.schedule", self.schedule, ("linear", "cosine"))
        _check(_finite(self.start_fraction) and 0.0 <= self.start_fraction < 1.0,
               "lora.afa.start_fraction", self.start_fraction, "a fraction in [0, 1)")
        _check(_finite(self.anneal_fraction) and 0.0 < self.anneal_fraction <= 1.0,
               "lora.afa.anneal_fraction", self.anneal_fraction, "a fraction in (0, 1]")
        _check(self.start_fraction + self.anneal_fraction <= 1.0, "lora.afa.anneal_fraction",
               self.anneal_fraction, f"<= 1 - lora.afa.start_fraction = {1 - self.start_fraction:g}, "
               "so the activation is linear (lam = 0) by the last step")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters on frozen base weights: W x + (alpha / rank) * B f(A x) (lcjax/lora).

    rank: r; 0 turns LoRA off (full fine-tuning).
    alpha: the scale numerator; the adapter output is multiplied by alpha / rank.
    dropout: dropout rate on the adapter's input during training.
    targets: a preset name (LORA_TARGET_PRESETS: default, attention, mlp, experts, mtp, all) or a
        Python regex searched in each weight's parameter path ("layers/attn_0/q_a",
        "layers/moe/gate", "mtp/mlp/down"; scanned layers share one path). Only weights with an
        adapter hook qualify (MLA q_a q_b kv_a o, SwiGLU and expert gate up down); a pattern that
        selects none of them is an error.
    afa: the annealed activation (AfaConfig).
    """

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = "default"
    afa: AfaConfig = AfaConfig()

    def __post_init__(self):
        _check(isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank >= 0,
               "lora.rank", self.rank, "an integer >= 0 (0 = no adapters)")
        _check(_finite(self.alpha) and self.alpha > 0, "lora.alpha", self.alpha, "a finite number > 0")
        _check(_finite(self.dropout) and 0.0 <= self.dropout < 1.0, "lora.dropout", self.dropout,
               "a rate in [0, 1)")
        _check(isinstance(self.targets, str) and self.targets != "", "lora.targets", self.targets,
               f"a preset in {list(LORA_TARGET_PRESETS)} or a regex of parameter paths")
        if self.targets not in LORA_TARGET_PRESETS:
            import re

            try:
                re.compile(self.targets)
            except re.error as e:
                _check(False, "lora.targets", self.targets, f"a valid regex ({e})")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0

    @property
    def pattern(self) -> str:
        return LORA_TARGET_PRESETS.get(self.targets, self.targets)
