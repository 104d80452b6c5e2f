"""A small synthetic text corpus and a fast training config on it."""

import pytest

from lcjax.config_io import load_config, resolve_config_path

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
         "sigma tau upsilon phi chi psi omega def return class import yield lambda").split()


def write_corpus(root) -> str:
    """60 small documents of pseudo-code-like text, one per file under `root`; returns the glob."""
    for i in range(60):
        words = [WORDS[(i * 7 + j * j) % len(WORDS)] for j in range(40 + i % 17)]
        (root / f"doc{i:03d}.txt").write_text(" ".join(words) + "\n")
    return str(root / "*.txt")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def train_config(corpus: str, run_dir, *overrides: str):
    """Tiny model (1 logical layer, LoZA + n-gram + MTP on), 32-token rows, 4 rows per step."""
    base = [f"data.source=text", f"data.path={corpus}", "data.seq_len=32", "data.global_batch=4",
            "data.heldout_fraction=0.1", "model.vocab_size=320", "model.num_layers=1",
            "model.loza.layer_pattern=01", f"train.run_dir={run_dir}", "train.steps=6",
            "train.checkpoint_every=3", "train.eval_every=0", "train.eval_batches=1",
            "train.log_every=1", "train.async_checkpoint=false", "optimizer.warmup_steps=2"]
    return load_config(resolve_config_path("tiny"), base + list(overrides))
