"""The step-time model of `--device sim`: a roofline per phase of one forward step on one GPU.

Inputs: the model's config.json (shapes, MLA or GQA, MoE, fp8 weights from `quantization_config`),
a hardware profile and the rank's place in the parallel layout. One step of one rank costs

    step = overhead + attention part + feed-forward part + communication

- attention part (this DP group's rows, split over attn_tp ranks): attention-side weights
  (q/k/v/o or MLA's q_a/q_b/kv_a/kv_b/o, embedding and LM head) read once, their GEMMs on the
  group's tokens, the score/value products over each row's context (MLA: prefill rows in the
  expanded form, heads x (qk_head_dim + v_head_dim); decode rows absorbed, heads x (kv_lora_rank +
  rope + kv_lora_rank)) and the KV cache read (every cached token of every row).
  time = max(FLOPs / (peak x MFU), bytes / (HBM x MBU))
- feed-forward part (every group's tokens under DP attention, split over all tp ranks): dense MLP
  weights, shared experts, and the routed experts this GPU holds that some token picks: with T
  tokens each choosing k of E experts uniformly, an expert is hit with probability
  1 - (1 - k/E)^T (so decode at small T reads few experts, prefill reads all).
- communication: plain TP, two all-reduces per layer (ring: 2 (n-1)/n x bytes / link);
  DP attention, per layer a gather of every group's hidden states (unpadded: SGLang's dp_gather
  moves the sum of the groups' tokens; our CPU path pads to the largest group) and the scatter
  back, plus the group's own all-reduces when attn_tp > 1. A world wider than one node (8 GPUs) runs at the
  inter-node bandwidth.

Sources of the constants: NVIDIA's datasheets (dense, no sparsity) for A100 SXM 80GB (312 TFLOP/s
bf16, no fp8, 2.04 TB/s, NVLink 600 GB/s), H100 SXM (989 / 1979 fp8, 3.35 TB/s, 80 GB, NVLink
900 GB/s), H200 SXM (same compute, 4.8 TB/s, 141 GB) and H20 (148 / 296 fp8, 4.0 TB/s, 96 GB,
NVLink 900 GB/s); NVLink's figure is both directions, a ring moves one, so half of it is used;
inter-node 400 Gb/s InfiniBand NDR per GPU (50 GB/s; HDR 25 GB/s for A100). The efficiencies
(MFU 0.6 for GEMMs, MBU 0.8 for HBM reads, 0.7 of link bandwidth, 2 ms per step for launches,
sampling and the scheduler's GPU-side work, 10 us per collective) are typical of what
SGLang/vLLM kernels reach on these parts; they are not fitted to a measurement here. The KV
pool is sized like a real GPU's: `memory x fraction - weights on this GPU`, over the KV bytes of
a token on this GPU (MLA's latent is one head, copied on every attn_tp rank).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GPUS_PER_NODE = 8
ACT_BYTES = 2  # bf16 activations and KV cache


@dataclass(frozen=True)
class Hardware:
    name: str
    bf16_flops: float  # dense FLOP/s
    fp8_flops: float  # dense FLOP/s of fp8 GEMMs (== bf16 where the part has none)
    hbm_bw: float  # bytes/s
    memory: float  # bytes
    nvlink_bw: float  # bytes/s, one direction
    internode_bw: float  # bytes/s per GPU, one direction
    mfu: float = 0.6
    mbu: float = 0.8
    link_eff: float = 0.7
    step_overhead_s: float = 0.002
    collective_latency_s: float = 10e-6


T, G = 1e12, 1e9
HARDWARE = {
    "a100": Hardware("a100", 312 * T, 312 * T, 2039 * G, 80 * G, 300 * G, 25 * G),
    "h100": Hardware("h100", 989 * T, 1979 * T, 3350 * G, 80 * G, 450 * G, 50 * G),
    "h200": Hardware("h200", 989 * T, 1979 * T, 4800 * G, 141 * G, 450 * G, 50 * G),
    "h20": Hardware("h20", 148 * T, 296 * T, 4000 * G, 96 * G, 450 * G, 50 * G),
}


@dataclass(frozen=True)
class ModelShape:
    """Parameter counts and per-token sizes of a config.json, the way the cost model needs them."""

    layers: int
    hidden: int
    vocab: int
    heads: int
    weight_bytes: int  # bytes per parameter of the linear layers (1: fp8 checkpoint, else 2)
    attn_params: int  # per layer: the attention projections
    dense_mlp_params: int  # all dense-MLP layers together
    shared_expert_params: int  # all MoE layers together
    expert_params: int  # one routed expert of one layer
    moe_layers: int
    n_experts: int  # routed experts per MoE layer (0: dense model)
    top_k: int
    kv_heads: int  # GQA: KV heads; MLA: 1 (the latent)
    kv_dim: int  # per KV head and token: GQA K+V (2 x head_dim); MLA kv_lora_rank + rope
    # attention products per (query token, cached token), per head: prefill and decode forms
    attn_dim_prefill: int
    attn_dim_decode: int
    mla: bool

    @property
    def embed_params(self) -> int:
        return 2 * self.vocab * self.hidden  # embedding and LM head (kept in bf16)

    @property
    def total_params(self) -> int:
        routed = self.moe_layers * self.n_experts * self.expert_params
        return (self.embed_params + self.layers * self.attn_params + self.dense_mlp_params
                + self.shared_expert_params + routed)

    @property
    def active_params(self) -> int:
        """Parameters one token uses (top_k routed experts per MoE layer)."""
        routed = self.moe_layers * self.top_k * self.expert_params
        return (self.embed_params + self.layers * self.attn_params + self.dense_mlp_params
                + self.shared_expert_params + routed)

    def kv_bytes_per_token(self, attn_tp: int) -> int:
        """KV bytes of one token on one GPU of an attention group of attn_tp ranks."""
        heads = self.kv_heads if self.mla else max(1, self.kv_heads // attn_tp)
        return self.layers * heads * self.kv_dim * ACT_BYTES

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> ModelShape:
        hidden, layers, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
        heads = cfg["num_attention_heads"]
        quant = (cfg.get("quantization_config") or {}).get("quant_method", "")
        wbytes = 1 if quant == "fp8" else 2
        if "kv_lora_rank" in cfg:  # MLA (DeepSeek V2/V3)
            q_lora, kv_lora = cfg.get("q_lora_rank"), cfg["kv_lora_rank"]
            nope, rope, v = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
            q = hidden * q_lora + q_lora * heads * (nope + rope) if q_lora else hidden * heads * (nope + rope)
            attn = q + hidden * (kv_lora + rope) + kv_lora * heads * (nope + v) + heads * v * hidden
            kv_heads, kv_dim = 1, kv_lora + rope
            prefill, decode, mla = nope + rope + v, kv_lora + rope + kv_lora, True
        else:
            head_dim = cfg.get("head_dim") or hidden // heads
            kvh = cfg.get("num_key_value_heads") or heads
            attn = 2 * hidden * heads * head_dim + 2 * hidden * kvh * head_dim
            kv_heads, kv_dim = kvh, 2 * head_dim
            prefill = decode = 2 * head_dim
            mla = False
        inter = cfg["intermediate_size"]
        n_experts = cfg.get("n_routed_experts") or 0
        if n_experts:
            first_dense, freq = cfg.get("first_k_dense_replace") or 0, cfg.get("moe_layer_freq") or 1
            moe_layers = sum(1 for i in range(layers) if i >= first_dense and i % freq == 0)
            expert = 3 * hidden * cfg["moe_intermediate_size"]
            shared = moe_layers * (cfg.get("n_shared_experts") or 0) * expert + moe_layers * n_experts * hidden
            top_k = cfg["num_experts_per_tok"]
        else:
            moe_layers, expert, shared, top_k = 0, 0, 0, 0
        dense = (layers - moe_layers) * 3 * hidden * inter
        return cls(layers, hidden, vocab, heads, wbytes, attn, dense, shared, expert, moe_layers, n_experts,
                   top_k, kv_heads, kv_dim, prefill, decode, mla)

    @classmethod
    def from_path(cls, model_path: str | Path) -> ModelShape:
        return cls.from_config(json.loads((Path(model_path) / "config.json").read_text()))


@dataclass(frozen=True)
class Row:
    """One request's part of a step: tokens fed and its context after them."""

    extend: int
    seq_len: int


