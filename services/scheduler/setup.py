"""What a scheduler rank is built from its arguments: its place in the parallel layout, its
torch.distributed world, the model, the KV pool and the engine over them.

`build_rank` runs on the forward thread (every collective of the world runs there) and returns
what it built; nothing here keeps state.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from services.scheduler.dist_sync import GroupSync, init_world
from services.scheduler.dp_attention import ParallelLayout, build_linears, new_attn_groups
from services.scheduler.engine import Engine, EngineConfig
from services.scheduler.model.attention_backends import install_attention_backend
from services.scheduler.model.config import ModelConfig
from services.scheduler.model.llama import local_kv_heads
from services.scheduler.model.loader import load_model, serving_dtype
from services.scheduler.model.mla_pool import kv_bytes_per_token, make_kv_pool
from services.scheduler.model.parallel import Linears
from shared.config import ServerArgs

DEFAULT_MAX_TOTAL_TOKENS = 65536


def layout_of(args: ServerArgs) -> ParallelLayout:
    return ParallelLayout.from_args(args.tp_size, args.dp_size, args.tp_rank, args.enable_dp_attention)


def dp_rank_of(args: ServerArgs, layout: ParallelLayout) -> int:
    """This rank's dp_rank: --dp-rank-base plus its DP attention group or --dp-rank (a side of a
    disaggregated deployment numbers its groups from 0); -1: the rank registry assigns one."""
    if layout.dp_groups > 1:
        if args.dp_rank not in (-1, layout.group_index):
            raise ValueError(f"--dp-rank {args.dp_rank} != tp_rank // attn_tp_size ({layout.group_index})")
        return args.dp_rank_base + layout.group_index
    if layout.distributed and args.dp_rank < 0:
        raise ValueError("a tensor-parallel rank needs an explicit --dp-rank (the launcher passes it)")
    return args.dp_rank_base + args.dp_rank if args.dp_rank >= 0 else -1


def pool_size(
    max_total_tokens: int,
    mem_fraction_static: float,
    bytes_per_token: int,
    device: str,
    kv_cache_bytes: int = 0,
    ranks_sharing_memory: int = 1,
) -> int:
    """KV pool slots of one rank: --max-total-tokens if set, else --kv-cache-bytes (this rank's
    budget), else --mem-fraction-static of the free memory (the GPU's, or on CPU the host's
    MemAvailable split among the `ranks_sharing_memory` scheduler processes), else
    DEFAULT_MAX_TOTAL_TOKENS."""
    if max_total_tokens > 0:
        return max_total_tokens
    if kv_cache_bytes > 0:
        return max(1, kv_cache_bytes // bytes_per_token)
    if mem_fraction_static <= 0:
        return DEFAULT_MAX_TOTAL_TOKENS
    if device.startswith("cuda"):
        free = torch.cuda.mem_get_info(torch.device(device))[0]
    else:
        free = next(
            int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemAvailable:")
        ) // max(1, ranks_sharing_memory)
    return max(1, int(free * mem_fraction_static) // bytes_per_token)


def kv_config(config: ModelConfig, attn_tp_size: int) -> ModelConfig:
    """The config whose KV pool one rank holds: MLA's latent is one head, copied on every rank of
    an attention group; other models keep num_key_value_heads / attn_tp_size heads per rank."""
    if config.mla is not None or attn_tp_size == 1:
        return config
    return dataclasses.replace(
        config,
        num_attention_heads=config.num_attention_heads // attn_tp_size,
        num_key_value_heads=local_kv_heads(config, attn_tp_size),
    )


@dataclass(frozen=True)
class Rank:
    """A built rank: its engine, its group's step collectives and its layer builder."""

    engine: Engine
    sync: GroupSync
    linears: Linears | None  # None: plain single-device layers


def build_rank(args: ServerArgs, layout: ParallelLayout, log: logging.Logger) -> Rank:
    """Joins the world (when distributed), loads the model and sizes the KV pool. Forward thread."""
    if args.device == "sim":  # no model: services/scheduler/sim/
        from services.scheduler.sim.rank import build_sim_rank

        return build_sim_rank(args, layout, log)
    linears, sync = join_world(args, layout, args.device)
    dtype = serving_dtype(args.dtype, ModelConfig.from_hf(args.model_path).torch_dtype, args.device)
    model, config = load_model(args.model_path, dtype=dtype, device=args.device, linears=linears)
    attention = install_attention_backend(model, args.attention_backend, args.device)
    log.info("attention backend: %s (--attention-backend %s)", attention, args.attention_backend)
    pool_config = kv_config(config, layout.attn_tp_size)
    sharing = args.tp_size * (1 if args.enable_dp_attention else args.dp_size)
    size = pool_size(
        args.max_total_tokens, args.mem_fraction_static, kv_bytes_per_token(pool_config, dtype), args.device,
        kv_cache_bytes=args.kv_cache_bytes, ranks_sharing_memory=sharing,
    )
    pool = make_kv_pool(pool_config, size, dtype, args.device)
    tokenizer = Tokenizer.from_file(str(Path(args.model_path) / "tokenizer.json"))
    return Rank(Engine(model, pool, tokenizer, engine_config(args, layout, config, size)), sync, linears)


def join_world(args: ServerArgs, layout: ParallelLayout, device: str) -> tuple[Linears | None, GroupSync]:
    """Joins the torch.distributed world (when distributed) on `device`; this rank's layer builder
    and its group's step collectives."""
    if layout.distributed:
        if not args.dist_init_addr:
            raise ValueError("--tp-size > 1 needs --dist-init-addr host:port (the launcher passes it)")
        init_world(layout, args.dist_init_addr, device, args.dist_timeout, args.dist_store_prefix)
    attn_group = new_attn_groups(layout) if layout.distributed else None
    return build_linears(layout, attn_group), GroupSync(layout, attn_group, device)


def engine_config(args: ServerArgs, layout: ParallelLayout, config: ModelConfig, pool_size: int) -> EngineConfig:
    """The engine's limits: the serving flags over the model's own."""
    return EngineConfig.from_model(
        config,
        pool_size,
        max_running_requests=args.max_running_requests,
        prefill_budget=args.max_prefill_tokens,
        context_length=args.context_length,
        chunked_prefill_size=group_chunk_size(args.chunked_prefill_size, layout),
        schedule_policy=args.schedule_policy,
        disable_radix_cache=args.disable_radix_cache,
    )


def group_chunk_size(chunked_prefill_size: int, layout: ParallelLayout) -> int:
    """A DP-attention group's share of `--chunked-prefill-size`. The MLP/MoE layers run over every
    group's tokens at once, so SGLang divides the flag by the groups and the gathered batch of a
    step stays what the flag says; off (<= 0) stays off."""
    if chunked_prefill_size <= 0 or layout.dp_groups == 1:
        return chunked_prefill_size
    return max(1, chunked_prefill_size // layout.dp_groups)
