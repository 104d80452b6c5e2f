"""Peak memory of `python -m lcjax.convert` on a synthetic multi-shard checkpoint.

Writes a random LongCat-Flash checkpoint (float32, several shards + index, MTP included) whose
total size is several times the streaming bound, then runs each conversion in a fresh process
and reads that process's peak RSS (`os.wait4` rusage). A process that only imports the same
modules gives the baseline; `delta` = peak - baseline is what conversion itself holds, to be
compared with the bound: the largest lcjax leaf (stacked over layers when scanned) plus the
orbax chunk being written (hf-to-lcjax) or one tensor (lcjax-to-hf; shards stream to disk).
The parent stays small (no jax import): Linux carries ru_maxrss across fork and exec, so a
child forked from a large process would report the parent's size.

    python scripts/bench_convert_memory.py [--workdir DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
MIB = 2**20
SHAPE = [  # ~2 GB float32: 48 layers, 4 experts, a 64K vocabulary
    "model.vocab_size=64000", "model.hidden_size=512", "model.num_layers=48",
    "model.ffn_hidden_size=1536", "model.max_position_embeddings=4096", "model.mla.num_heads=8",
    "model.mla.q_lora_rank=256", "model.mla.kv_lora_rank=128", "model.mla.qk_nope_head_dim=64",
    "model.mla.qk_rope_head_dim=32", "model.mla.v_head_dim=64", "model.moe.num_experts=4",
    "model.moe.num_zero_experts=4", "model.moe.top_k=2", "model.moe.expert_ffn_size=512",
    "model.ngram.enabled=false", "model.loza.layer_pattern=''", "model.mtp_layers=1",
]


# Checks the checkpoint against the model's `init` shapes (jax.eval_shape) and reads nothing.
PLAN = ("import sys, dataclasses as d; from lcjax.convert import hf; "
        "c = hf.config_from_checkpoint(sys.argv[1]); "
        "c = d.replace(c, model=d.replace(c.model, scan_layers=sys.argv[2] == 'true')); "
        "hf.check_checkpoint(hf.ShardedReader(sys.argv[1]), c.model)")


def write_synthetic(directory: pathlib.Path, shard_bytes: int) -> dict:
    """A random HF checkpoint, written one tensor at a time; returns size statistics.

    Runs in a child process (`--generate`), so the parent never imports jax.
    """
    import numpy as np

    sys.path.insert(0, str(REPO))
    from lcjax.config_io import load_config, resolve_config_path
    from lcjax.convert import hf_config_dict
    from lcjax.convert.hf_names import plan
    from lcjax.convert.safetensors_io import ShardedWriter

    cfg = load_config(resolve_config_path("tiny"), SHAPE).model
    leaves = plan(cfg)
    units = [(leaf, key) for leaf in leaves for _, key in leaf.units()]
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(hf_config_dict(cfg), indent=2))
    writer = ShardedWriter(directory, [(k, l.hf_shape, np.float32) for l, k in units], shard_bytes)
    rng = np.random.default_rng(0)
    for leaf, key in units:
        writer.add(key, rng.standard_normal(leaf.hf_shape, np.float32) * 0.02)
    writer.finish()
    sizes = [math.prod(leaf.hf_shape) * 4 for leaf, _ in units]
    return {"total_mib": sum(sizes) / MIB, "largest_tensor_mib": max(sizes) / MIB,
            "largest_stacked_leaf_mib": max(math.prod(l.shape) * 4 for l in leaves) / MIB,
            "largest_unrolled_leaf_mib": max(math.prod(l.unit_shape) * (l.experts or 1) * 4
                                             for l in leaves) / MIB,
            "shards": len(list(directory.glob("*.safetensors")))}


def run(args: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of `python args...` in a fresh process."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)})
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise RuntimeError(f"{args} failed with status {status}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--json", default="bench_convert_memory.json")
    parser.add_argument("--shard-mib", type=int, default=100, help="input and output shard size")
    parser.add_argument("--chunk-mib", type=int, default=128, help="orbax write chunk")
    parser.add_argument("--generate", default=None, help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()
    if args.generate:
        print(json.dumps(write_synthetic(pathlib.Path(args.generate), args.shard_mib * MIB)))
        return
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = pathlib.Path(tmp)
        out = subprocess.run([sys.executable, __file__, "--generate", str(root / "hf"),
                              "--shard-mib", str(args.shard_mib)], check=True, cwd=REPO,
                             capture_output=True, text=True).stdout
        stats = json.loads(out.strip().splitlines()[-1])
        convert = ["-m", "lcjax.convert"]
        steps = [
            ("baseline (imports only)", ["-c", "import lcjax.convert.__main__, lcjax.convert.hf"], 0.0),
            ("baseline + plan (scanned)", ["-c", PLAN, str(root / "hf"), "true"], 0.0),
            ("baseline + plan (unrolled)", ["-c", PLAN, str(root / "hf"), "false"], 0.0),
            ("hf-to-lcjax (scanned)", [*convert, "hf-to-lcjax", str(root / "hf"), str(root / "lc"),
                                       "--chunk-size", f"{args.chunk_mib}MiB"],
             max(stats["largest_stacked_leaf_mib"], args.chunk_mib)),
            ("hf-to-lcjax (unrolled)", [*convert, "hf-to-lcjax", str(root / "hf"), str(root / "lu"),
                                        "-o", "model.scan_layers=false", "--chunk-size",
                                        f"{args.chunk_mib}MiB"],
             max(stats["largest_unrolled_leaf_mib"], args.chunk_mib)),
            ("lcjax-to-hf (scanned)", [*convert, "lcjax-to-hf", str(root / "lc"), str(root / "out"),
                                       "--max-shard-size", f"{args.shard_mib}MiB"],
             stats["largest_stacked_leaf_mib"] + stats["largest_tensor_mib"]),
        ]
        rows = []
        for name, cmd, bound in steps:
            wall, peak = run(cmd)
            rows.append({"step": name, "wall_s": wall, "peak_rss_mib": peak, "bound_mib": bound})
    base = rows[0]["peak_rss_mib"]
    print(f"synthetic checkpoint: {stats['total_mib']:.0f} MiB in {stats['shards']} shards; largest "
          f"tensor {stats['largest_tensor_mib']:.0f} MiB, largest stacked leaf "
          f"{stats['largest_stacked_leaf_mib']:.0f} MiB")
    print(f"{'step':<26} {'wall s':>7} {'peak RSS MiB':>13} {'delta MiB':>10} {'bound MiB':>10}")
    for r in rows:
        r["delta_mib"] = r["peak_rss_mib"] - base
        print(f"{r['step']:<26} {r['wall_s']:>7.1f} {r['peak_rss_mib']:>13.0f} "
              f"{r['delta_mib']:>10.0f} {r['bound_mib']:>10.0f}")
    pathlib.Path(args.json).write_text(json.dumps({"checkpoint": stats, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
