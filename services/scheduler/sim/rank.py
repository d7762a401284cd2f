"""build_sim_rank: a `--device sim` rank. The same layout, torch.distributed world (gloo) and
engine as a real rank; no weights are read (config.json and the tokenizer only), the KV pool is
an allocator without tensors sized from the simulated GPU's memory, and SimRunner replaces the
model."""

from __future__ import annotations

import logging
from pathlib import Path

from tokenizers import Tokenizer

from services.scheduler.dp_attention import DPAttentionLinears, ParallelLayout
from services.scheduler.engine import Engine
from services.scheduler.model.config import ModelConfig
from services.scheduler.model.kv_pool import KVPool
from services.scheduler.setup import Rank, engine_config, join_world
from services.scheduler.sim.cost import HARDWARE, CostModel, ModelShape
from services.scheduler.sim.runner import SimRunner
from services.scheduler.table import ReqToTokenTable
from shared.config import ServerArgs

DEFAULT_MEM_FRACTION = 0.88  # of the simulated GPU's memory, for weights + KV (SGLang's large-TP default)


class SimKVPool(KVPool):
    """KVPool's allocator (free list, used flags: the real accounting) with no K/V tensors."""

    def __init__(self, size: int) -> None:
        super().__init__(0, size, 1, 1)


def sim_pool_size(args: ServerArgs, cost: CostModel) -> int:
    """--max-total-tokens, else --kv-cache-bytes over a token's KV bytes on one GPU, else what the
    simulated GPU has left after its weights at --mem-fraction-static (default 0.88)."""
    if args.max_total_tokens > 0:
        return args.max_total_tokens
    if args.kv_cache_bytes > 0:
        return max(1, args.kv_cache_bytes // cost.shape.kv_bytes_per_token(cost.attn_tp))
    return cost.kv_pool_tokens(args.mem_fraction_static or DEFAULT_MEM_FRACTION)


def build_sim_rank(args: ServerArgs, layout: ParallelLayout, log: logging.Logger) -> Rank:
    linears, sync = join_world(args, layout, "cpu")
    config = ModelConfig.from_hf(args.model_path)
    hw = HARDWARE[args.sim_hardware]
    cost = CostModel(ModelShape.from_path(args.model_path), hw, layout.tp_size, layout.attn_tp_size, layout.dp_groups)
    size = sim_pool_size(args, cost)
    pool = SimKVPool(size)
    tokenizer = Tokenizer.from_file(str(Path(args.model_path) / "tokenizer.json"))
    cfg = engine_config(args, layout, config, size)
    end = min(tokenizer.get_vocab_size(with_added_tokens=True), config.vocab_size)
    reserved = [*tokenizer.get_added_tokens_decoder(), *config.eos_token_ids]  # special ids, EOS among them
    token_range = (1 + max([-1, *(i for i in reserved if i < end)]), end)
    dpa = linears if isinstance(linears, DPAttentionLinears) else None

    def runner(pool_: KVPool, table: ReqToTokenTable) -> SimRunner:
        return SimRunner(cost, pool_, table, cfg.eos_token_ids, token_range, args.sim_time_scale, dpa)

    log.info(
        "sim device: %s, tp=%d attn_tp=%d dp_groups=%d, weights %.1f GB/GPU, KV %d B/token/GPU, pool %d tokens, "
        "time scale %.2f", hw.name, layout.tp_size, layout.attn_tp_size, layout.dp_groups,
        cost.weight_bytes_per_gpu() / 1e9, cost.shape.kv_bytes_per_token(layout.attn_tp_size), size,
        args.sim_time_scale,
    )
    return Rank(Engine(None, pool, tokenizer, cfg, make_runner=runner), sync, linears)
