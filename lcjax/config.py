"""Typed configuration: frozen dataclasses, validated on construction.

Defaults live only here; YAML files in `configs/` and dotted `key=value` overrides are applied on
top by `lcjax.config_io.load_config`. Dataclass defaults describe LongCat-Flash (the HF default,
which matches the Flash-Chat checkpoint).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

_DTYPES = ("float32", "bfloat16", "float16", "float64")  # float64: reference checks under x64
_REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
_MOE_DISPATCH = ("ragged", "dense")
# Backends of pallas_kernels.block_sparse_attention (kept here as data: config imports nothing
# above it). None picks the platform's fastest through the op's default order.
_ATTENTION_IMPLS = (None, "xla", "reference", "cudnn", "splash", "pallas_gpu", "pallas_tpu",
                    "triton", "splash_interpret", "pallas_gpu_interpret", "pallas_tpu_interpret",
                    "triton_interpret")


# The validators every config section uses (lcjax/config_checks.py).
from lcjax.config_checks import check as _check  # noqa: E402
from lcjax.config_checks import check_choice as _check_choice  # noqa: E402
from lcjax.config_checks import check_positive as _check_positive  # noqa: E402
from lcjax.config_checks import finite as _finite  # noqa: E402,F401
# The run's sections (data, optimizer, train, lora) live in lcjax/config_run.py; re-exported here.
from lcjax.config_run import (DATA_SOURCES, AfaConfig, DataConfig, LoraConfig,  # noqa: E402,F401
                              OptimizerConfig, TrainConfig, check_data)


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding on the decoupled rope dims (interleaved pairs, GPT-J style).

    `type="yarn"` follows the DeepSeek-V3 convention used by HF: cos/sin are multiplied by the
    attention factor and the softmax scale by mscale(factor, mscale_all_dim)^2.
    """

    theta: float = 1e7
    type: str = "default"  # "default" | "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0

    def __post_init__(self):
        _check_choice("rope.type", self.type, ("default", "yarn"))
        _check(self.theta > 0, "rope.theta", self.theta, "> 0")
        _check(self.factor >= 1.0, "rope.factor", self.factor, ">= 1")


