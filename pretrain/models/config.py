"""Typed configuration of every model component.

Each component receives only its own section (``SSMConfig`` for the SSM, ...). Single-field
checks live in ``__post_init__``; checks that need several sections (heads dividing d_model,
block indices in range) belong to the model family (``ModelFamily.config_problems``, built from
the shared checks here) and run in ``validate_model_config``, which collects every problem and
raises once, before anything is allocated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pretrain.config_errors import ConfigError
from pretrain.models.attamba.config import AttambaConfig
from pretrain.models.dreamer.config import DreamerConfig
from pretrain.models.registry import FAMILY_NAMES, get_family, uses_component

MODEL_FAMILIES = FAMILY_NAMES  # the registry's names (kept for importers of the old list)
MOE_ROUTING = ("chunk", "token")
MOE_SCORE_FUNCS = ("softmax", "sigmoid")


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


@dataclass
class SSMConfig:
    """Mamba-2 (SSD) mixer."""

    enabled: bool = True  # the SSM path of each Hydra block
    d_state: int = 64  # N, state size per head
    head_dim: int = 64  # P, channels per SSM head
    expand: int = 2  # d_inner = expand * d_model
    n_groups: int = 1  # B/C groups shared by heads (GQA-like)
    d_conv: int = 4  # causal depthwise conv width
    chunk_size: int = 64  # SSD chunk length
    dt_min: float = 1e-3  # initial dt range (log-uniform)
    dt_max: float = 0.1
    a_init_min: float = 1.0  # A = -exp(A_log), A_log init from log(U[a_init_min, a_init_max])
    a_init_max: float = 16.0

    def __post_init__(self) -> None:
        for name in ("d_state", "head_dim", "expand", "n_groups", "d_conv", "chunk_size"):
            _check(getattr(self, name) >= 1, f"model.ssm.{name}", "must be >= 1")
        _check(0 < self.dt_min <= self.dt_max, "model.ssm.dt_min", "need 0 < dt_min <= dt_max")
        _check(
            0 < self.a_init_min <= self.a_init_max,
            "model.ssm.a_init_min",
            "need 0 < a_init_min <= a_init_max",
        )


@dataclass
class AttentionConfig:
    """Sparse global attention (Hydra) or full causal attention (Transformer baseline)."""

    enabled: bool = True
    every: int = 4  # Hydra: the attention path sits in blocks every-1, 2*every-1, ...
    n_heads: int = 8
    n_kv_heads: int | None = None  # None: same as n_heads
    window: int = 256  # w, local causal window (tokens, including the query itself)
    summary_chunk: int = 64  # length of the chunks that produce one global summary token each
    n_global: int = 64  # G, at most this many summaries (the most recent completed chunks)
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        for name in ("every", "n_heads", "window", "summary_chunk"):
            _check(getattr(self, name) >= 1, f"model.attention.{name}", "must be >= 1")
        _check(self.n_global >= 0, "model.attention.n_global", "must be >= 0")
        if self.n_kv_heads is not None:
            _check(self.n_kv_heads >= 1, "model.attention.n_kv_heads", "must be >= 1")
            _check(
                self.n_heads % self.n_kv_heads == 0,
                "model.attention.n_kv_heads",
                f"must divide n_heads={self.n_heads}",
            )
        _check(self.rope_theta > 0, "model.attention.rope_theta", "must be > 0")


@dataclass
class MoEConfig:
    """Chunk-level mixture of SwiGLU experts (replaces the dense FFN where enabled)."""

    enabled: bool = True
    every: int = 1  # MoE in blocks every-1, 2*every-1, ...; dense FFN elsewhere
    n_experts: int = 8  # E
    top_k: int = 2
    d_expert: int = 512  # hidden size of each SwiGLU expert
    routing: str = "chunk"  # "chunk": a chunk of C tokens routed as a unit; "token": per token
    chunk_size: int = 64  # C, aligned with the SSM chunk
    score_func: str = "softmax"  # router scores: softmax or sigmoid (DeepSeek-V3)
    aux_loss_coef: float = 0.01  # Switch-style load-balance loss weight (0 disables)
    z_loss_coef: float = 1e-3  # router z-loss weight (0 disables)
    bias_update_rate: float = 0.0  # DeepSeek-V3 bias balancing step size (0 disables)

    def __post_init__(self) -> None:
        for name in ("every", "n_experts", "top_k", "d_expert", "chunk_size"):
            _check(getattr(self, name) >= 1, f"model.moe.{name}", "must be >= 1")
        _check(
            self.top_k <= self.n_experts,
            "model.moe.top_k",
            f"must be <= n_experts={self.n_experts}",
        )
        _check(
            self.routing in MOE_ROUTING, "model.moe.routing", f"must be one of {list(MOE_ROUTING)}"
        )
        _check(
            self.score_func in MOE_SCORE_FUNCS,
            "model.moe.score_func",
            f"must be one of {list(MOE_SCORE_FUNCS)}",
        )
        for name in ("aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            _check(getattr(self, name) >= 0, f"model.moe.{name}", "must be >= 0")


@dataclass
class WorkspaceConfig:
    """Workspace memory: M slots carried chunk to chunk, read then gated write."""

    enabled: bool = True
    after_blocks: list[int] = field(default_factory=list)  # block indices followed by a workspace
    n_slots: int = 16  # M
    chunk_size: int = 64  # tokens of chunk c read the slots written by chunks < c
    n_heads: int = 4  # heads of the slot read/write attention

    def __post_init__(self) -> None:
        for name in ("n_slots", "chunk_size", "n_heads"):
            _check(getattr(self, name) >= 1, f"model.workspace.{name}", "must be >= 1")


@dataclass
class PKMConfig:
    """Product-key memory (Lample et al. 2019)."""

    enabled: bool = True
    after_blocks: list[int] = field(default_factory=list)  # block indices followed by a PKM
    n_subkeys: int = 128  # sqrt(K): each half has this many sub-keys, K = n_subkeys**2 value rows
    top_k: int = 32  # k, candidates per half and rows finally read
    n_heads: int = 4
    d_key: int = 256  # query/key size (split in two halves of d_key/2)
    d_value: int | None = None  # None: d_model (values are added to the residual stream)

    def __post_init__(self) -> None:
        for name in ("n_subkeys", "top_k", "n_heads", "d_key"):
            _check(getattr(self, name) >= 1, f"model.pkm.{name}", "must be >= 1")
        _check(self.d_key % 2 == 0, "model.pkm.d_key", "must be even (two halves)")
        _check(
            self.top_k <= self.n_subkeys,
            "model.pkm.top_k",
            f"must be <= n_subkeys={self.n_subkeys}",
        )


@dataclass
class ModelConfig:
    """A whole model: family, sizes and one section per component."""

    family: str = "hydra"  # hydra | transformer | mamba2 | attamba | dreamer
    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    d_ff: int = 512  # hidden size of the dense SwiGLU FFN (0: no dense FFN)
    max_seq_len: int = 2048  # longest sequence the model is built for
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    ssm: SSMConfig = field(default_factory=SSMConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    workspace: WorkspaceConfig = field(default_factory=WorkspaceConfig)
    pkm: PKMConfig = field(default_factory=PKMConfig)
    attamba: AttambaConfig = field(default_factory=AttambaConfig)
    dreamer: DreamerConfig = field(default_factory=DreamerConfig)

    def __post_init__(self) -> None:
        _check(self.family in FAMILY_NAMES, "model.family", f"must be one of {list(FAMILY_NAMES)}")
        for name in ("vocab_size", "d_model", "n_layers", "max_seq_len"):
            _check(getattr(self, name) >= 1, f"model.{name}", "must be >= 1")
        _check(self.d_ff >= 0, "model.d_ff", "must be >= 0")
        _check(self.norm_eps > 0, "model.norm_eps", "must be > 0")


def attention_problems(cfg: ModelConfig) -> list[str]:
    """Attention heads must divide ``d_model`` into even head dims (RoPE rotates pairs).

    Shared by every family whose components include "attention".
    """
    att = cfg.attention
    if cfg.d_model % att.n_heads:
        return [
            f"model.attention.n_heads: {att.n_heads} does not divide model.d_model={cfg.d_model}"
        ]
    if (cfg.d_model // att.n_heads) % 2:
        return [
            f"model.attention.n_heads: head dim {cfg.d_model // att.n_heads} must be even for RoPE"
        ]
    return []


def ssm_problems(cfg: ModelConfig) -> list[str]:
    """SSM heads must split ``d_inner`` evenly and into whole B/C groups.

    Shared by every family whose components include "ssm".
    """
    ssm = cfg.ssm
    d_inner = ssm.expand * cfg.d_model
    if d_inner % ssm.head_dim:
        return [
            f"model.ssm.head_dim: {ssm.head_dim} does not divide d_inner = ssm.expand * model.d_model"
            f" = {d_inner}"
        ]
    if (d_inner // ssm.head_dim) % ssm.n_groups:
        return [
            f"model.ssm.n_groups: {ssm.n_groups} does not divide the number of SSM heads"
            f" {d_inner // ssm.head_dim}"
        ]
    return []


def component_problems(cfg: ModelConfig, components: frozenset[str]) -> list[str]:
    """The shared checks of the components a family builds (attention first, then SSM)."""
    problems = attention_problems(cfg) if "attention" in components else []
    return problems + (ssm_problems(cfg) if "ssm" in components else [])


def model_config_problems(cfg: ModelConfig) -> list[str]:
    """Cross-field checks of a model config; every problem found, each naming its key.

    The family owns them (``ModelFamily.config_problems``), calling the shared ones above.
    """
    return get_family(cfg.family).config_problems(cfg)


def uses_ssm(cfg: ModelConfig) -> bool:
    """Whether the model has SSM mixers (Mamba-2 always, Hydra unless ``ssm.enabled`` is off)."""
    return uses_component(cfg, "ssm")


def validate_model_config(cfg: ModelConfig) -> None:
    """Raise one ConfigError listing every cross-field problem of ``cfg``."""
    problems = model_config_problems(cfg)
    if problems:
        raise ConfigError.from_problems("invalid model config", problems)
