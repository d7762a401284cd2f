"""Server arguments: SGLang's flag names, every flag also settable as env `DPSERVE_<FLAG>`.

One frozen dataclass built once per process. Each service reads the fields it needs; the launcher
passes the same flags on to every child, and containers set them through the environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

LOAD_BALANCE_METHODS = (
    "round_robin",
    "total_requests",
    "shortest_queue",
    "total_tokens",
    "minimum_tokens",
    "power_of_two",
    "random",
    "cache_aware",
)

# auto: triton on CUDA, torch elsewhere (services.scheduler.model.attention_backends).
ATTENTION_BACKENDS = ("auto", "torch", "triton")

# SGLang's --dtype values (services.scheduler.model.loader.serving_dtype resolves auto).
DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")


@dataclass(frozen=True)
class ServerArgs:
    model_path: str = ""  # empty: the tiny model dpserve creates in its cache dir
    served_model_name: str = ""
    host: str = "127.0.0.1"
    port: int = 30000
    nats_url: str = ""  # empty for `serve`: start an embedded nats-server
    nats_subject_prefix: str = "dpserve"
    dp_size: int = 1
    tp_size: int = 1
    dp_rank: int = -1  # scheduler only: which DP rank this process serves; -1: ask the rank registry
    enable_dp_attention: bool = False  # tp_size ranks in one world, dp_size attention groups (SGLang's)
    tp_rank: int = 0  # scheduler only: rank in its torch.distributed world (the launcher sets it)
    dist_init_addr: str = ""  # scheduler only: host:port of the world's TCP store (the launcher sets it)
    dist_timeout: float = 30.0  # seconds a torch.distributed collective may wait for a peer before the rank exits
    load_balance_method: str = "minimum_tokens"
    cache_threshold: float = 0.5  # cache_aware: route by prefix when the best match ratio exceeds this
    balance_abs_threshold: int = 32  # cache_aware: imbalanced when max - min load (requests) exceeds this
    balance_rel_threshold: float = 1.0001  # ... and max load exceeds min load times this
    max_tree_size: int = 1 << 22  # cache_aware: tokens kept per rank's approximate prefix tree (LRU)
    max_running_requests: int = 64
    max_total_tokens: int = 0  # 0: derived from the model's context length
    mem_fraction_static: float = 0.0  # >0 and no --max-total-tokens: KV pool = this share of free memory
    kv_cache_bytes: int = 0  # >0 and no --max-total-tokens: each rank's KV pool budget in bytes
    chunked_prefill_size: int = 8192  # -1 or 0: off (a prompt is prefilled in one step)
    max_prefill_tokens: int = 16384  # prompt tokens one step may feed
    schedule_policy: str = "fcfs"  # fcfs | lpm (longest prefix match first)
    disable_radix_cache: bool = False
    context_length: int = 0  # 0: the model's max_position_embeddings
    max_queued_requests: int = 1024  # gateway: requests in progress before it answers 503
    request_timeout: float = 600.0  # seconds before the gateway ends a request with an error
    heartbeat_interval: float = 0.1  # seconds between load reports when nothing changes
    dead_rank_timeout: float = 1.0  # seconds without a load report before a rank is dead
    disable_migration: bool = False  # a dead rank's running requests fail instead of migrating
    shutdown_grace_period: float = 10.0  # SIGTERM: seconds running requests may take to finish
    torch_threads: int = 0  # 0: torch's default
    dtype: str = "auto"  # auto: the checkpoint's half type where the device computes it natively, else float32
    device: str = "cpu"
    attention_backend: str = "auto"
    log_level: str = "info"
    # security (README "Security"): secrets travel to child processes in the environment, never argv
    api_key: str = ""  # gateway: every route but /health needs `Authorization: Bearer <key>`
    nats_user: str = ""
    nats_password: str = ""
    nats_token: str = ""
    nats_tls_cert: str = ""  # client certificate (mutual TLS), and the embedded server's certificate
    nats_tls_key: str = ""
    nats_tls_ca: str = ""  # CA that signed the server's certificate (clients verify against it)
    max_queued_requests_per_rank: int = 0  # scheduler: waiting requests before it rejects with 429; 0: off
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def subject_prefix(self) -> str:
        return self.nats_subject_prefix

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        return os.path.basename(os.path.normpath(self.model_path)) if self.model_path else "dpserve-tiny"

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        for f in dataclasses.fields(cls):
            if f.name == "extra":
                continue
            flag = "--" + f.name.replace("_", "-")
            env = "DPSERVE_" + f.name.upper()
            default = os.environ.get(env, f.default)
            kind = type(f.default)
            if kind is bool:
                parser.add_argument(flag, action="store_true", default=_as_bool(default))
            else:
                kwargs: dict[str, Any] = {"type": kind, "default": kind(default)}
                if f.name == "load_balance_method":
                    kwargs["choices"] = LOAD_BALANCE_METHODS
                if f.name == "attention_backend":
                    kwargs["choices"] = ATTENTION_BACKENDS
                if f.name == "dtype":
                    kwargs["choices"] = DTYPES
                parser.add_argument(flag, **kwargs, help=f"(env {env})")

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> ServerArgs:
        names = {f.name for f in dataclasses.fields(cls)}
        args = cls(**{k: v for k, v in vars(ns).items() if k in names})
        args.validate()
        return args

    @classmethod
    def parse(cls, argv: list[str] | None = None, prog: str | None = None) -> ServerArgs:
        parser = argparse.ArgumentParser(prog=prog)
        cls.add_cli_args(parser)
        return cls.from_namespace(parser.parse_args(argv))

    def validate(self) -> None:
        """Raises ValueError naming the flag for a value no service could run with."""
        if self.dp_size < 1 or self.tp_size < 1:
            raise ValueError("--dp-size and --tp-size must be >= 1")
        if not (self.dp_rank == -1 or 0 <= self.dp_rank < self.dp_size):
            raise ValueError(f"--dp-rank {self.dp_rank} is outside [0, {self.dp_size}) (-1: ask the registry)")
        if self.enable_dp_attention and self.tp_size % self.dp_size:
            raise ValueError(f"--enable-dp-attention needs --tp-size ({self.tp_size}) divisible by --dp-size ({self.dp_size})")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"--tp-rank {self.tp_rank} is outside [0, {self.tp_size})")
        if self.dist_timeout <= 0:
            raise ValueError("--dist-timeout must be > 0 (seconds)")
        if self.kv_cache_bytes < 0:
            raise ValueError("--kv-cache-bytes must be >= 0")
        if not 0 <= self.cache_threshold <= 1:
            raise ValueError("--cache-threshold must be in [0, 1]")
        if self.balance_abs_threshold < 0 or self.balance_rel_threshold < 1:
            raise ValueError("--balance-abs-threshold must be >= 0 and --balance-rel-threshold >= 1")
        if self.max_tree_size < 1:
            raise ValueError("--max-tree-size must be >= 1")
        if self.load_balance_method not in LOAD_BALANCE_METHODS:
            raise ValueError(f"unknown --load-balance-method {self.load_balance_method}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown --attention-backend {self.attention_backend}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown --dtype {self.dtype} ({' | '.join(DTYPES)})")
        if self.schedule_policy not in ("fcfs", "lpm"):
            raise ValueError(f"unknown --schedule-policy {self.schedule_policy} (fcfs | lpm)")
        if self.nats_token and (self.nats_user or self.nats_password):
            raise ValueError("give --nats-token or --nats-user/--nats-password, not both")
        if bool(self.nats_tls_cert) != bool(self.nats_tls_key):
            raise ValueError("--nats-tls-cert and --nats-tls-key go together")
        if self.max_queued_requests_per_rank < 0:
            raise ValueError("--max-queued-requests-per-rank must be >= 0 (0: unbounded)")
        if not 0 <= self.mem_fraction_static < 1 or self.max_prefill_tokens < 1:
            raise ValueError("--mem-fraction-static must be in [0, 1) and --max-prefill-tokens >= 1")

    def secret_env(self) -> dict[str, str]:
        """The secrets as `DPSERVE_*` env vars: `to_cli` leaves them out so `ps` never shows them."""
        return {"DPSERVE_" + name.upper(): getattr(self, name) for name in SECRET_FIELDS if getattr(self, name)}

    def to_cli(self, **overrides: Any) -> list[str]:
        """The flags that reproduce these args (with overrides) in a child process, secrets aside
        (pass `secret_env()` in the child's environment)."""
        out: list[str] = []
        values = dataclasses.asdict(self) | overrides
        for f in dataclasses.fields(self):
            if f.name == "extra" or f.name in SECRET_FIELDS:
                continue
            value = values[f.name]
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                if value:
                    out.append(flag)
            else:
                out += [flag, str(value)]
        return out


SECRET_FIELDS = ("api_key", "nats_password", "nats_token")


def _as_bool(value: object) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)
