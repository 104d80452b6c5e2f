"""Hugging Face LongCat-Flash checkpoints <-> lcjax variables, streamed tensor by tensor.

A HF directory is `config.json` plus `model.safetensors` or shards with
`model.safetensors.index.json`, in the Hub layout (spec §1.5): one tensor per routed expert,
`model.mtp.*` for the MTP head, `model.ngram_embeddings.*` for Flash-Lite. "variables" is the
lcjax tree `{"params": ..., "router_bias": ...}` (the correction biases live in the separate
`router_bias` collection), scanned ([L] leading axis) or unrolled (`layers_{i}`) as the config says.

Everything is checked before anything is written: a missing tensor, a shape mismatch, an
unexpected tensor or an unsupported config.json field raises a ValueError naming it, and
outputs are built in a temporary directory next to DST that is renamed into place on success.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import shutil
from typing import Any, Iterable, Iterator, Optional, Union

import flax.linen as nn
import numpy as np

from lcjax.config import Config, ModelConfig
from lcjax.convert import hf_names, orbax_io
from lcjax.convert.atomic_dir import atomic_directory
from lcjax.convert.hf_config import hf_config_dict, model_config_from_hf
from lcjax.convert.hf_names import BIAS_COLLECTION, Leaf
from lcjax.convert.safetensors_io import ShardedReader, ShardedWriter, parse_size

ConfigLike = Union[Config, ModelConfig]
_MTP_FFN_KEY = "model.mtp.layers.0.transformer_layer.mlp.gate_proj.weight"
TOKENIZER_FILE = "tokenizer.json"  # a training run's tokenizer (lcjax.data), copied to HF outputs
_BLOCK_BYTES = 16 << 20  # rows of a Linear weight read at a time while transposing


def _as_config(config: ConfigLike) -> Config:
    return config if isinstance(config, Config) else Config(model=config)


def config_from_checkpoint(path: Union[str, os.PathLike],
                           reader: Optional[ShardedReader] = None) -> Config:
    """The lcjax Config of a HF directory: model part from config.json, the rest default.

    The MTP head is on when the weights hold `model.mtp.*` (transformers drops them on save);
    its dense width comes from those weights.
    """
    path = pathlib.Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path}: no config.json (pass config= to load without one)")
    reader = reader or ShardedReader(path)
    layer_ids = {int(m.group(1)) for k in reader.entries
                 for m in [re.match(r"model\.layers\.(\d+)\.", k)] if m}
    has_mtp = any(k.startswith("model.mtp.") for k in reader.entries)
    mtp_ffn = reader.shape(_MTP_FFN_KEY)[0] if _MTP_FFN_KEY in reader else None
    try:
        hf = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_file}: not valid JSON ({e})") from e
    if not isinstance(hf, dict):
        raise ValueError(f"{config_file}: expected a JSON object of fields, got a "
                         f"{type(hf).__name__} ({str(hf)[:60]})")
    try:
        model = model_config_from_hf(hf, num_layers=max(layer_ids) + 1 if layer_ids else None,
                                     has_mtp=has_mtp, mtp_ffn_size=mtp_ffn)
    except ValueError as e:  # hf_config names the field; this names the file
        raise ValueError(f"{config_file}: {str(e).removeprefix('config.json: ')}") from e
    return Config(model=model)


def _source_key(key: str, reader: ShardedReader) -> Optional[str]:
    for candidate in (key, *hf_names.ALIASES.get(key, ())):
        if candidate in reader:
            return candidate
    return None


def check_checkpoint(reader: ShardedReader, cfg: ModelConfig) -> list[Leaf]:
    """The conversion plan for `cfg`, after checking every tensor name and shape of the files."""
    leaves = hf_names.plan(cfg)
    problems, used = [], set()
    for leaf in leaves:
        for _, key in leaf.units():
            source = _source_key(key, reader)
            if source is None:
                problems.append(f"missing tensor {key!r} (for lcjax {leaf.name}, shape "
                                f"{list(leaf.hf_shape)})")
            elif reader.shape(source) != leaf.hf_shape:
                problems.append(f"tensor {source!r} has shape {list(reader.shape(source))}, "
                                f"expected {list(leaf.hf_shape)} (for lcjax {leaf.name})")
            used.add(source)
    extra = sorted(k for k in reader.entries if k not in used and not hf_names.is_ignorable(k, cfg))
    problems += [f"unexpected tensor {k!r} (not part of this model config)" for k in extra]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError(f"checkpoint {reader.directory} does not match the config: "
                         + "; ".join(problems[:5]) + more)
    return leaves


def iter_hf_leaves(reader: ShardedReader, leaves: Iterable[Leaf]) -> Iterator[tuple[Leaf, np.ndarray]]:
    """Build each lcjax leaf from its HF tensors; memory: one leaf plus one tensor at a time.

    Tensors stored as-is (norms, embeddings, biases) in the leaf's dtype are read straight into
    the leaf; Linear weights are read in blocks of rows and transposed into place, so no
    temporary larger than `_BLOCK_BYTES` exists besides the leaf.
    """
    for leaf in leaves:
        out = np.empty(leaf.shape, leaf.dtype)
        for index, key in leaf.units():
            source, unit = _source_key(key, reader), out[index]
            if leaf.linear_axes == 0 and reader.dtype(source) == out.dtype:
                reader.read_into(source, unit)
            elif leaf.linear_axes == 0:
                unit[...] = reader.get(source)  # assignment casts the dtype
            else:  # torch [out, in] -> lcjax [in, out] (heads split out)
                rows, cols = leaf.hf_shape
                unit_t = unit.reshape(cols, rows)  # a view: units are C-contiguous
                step = max(1, _BLOCK_BYTES // max(1, cols * reader.dtype(source).itemsize))
                for start in range(0, rows, step):
                    block = reader.read_rows(source, start, min(rows, start + step))
                    unit_t[:, start:start + step] = block.T
        yield leaf, out
        del out  # the next leaf is allocated only after the consumer let go of this one


def _open_source(path, config: Optional[ConfigLike]) -> tuple[Config, ShardedReader, list[Leaf]]:
    reader = ShardedReader(path)
    cfg = config_from_checkpoint(path, reader) if config is None else _as_config(config)
    return cfg, reader, check_checkpoint(reader, cfg.model)


def load_hf_checkpoint(path: Union[str, os.PathLike],
                       config: Optional[ConfigLike] = None) -> tuple[Config, dict]:
    """Read a HF LongCat-Flash directory into lcjax variables (numpy arrays).

    Args:
      path: directory with config.json and safetensors (one file, or shards + index).
      config: a Config or ModelConfig to load into (e.g. bfloat16 params, scan_layers=False);
        None derives it from config.json (see `config_from_checkpoint`).

    Returns:
      (Config, variables) with variables = {"params": ..., "router_bias": ...}, ready for
      `LongCatModel(config).apply`. Parameters take `config.model.param_dtype`.
    """
    cfg, reader, leaves = _open_source(path, config)
    variables: dict = {}
    for leaf, array in iter_hf_leaves(reader, leaves):
        orbax_io.nest(variables, (leaf.collection, *leaf.path), array)
    return cfg, variables


def _layout(leaves: list[Leaf], cfg: ModelConfig, dtype, stubs: bool) -> list[tuple]:
    """(HF key, shape, dtype) of every tensor to write, in write order (stubs last)."""
    layout = [(key, leaf.hf_shape, _out_dtype(leaf, dtype))
              for leaf in leaves for _, key in leaf.units()]
    if stubs:
        gate = next(l for l in leaves if l.experts is not None and l.path[-1] == "gate")
        layout += [(key, gate.hf_shape, _out_dtype(gate, dtype))
                   for key in hf_names.zero_expert_stub_keys(cfg)]
    return layout


def _out_dtype(leaf: Leaf, dtype) -> np.dtype:
    if dtype is None or leaf.collection == BIAS_COLLECTION:
        return leaf.dtype
    return np.dtype(dtype)


def write_hf_directory(directory: pathlib.Path, cfg: ModelConfig,
                       leaves_with_arrays: Iterable[tuple[Leaf, np.ndarray]], leaves: list[Leaf], *,
                       max_shard_size: Union[int, str] = "5GB", zero_expert_stubs: Optional[bool] = None,
                       dtype: Optional[str] = None) -> None:
    """config.json + safetensors shards for `cfg` from a stream of (leaf, array) in plan order."""
    (directory / "config.json").write_text(json.dumps(hf_config_dict(cfg), indent=2) + "\n")
    zero_expert_stubs = hf_names.resolve_zero_expert_stubs(zero_expert_stubs)
    writer = ShardedWriter(directory, _layout(leaves, cfg, dtype, zero_expert_stubs),
                           parse_size(max_shard_size))
    try:
        stub = None
        for leaf, array in leaves_with_arrays:
            if tuple(array.shape) != leaf.shape:
                raise ValueError(f"variable {leaf.name} has shape {list(array.shape)}, expected "
                                 f"{list(leaf.shape)} for this config")
            out_dtype = _out_dtype(leaf, dtype)
            for index, key in leaf.units():
                writer.add(key, leaf.to_hf(np.asarray(array[index])).astype(out_dtype, copy=False))
            if leaf.experts is not None and leaf.path[-1] == "gate":
                stub = np.zeros(leaf.hf_shape, out_dtype)
            del array  # free this leaf before the stream loads the next one
        if zero_expert_stubs:
            for key in hf_names.zero_expert_stub_keys(cfg):
                writer.add(key, stub)
        writer.finish()
    finally:
        writer.close()


def _matching_scan(cfg: Config, variables: dict) -> Config:
    """The config with scan_layers set to the layout the variables actually use."""
    unrolled = "layers_0" in variables.get("params", {})
    if unrolled == cfg.model.scan_layers:
        model = dataclasses.replace(cfg.model, scan_layers=not unrolled)
        return dataclasses.replace(cfg, model=model)
    return cfg


def _variable_stream(variables: dict, leaves: list[Leaf]) -> Iterator[tuple[Leaf, np.ndarray]]:
    for leaf in leaves:
        node: Any = variables
        for key in (leaf.collection, *leaf.path):
            if not isinstance(node, dict) or key not in node:
                raise ValueError(f"variables have no {leaf.name!r} (missing {key!r}); expected "
                                 f"the tree of LongCatModel(config).init")
            node = node[key]
        yield leaf, node


def save_hf_checkpoint(variables: Any, config: ConfigLike, path: Union[str, os.PathLike], *,
                       max_shard_size: Union[int, str] = "5GB", zero_expert_stubs: Optional[bool] = None,
                       dtype: Optional[str] = None, overwrite: bool = False) -> None:
    """Write lcjax variables as a HF directory that `LongcatFlashForCausalLM.from_pretrained` loads.

    Args:
      variables: {"params": ..., "router_bias": ...}, scanned or unrolled.
      config: the Config or ModelConfig the variables belong to.
      path: output directory; built in a temporary directory and renamed on success.
      max_shard_size: bytes (or "5GB") per safetensors shard; only one shard is buffered.
      zero_expert_stubs: also write zero gate/up tensors for the zero experts, which some
        transformers 5 releases allocate (and refuse checkpoints without); False writes the pure
        Hub layout (routed experts only); None (default) asks the installed transformers
        (`hf_names.transformers_wants_zero_expert_stubs`).
      dtype: cast floating tensors (e.g. "bfloat16"); None keeps each variable's dtype. The
        correction bias always stays float32.
      overwrite: replace an existing `path`.
    """
    cfg = _matching_scan(_as_config(config), nn.unbox(variables))
    leaves = hf_names.plan(cfg.model)
    stream = ((leaf, np.asarray(a)) for leaf, a in _variable_stream(nn.unbox(variables), leaves))
    with atomic_directory(path, overwrite) as tmp:
        write_hf_directory(tmp, cfg.model, stream, leaves, max_shard_size=max_shard_size,
                           zero_expert_stubs=zero_expert_stubs, dtype=dtype)


def hf_to_lcjax(src: Union[str, os.PathLike], dst: Union[str, os.PathLike],
                config: Optional[ConfigLike] = None, *, overwrite: bool = False,
                chunk_bytes: int = 1 << 30) -> Config:
    """Convert a HF directory into an lcjax checkpoint (config.yaml + orbax variables).

    Streams: peak memory is about the largest lcjax leaf (a stacked [L, E, M, F] expert weight
    for scanned layers) plus up to `chunk_bytes` of leaves waiting to be written.
    """
    cfg, reader, leaves = _open_source(src, config)

    def stream():  # a generator, not a genexpr, so no frame keeps the previous leaf alive
        for leaf, array in iter_hf_leaves(reader, leaves):
            yield (leaf.collection, *leaf.path), array
            del array

    with atomic_directory(dst, overwrite) as tmp:
        orbax_io.write_lcjax_checkpoint(tmp, cfg, stream(), chunk_bytes)
    return cfg


def lcjax_to_hf(src: Union[str, os.PathLike], dst: Union[str, os.PathLike], *,
                max_shard_size: Union[int, str] = "5GB", zero_expert_stubs: Optional[bool] = None,
                dtype: Optional[str] = None, overwrite: bool = False) -> Config:
    """Convert an lcjax checkpoint (from `hf_to_lcjax` or training) into a HF directory.

    `src` is a converted directory, a training run directory (its config.yaml and the params of
    its newest checkpoint) or one `<run_dir>/checkpoints/<step>`; see
    `orbax_io.locate_checkpoint`. A `tokenizer.json` beside the config is copied along.
    Loads one lcjax leaf at a time: peak memory is about the largest leaf plus one shard.
    """
    source = orbax_io.locate_checkpoint(src)
    cfg = orbax_io.read_lcjax_config(src)
    leaves = hf_names.plan(cfg.model)

    def stream():  # no zip/genexpr: they would hold the previous leaf while loading the next
        arrays = orbax_io.iter_lcjax_leaves(src, [(l.collection, *l.path) for l in leaves])
        for leaf in leaves:
            _, array = next(arrays)
            yield leaf, array
            del array

    with atomic_directory(dst, overwrite) as tmp:
        write_hf_directory(tmp, cfg.model, stream(), leaves, max_shard_size=max_shard_size,
                           zero_expert_stubs=zero_expert_stubs, dtype=dtype)
        tokenizer = source.config_file.parent / TOKENIZER_FILE
        if tokenizer.is_file():
            shutil.copyfile(tokenizer, tmp / TOKENIZER_FILE)
    return cfg
