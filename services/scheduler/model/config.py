"""ModelConfig: the fields of a Hugging Face config.json that our models read, frozen and validated."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# rope types whose inverse frequencies layers.py knows how to compute.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# DeepSeek's models (MLA) also take YaRN, whose attention-scale correction lives in mla.py.
DEEPSEEK_ROPE_TYPES = ("default", "yarn")
DEEPSEEK_ARCHITECTURES = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")


@dataclass(frozen=True)
class RopeScaling:
    rope_type: str  # one of the allowed types, never "default" (that is `rope_scaling=None`)
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 and yarn
    beta_fast: float = 32.0  # yarn only
    beta_slow: float = 1.0  # yarn only
    mscale: float = 0.0  # yarn only (0 = absent); see mla.yarn_attention_factor
    mscale_all_dim: float = 0.0  # yarn only (0 = absent); see mla.yarn_softmax_scale

    @classmethod
    def from_hf(
        cls, d: dict[str, Any] | None, allowed: tuple[str, ...] = SUPPORTED_ROPE_TYPES
    ) -> RopeScaling | None:
        if not d:
            return None
        rope_type = d.get("rope_type", d.get("type", "default"))
        if rope_type not in allowed:
            raise ValueError(f"unsupported rope_scaling type {rope_type!r}; supported: {', '.join(allowed)}")
        if rope_type == "default":
            return None
        if rope_type == "linear":
            return cls(rope_type="linear", factor=float(d["factor"]))
        if rope_type == "yarn":
            return cls(
                rope_type="yarn",
                factor=float(d["factor"]),
                original_max_position_embeddings=int(d["original_max_position_embeddings"]),
                beta_fast=float(d.get("beta_fast") or 32.0),
                beta_slow=float(d.get("beta_slow") or 1.0),
                mscale=float(d.get("mscale") or 0.0),
                mscale_all_dim=float(d.get("mscale_all_dim") or 0.0),
            )
        return cls(
            rope_type="llama3",
            factor=float(d["factor"]),
            low_freq_factor=float(d.get("low_freq_factor", 1.0)),
            high_freq_factor=float(d.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(d.get("original_max_position_embeddings", 8192)),
        )


@dataclass(frozen=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek V2/V3). The KV cache holds, per token and layer, the
    normalized latent c_kv [kv_lora_rank] and the shared rotated key k_rope [qk_rope_head_dim]."""

    q_lora_rank: int | None  # None: q_proj straight from hidden (V2-Lite); else q_a -> norm -> q_b
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_interleave: bool  # rope pairs are (2i, 2i+1) (DeepSeek's layout) rather than (i, i + d/2)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        return self.kv_lora_rank + self.qk_rope_head_dim

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], arch: str) -> MLAConfig:
        q_lora = cfg.get("q_lora_rank")
        return cls(
            q_lora_rank=int(q_lora) if q_lora else None,
            kv_lora_rank=int(cfg["kv_lora_rank"]),
            qk_nope_head_dim=int(cfg["qk_nope_head_dim"]),
            qk_rope_head_dim=int(cfg["qk_rope_head_dim"]),
            v_head_dim=int(cfg["v_head_dim"]),
            # V2 rotates complex pairs (interleaved) always; V3 has the flag (default True).
            rope_interleave=True
            if arch == "DeepseekV2ForCausalLM"
            else bool(cfg.get("rope_interleave", True)),
        )


