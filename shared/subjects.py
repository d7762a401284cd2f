"""Every NATS subject in one place. `ns` is the deployment namespace (`--nats-subject-prefix`)."""

from __future__ import annotations

from dataclasses import dataclass

TOKENIZER_QUEUE = "tokenizer"
DETOKENIZER_QUEUE = "detokenizer"


@dataclass(frozen=True)
class Subjects:
    ns: str = "dpserve"

    @property
    def tokenize(self) -> str:  # gateway -> tokenizer (queue group)
        return f"{self.ns}.tokenize"

    @property
    def tokenize_text(self) -> str:  # gateway -> tokenizer (request/reply, queue group): /tokenize
        return f"{self.ns}.tokenize.text"

    @property
    def detokenize_ids(self) -> str:  # gateway -> tokenizer (request/reply, queue group): /detokenize
        return f"{self.ns}.tokenize.ids"

    @property
    def dispatch(self) -> str:  # tokenizer -> dispatcher
        return f"{self.ns}.dispatch"

    def sched_req(self, dp_rank: int) -> str:  # dispatcher -> DP group leader
        return f"{self.ns}.sched.{dp_rank}.req"

    def sched_prefill(self, dp_rank: int) -> str:  # decode rank -> prefill rank: PrefillTask
        return f"{self.ns}.sched.{dp_rank}.prefill"

    def sched_kv(self, dp_rank: int) -> str:  # prefill rank -> decode rank: PrefillDone
        return f"{self.ns}.sched.{dp_rank}.kv"

    @property
    def sched_control(self) -> str:  # dispatcher / gateway -> all schedulers
        return f"{self.ns}.sched.control"

    def load(self, dp_rank: int) -> str:  # DP group leader -> dispatcher
        return f"{self.ns}.load.{dp_rank}"

    @property
    def load_all(self) -> str:
        return f"{self.ns}.load.*"

    @property
    def detok(self) -> str:  # scheduler leader -> detokenizer (queue group)
        return f"{self.ns}.detok"

    def out(self, gateway_id: str) -> str:  # detokenizer / any service -> gateway
        return f"{self.ns}.out.{gateway_id}"

    @property
    def rank_register(self) -> str:  # scheduler -> dispatcher (request/reply)
        return f"{self.ns}.rank.register"

    @property
    def dispatcher_loads(self) -> str:  # gateway -> dispatcher (request/reply): the load table
        return f"{self.ns}.dispatcher.loads"

    @property
    def dispatcher_resume(self) -> str:  # gateway -> dispatcher (request/reply): Resume a request
        return f"{self.ns}.dispatcher.resume"

    @property
    def metrics(self) -> str:  # every service -> gateways: MetricsSnapshot (shared/metrics.py)
        return f"{self.ns}.metrics"

    @property
    def nodes(self) -> str:  # each node's launcher -> node 0's launcher: NodeReport (multi-node)
        return f"{self.ns}.launcher.nodes"

    @property
    def world_epochs(self) -> str:  # node 0's launcher -> every launcher: WorldEpochs
        return f"{self.ns}.launcher.epochs"

    @property
    def world_down(self) -> str:  # a node's launcher -> node 0's: WorldDown
        return f"{self.ns}.launcher.down"

    @property
    def launcher_stop(self) -> str:  # any node's launcher -> every launcher: LauncherStop
        return f"{self.ns}.launcher.stop"