@dataclasses.dataclass(frozen=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V3 style) with LongCat's two fixed LoRA scales."""

    num_heads: int = 64
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # HF and the remote code build q_a_layernorm / kv_a_layernorm with the class default eps=1e-6,
    # not rms_norm_eps (vLLM/SGLang use 1e-5 here; HF parity is the target).
    latent_norm_eps: float = 1e-6
    # sqrt(hidden / q_lora_rank) on q and sqrt(hidden / kv_lora_rank) on the normed latent;
    # True in every released checkpoint and always on in HF 5.x.
    scale_q_lora: bool = True
    scale_kv_lora: bool = True
    rope: RopeConfig = RopeConfig()

    def __post_init__(self):
        _check_positive(self, "num_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                        "qk_rope_head_dim", "v_head_dim")
        _check(self.qk_rope_head_dim % 2 == 0, "mla.qk_rope_head_dim", self.qk_rope_head_dim,
               "an even number (RoPE rotates pairs)")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times the YaRN mscale^2 when a YaRN rope with mscale_all_dim is set."""
        scale = self.qk_head_dim ** -0.5
        rope = self.rope
        if rope.type == "yarn" and rope.mscale_all_dim:
            m = yarn_mscale(rope.factor, rope.mscale_all_dim)
            scale = scale * m * m
        return scale


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """DeepSeek YaRN magnitude correction 0.1 * mscale * ln(factor) + 1 (1 when factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Routed experts plus zero-computation (identity) experts behind one softmax router."""

    num_experts: int = 512
    num_zero_experts: int = 256
    top_k: int = 12
    expert_ffn_size: int = 2048
    routed_scaling_factor: float = 6.0
    zero_expert_type: str = "identity"  # "identity" (HF) | "drop" (remote code option)
    dispatch: str = "ragged"  # "ragged" (sort + ops.grouped_matmul, dropless) | "dense" (oracle)
    # Aux-loss-free balancing: step of the sign update on the correction bias (see moe.py).
    bias_update_rate: float = 1e-3
    # Routing restrictions (sparse verification sets them for its verify pass only, see
    # lcjax/sparsity/sparse_verify.py): routed experts with router probability below
    # route_prob_floor are dropped (weight 0, never computed); with route_within_first the
    # tokens of a batch row choose among the routed experts its first token chose (+ zero experts).
    route_prob_floor: float = 0.0
    route_within_first: bool = False

    def __post_init__(self):
        _check_positive(self, "num_experts", "top_k", "expert_ffn_size")
        _check(self.num_zero_experts >= 0, "moe.num_zero_experts", self.num_zero_experts, ">= 0")
        _check(self.top_k <= self.num_router_outputs, "moe.top_k", self.top_k,
               f"<= num_experts + num_zero_experts = {self.num_router_outputs}")
        _check_choice("moe.zero_expert_type", self.zero_expert_type, ("identity", "drop"))
        _check_choice("moe.dispatch", self.dispatch, _MOE_DISPATCH)
        _check(self.bias_update_rate >= 0, "moe.bias_update_rate", self.bias_update_rate, ">= 0")
        _check(0 <= self.route_prob_floor < 1, "moe.route_prob_floor", self.route_prob_floor,
               "in [0, 1)")

    @property
    def num_router_outputs(self) -> int:
        return self.num_experts + self.num_zero_experts


@dataclasses.dataclass(frozen=True)
class NgramConfig:
    """Flash-Lite hashed N-gram embedding: orders 2..N, K splits each, odd moduli near ratio*V."""

    enabled: bool = False
    vocab_size_ratio: int = 78  # m = ratio * vocab_size
    neighbor_num: int = 4  # N: largest n-gram order
    split_num: int = 4  # K: tables per order

    def __post_init__(self):
        if self.enabled:
            _check_positive(self, "vocab_size_ratio", "split_num")
            _check(self.neighbor_num >= 2, "ngram.neighbor_num", self.neighbor_num, ">= 2")

    @property
    def num_tables(self) -> int:
        return self.split_num * (self.neighbor_num - 1) if self.enabled else 0


@dataclasses.dataclass(frozen=True)
class LozaConfig:
    """LoZA streaming-sparse attention: sink blocks + block-aligned local blocks per query block.

    `layer_pattern` has one character per attention sublayer ('1' sparse, '0' full), in order
    (logical layer l owns sublayers 2l and 2l+1); empty means every sublayer is full attention.
    """

    layer_pattern: str = ""
    block_size: int = 128
    sink_blocks: int = 1
    local_blocks: int = 7

    def __post_init__(self):
        _check(set(self.layer_pattern) <= {"0", "1"}, "loza.layer_pattern", self.layer_pattern,
               "a string of '0' (full) and '1' (sparse)")
        _check_positive(self, "block_size", "local_blocks")
        _check(self.sink_blocks >= 0, "loza.sink_blocks", self.sink_blocks, ">= 0")

    @property
    def window_tokens(self) -> int:
        """Tokens a query can see in a sparse layer: sink blocks + local blocks."""
        return (self.sink_blocks + self.local_blocks) * self.block_size

    @property
    def cache_tokens(self) -> int:
        """Cache slots of a sparse layer: the window plus one spare block, so writing up to
        block_size speculative tokens that are then rejected never evicts a key the next
        accepted query still needs."""
        return self.window_tokens + self.block_size


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """LongCat-Flash family backbone (Flash, Flash-Lite, ZigZag) and its numerics."""

    vocab_size: int = 131072
    hidden_size: int = 6144
    num_layers: int = 28  # logical ScMoE layers; 2 attention sublayers each
    ffn_hidden_size: int = 12288
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    mla: MLAConfig = MLAConfig()
    moe: MoEConfig = MoEConfig()
    ngram: NgramConfig = NgramConfig()
    loza: LozaConfig = LozaConfig()
    # Multi-token-prediction head (one dense MLA+SwiGLU block); 0 disables it.
    mtp_layers: int = 1
    # Dense width of the MTP block; None = ffn_hidden_size (engines' choice; UNCONFIRMED).
    mtp_ffn_size: Optional[int] = None
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype; router, norms and softmax stay float32
    scan_layers: bool = True
    remat_policy: str = "none"
    # Attention backend: None = the platform's fastest (kernels on GPU/TPU, block-skipping XLA
    # on CPU); "xla", "reference" (dense, the definition), "cudnn", "splash", "pallas_gpu",
    # "pallas_tpu", "triton", or a "*_interpret" variant of a kernel (CPU tests).
    attention_impl: Optional[str] = None

    def __post_init__(self):
        _check_positive(self, "vocab_size", "hidden_size", "num_layers", "ffn_hidden_size",
                        "max_position_embeddings")
        _check(self.rms_norm_eps > 0, "model.rms_norm_eps", self.rms_norm_eps, "> 0")
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, key)
            _check(0 <= value < self.vocab_size, f"model.{key}", value,
                   f"a token id in [0, vocab_size={self.vocab_size})")
        _check(self.mtp_layers in (0, 1), "model.mtp_layers", self.mtp_layers, "0 or 1")
        _check(self.mtp_ffn_size is None or self.mtp_ffn_size > 0, "model.mtp_ffn_size",
               self.mtp_ffn_size, "None or a positive integer")
        _check_choice("model.param_dtype", self.param_dtype, _DTYPES)
        _check_choice("model.dtype", self.dtype, _DTYPES)
        _check_choice("model.remat_policy", self.remat_policy, _REMAT_POLICIES)
        _check_choice("model.attention_impl", self.attention_impl, _ATTENTION_IMPLS)
        pattern = self.loza.layer_pattern
        _check(pattern == "" or len(pattern) == self.num_attention_layers, "model.loza.layer_pattern",
               pattern, f"'' or {self.num_attention_layers} characters (2 per logical layer)")
        if self.ngram.enabled:
            _check(self.hidden_size % self.ngram.num_tables == 0, "model.hidden_size",
                   self.hidden_size, f"divisible by the {self.ngram.num_tables} n-gram tables")

    @property
    def num_attention_layers(self) -> int:
        return 2 * self.num_layers

    @property
    def sparse_layers(self) -> tuple[bool, ...]:
        """Per attention sublayer: True where LoZA sparse attention replaces full attention."""
        pattern = self.loza.layer_pattern or "0" * self.num_attention_layers
        return tuple(c == "1" for c in pattern)

    @property
    def mtp_ffn(self) -> int:
        return self.mtp_ffn_size or self.ffn_hidden_size

    @property
    def ngram_table_dim(self) -> int:
        return self.hidden_size // self.ngram.num_tables if self.ngram.enabled else 0


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh shape; -1 on one ICI axis takes the remaining devices.

    `data/fsdp/expert/tensor` are the sizes within a slice or host group (ICI, fast links);
    `dcn_*` multiply them across slices / hosts joined by the data-centre network (DCN). The
    mesh axis `data` then has data * dcn_data devices, and so on. Keep DCN on `data` (or
    `fsdp`): the other axes' collectives run every layer.
    """

    data: int = -1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_expert: int = 1
    dcn_tensor: int = 1

    def __post_init__(self):
        sizes = (self.data, self.fsdp, self.expert, self.tensor)
        _check(sum(s == -1 for s in sizes) <= 1, "mesh", sizes, "at most one axis set to -1")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name.startswith("dcn_"):
                _check(isinstance(value, int) and value >= 1, f"mesh.{f.name}", value, ">= 1")
            else:
                _check(value == -1 or value >= 1, f"mesh.{f.name}", value, "-1 or >= 1")

    @property
    def ici_sizes(self) -> tuple[int, int, int, int]:
        return (self.data, self.fsdp, self.expert, self.tensor)

    @property
    def dcn_sizes(self) -> tuple[int, int, int, int]:
        return (self.dcn_data, self.dcn_fsdp, self.dcn_expert, self.dcn_tensor)


TP_COMM_MODES = ("none", "int8", "int4", "int6")


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """How the model is split over the mesh: rule table, expert dispatch, quantized TP comm.

    rules: a preset in configs/rules (`fsdp`, `fsdp_tp`, `ep_fsdp_tp`) or a YAML path; it maps
      logical axis names to mesh axes (lcjax.parallel.rules).
    expert_dispatch: `auto` (all-to-all expert parallelism when the mesh's expert axis > 1 and
      the rules put `experts` on it, else GSPMD), `all_to_all` (require it) or `gspmd` (never).
    expert_capacity_factor: 0 = dropless (each device can receive every slot it could be sent);
      c > 0 caps the rows one device sends another at ceil(c * slots / expert_devices), and
      slots over the cap are dropped (their weight is lost, as in GShard).
    quantized_tp_comm: Flash Communication on the tensor-parallel all-reduces of the attention
      output and the dense MLP down projections: `none`, `int8`, `int4` or `int6` (int4 for the
      reduce-scatter half, int8 for the all-gather half). comm_group_size: elements per scale.
    """

    rules: str = "ep_fsdp_tp"
    expert_dispatch: str = "auto"
    expert_capacity_factor: float = 0.0
    quantized_tp_comm: str = "none"
    comm_group_size: int = 128

    def __post_init__(self):
        _check(isinstance(self.rules, str) and bool(self.rules), "parallel.rules", self.rules,
               "a preset name in configs/rules or a YAML path")
        _check_choice("parallel.expert_dispatch", self.expert_dispatch, ("auto", "all_to_all", "gspmd"))
        _check(self.expert_capacity_factor >= 0, "parallel.expert_capacity_factor",
               self.expert_capacity_factor, ">= 0 (0 = dropless)")
        _check_choice("parallel.quantized_tp_comm", self.quantized_tp_comm, TP_COMM_MODES)
        _check(isinstance(self.comm_group_size, int) and self.comm_group_size > 0,
               "parallel.comm_group_size", self.comm_group_size, "a positive integer")


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """Process-level settings: randomness and logging."""

    seed: int = 0
    log_level: str = "INFO"

    def __post_init__(self):
        _check_choice("runtime.log_level", self.log_level, ("DEBUG", "INFO", "WARNING", "ERROR"))


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a run needs; `configs/*.yaml` files are partial overrides of this tree."""

    model: ModelConfig = ModelConfig()
    mesh: MeshConfig = MeshConfig()
    parallel: ParallelConfig = ParallelConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    train: TrainConfig = TrainConfig()
    lora: LoraConfig = LoraConfig()

    def __post_init__(self):
        _check(self.data.seq_len <= self.model.max_position_embeddings, "data.seq_len",
               self.data.seq_len, f"<= model.max_position_embeddings={self.model.max_position_embeddings}")