@dataclass(frozen=True)
class StepCost:
    attention_s: float  # this group's attention part
    ffn_s: float
    comm_s: float
    overhead_s: float

    @property
    def total_s(self) -> float:
        return self.attention_s + self.ffn_s + self.comm_s + self.overhead_s


class CostModel:
    """Step times of one rank: `tp` GPUs in its world, `attn_tp` of them in its attention group,
    `dp_groups` groups sharing the feed-forward (1: plain TP)."""

    def __init__(self, shape: ModelShape, hw: Hardware, tp: int = 1, attn_tp: int = 1, dp_groups: int = 1) -> None:
        self.shape, self.hw = shape, hw
        self.tp, self.attn_tp, self.dp_groups = tp, attn_tp, dp_groups
        self.link_bw = (hw.nvlink_bw if tp <= GPUS_PER_NODE else hw.internode_bw) * hw.link_eff

    # --- memory ---------------------------------------------------------------------------------

    def weight_bytes_per_gpu(self) -> float:
        s = self.shape
        attn = (s.layers * s.attn_params * s.weight_bytes + s.embed_params * ACT_BYTES) / self.attn_tp
        ffn = (s.dense_mlp_params + s.shared_expert_params + s.moe_layers * s.n_experts * s.expert_params)
        return attn + ffn * s.weight_bytes / self.tp

    def kv_pool_tokens(self, mem_fraction: float) -> int:
        """KV slots of one rank: what is left of `mem_fraction` of the GPU after its weights."""
        room = self.hw.memory * mem_fraction - self.weight_bytes_per_gpu()
        if room <= 0:
            raise ValueError(
                f"the weights need {self.weight_bytes_per_gpu() / G:.1f} GB per GPU; {self.hw.name} has "
                f"{self.hw.memory * mem_fraction / G:.1f} GB at --mem-fraction-static {mem_fraction}"
            )
        return int(room // self.shape.kv_bytes_per_token(self.attn_tp))

    # --- time -----------------------------------------------------------------------------------

    def _roofline(self, flops: float, fp8_flops: float, nbytes: float) -> float:
        hw = self.hw
        compute = flops / (hw.bf16_flops * hw.mfu) + fp8_flops / (hw.fp8_flops * hw.mfu)
        return max(compute, nbytes / (hw.hbm_bw * hw.mbu))

    def _linear_flops(self, params: float, tokens: float) -> tuple[float, float]:
        """(bf16, fp8) FLOPs of `tokens` through `params` linear weights."""
        f = 2.0 * params * tokens
        return (0.0, f) if self.shape.weight_bytes == 1 else (f, 0.0)

    def attention_time(self, rows: list[Row]) -> float:
        """This group's attention part on one of its GPUs (0 rows: nothing to run)."""
        if not rows:
            return 0.0
        s = self.shape
        tokens = sum(r.extend for r in rows)
        emits = len(rows)
        bf16, fp8 = self._linear_flops(s.layers * s.attn_params / self.attn_tp, tokens)
        bf16 += 2.0 * s.vocab * s.hidden * emits / self.attn_tp  # LM head on the emitting rows
        ctx_pairs = 0.0
        for r in rows:  # query i of a row of `extend` new tokens sees seq_len - extend + i + 1 tokens
            past = r.seq_len - r.extend
            pairs = r.extend * past + r.extend * (r.extend + 1) / 2
            dim = s.attn_dim_decode if r.extend == 1 else s.attn_dim_prefill
            ctx_pairs += pairs * dim
        bf16 += 2.0 * s.layers * (s.heads / self.attn_tp) * ctx_pairs
        kv_read = sum(r.seq_len for r in rows) * s.kv_bytes_per_token(self.attn_tp)
        weights = (s.layers * s.attn_params * s.weight_bytes + s.vocab * s.hidden * ACT_BYTES) / self.attn_tp
        return self._roofline(bf16, fp8, weights + kv_read + tokens * s.hidden * ACT_BYTES)

    def ffn_time(self, tokens: int) -> float:
        """The feed-forward part on one GPU for `tokens` tokens (every group's, under DP attention)."""
        if tokens <= 0:
            return 0.0
        s = self.shape
        dense = (s.dense_mlp_params + s.shared_expert_params) / self.tp
        local_experts = s.moe_layers * s.n_experts / self.tp
        hit = 1.0 - (1.0 - s.top_k / s.n_experts) ** tokens if s.n_experts else 0.0
        weights = (dense + local_experts * hit * s.expert_params) * s.weight_bytes
        routed = s.moe_layers * s.top_k * s.expert_params / self.tp  # balanced over the EP ranks
        bf16, fp8 = self._linear_flops(dense + routed, tokens)
        return self._roofline(bf16, fp8, weights + tokens * s.hidden * ACT_BYTES * 2)

    def comm_time(self, group_tokens: list[int]) -> float:
        """Collectives of one step: `group_tokens[g]` tokens of each DP group ([n] under plain TP)."""
        s, hw = self.shape, self.hw
        t = 0.0
        per_layer = 0
        if self.attn_tp > 1:  # the group's all-reduces after attention and (plain TP) after the MLP
            n = self.attn_tp
            calls = 1 if self.dp_groups > 1 else 2
            nbytes = max(group_tokens) * s.hidden * ACT_BYTES
            t += s.layers * calls * 2 * (n - 1) / n * nbytes / self.link_bw
            per_layer += calls
        if self.dp_groups > 1 and any(group_tokens):  # all-gather + reduce-scatter around the FFN
            n = self.tp
            nbytes = sum(group_tokens) * s.hidden * ACT_BYTES
            t += s.layers * 2 * (n - 1) / n * nbytes / self.link_bw
            per_layer += 2
        return t + s.layers * per_layer * hw.collective_latency_s

    def step(self, rows: list[Row], group_tokens: list[int]) -> StepCost:
        """One step of this rank; `group_tokens`: every DP group's token count (plain TP: [this one])."""
        return StepCost(
            attention_s=self.attention_time(rows),
            ffn_s=self.ffn_time(sum(group_tokens)),
            comm_s=self.comm_time(group_tokens),
            overhead_s=self.hw.step_overhead_s if any(group_tokens) else 0.0,
        )
