"""Sends benchmark requests to a server's streaming API (see `backends.py`) and times each one.

Arrivals: a Poisson process at `request_rate` requests/s (exponential gaps; `inf` sends all at
once), at most `max_concurrency` in flight. Each request streams, so TTFT is the time to the first
event that carries output tokens and every later such event adds one inter-token latency per new
token (the gap split evenly over the event's tokens). An error status, an `error` event or a broken
stream fails that request only.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from services.bench.backends import Backend, SGLangGenerate
from services.bench.datasets import BenchRequest


@dataclass
class RequestResult:
    prompt_len: int
    success: bool = False
    output_len: int = 0
    text: str = ""
    ttft: float = 0.0
    latency: float = 0.0
    itls: list[float] = field(default_factory=list)
    error: str = ""
    rid: str = ""  # the server's request id, where its events carry one


async def sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects of a server-sent event stream, up to `data: [DONE]`."""
    async for raw in resp.content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            return
        event = json.loads(payload)
        if not isinstance(event, dict):
            raise ValueError(f"event is not a JSON object: {payload[:200]!r}")
        yield event


async def send_one(
    session: aiohttp.ClientSession, url: str, backend: Backend, req: BenchRequest
) -> RequestResult:
    result = RequestResult(prompt_len=req.prompt_len, output_len=req.output_len)
    start = time.perf_counter()
    last = start
    tokens = 0
    try:
        async with session.post(url + backend.path, json=backend.body(req)) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return result
            async for event in sse_events(resp):
                if "error" in event:
                    result.error = str(event["error"])
                    return result
                now = time.perf_counter()
                result.rid = result.rid or backend.rid(event)
                delta = backend.delta(event, result.text, tokens)
                if delta.tokens > 0:
                    if tokens == 0:
                        result.ttft = now - start
                    else:
                        result.itls += [(now - last) / delta.tokens] * delta.tokens
                    tokens, last = tokens + delta.tokens, now
                result.text += delta.text
                if delta.output_len is not None:
                    result.output_len = delta.output_len
        result.latency = time.perf_counter() - start
        result.success = True
    except (TimeoutError, aiohttp.ClientError, ValueError) as e:
        result.error = repr(e)
    return result


async def run(
    url: str,
    requests: list[BenchRequest],
    request_rate: float,
    max_concurrency: int | None,
    backend: Backend | None = None,
    api_key: str = "",
    seed: int = 0,
    timeout: float = 3600.0,
) -> tuple[list[RequestResult], float]:
    """Every request's result, in dataset order, and the benchmark's wall time in seconds."""
    backend = backend or SGLangGenerate()
    rng = random.Random(seed)
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    conn = aiohttp.TCPConnector(limit=0)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    async with aiohttp.ClientSession(
        connector=conn, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
    ) as session:

        async def one(req: BenchRequest) -> RequestResult:
            if limit is None:
                return await send_one(session, url, backend, req)
            async with limit:
                return await send_one(session, url, backend, req)

        start = time.perf_counter()
        tasks = []
        for req in requests:
            tasks.append(asyncio.create_task(one(req)))
            if not math.isinf(request_rate):
                await asyncio.sleep(rng.expovariate(request_rate))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - start
