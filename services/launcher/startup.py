"""What `dpserve serve` shows while it starts: a progress bar on stderr, then a summary on stdout.

Progress counts the DP ranks that have loaded their model and reported (`/get_server_info`'s
`internal_states`) out of `dp_size` (both sides' ranks when prefill and decode are apart); on a terminal it redraws one line, otherwise it prints a line
whenever the count changes.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from typing import Any, TextIO

from services.launcher.layout import sides
from shared.config import ServerArgs

BAR = 30


def server_info(url: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(url + "/get_server_info", timeout=2) as resp:
            data = json.loads(resp.read())
            return data if isinstance(data, dict) else None
    except (urllib.error.URLError, OSError, ValueError):
        return None


class Progress:
    def __init__(self, total: int, label: str, out: TextIO = sys.stderr) -> None:
        self.total, self.label, self.out = total, label, out
        self.start = time.monotonic()
        self.last = -1
        self.tty = out.isatty()

    def update(self, done: int) -> None:
        done = min(done, self.total)
        if not self.tty and done == self.last:
            return
        filled = BAR * done // max(1, self.total)
        line = f"{self.label} [{'#' * filled}{'.' * (BAR - filled)}] {done}/{self.total} {time.monotonic() - self.start:5.1f}s"
        self.out.write(("\r" + line) if self.tty else line + "\n")
        self.out.flush()
        self.last = done

    def close(self) -> None:
        if self.tty:
            self.out.write("\n")
            self.out.flush()


def summary(args: ServerArgs, url: str, info: dict[str, Any] | None) -> str:
    states = (info or {}).get("internal_states") or []
    kv = [int(s.get("max_total_num_tokens", 0)) for s in states]
    kv_text = f"{min(kv)} tokens per rank, {sum(kv)} in all" if kv else "unknown (no rank reported yet)"
    lines = [
        f"dpserve is serving {args.model_name} at {url} (dp_size={args.dp_size})",
        f"  model        {args.model_path}",
        f"  ranks        {shape(args)}, load balance {args.load_balance_method}, {len(states)} live",
        f"  KV capacity  {kv_text}",
        f"  bus          {args.nats_url} (subjects {args.subject_prefix}.*)",
        *([f"  nodes        {args.nnodes}, rendezvous at {args.dist_init_addr}; DP ranks on each: {per_node(states)}"]
          if args.nnodes > 1 else []),
        f"  API          {url}/generate  {url}/v1/chat/completions  {url}/v1/completions  {url}/metrics",
    ]
    return "\n".join(lines)


def shape(args: ServerArgs) -> str:
    """`2 DP x 1 TP`, or each side's: `decode 2 DP x 1 TP, prefill 1 DP x 1 TP`."""
    if not args.disaggregated:
        return f"{args.dp_size} DP x {args.tp_size} TP"
    return ", ".join(f"{side.mode} {side.shape}" for side in sides(args))


def per_node(states: list[dict[str, Any]]) -> str:
    """`node 0: [0], node 1: [1]` from internal_states (a DP rank's node is its leader's)."""
    nodes: dict[int, list[int]] = {}
    for state in states:
        nodes.setdefault(int(state.get("node_rank", 0)), []).append(int(state["dp_rank"]))
    return ", ".join(f"node {n}: {sorted(ranks)}" for n, ranks in sorted(nodes.items()))
