"""Checkpoint names: every lcjax variable and the Hub tensors it is built from.

The Hub layout (spec §1.5, §1.6, §3.2) stores one torch `Linear` weight [out, in] per module and
one tensor per routed expert. lcjax keeps weights in the shape their einsum consumes ([in, out],
heads split out) and stacks logical layers (scan) and experts on leading axes, so a leaf is
    leaf[l, e] = W(l, e).T.reshape(unit)          (Linear)
    leaf[l, e] = W(l, e)                          (copy: norms, embeddings, biases)
where `unit` is the leaf shape without its [L] and [E] axes. The plan is derived from the model's
own `init` shapes, so a parameter added to the model without a rule here fails loudly.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
from typing import Iterator, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lcjax.config import ModelConfig
from lcjax.model import BIAS_COLLECTION, LongCatModel

_ATTN = (  # lcjax name inside an MLA module -> (HF module name, Linear input axes or 0 = copy)
    ("q_a", "q_a_proj", 1), ("q_a_norm/scale", "q_a_layernorm", 0), ("q_b", "q_b_proj", 1),
    ("kv_a", "kv_a_proj_with_mqa", 1), ("kv_a_norm/scale", "kv_a_layernorm", 0),
    ("kv_b", "kv_b_proj", 1), ("o", "o_proj", 2),  # o: [H, Dv, M], input = heads x v dims
)
_SWIGLU = (("gate", "gate_proj", 1), ("up", "up_proj", 1), ("down", "down_proj", 1))


def _rules() -> list[tuple[re.Pattern, str, int]]:
    """(regex over the '/'-joined lcjax path, HF key template, Linear input axes or 0 = copy).

    `{l}` in a template is the logical layer, `{e}` the routed expert, `\\1` a regex group.
    """
    layer, mtp = "model.layers.{l}.", "model.mtp.layers.0."
    rules = [
        (r"embed/tokens/embedding", "model.embed_tokens.weight", 0),
        (r"embed/ngram/table_(\d+)", r"model.ngram_embeddings.embedders.\1.weight", 0),
        (r"embed/ngram/proj_(\d+)", r"model.ngram_embeddings.post_projs.\1.weight", 1),
        (r"final_norm/scale", "model.norm.weight", 0),
        (r"lm_head", "lm_head.weight", 1),
        (r"L/input_norm_(\d)/scale", layer + r"input_layernorm.\1.weight", 0),
        (r"L/post_norm_(\d)/scale", layer + r"post_attention_layernorm.\1.weight", 0),
        (r"L/moe/classifier", layer + "mlp.router.classifier.weight", 1),
        (r"L/moe/e_score_correction_bias", layer + "mlp.router.e_score_correction_bias", 0),
        (r"mtp/embed/embedding", "model.mtp.embed_tokens.weight", 0),
        (r"mtp/enorm/scale", mtp + "enorm.m.weight", 0),
        (r"mtp/hnorm/scale", mtp + "hnorm.m.weight", 0),
        (r"mtp/eh_proj", mtp + "eh_proj.weight", 1),
        (r"mtp/input_norm/scale", mtp + "input_layernorm.weight", 0),
        (r"mtp/post_norm/scale", mtp + "post_attention_layernorm.weight", 0),
        (r"mtp/final_norm/scale", "model.mtp.norm.weight", 0),
    ]
    for ours, theirs, axes in _ATTN:
        rules.append((rf"L/attn_(\d)/{ours}", layer + rf"self_attn.\1.{theirs}.weight", axes))
        rules.append((rf"mtp/attn/{ours}", mtp + f"self_attn.{theirs}.weight", axes))
    for ours, theirs, axes in _SWIGLU:
        rules.append((rf"L/mlp_(\d)/{ours}", layer + rf"mlps.\1.{theirs}.weight", axes))
        rules.append((rf"L/moe/{ours}", layer + f"mlp.experts.{{e}}.{theirs}.weight", axes))
        rules.append((rf"mtp/mlp/{ours}", mtp + f"transformer_layer.mlp.{theirs}.weight", axes))
    return [(re.compile(pattern + "$"), template, axes) for pattern, template, axes in rules]


_RULES = _rules()
# Hub aliases accepted on load (Flash-Lite's remote code names the token table this way).
ALIASES = {"model.embed_tokens.weight": ("model.ngram_embeddings.word_embeddings.weight",)}


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One lcjax variable and the HF tensors that make it up."""

    collection: str  # "params" or BIAS_COLLECTION
    path: tuple[str, ...]  # keys inside the collection
    shape: tuple[int, ...]  # full lcjax shape, [L] and [E] axes included
    dtype: np.dtype
    template: str  # HF key; may contain {l} (stacked layers) and {e} (experts)
    linear_axes: int  # 0: copy; k: torch Linear whose input is the first k unit axes
    layers: Optional[int]  # L when stacked over scanned layers (axis 0), else None
    experts: Optional[int]  # E when stacked over experts (the axis after L), else None

    @property
    def name(self) -> str:
        return "/".join((self.collection,) + self.path)

    @property
    def unit_shape(self) -> tuple[int, ...]:
        skip = (self.layers is not None) + (self.experts is not None)
        return self.shape[skip:]

    @property
    def hf_shape(self) -> tuple[int, ...]:
        unit, k = self.unit_shape, self.linear_axes
        return unit if k == 0 else (math.prod(unit[k:]), math.prod(unit[:k]))

    def units(self) -> Iterator[tuple[tuple[int, ...], str]]:
        """(index into the leaf, HF key) for every HF tensor of this leaf, in leaf order."""
        for l in range(self.layers or 1):
            for e in range(self.experts or 1):
                index = ((l,) if self.layers is not None else ()) + (
                    (e,) if self.experts is not None else ())
                yield index, self.template.format(l=l, e=e)

    def to_lcjax(self, tensor: np.ndarray) -> np.ndarray:
        """One HF tensor -> its lcjax unit (a view where possible)."""
        return tensor if self.linear_axes == 0 else tensor.T.reshape(self.unit_shape)

    def to_hf(self, unit: np.ndarray) -> np.ndarray:
        """One lcjax unit -> its HF tensor, C-contiguous for safetensors."""
        if self.linear_axes == 0:
            return np.ascontiguousarray(unit)
        k = self.linear_axes
        return np.ascontiguousarray(unit.reshape(math.prod(unit.shape[:k]), -1).T)


