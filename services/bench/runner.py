"""Sends benchmark requests to SGLang's streaming `/generate` and times each one.

Arrivals: a Poisson process at `request_rate` requests/s (exponential gaps; `inf` sends all at
once), at most `max_concurrency` in flight. Each request streams, so TTFT is the time to the first
event that carries output tokens and every later such event adds one inter-token latency per new
token (the gap split evenly over the event's tokens).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

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


def generate_body(req: BenchRequest, ignore_eos: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "sampling_params": {"max_new_tokens": req.output_len, "temperature": 0.0, "ignore_eos": ignore_eos},
        "stream": True,
    }
    if req.input_ids is not None:
        body["input_ids"] = req.input_ids
    else:
        body["text"] = req.text
    return body


async def send_one(
    session: aiohttp.ClientSession, url: str, req: BenchRequest, ignore_eos: bool
) -> RequestResult:
    result = RequestResult(prompt_len=req.prompt_len)
    start = time.perf_counter()
    last = start
    tokens = 0
    try:
        async with session.post(url + "/generate", json=generate_body(req, ignore_eos)) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return result
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    break
                event = json.loads(payload)
                if "error" in event:
                    result.error = str(event["error"])
                    return result
                now = time.perf_counter()
                n = len(event.get("output_ids") or []) or event.get("meta_info", {}).get("completion_tokens", 0)
                new = n - tokens
                if new > 0:
                    if tokens == 0:
                        result.ttft = now - start
                    else:
                        result.itls += [(now - last) / new] * new
                    tokens, last = n, now
                result.text = event.get("text", result.text)
                result.output_len = event.get("meta_info", {}).get("completion_tokens", tokens)
        result.latency = time.perf_counter() - start
        result.success = True
    except (TimeoutError, aiohttp.ClientError, json.JSONDecodeError) as e:
        result.error = repr(e)
    return result


async def run(
    url: str,
    requests: list[BenchRequest],
    request_rate: float,
    max_concurrency: int | None,
    ignore_eos: bool = True,
    seed: int = 0,
    timeout: float = 3600.0,
) -> tuple[list[RequestResult], float]:
    """Every request's result, in dataset order, and the benchmark's wall time in seconds."""
    rng = random.Random(seed)
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout)) as session:

        async def one(req: BenchRequest) -> RequestResult:
            if limit is None:
                return await send_one(session, url, req, ignore_eos)
            async with limit:
                return await send_one(session, url, req, ignore_eos)

        start = time.perf_counter()
        tasks = []
        for req in requests:
            tasks.append(asyncio.create_task(one(req)))
            if not math.isinf(request_rate):
                await asyncio.sleep(rng.expovariate(request_rate))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - start
