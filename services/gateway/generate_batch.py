"""SGLang's batch `/generate`: one body becomes `batch_size × n` GenerateRequests in SGLang's order.

`text` as a list or `input_ids` as a list of lists is a batch, and `sampling_params.n` (or a
top-level `n`) > 1 turns even one prompt into a batch. Item i's n samples are consecutive (index
`i * n + j`). Per-item values: `sampling_params`, `return_logprob`, `top_logprobs_num` and
`logprob_start_len` are one value for all items or a list with one per prompt (not with n > 1 for
the logprob options). Rids: a batch item gets `rid[i]` (a list) or `{rid}_{index}` (a string); with
n > 1 and a list, `{rid[i]}_{j}`; no rid, a fresh one each. Every sample of an item uses the same
seed, as in SGLang. `data_parallel_rank` is SGLang's deprecated alias of `routed_dp_rank`.
"""

from __future__ import annotations

import uuid
from typing import Any

from services.gateway.request_body import InvalidRequest, check_encodable
from services.gateway.sglang_fields import GenerateBody, GenerateSamplingParams
from shared.messages import GenerateRequest


def expand(
    req: GenerateBody, gateway_id: str, created: float, max_requests: int
) -> tuple[list[GenerateRequest], bool]:
    """The bus messages of `req` in index order, and whether it is a batch (answered as a list);
    more than `max_requests` of them raises InvalidRequest before any is built."""
    prompts = _prompts(req)
    params = _sampling_list(req.sampling_params, len(prompts))
    n = _samples_per_prompt(req, params)
    batch = isinstance(req.text, list) or (req.input_ids is not None and _is_batch(req.input_ids)) or n > 1
    if len(prompts) * n > max_requests:
        raise InvalidRequest(
            f"the request asks for {len(prompts) * n} generations; this server runs at most {max_requests} at once"
        )
    routed = _routed_dp_rank(req)
    rids = _rids(req.rid, len(prompts), n, batch)
    logprob = _per_item(req.return_logprob, False, "return_logprob", len(prompts), n)
    top = _per_item(req.top_logprobs_num, 0, "top_logprobs_num", len(prompts), n)
    start = _per_item(req.logprob_start_len, -1, "logprob_start_len", len(prompts), n)
    if any(t < 0 for t in top) or any(s < -1 for s in start):
        raise InvalidRequest("`top_logprobs_num` must be >= 0 and `logprob_start_len` >= -1")
    sampling = [p.to_sampling() for p in params]
    reqs = []
    for i, prompt in enumerate(prompts):
        for j in range(n):
            reqs.append(check_encodable(GenerateRequest(
                rid=rids[i * n + j],
                gateway_id=gateway_id,
                text=prompt if isinstance(prompt, str) else None,
                input_ids=prompt if isinstance(prompt, list) else None,
                sampling=sampling[i],
                stream=req.stream,
                routed_dp_rank=routed,
                created=created,
                return_logprob=logprob[i],
                top_logprobs_num=top[i],
                logprob_start_len=start[i],
            )))
    return reqs, batch


def _is_batch(ids: list[int | list[int]]) -> bool:
    return bool(ids) and isinstance(ids[0], list)


def _prompts(req: GenerateBody) -> list[str | list[int]]:
    """The prompts, one per batch item (a single request is a batch of one)."""
    if (req.text is None) == (req.input_ids is None):
        raise InvalidRequest("exactly one of `text` and `input_ids` is required")
    if req.text is not None:
        prompts: list[str | list[int]] = [req.text] if isinstance(req.text, str) else list(req.text)
    else:
        ids = req.input_ids or []
        if not ids:
            raise InvalidRequest("`input_ids` must not be empty")
        if _is_batch(ids):
            if not all(isinstance(x, list) for x in ids):
                raise InvalidRequest("`input_ids` mixes token ids and id lists")
            prompts = [list(x) for x in ids if isinstance(x, list)]
        elif any(isinstance(x, list) for x in ids):
            raise InvalidRequest("`input_ids` mixes token ids and id lists")
        else:
            prompts = [[x for x in ids if isinstance(x, int)]]
        if any(not p for p in prompts):
            raise InvalidRequest("`input_ids` must not be empty")
        if any(i < 0 for p in prompts for i in p):
            raise InvalidRequest("`input_ids` must be >= 0")
    if not prompts:
        raise InvalidRequest("a batch must not be empty")
    return prompts


def _sampling_list(
    params: GenerateSamplingParams | list[GenerateSamplingParams] | None, size: int
) -> list[GenerateSamplingParams]:
    if params is None:
        return [GenerateSamplingParams()] * size
    if not isinstance(params, list):
        return [params] * size
    if len(params) != size:
        raise InvalidRequest(f"`sampling_params` has {len(params)} entries for a batch of {size}")
    return params


def _samples_per_prompt(req: GenerateBody, params: list[GenerateSamplingParams]) -> int:
    ns = {1 if p.n is None else p.n for p in params}
    if len(ns) > 1:
        raise InvalidRequest("every entry of `sampling_params` must have the same `n`")
    n = ns.pop()
    if req.n is not None:
        if any(p.n is not None for p in params) and req.n != n:
            raise InvalidRequest("`n` and `sampling_params.n` differ")
        n = req.n
    if n < 1:
        raise InvalidRequest("`n` must be >= 1")
    return n


def _routed_dp_rank(req: GenerateBody) -> int | None:
    for name in ("routed_dp_rank", "data_parallel_rank"):
        value = getattr(req, name)
        if value is not None and value < 0:
            raise InvalidRequest(f"`{name}` must be >= 0")
    return req.routed_dp_rank if req.routed_dp_rank is not None else req.data_parallel_rank


def _rids(rid: str | list[str] | None, size: int, n: int, batch: bool) -> list[str]:
    """One rid per generation, in index order (item i's n samples consecutive)."""
    total = size * n
    if isinstance(rid, list):
        if not batch:
            raise InvalidRequest("`rid` is a list but the request is not a batch")
        if len(rid) != size:
            raise InvalidRequest(f"`rid` has {len(rid)} entries for a batch of {size}")
        rids = rid if n == 1 else [f"{r}_{j}" for r in rid for j in range(n)]
    elif rid is None:
        rids = [uuid.uuid4().hex for _ in range(total)]
    elif batch:
        rids = [f"{rid}_{k}" for k in range(total)]
    else:
        rids = [rid]
    if any(not r for r in rids):
        raise InvalidRequest("`rid` must not be empty")
    if len(set(rids)) != len(rids):
        raise InvalidRequest("the rids of a batch must be distinct")
    return rids


def _per_item(value: Any, default: Any, name: str, size: int, n: int) -> list[Any]:
    """A logprob option for each batch item: one value for all, or a list with one per item."""
    if value is None:
        return [default] * size
    if not isinstance(value, list):
        return [value] * size
    if n > 1:
        raise InvalidRequest(f"`{name}` cannot be a list when n > 1")
    if len(value) != size:
        raise InvalidRequest(f"`{name}` has {len(value)} entries for a batch of {size}")
    return value