def abstract_variables(cfg: ModelConfig) -> dict:
    """Shapes and dtypes of `LongCatModel(cfg).init` without allocating anything."""
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return nn.unbox(jax.eval_shape(LongCatModel(cfg).init, jax.random.key(0), ids))


def _match(relative: str) -> tuple[str, int]:
    for regex, template, axes in _RULES:
        m = regex.match(relative)
        if m:
            return m.expand(template), axes  # fills \1; {l} and {e} pass through
    raise ValueError(f"lcjax variable {relative!r} has no Hugging Face name (lcjax/convert/hf_names.py)")


def plan(cfg: ModelConfig) -> list[Leaf]:
    """Every lcjax variable of `cfg` with its HF tensors, in a stable order."""
    leaves = []
    flat = jax.tree_util.tree_flatten_with_path(abstract_variables(cfg))[0]
    for keypath, spec in flat:
        collection, *path = [k.key for k in keypath]
        layers, layer_index = None, None
        if path[0] == "layers":
            layers = cfg.num_layers
        elif re.fullmatch(r"layers_\d+", path[0]):
            layer_index = int(path[0].split("_")[1])
        per_layer = layers is not None or layer_index is not None
        relative = "/".join(["L", *path[1:]] if per_layer else path)
        template, axes = _match(relative)
        if layer_index is not None:
            template = template.replace("{l}", str(layer_index))
        experts = cfg.moe.num_experts if "{e}" in template else None
        leaves.append(Leaf(collection, tuple(path), tuple(spec.shape), np.dtype(spec.dtype),
                           template, axes, layers, experts))
    return leaves


@functools.cache
def transformers_wants_zero_expert_stubs() -> bool:
    """Whether the installed transformers sizes its fused experts for routed + zero experts.

    Early transformers 5 releases allocate `experts.gate_up_proj` as [E+Z, 2F, M] and refuse a
    checkpoint without zero-expert gate/up tensors; later ones (and 4.x) use the Hub layout,
    routed experts only, and refuse the stubs. Without transformers: False (the Hub layout).
    """
    try:
        from transformers.models.longcat_flash import modeling_longcat_flash as hf_modeling
    except ImportError:
        return False
    experts = getattr(hf_modeling, "LongcatFlashExperts", None)
    if experts is None:  # per-expert modules under the Hub names
        return False
    probe = types.SimpleNamespace(n_routed_experts=1, zero_expert_num=1, hidden_size=1,
                                  expert_ffn_hidden_size=1, hidden_act="silu")
    try:
        return experts(probe).gate_up_proj.shape[0] > 1
    except Exception:  # an unexpected constructor: keep the Hub layout  # noqa: BLE001
        return False


def resolve_zero_expert_stubs(zero_expert_stubs: Optional[bool]) -> bool:
    """None (auto) -> what the installed transformers loads; True / False as given."""
    if zero_expert_stubs is None:
        return transformers_wants_zero_expert_stubs()
    if not isinstance(zero_expert_stubs, bool):
        raise ValueError(f"zero_expert_stubs={zero_expert_stubs!r} must be True, False or None "
                         "(auto: whatever the installed transformers loads)")
    return zero_expert_stubs


def zero_expert_stub_keys(cfg: ModelConfig) -> list[str]:
    """Gate/up keys of the zero experts, which some transformers 5 releases allocate and save.

    Their fused `experts.gate_up_proj` is [E+Z, 2F, M], so `from_pretrained` rejects a checkpoint
    without these (size mismatch); they are never used (zero experts are identities).
    """
    moe = cfg.moe
    return [f"model.layers.{l}.mlp.experts.{e}.{name}.weight"
            for l in range(cfg.num_layers)
            for e in range(moe.num_experts, moe.num_router_outputs)
            for name in ("gate_proj", "up_proj")]


def is_ignorable(key: str, cfg: ModelConfig) -> bool:
    """Tensors a loader may skip: zero-expert stubs and cached rotary tables."""
    if key.endswith("rotary_emb.inv_freq"):
        return True
    m = re.fullmatch(r"model\.layers\.\d+\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight", key)
    return bool(m) and cfg.moe.num_experts <= int(m.group(1)) < cfg.moe.num_router_outputs


__all__ = ["ALIASES", "BIAS_COLLECTION", "Leaf", "abstract_variables", "is_ignorable", "plan",
           "resolve_zero_expert_stubs", "transformers_wants_zero_expert_stubs",
           "zero_expert_stub_keys"]
