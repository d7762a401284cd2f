"""Every message that crosses the bus, as msgspec Structs encoded with msgpack.

One boundary per section. Structs are `kw_only` and `omit_defaults` so that fields can be added
later without breaking older peers; control messages form a tagged union.
"""

from __future__ import annotations

import math

import msgspec
from msgspec import Struct, field

GREEDY_TEMPERATURE = 1e-5
# the sampling params a model's generation_config.json may set, used where a request leaves them unset
MODEL_SAMPLING_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


class SamplingParams(Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """SGLang's `sampling_params`, with SGLang's defaults."""

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: the whole vocabulary
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    seed: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit (OpenAI's)
    no_stop_trim: bool = False  # keep the matched stop string / stop token's text in the output
    # structured output (services/scheduler/grammar.py): at most one; the output must match it
    json_schema: str | None = None  # a JSON Schema, as JSON text
    regex: str | None = None
    ebnf: str | None = None  # a GBNF grammar (root rule `root`)

    def problem(self) -> str | None:
        """Returns what is wrong with these parameters, or None."""
        floats = (self.temperature, self.top_p, self.min_p, self.frequency_penalty, self.presence_penalty,
                  self.repetition_penalty)
        if not all(math.isfinite(x) for x in floats):
            return "sampling parameters must be finite numbers (no NaN or infinity)"
        if self.seed is not None and not 0 <= self.seed < 2**63:
            return "seed must be in [0, 2**63)"
        if self.max_new_tokens < 0:
            return "max_new_tokens must be >= 0"
        if self.min_new_tokens < 0 or self.min_new_tokens > self.max_new_tokens:
            return "min_new_tokens must be between 0 and max_new_tokens"
        if self.temperature < 0:
            return "temperature must be >= 0"
        if not 0 < self.top_p <= 1:
            return "top_p must be in (0, 1]"
        if self.top_k == 0 or self.top_k < -1:
            return "top_k must be -1 (disabled) or >= 1"
        if not 0 <= self.min_p <= 1:
            return "min_p must be in [0, 1]"
        if not -2 <= self.frequency_penalty <= 2:
            return "frequency_penalty must be in [-2, 2]"
        if not -2 <= self.presence_penalty <= 2:
            return "presence_penalty must be in [-2, 2]"
        if not 0 < self.repetition_penalty <= 2:
            return "repetition_penalty must be in (0, 2]"
        if any(not s for s in self.stop):
            return "stop strings must not be empty"
        if any(t < 0 for t in self.stop_token_ids):
            return "stop_token_ids must be >= 0"
        if any(t < 0 or not -100 <= b <= 100 for t, b in self.logit_bias.items()):  # NaN fails too
            return "logit_bias maps token ids >= 0 to biases in [-100, 100]"
        if sum(x is not None for x in (self.json_schema, self.regex, self.ebnf)) > 1:
            return "at most one of json_schema, regex and ebnf may be given"
        return None

    @property
    def grammar(self) -> tuple[str, str] | None:
        """The output constraint as (kind, source), kind "json_schema" | "regex" | "ebnf"; or None."""
        for kind in ("json_schema", "regex", "ebnf"):
            source = getattr(self, kind)
            if source is not None:
                return kind, source
        return None

    @property
    def greedy(self) -> bool:
        # below GREEDY_TEMPERATURE, logits / temperature overflows: such a request is greedy
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1


# --- gateway -> tokenizer -------------------------------------------------------------------


class ToolCall(Struct, kw_only=True, omit_defaults=True):
    """A function call an assistant message made (OpenAI's `tool_calls[i]`, flattened)."""

    id: str = ""
    name: str
    arguments: str = "{}"  # JSON text, as OpenAI sends it


class ChatMessage(Struct, kw_only=True, omit_defaults=True):
    """One OpenAI chat message, content flattened to text; the tokenizer renders the template
    (services/tokenizer/tools.py for the tool fields)."""

    role: str
    content: str = ""
    name: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)  # role "assistant"
    tool_call_id: str | None = None  # role "tool": the call this message answers


class GenerateRequest(Struct, kw_only=True, omit_defaults=True):
    rid: str
    gateway_id: str  # replies go to subjects.out(gateway_id)
    text: str | None = None
    input_ids: list[int] | None = None
    messages: list[ChatMessage] | None = None  # exactly one of text / input_ids / messages
    # with messages: the functions the model may call, as JSON text of OpenAI's `tools` list
    # ([{"type": "function", "function": {"name", "description", "parameters"}}]); None: no tools
    tools: str | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stream: bool = False
    routed_dp_rank: int | None = None
    created: float = 0.0  # wall-clock time the gateway received it
    # SGLang's /generate logprob options (top level, not sampling params)
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int = -1  # -1: no input logprobs
    first_seq: int = 0  # > 0 when the gateway submits a lost request again (a new seq epoch)
    # sampling params the client left unset, which the tokenizer fills from the model:
    # MODEL_SAMPLING_DEFAULTS from generation_config.json, "max_new_tokens" with the rest of the context
    unset_sampling: list[str] = field(default_factory=list)


# --- tokenizer -> dispatcher -> scheduler ---------------------------------------------------


class TokenizedRequest(Struct, kw_only=True, omit_defaults=True):
    rid: str
    gateway_id: str
    input_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stream: bool = False
    routed_dp_rank: int | None = None
    created: float = 0.0
    dispatch_id: int = 0  # set by the dispatcher; acknowledged in LoadReport.accepted
    # SGLang's /generate logprob options (top level, not sampling params)
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int = -1  # -1: no input logprobs
    # migration / recovery (services/gateway/migrate.py): output ids the request already generated
    # elsewhere (the scheduler feeds them as output: they count toward max_new_tokens, penalties and
    # stop checks) and the seq of its first TokenOutput (a new epoch, above every earlier seq)
    resume_output_ids: list[int] = field(default_factory=list)
    first_seq: int = 0
    # disaggregation (set by the dispatcher): the prefill rank that computes this prompt's KV and first
    # token for the decode rank it is sent to; None: the rank prefills it itself
    prefill_dp_rank: int | None = None
    prefill_bootstrap: str = ""  # that rank's bootstrap address, from its latest load report
    prefill_instance: str = ""  # and its instance


# --- scheduler leader -> detokenizer --------------------------------------------------------


class FinishReason(Struct, kw_only=True, omit_defaults=True):
    """SGLang's finish_reason: {"type": "stop", "matched": ...} / {"type": "length", ...}."""

    type: str  # "stop" | "length" | "abort"
    matched: int | str | None = None  # the stop token id or stop string that ended it
    length: int | None = None
    message: str | None = None
    status: int | None = None  # an abort the request itself caused (a bad constraint): HTTP status to answer


class TokenOutput(Struct, kw_only=True, omit_defaults=True):
    """One request's progress in one scheduler step.

    `ids` = up to `DETOK_CONTEXT` ids generated before this step, then the `num_new` new ones: the
    context lets a stateless detokenizer finish a character whose bytes began in earlier tokens.
    When the request finishes, `all_ids` holds every generated id so the final text is exact.
    """

    rid: str
    gateway_id: str
    seq: int  # 0, 1, 2, ... per request: the gateway restores order by it
    ids: list[int]
    num_new: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    skip_special_tokens: bool = True
    stop: list[str] = field(default_factory=list)
    no_stop_trim: bool = False  # the final text keeps the matched stop string / stop token's text
    finish: FinishReason | None = None
    all_ids: list[int] | None = None
    prefill: str = ""  # a decode rank's request: where its prompt was prefilled ("remote", "local")
    # with return_logprob: (logprob, token_id) pairs; input ones once (first output), output
    # ones for this output's new ids; top ones: the top_logprobs_num best per position
    input_token_logprobs: list[tuple[float | None, int]] | None = None
    input_top_logprobs: list[list[tuple[float, int]]] | None = None
    output_token_logprobs: list[tuple[float, int]] | None = None
    output_top_logprobs: list[list[tuple[float, int]]] | None = None


DETOK_CONTEXT = 4  # a UTF-8 character has at most 4 bytes, a token at least 1


class TokenBatch(Struct, kw_only=True):
    dp_rank: int
    outputs: list[TokenOutput]


# --- detokenizer / any service -> gateway ---------------------------------------------------


class TextOutput(Struct, tag="text", kw_only=True, omit_defaults=True):
    rid: str
    seq: int
    text: str  # the new text of this step
    new_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    finish: FinishReason | None = None
    full_text: str | None = None  # on finish: decode(all ids), the matched stop trimmed (unless no_stop_trim)
    # with return_logprob: (logprob, token_id) pairs; input ones once (first output), output
    # ones for this output's new ids; top ones: the top_logprobs_num best per position
    input_token_logprobs: list[tuple[float | None, int]] | None = None
    input_top_logprobs: list[list[tuple[float, int]]] | None = None
    output_token_logprobs: list[tuple[float, int]] | None = None
    output_top_logprobs: list[list[tuple[float, int]]] | None = None
    # with output logprobs: token id -> that token's bytes alone (special tokens included), for
    # every id in output_token_logprobs / output_top_logprobs; the gateway has no tokenizer
    token_bytes: dict[int, bytes] | None = None
    prefill: str = ""  # TokenOutput.prefill


class RequestError(Struct, tag="error", kw_only=True, omit_defaults=True):
    rid: str
    message: str
    status: int = 400  # HTTP status the gateway answers with
    migrate: bool = False  # the rank serving it died: the gateway may continue it elsewhere (Resume)


class TextBatch(Struct, kw_only=True):
    outputs: list[TextOutput | RequestError] = field(default_factory=list)


# --- scheduler leader -> dispatcher ---------------------------------------------------------


class LoadReport(Struct, kw_only=True, omit_defaults=True):
    dp_rank: int
    seq: int
    timestamp: float  # time.monotonic() of the sender (same-host comparisons only)
    holding_tokens: int  # running + waiting requests: prompt + generated so far
    num_running: int
    num_waiting: int
    kv_used: int
    kv_total: int
    cache_hit_rate: float = 0.0
    accepted: list[int] = field(default_factory=list)  # dispatch ids accepted since last report
    instance_id: str = ""  # changes when the rank process restarts
    finished: list[int] = field(default_factory=list)  # accepted dispatch ids that ended since last report
    node_rank: int = 0  # the node (--node-rank) the rank's leader runs on
    mode: str = "null"  # --disaggregation-mode: "prefill" ranks only take prefill tasks from decode ranks
    bootstrap_addr: str = ""  # a prefill rank: host:port where decode ranks open KV transfer pairs
    tasks_accepted: list[int] = field(default_factory=list)  # a prefill rank: dispatch ids of tasks taken since the last report

    def problem(self, dp_size: int) -> str | None:
        """What makes this report nonsense (it would corrupt a load table), or None. Schedulers send
        dp_rank in [0, dp_size), finite numbers, counts >= 0, kv_used <= kv_total, ids >= 0."""
        if not 0 <= self.dp_rank < dp_size:
            return f"dp_rank outside [0, {dp_size})"
        if not (math.isfinite(self.timestamp) and math.isfinite(self.cache_hit_rate)) or not 0 <= self.cache_hit_rate <= 1:
            return "timestamp / cache_hit_rate not finite or out of range"
        counts = (self.seq, self.holding_tokens, self.num_running, self.num_waiting, self.kv_used, self.kv_total)
        if min(counts) < 0 or self.kv_used > self.kv_total:
            return "negative counts or kv_used > kv_total"
        if any(d < 0 for d in self.accepted) or any(d < 0 for d in self.finished):
            return "negative dispatch ids"
        if self.node_rank < 0:
            return "negative node_rank"
        if self.mode not in ("null", "prefill", "decode"):
            return f"unknown mode {self.mode!r}"
        return None


# --- disaggregation: decode rank <-> prefill rank (control only: the KV goes over a transfer engine) ---


class PrefillTask(Struct, kw_only=True, omit_defaults=True):
    """Decode rank -> prefill rank: prefill `req`, ship the KV rows of its prompt from `skip` on
    (what the decode rank has cached) under `tag` on the pair `pair_key`, then answer PrefillDone."""

    req: TokenizedRequest
    decode_dp_rank: int
    pair_key: str
    tag: int
    skip: int
    nbytes: int  # the rows' size the decode rank expects (it checks the models agree)
    prefill_instance: str  # the instance it was meant for: a restarted rank refuses it


class PrefillDone(Struct, kw_only=True, omit_defaults=True):
    """Prefill rank -> decode rank, once prefilled: ok, the rows follow at once under `tag` on
    `pair_key` (the decode rank posts their receive now, or drains them if it gave up on the
    request), with the first token's output (logprobs included) and the sampler's generator state
    after drawing it; not ok, nothing follows."""

    rid: str
    tag: int
    ok: bool
    pair_key: str = ""
    nbytes: int = 0
    message: str = ""
    output: TokenOutput | None = None
    rng_state: bytes = b""
    cached_tokens: int = 0  # prompt tokens the prefill rank had cached


# --- control: dispatcher / gateway -> all schedulers ----------------------------------------


class Abort(Struct, tag="abort", kw_only=True):
    rid: str
    dp_rank: int | None = None  # set: only that rank aborts (and drops the rid if it arrives later)
    instance_id: str = ""  # set with dp_rank: only that instance of the rank (a restarted one is clean)


class FlushCache(Struct, tag="flush_cache", kw_only=True):
    pass


ControlMessage = Abort | FlushCache


# --- rank registry (request/reply) ----------------------------------------------------------


class RankHello(Struct, kw_only=True, omit_defaults=True):
    instance_id: str
    requested_dp_rank: int | None = None


class RankAssignment(Struct, kw_only=True, omit_defaults=True):
    dp_rank: int | None
    message: str = ""


class RankLoad(Struct, kw_only=True, omit_defaults=True):
    """One row of the dispatcher's load table (`GET /get_loads`)."""

    dp_rank: int
    status: str  # "live" | "dead"
    holding_tokens: int
    in_flight_requests: int
    in_flight_tokens: int
    num_running: int
    num_waiting: int
    kv_used: int
    kv_total: int
    report_age_s: float
    accepted_requests: int = 0  # accepted by the rank and not yet finished
    cache_hit_rate: float = 0.0
    instance_id: str = ""


class Resume(Struct, kw_only=True, omit_defaults=True):
    """gateway -> dispatcher (request/reply): continue `rid` from the output the gateway holds.

    mode "migrate": after a RequestError(migrate=True); "stall": no progress for a while — the
    dispatcher re-dispatches only if the request is no longer running anywhere (finished with its
    last outputs lost, or parked after its rank died) and else answers where it is.
    """

    rid: str
    gateway_id: str
    output_ids: list[int]
    first_seq: int
    mode: str = "stall"


class ResumeReply(Struct, kw_only=True, omit_defaults=True):
    status: str  # "dispatched" | "running" | "unknown" | "failed"
    message: str = ""
    dp_rank: int | None = None


class LoadTableQuery(Struct, kw_only=True):
    pass


class LoadTableReply(Struct, kw_only=True):
    method: str
    ranks: list[RankLoad]


# --- launchers of a multi-node deployment (services/launcher/worlds.py) ------------------------


class NodeReport(Struct, kw_only=True):
    """A node's launcher is up (every 0.5 s); a new instance_id means it was started again."""

    node_rank: int
    instance_id: str


class WorldDown(Struct, kw_only=True):
    """A member of `world` on `node_rank` died while the world ran at `epoch`."""

    world: str
    epoch: int
    node_rank: int


class WorldEpochs(Struct, kw_only=True):
    """Node 0's word on each world that spans nodes: the rendezvous epoch its ranks must run at.
    `nodes`: the launcher instance node 0 last heard from on each node; a launcher acts on the
    epochs only once its own instance is listed (so a relaunched node never joins a stale epoch)."""

    epochs: dict[str, int]
    nodes: dict[int, str]


class LauncherStop(Struct, kw_only=True):
    """A node's launcher ends the deployment (a process kept dying at its start): every other
    launcher ends too, with `reason` in its log."""

    node_rank: int
    instance_id: str
    reason: str


# --- gateway -> tokenizer (request/reply): SGLang's /tokenize and /detokenize -----------------


class TokenizeQuery(Struct, kw_only=True, omit_defaults=True):
    prompts: list[str]
    add_special_tokens: bool = True  # the model's BOS policy (TextTokenizer.encode); False: none


class TokenizeReply(Struct, kw_only=True, omit_defaults=True):
    tokens: list[list[int]] = field(default_factory=list)  # one list per prompt
    max_model_len: int = 0
    error: str = ""  # set: the query was refused (HTTP 400)


class DetokenizeQuery(Struct, kw_only=True, omit_defaults=True):
    tokens: list[list[int]]
    skip_special_tokens: bool = True


class DetokenizeReply(Struct, kw_only=True, omit_defaults=True):
    texts: list[str] = field(default_factory=list)  # one text per id list
    error: str = ""  # set: the query was refused (HTTP 400)


def encode(msg: Struct) -> bytes:
    return _encoder.encode(msg)


_encoder = msgspec.msgpack.Encoder()