@dataclass(frozen=True)
class MoEConfig:
    """Routed + shared experts (DeepSeek). Layer i is MoE iff i >= first_k_dense_replace and
    i % moe_layer_freq == 0; the other layers use the dense MLP of width intermediate_size."""

    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int
    moe_intermediate_size: int
    first_k_dense_replace: int
    moe_layer_freq: int
    scoring_func: str  # "sigmoid" (V3) or "softmax" (V2)
    topk_method: (
        str  # "noaux_tc" (V3: group score = sum of its top-2 biased scores), "greedy", "group_limited_greedy"
    )
    n_group: int  # 1 means no group limit
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    has_correction_bias: bool  # V3's e_score_correction_bias (used for choosing, not for weights)

    def __post_init__(self) -> None:
        if self.scoring_func not in ("sigmoid", "softmax"):
            raise ValueError(f"unsupported MoE scoring_func {self.scoring_func!r}")
        if self.topk_method not in ("noaux_tc", "greedy", "group_limited_greedy"):
            raise ValueError(f"unsupported MoE topk_method {self.topk_method!r}")
        if self.n_routed_experts % self.n_group or not 1 <= self.topk_group <= self.n_group:
            raise ValueError(
                f"n_routed_experts ({self.n_routed_experts}) must split into n_group ({self.n_group}) "
                f"groups and 1 <= topk_group ({self.topk_group}) <= n_group"
            )
        if not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
            raise ValueError(f"num_experts_per_tok {self.num_experts_per_tok} out of range")

    def is_moe_layer(self, layer_id: int) -> bool:
        return layer_id >= self.first_k_dense_replace and layer_id % self.moe_layer_freq == 0

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], arch: str) -> MoEConfig:
        v3 = arch == "DeepseekV3ForCausalLM"
        return cls(
            n_routed_experts=int(cfg["n_routed_experts"]),
            num_experts_per_tok=int(cfg["num_experts_per_tok"]),
            n_shared_experts=int(cfg.get("n_shared_experts") or 0),
            moe_intermediate_size=int(cfg["moe_intermediate_size"]),
            first_k_dense_replace=int(cfg.get("first_k_dense_replace") or 0),
            moe_layer_freq=int(cfg.get("moe_layer_freq") or 1),
            scoring_func=str(cfg.get("scoring_func") or ("sigmoid" if v3 else "softmax")),
            topk_method=str(cfg.get("topk_method") or ("noaux_tc" if v3 else "greedy")),
            n_group=int(cfg.get("n_group") or 1),
            topk_group=int(cfg.get("topk_group") or 1),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", v3)),
            routed_scaling_factor=float(cfg.get("routed_scaling_factor") or 1.0),
            has_correction_bias=v3,
        )


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    torch_dtype: str
    mla: MLAConfig | None = None  # DeepSeek only; then head_dim == qk_rope_head_dim, as in HF
    moe: MoEConfig | None = None  # DeepSeek only

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    @classmethod
    def from_hf(cls, path: str | Path) -> ModelConfig:
        """Read `path`/config.json (and generation_config.json's eos ids, if that file exists)."""
        path = Path(path)
        cfg: dict[str, Any] = json.loads((path / "config.json").read_text())
        gen_path = path / "generation_config.json"
        gen: dict[str, Any] = json.loads(gen_path.read_text()) if gen_path.exists() else {}

        archs = cfg.get("architectures") or []
        if not archs:
            raise ValueError(f"{path / 'config.json'} has no 'architectures'")
        arch = archs[0]

        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or hidden // heads)

        # transformers 5 writes `rope_parameters` (holding rope_theta); older configs write
        # `rope_theta` and `rope_scaling` at top level.
        rope_params = cfg.get("rope_parameters") or {}
        rope_theta = float(cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0)))
        deepseek = arch in DEEPSEEK_ARCHITECTURES
        rope_scaling = RopeScaling.from_hf(
            cfg.get("rope_scaling") or rope_params or None,
            allowed=DEEPSEEK_ROPE_TYPES if deepseek else SUPPORTED_ROPE_TYPES,
        )
        mla = MLAConfig.from_hf(cfg, arch) if deepseek else None
        if mla is not None:
            head_dim = mla.qk_rope_head_dim

        if arch == "Qwen2ForCausalLM":
            attention_bias = True
        else:
            attention_bias = bool(cfg.get("attention_bias", False))

        eos: list[int] = []
        for source in (cfg.get("eos_token_id"), gen.get("eos_token_id")):
            for e in [source] if isinstance(source, int) else (source or []):
                if e not in eos:
                    eos.append(int(e))

        dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
        return cls(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            intermediate_size=int(cfg["intermediate_size"]),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            bos_token_id=cfg.get("bos_token_id", gen.get("bos_token_id")),
            eos_token_ids=tuple(eos),
            torch_dtype=str(dtype),
            mla=mla,
            moe=MoEConfig.from_hf(cfg, arch) if deepseek else None,
        )
