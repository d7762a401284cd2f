"""Step-boundary synchronisation of the scheduler ranks of one torch.distributed world.

Per step, in this order on every rank (the calls are collectives, run in the forward thread):
  1. share_inputs   the group leader's new requests, aborts and flush flag -> its group
                    (msgspec bytes in a uint8 tensor, length first; never pickle)
  2. gather_counts  DP attention only: every group's token count this step, to every rank
  3. the forward    (the model's own collectives)
  4. share_tokens   the leader's sampled token ids -> its group (unseeded sampling draws from each
                    rank's own RNG; the leader's draw wins, so every rank's requests stay equal)
Since every rank of a group absorbs the same inputs in the same order and the engine's
schedule is deterministic, the group's ranks build the same batch, row for row.

Failure: every collective waits at most --dist-timeout seconds for its peers (gloo applies the
world's timeout to each collective; a peer that died usually fails it at once with a connection
reset). A rank whose collective failed can't know where its peers are in their sequence of
collectives, so the world is broken: the rank raises WorldBroken, the scheduler exits non-zero,
and the launcher restarts the whole world. An idle leader therefore never leaves its followers in
share_inputs longer than `keepalive_s`, far below the timeout.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import TypeVar

import msgspec
import torch
import torch.distributed as dist

from services.scheduler.dp_attention import ParallelLayout
from shared.messages import TokenizedRequest

T = TypeVar("T")
KEEPALIVE_S = 1.0  # at most this long between an idle leader's step-boundary collectives


class WorldBroken(RuntimeError):
    """A collective of this rank's torch.distributed world failed (a peer died or timed out)."""


def keepalive_s(dist_timeout: float) -> float:
    """How long an idle leader may stay out of collectives: well inside the collective timeout."""
    return min(KEEPALIVE_S, dist_timeout / 4)


def collective(what: str, fn: Callable[[], T]) -> T:
    """Runs `fn` (collectives); any failure means the world is broken."""
    try:
        return fn()
    except WorldBroken:
        raise
    except Exception as e:
        raise WorldBroken(f"{what}: {e}") from e


class StepInputs(msgspec.Struct, frozen=True):
    reqs: list[TokenizedRequest] = []
    aborts: list[str] = []
    flush: bool = False


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(StepInputs)


def init_world(
    layout: ParallelLayout, init_addr: str, device: str, timeout_s: float = 30.0, store_prefix: str = ""
) -> None:
    """Joins this replica's world (gloo on CPU, NCCL on CUDA). Without `store_prefix` rank 0 hosts
    the world's TCP store at `init_addr`; with it the store there is a multi-node deployment's
    rendezvous (node 0's launcher hosts it) and this world's keys live under the prefix. Joining
    and every collective afterwards wait at most `timeout_s` for the peers; a join that fails
    (a peer never came, the store is unreachable) is WorldBroken too: the peers are at fault, and
    the launcher counts only a rank's own deaths against it."""
    backend = "nccl" if device.startswith("cuda") else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)

    def join() -> None:
        if not store_prefix:
            dist.init_process_group(
                backend, init_method=f"tcp://{init_addr}", rank=layout.tp_rank, world_size=layout.tp_size, timeout=timeout
            )
            return
        host, _, port = init_addr.rpartition(":")
        client = dist.TCPStore(host.strip("[]"), int(port), is_master=False, timeout=timeout)
        store = dist.PrefixStore(store_prefix, client)
        dist.init_process_group(backend, store=store, rank=layout.tp_rank, world_size=layout.tp_size, timeout=timeout)

    collective("join the world", join)


class GroupSync:
    def __init__(self, layout: ParallelLayout, attn_group: dist.ProcessGroup | None, device: str = "cpu") -> None:
        self.layout = layout
        self.group = attn_group  # None: the whole world is the group
        self.leader = layout.group_index * layout.attn_tp_size  # global rank of the group's leader
        # NCCL moves CUDA tensors only; gloo CPU ones
        self.device = torch.device(device if device.startswith("cuda") else "cpu")

    def _broadcast_bytes(self, payload: bytes | None) -> bytes:
        n = torch.tensor([len(payload) if payload is not None else 0], dtype=torch.int64, device=self.device)
        dist.broadcast(n, src=self.leader, group=self.group)
        if payload is not None:
            buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(self.device)
        else:
            buf = torch.empty(int(n.item()), dtype=torch.uint8, device=self.device)
        if buf.numel():
            dist.broadcast(buf, src=self.leader, group=self.group)
        return payload if payload is not None else bytes(buf.cpu().numpy().tobytes())

    def share_inputs(self, inputs: StepInputs | None) -> StepInputs:
        """Leader: passes `inputs` (required); followers: pass None and get the leader's."""
        if self.layout.attn_tp_size == 1:
            assert inputs is not None
            return inputs
        if self.layout.is_leader:
            assert inputs is not None
            payload = _encoder.encode(inputs)
            collective("share_inputs", lambda: self._broadcast_bytes(payload))
            return inputs
        return _decoder.decode(collective("share_inputs", lambda: self._broadcast_bytes(None)))

    def gather_counts(self, num_tokens: int) -> list[int]:
        """Tokens of each DP group this step (index: group), the same list on every rank."""
        if self.layout.dp_groups == 1:
            return [num_tokens]
        mine = torch.tensor([num_tokens], dtype=torch.int64, device=self.device)
        parts = [torch.empty_like(mine) for _ in range(self.layout.tp_size)]
        collective("gather_counts", lambda: dist.all_gather(parts, mine))
        return [int(parts[g * self.layout.attn_tp_size].item()) for g in range(self.layout.dp_groups)]

    def share_tokens(self, tokens: list[int]) -> list[int]:
        """The leader's sampled ids for the step's emitting rows (same count on every group rank)."""
        if self.layout.attn_tp_size == 1 or not tokens:
            return tokens
        t = torch.tensor(tokens, dtype=torch.int64, device=self.device)
        collective("share_tokens", lambda: dist.broadcast(t, src=self.leader, group=self.group))
        return [int(v) for v in t.tolist()]
