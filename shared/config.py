"""Server arguments: SGLang's flag names, every flag also settable as env `DPSERVE_<FLAG>`.

One frozen dataclass built once per process. Each service reads the fields it needs; the launcher
passes the same flags on to every child, and containers set them through the environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

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

DISAGGREGATION_MODES = ("null", "prefill", "decode")
TRANSFER_BACKENDS = ("gloo",)

# auto: triton on CUDA, torch elsewhere (services.scheduler.model.attention_backends).
ATTENTION_BACKENDS = ("auto", "torch", "triton")

# SGLang's --dtype values (services.scheduler.model.loader.serving_dtype resolves auto).
DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")

SCHEDULE_POLICIES = ("fcfs", "lpm")

# --device sim's GPU profiles (services.scheduler.sim.cost.HARDWARE).
SIM_HARDWARE = ("a100", "h100", "h200", "h20")

# `--help` sections, in order: title -> what the section covers.
GROUPS = {
    "model": "what is served and how it computes",
    "server": "the gateway's HTTP address and every service's log",
    "parallelism": "SGLang's DP/TP layout; `serve` sets the per-rank flags for its children",
    "scheduling": "each rank's batch, KV cache and queue limits",
    "load balancing": "how the dispatcher picks a DP rank for a request",
    "bus": "the NATS connection every service shares",
    "security": "API key, NATS credentials and TLS; `serve` hands secrets to children as env vars, never argv",
    "reliability": "timeouts, liveness and recovery",
    "disaggregation": "prefill and decode on separate DP ranks: `serve --prefill-dp-size P --decode-dp-size D`",
    "multi-node": "one deployment across machines: `serve` on every node, the same layout flags, its own "
    "--node-rank; node 0's address in --dist-init-addr",
}


def arg(default: T, help: str, group: str, choices: tuple[str, ...] | None = None, secret: bool = False) -> T:
    """A ServerArgs field: its default, its one-line `--help` text (what it does, in which unit) and
    its `--help` section. A secret's value never shows in `--help` nor in a child's argv."""
    if group not in GROUPS:
        raise ValueError(f"unknown group {group!r}")
    return field(default=default, metadata={"help": help, "group": group, "choices": choices, "secret": secret})


@dataclass(frozen=True)
class ServerArgs:
    # model
    model_path: str = arg("", "The path of the model weights: a Hugging Face checkpoint directory or a .gguf "
                          "file; empty: the default model (SmolLM2-135M-Instruct)", "model")
    served_model_name: str = arg("", "Override the model name returned by /v1/models; empty: the name of "
                                 "--model-path", "model")
    context_length: int = arg(0, "The model's maximum context length in tokens; 0: max_position_embeddings "
                              "of its config.json", "model")
    dtype: str = arg("auto", "Data type for model weights and activations; auto: the checkpoint's half type "
                     "where the device computes it natively, else float32", "model", choices=DTYPES)
    device: str = arg("cpu", "The device to use (cpu, cuda, cuda:N; sim: no model, each step sleeps for a "
                      "roofline model's time on --sim-hardware; needs config.json and a tokenizer only)", "model")
    sim_hardware: str = arg("h100", "--device sim: the simulated GPU (its FLOP/s, HBM bandwidth, memory and "
                            "links)", "model", choices=SIM_HARDWARE)
    sim_time_scale: float = arg(1.0, "--device sim: sleep this many times the modeled step time (> 1 slows "
                                "the simulation so the scheduler's CPU time weighs less; divide latencies "
                                "by it)", "model")
    attention_backend: str = arg("auto", "Choose the kernels for attention layers; auto: triton on CUDA, "
                                 "torch elsewhere", "model", choices=ATTENTION_BACKENDS)
    torch_threads: int = arg(0, "CPU threads per scheduler process; 0: serve divides the cores among its "
                             "ranks, a service started alone keeps torch's default", "model")
    # server
    host: str = arg("127.0.0.1", "The host of the HTTP server (on several nodes, 127.0.0.1 means node 0's "
                    "--node-addr: nothing binds loopback there)", "server")
    port: int = arg(30000, "The port of the HTTP server", "server")
    log_level: str = arg("info", "The logging level of all services (debug, info, warning, error)", "server")
    # parallelism
    dp_size: int = arg(1, "The data parallelism size: scheduler replicas (DP ranks)", "parallelism")
    tp_size: int = arg(1, "The tensor parallelism size: ranks per replica, or in total with "
                       "--enable-dp-attention", "parallelism")
    enable_dp_attention: bool = arg(False, "Data parallelism for attention, tensor parallelism for FFN: "
                                    "tp_size ranks in one world, dp_size attention groups", "parallelism")
    dp_rank: int = arg(-1, "Scheduler only: the DP rank this process serves; -1: ask the dispatcher's rank "
                       "registry", "parallelism")
    tp_rank: int = arg(0, "Scheduler only: the rank in its torch.distributed world (serve sets it)",
                       "parallelism")
    dist_init_addr: str = arg("", "host:port of node 0's rendezvous store (multi-node serve: every node gives "
                              "node 0's); a scheduler: its world's TCP store (serve sets it)", "parallelism")
    dist_store_prefix: str = arg("", "Scheduler only: its world's key prefix in node 0's rendezvous store at "
                                 "--dist-init-addr (multi-node serve sets it); empty: tp rank 0 hosts the "
                                 "world's own store there", "parallelism")
    dist_timeout: float = arg(30.0, "Seconds a torch.distributed collective may wait for a peer before the "
                              "rank exits", "parallelism")
    # scheduling
    max_running_requests: int = arg(64, "The maximum number of running requests per rank", "scheduling")
    max_total_tokens: int = arg(0, "The maximum number of tokens in each rank's KV pool; 0: from "
                                "--kv-cache-bytes, --mem-fraction-static or the context length",
                                "scheduling")
    mem_fraction_static: float = arg(0.0, "The fraction of free device memory for the KV pool when "
                                     "--max-total-tokens is 0; 0: off", "scheduling")
    kv_cache_bytes: int = arg(0, "Each rank's KV pool budget in bytes when --max-total-tokens is 0; 0: off",
                              "scheduling")
    chunked_prefill_size: int = arg(8192, "The maximum number of tokens in a chunk for the chunked prefill "
                                    "(prompt tokens in one step, as in SGLang; with DP attention, divided by "
                                    "the DP groups); -1 or 0: off (a prompt is prefilled in one step)",
                                    "scheduling")
    max_prefill_tokens: int = arg(16384, "The maximum number of prompt tokens in one prefill step",
                                  "scheduling")
    schedule_policy: str = arg("fcfs", "The scheduling policy of the requests; lpm: longest prefix match "
                               "first", "scheduling", choices=SCHEDULE_POLICIES)
    disable_radix_cache: bool = arg(False, "Disable the radix (prefix) cache", "scheduling")
    max_queued_requests: int = arg(1024, "Gateway: requests in progress before it answers 503",
                                   "scheduling")
    max_queued_requests_per_rank: int = arg(0, "Scheduler: waiting requests before it rejects with 429; "
                                            "0: unbounded", "scheduling")
    # load balancing
    load_balance_method: str = arg("minimum_tokens", "The load balancing strategy for data parallelism",
                                   "load balancing", choices=LOAD_BALANCE_METHODS)
    cache_threshold: float = arg(0.5, "Cache threshold (0.0-1.0) for cache-aware routing: route by prefix "
                                 "when the best match ratio exceeds it", "load balancing")
    balance_abs_threshold: int = arg(32, "cache_aware: balance by load when max - min load (requests) "
                                     "exceeds this and --balance-rel-threshold holds", "load balancing")
    balance_rel_threshold: float = arg(1.0001, "cache_aware: balance by load when max load exceeds min load "
                                       "times this and --balance-abs-threshold holds", "load balancing")
    max_tree_size: int = arg(1 << 22, "cache_aware: tokens kept in each rank's approximate prefix tree "
                             "(LRU)", "load balancing")
    # bus
    nats_url: str = arg("", "The NATS server URL (nats://host:4222), or several comma-separated, tried in "
                        "order; empty: serve starts an embedded nats-server, a service alone uses "
                        "nats://127.0.0.1:4222", "bus")
    nats_subject_prefix: str = arg("dpserve", "Prefix of every NATS subject, so deployments can share a "
                                   "server", "bus")
    # security
    api_key: str = arg("", "Set API key of the server: every route but /health needs `Authorization: Bearer "
                       "<key>`", "security", secret=True)
    nats_user: str = arg("", "NATS user name (with --nats-password)", "security")
    nats_password: str = arg("", "NATS password (with --nats-user)", "security", secret=True)
    nats_token: str = arg("", "NATS token (instead of --nats-user/--nats-password)", "security", secret=True)
    nats_tls_cert: str = arg("", "Client certificate file (mutual TLS), also the embedded server's "
                             "certificate", "security")
    nats_tls_key: str = arg("", "Private key file of --nats-tls-cert", "security")
    nats_tls_ca: str = arg("", "CA certificate file that signed the NATS server's certificate (clients "
                           "verify against it)", "security")
    # reliability
    request_timeout: float = arg(600.0, "Seconds before the gateway ends a request with an error",
                                 "reliability")
    heartbeat_interval: float = arg(0.1, "Seconds between a rank's load reports when nothing changes",
                                    "reliability")
    dead_rank_timeout: float = arg(1.0, "Seconds without a load report before a rank counts as dead",
                                   "reliability")
    disable_migration: bool = arg(False, "Fail a dead rank's running requests instead of migrating them to "
                                  "a live rank", "reliability")
    shutdown_grace_period: float = arg(10.0, "Seconds running requests may take to finish after SIGTERM",
                                       "reliability")
    max_start_failures: int = arg(3, "serve: a process that dies this many times in a row, each time within "
                                  "a minute of its start, ends the deployment with its name and last log "
                                  "lines (earlier deaths are restarted)", "reliability")
    # multi-node
    nnodes: int = arg(1, "The number of nodes (machines) of the deployment; serve on each starts its share "
                      "of the scheduler ranks", "multi-node")
    node_rank: int = arg(0, "This node's index in [0, --nnodes); node 0 also runs the gateway, tokenizer, "
                         "dispatcher and detokenizer", "multi-node")
    node_addr: str = arg("", "The address this node's servers bind and advertise (nats-server, gloo, node 0's "
                         "rendezvous store); empty: the source address of the route to the --dist-init-addr "
                         "host", "multi-node")
    nats_port: int = arg(0, "The embedded nats-server's client port; 0: a free port on one node, 4222 on "
                         "several", "multi-node")
    nats_cluster_port: int = arg(6222, "The embedded nats-server's cluster port, where the other nodes' "
                                 "servers route to it (several nodes only)", "multi-node")
    nats_routes: str = arg("", "Comma-separated nats://host:port cluster routes this node's nats-server "
                           "joins; empty: node 0's (the --dist-init-addr host, --nats-cluster-port)",
                           "multi-node")
    gloo_socket_ifname: str = arg("", "The network interface gloo binds on this node (the ranks' "
                                  "GLOO_SOCKET_IFNAME); empty: the interface that holds --node-addr",
                                  "multi-node")
    # disaggregation
    disaggregation_mode: str = arg("null", "Scheduler: this world's role; prefill: it only prefills and ships the "
                                   "KV to a decode rank; decode: it takes prompts' KV from prefill ranks (short "
                                   "ones it prefills itself); null: both (serve sets it per side)",
                                   "disaggregation", choices=DISAGGREGATION_MODES)
    dp_rank_base: int = arg(0, "Scheduler only: the DP rank of its world's first DP group (the prefill side's "
                            "ranks follow the decode side's; serve sets it)", "disaggregation")
    prefill_dp_size: int = arg(0, "serve: DP ranks that only prefill (with --decode-dp-size; 0: colocated)",
                               "disaggregation")
    decode_dp_size: int = arg(0, "serve: DP ranks that decode (with --prefill-dp-size; 0: colocated)",
                              "disaggregation")
    prefill_tp_size: int = arg(0, "serve: the prefill side's --tp-size; 0: --tp-size", "disaggregation")
    decode_tp_size: int = arg(0, "serve: the decode side's --tp-size; 0: --tp-size", "disaggregation")
    prefill_enable_dp_attention: bool = arg(False, "serve: DP attention on the prefill side (--enable-dp-attention "
                                            "sets it on both)", "disaggregation")
    decode_enable_dp_attention: bool = arg(False, "serve: DP attention on the decode side (--enable-dp-attention "
                                           "sets it on both)", "disaggregation")
    disaggregation_transfer_backend: str = arg("gloo", "How the KV goes from a prefill rank to a decode rank: "
                                               "gloo (torch.distributed point-to-point, one pair per prefill/decode "
                                               "rank pair, over TCP)", "disaggregation", choices=TRANSFER_BACKENDS)
    disaggregation_min_prompt_tokens: int = arg(256, "Dispatcher: a prompt with fewer tokens not in the decode "
                                                "rank's cache is prefilled there, not sent to a prefill rank",
                                                "disaggregation")
    disaggregation_max_prefill_queue: int = arg(65536, "Dispatcher: when the least loaded prefill rank holds more "
                                                "tokens than this, the decode rank prefills locally; 0: no limit",
                                                "disaggregation")
    disaggregation_transfer_timeout: float = arg(300.0, "Decode rank: seconds a request waits for its prefill rank "
                                                 "(its queue, the prefill and the transfer) before it prefills "
                                                 "locally", "disaggregation")
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
        """One flag per field, in its `--help` section; the default comes from `DPSERVE_<FLAG>` if set."""
        groups = {name: parser.add_argument_group(name, about) for name, about in GROUPS.items()}
        for f in dataclasses.fields(cls):
            if f.name == "extra":
                continue
            flag = "--" + f.name.replace("_", "-")
            env = "DPSERVE_" + f.name.upper()
            default = os.environ.get(env, f.default)
            text = f.metadata["help"].replace("%", "%%")
            if f.metadata["secret"]:  # never print the value
                text += f" (env {env}: set)" if default else f" (env {env})"
            else:
                shown = "%(default)s" if default != "" else '""'
                text += f" (default: {shown}; env {env})"
            group = groups[f.metadata["group"]]
            kind = type(f.default)
            if kind is bool:
                group.add_argument(flag, action="store_true", default=_as_bool(default), help=text)
            else:
                group.add_argument(flag, type=kind, default=kind(default), choices=f.metadata["choices"],
                                   help=text)

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> ServerArgs:
        names = {f.name for f in dataclasses.fields(cls)}
        args = cls(**{k: v for k, v in vars(ns).items() if k in names})
        args.validate()
        return args

    @classmethod
    def parse(cls, argv: list[str] | None = None, prog: str | None = None) -> ServerArgs:
        parser = argparse.ArgumentParser(prog=prog, usage="%(prog)s [-h] [FLAG VALUE ...]")
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
        if self.sim_hardware not in SIM_HARDWARE:
            raise ValueError(f"unknown --sim-hardware {self.sim_hardware} ({' | '.join(SIM_HARDWARE)})")
        if self.sim_time_scale <= 0:
            raise ValueError("--sim-time-scale must be > 0")
        if self.schedule_policy not in SCHEDULE_POLICIES:
            raise ValueError(f"unknown --schedule-policy {self.schedule_policy} ({' | '.join(SCHEDULE_POLICIES)})")
        if self.nats_token and (self.nats_user or self.nats_password):
            raise ValueError("give --nats-token or --nats-user/--nats-password, not both")
        if bool(self.nats_tls_cert) != bool(self.nats_tls_key):
            raise ValueError("--nats-tls-cert and --nats-tls-key go together")
        if self.max_queued_requests_per_rank < 0:
            raise ValueError("--max-queued-requests-per-rank must be >= 0 (0: unbounded)")
        if not 0 <= self.mem_fraction_static < 1 or self.max_prefill_tokens < 1:
            raise ValueError("--mem-fraction-static must be in [0, 1) and --max-prefill-tokens >= 1")
        if self.max_start_failures < 1:
            raise ValueError("--max-start-failures must be >= 1")
        self._validate_disaggregation()
        self._validate_nodes()

    @property
    def disaggregated(self) -> bool:
        """serve runs separate prefill and decode ranks (--prefill-dp-size / --decode-dp-size)."""
        return self.prefill_dp_size > 0 or self.decode_dp_size > 0

    @property
    def scheduler_processes(self) -> int:
        """How many scheduler processes serve runs: tp_size with DP attention, else tp_size x
        dp_size; with prefill and decode apart, the two sides' counts added, each side by its own
        --*-tp-size / --*-enable-dp-attention (else the deployment's; in one side's scheduler,
        --enable-dp-attention is that side's, so the other side's comes from its own flag only)."""
        if not self.disaggregated:
            return self.tp_size if self.enable_dp_attention else self.tp_size * self.dp_size
        both = self.enable_dp_attention and self.disaggregation_mode == "null"
        total = 0
        for dp, tp, dpa in ((self.prefill_dp_size, self.prefill_tp_size, self.prefill_enable_dp_attention),
                            (self.decode_dp_size, self.decode_tp_size, self.decode_enable_dp_attention)):
            tp = tp or self.tp_size
            total += tp if dpa or both else tp * dp
        return total

    def _validate_disaggregation(self) -> None:
        if self.disaggregation_mode not in DISAGGREGATION_MODES:
            raise ValueError(f"unknown --disaggregation-mode {self.disaggregation_mode} ({' | '.join(DISAGGREGATION_MODES)})")
        if self.prefill_dp_size < 0 or self.decode_dp_size < 0 or self.prefill_tp_size < 0 or self.decode_tp_size < 0:
            raise ValueError("--prefill-dp-size, --decode-dp-size and the sides' --*-tp-size must be >= 0")
        if self.disaggregated and not (self.prefill_dp_size and self.decode_dp_size):
            raise ValueError("--prefill-dp-size and --decode-dp-size go together (each >= 1)")
        if self.dp_rank_base < 0:
            raise ValueError("--dp-rank-base must be >= 0")
        if self.disaggregation_transfer_timeout <= 0 or self.disaggregation_min_prompt_tokens < 0:
            raise ValueError("--disaggregation-transfer-timeout must be > 0, --disaggregation-min-prompt-tokens >= 0")
        if self.disaggregation_max_prefill_queue < 0:
            raise ValueError("--disaggregation-max-prefill-queue must be >= 0 (0: no limit)")

    def _validate_nodes(self) -> None:
        if self.nnodes < 1 or not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--node-rank {self.node_rank} must be in [0, --nnodes {self.nnodes})")
        if self.nnodes == 1:
            return
        host, _, port = self.dist_init_addr.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError("--nnodes > 1 needs --dist-init-addr HOST:PORT (node 0's address, every node the same)")
        ranks = self.scheduler_processes
        if ranks % self.nnodes:
            raise ValueError(f"--nnodes {self.nnodes} must divide the {ranks} scheduler ranks (each node an equal share)")

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


# ("api_key", "nats_password", "nats_token")
SECRET_FIELDS = tuple(f.name for f in dataclasses.fields(ServerArgs) if f.metadata.get("secret"))


def _as_bool(value: object) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)
