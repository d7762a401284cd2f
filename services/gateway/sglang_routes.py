"""SGLang's operational endpoints beside `/generate`.

- `GET /health`: 200 while a scheduler rank is live (its load reports arrive), else 503;
- `GET /get_loads`: the dispatcher's load table, one entry per DP rank; 503 when the dispatcher
  does not answer;
- `GET /get_server_info`: the server args plus `internal_states`, one entry per DP rank seen in the
  load reports (`dp_rank`, `node_rank` of its leader, `max_total_num_tokens`, load), which SGLang's bench client reads;
- `GET /get_model_info`: model path and name;
- `GET|POST /flush_cache`: `FlushCache` to every scheduler on the control subject;
- `POST /abort_request` `{"rid": ...}` or `{"abort_all": true}`: `Abort` for the request (and its
  OpenAI choices `{rid}-{i}`) or for every request this gateway has in progress;
- `GET /health_generate`: a one-token generation through the whole pipeline (tokenizer,
  dispatcher, a scheduler rank, detokenizer), 200 when it finishes, 503 otherwise;
- `POST /tokenize` (`/v1/tokenize`) `{"prompt": text or [texts], "add_special_tokens": true}` ->
  `{"tokens", "count", "max_model_len"}` and `POST /detokenize` (`/v1/detokenize`)
  `{"tokens": ids or [ids], "skip_special_tokens": true}` -> `{"text"}`, as SGLang answers them:
  the gateway has no tokenizer, so it asks a tokenizer service (request/reply); errors in
  OpenAI's shape, 503 when no tokenizer answers.

Their 503s but `/get_loads`' carry no `Retry-After`: they report a state, not an overload.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from typing import Any

import msgspec
from aiohttp import web
from msgspec import Struct

from services.gateway.openai_protocol import OpenAIError, decode_body
from services.gateway.replies import json_error, json_response, openai_error, timed_out
from services.gateway.state import GatewayState, SubmitError
from services.gateway.streams import wait_finished
from shared.config import SECRET_FIELDS
from shared.messages import (
    DetokenizeQuery,
    DetokenizeReply,
    FlushCache,
    GenerateRequest,
    LoadTableQuery,
    LoadTableReply,
    SamplingParams,
    TokenizeQuery,
    TokenizeReply,
)

log = logging.getLogger("gateway")

HEALTH_GENERATE_TIMEOUT = 20.0
LOADS_TIMEOUT_S = 2.0
TOKENIZE_TIMEOUT_S = 10.0
VERSION = "0.1.0"
NO_RETRY: dict[str, str] = {}  # the headers of a 503 that is no overload


class AbortBody(Struct, kw_only=True, forbid_unknown_fields=True):
    rid: str = ""
    abort_all: bool = False


class TokenizeBody(Struct, kw_only=True):  # unknown fields ignored, as on the OpenAI routes
    prompt: str | list[str]
    add_special_tokens: bool = True
    model: str | None = None


class DetokenizeBody(Struct, kw_only=True):
    tokens: list[int | list[int]]  # ids, or a list of id lists
    skip_special_tokens: bool = True
    model: str | None = None


class SGLangRoutes:
    def __init__(self, state: GatewayState) -> None:
        self.state = state

    async def health(self, request: web.Request) -> web.Response:
        if self.state.liveness.live_ranks():
            return json_response({"status": "ok"})
        return json_response({"status": "no live scheduler rank"}, 503)

    async def get_loads(self, request: web.Request) -> web.Response:
        state = self.state
        if state.requester is None:
            return json_error("the dispatcher is not reachable from this gateway", 503)
        try:
            reply = await state.requester.request(
                state.subjects.dispatcher_loads, LoadTableQuery(), LoadTableReply, timeout=LOADS_TIMEOUT_S
            )
        except Exception as e:
            log.warning("get_loads: no answer from the dispatcher: %r", e)
            return json_error("the dispatcher did not answer", 503)
        ranks = [msgspec.structs.asdict(r) for r in reply.ranks]
        for r in ranks:
            r["kv_usage"] = round(r["kv_used"] / r["kv_total"], 4) if r["kv_total"] else 0.0
        return json_response({"load_balance_method": reply.method, "ranks": ranks})

    def internal_states(self) -> list[dict[str, Any]]:
        metrics = self.state.metrics
        throughput = round(metrics.gen_throughput(), 3)
        out = []
        for dp_rank, (_, r) in sorted(metrics.reports.items()):
            out.append(
                {
                    "dp_rank": dp_rank,
                    "node_rank": r.node_rank,
                    "max_total_num_tokens": r.kv_total,
                    "num_used_tokens": r.kv_used,
                    "num_running_reqs": r.num_running,
                    "num_queue_reqs": r.num_waiting,
                    "cache_hit_rate": r.cache_hit_rate,
                    "live": dp_rank in self.state.liveness.live_ranks(),
                    "last_gen_throughput": throughput,
                    "avg_spec_accept_length": None,
                }
            )
        return out

    async def server_info(self, request: web.Request) -> web.Response:
        args = dataclasses.asdict(self.state.args)
        args.pop("extra", None)
        for secret in SECRET_FIELDS:  # never echo a secret
            args.pop(secret, None)
        states = self.internal_states()
        body = args | {
            "served_model_name": self.state.args.model_name,
            "version": VERSION,
            "max_total_num_tokens": min((s["max_total_num_tokens"] for s in states), default=0),
            "internal_states": states,
        }
        return json_response(body)

    async def model_info(self, request: web.Request) -> web.Response:
        args = self.state.args
        return json_response(
            {
                "model_path": args.model_path,
                "tokenizer_path": args.model_path,
                "served_model_name": args.model_name,
                "is_generation": True,
            }
        )

    async def flush_cache(self, request: web.Request) -> web.Response:
        try:
            await self.state.bus.publish(self.state.subjects.sched_control, FlushCache())
        except Exception:
            return json_error("the serving bus is unavailable", 503, NO_RETRY)
        return json_response({"success": True, "message": "flush_cache sent to every scheduler rank"})

    async def abort_request(self, request: web.Request) -> web.Response:
        try:
            body = msgspec.json.decode(await request.read() or b"{}", type=AbortBody)
        except (msgspec.ValidationError, msgspec.DecodeError) as e:
            return json_error(f"invalid request: {e}", 400)
        if not body.rid and not body.abort_all:
            return json_error("give `rid` or `abort_all: true`", 400)
        if body.abort_all:
            rids = list(self.state.streams)
        else:
            mine = [r for r in self.state.streams if r.startswith(body.rid + "-")]  # OpenAI choices
            rids = [body.rid, *mine]
        for rid in rids:
            await self.state.publish_abort(rid)
        return json_response({"success": True, "aborted": rids})

    async def health_generate(self, request: web.Request) -> web.Response:
        state = self.state
        req = GenerateRequest(
            rid=f"health-{uuid.uuid4().hex}",
            gateway_id=state.gateway_id,
            input_ids=[0],
            sampling=SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True),
            created=time.time(),
        )
        timeout = min(state.args.request_timeout, HEALTH_GENERATE_TIMEOUT)
        try:
            async with state.running(req) as stream:
                await wait_finished([stream], timeout)
        except SubmitError as e:
            return json_error(f"health generation failed: {e.message}", 503, NO_RETRY)
        except TimeoutError:
            return json_error(f"health generation failed: {timed_out(timeout)}", 503, NO_RETRY)
        if stream.error is not None:
            return json_error(f"health generation failed: {stream.error.message}", 503, NO_RETRY)
        return json_response({"status": "ok", "output_ids": stream.output_ids})


    async def tokenize(self, request: web.Request) -> web.Response:
        try:
            body = decode_body(await request.read(), TokenizeBody)
        except OpenAIError as e:
            return openai_error(e.message, e.status, e.param)
        one = isinstance(body.prompt, str)
        query = TokenizeQuery(prompts=[body.prompt] if one else body.prompt, add_special_tokens=body.add_special_tokens)
        reply = await self._ask(self.state.subjects.tokenize_text, query, TokenizeReply)
        if isinstance(reply, web.Response):
            return reply
        counts = [len(t) for t in reply.tokens]
        return json_response(
            {
                "tokens": reply.tokens[0] if one else reply.tokens,
                "count": counts[0] if one else counts,
                "max_model_len": reply.max_model_len,
            }
        )

    async def detokenize(self, request: web.Request) -> web.Response:
        try:
            body = decode_body(await request.read(), DetokenizeBody)
        except OpenAIError as e:
            return openai_error(e.message, e.status, e.param)
        ids = [t for t in body.tokens if isinstance(t, int)]
        lists = [t for t in body.tokens if isinstance(t, list)]
        if ids and lists:
            return openai_error("tokens mixes token ids with id lists", 400, "tokens")
        one = not lists
        if one:
            lists = [ids]
        if any(not 0 <= i < 2**32 for ids in lists for i in ids):  # and unencodable ones never leave
            return openai_error("token ids must be in [0, 2**32)", 400, "tokens")
        query = DetokenizeQuery(tokens=lists, skip_special_tokens=body.skip_special_tokens)
        reply = await self._ask(self.state.subjects.detokenize_ids, query, DetokenizeReply)
        if isinstance(reply, web.Response):
            return reply
        return json_response({"text": reply.texts[0] if one else reply.texts})

    async def _ask(
        self, subject: str, query: TokenizeQuery | DetokenizeQuery, kind: type[TokenizeReply] | type[DetokenizeReply]
    ) -> TokenizeReply | DetokenizeReply | web.Response:
        """A tokenizer service's reply, or the error answer (400 refused, 503 no answer)."""
        if self.state.requester is None:
            return openai_error("no tokenizer is reachable from this gateway", 503)
        try:
            reply = await self.state.requester.request(subject, query, kind, timeout=TOKENIZE_TIMEOUT_S)
        except Exception as e:
            log.warning("%s: no answer from a tokenizer: %r", subject, e)
            return openai_error("no tokenizer answered", 503)
        if reply.error:
            return openai_error(reply.error, 400, "tokens")
        return reply


def add_sglang_routes(app: web.Application, state: GatewayState) -> None:
    routes = SGLangRoutes(state)
    app.router.add_get("/health", routes.health)
    app.router.add_get("/get_loads", routes.get_loads)
    app.router.add_get("/get_server_info", routes.server_info)
    app.router.add_get("/server_info", routes.server_info)
    app.router.add_get("/get_model_info", routes.model_info)
    app.router.add_post("/flush_cache", routes.flush_cache)
    app.router.add_get("/flush_cache", routes.flush_cache, allow_head=False)
    for prefix in ("", "/v1"):
        app.router.add_post(f"{prefix}/tokenize", routes.tokenize)
        app.router.add_post(f"{prefix}/detokenize", routes.detokenize)
    app.router.add_post("/abort_request", routes.abort_request)
    app.router.add_get("/health_generate", routes.health_generate)
