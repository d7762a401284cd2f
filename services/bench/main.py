"""`dpserve bench`: flags, dataset, warm-up, run, print the result block, append a JSONL record."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import urllib.request
from dataclasses import replace
from typing import Any

from tokenizers import Tokenizer

from services.bench.backends import BACKENDS, Backend
from services.bench.datasets import BenchRequest, random_dataset, shared_prefix_dataset, sharegpt_dataset
from services.bench.report import details, format_block, jsonl_record, summarize
from services.bench.runner import run

DATASETS = ("random", "generated-shared-prefix", "sharegpt")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=sorted(BACKENDS), default="sglang",
                   help="sglang: POST /generate; openai: /v1/completions; openai-chat: /v1/chat/completions")
    p.add_argument("--model", default="", help="the OpenAI `model` field (default: the first id of GET /v1/models)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", ""),
                   help="sent as `Authorization: Bearer KEY` (default: $OPENAI_API_KEY)")
    p.add_argument("--base-url", default=None, help="server URL (default http://HOST:PORT)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--dataset-name", choices=DATASETS, default="random")
    p.add_argument("--dataset-path", default="", help="ShareGPT-format JSON file (for --dataset-name sharegpt)")
    p.add_argument("--tokenizer", default="", help="model dir or tokenizer.json (default: the server's /get_model_info)")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--random-input-len", type=int, default=256)
    p.add_argument("--random-output-len", type=int, default=64)
    p.add_argument("--random-range-ratio", type=float, default=0.0, help="lengths uniform in [len * ratio, len]")
    p.add_argument("--gsp-num-groups", type=int, default=8)
    p.add_argument("--gsp-prompts-per-group", type=int, default=8)
    p.add_argument("--gsp-system-prompt-len", type=int, default=256)
    p.add_argument("--gsp-question-len", type=int, default=32)
    p.add_argument("--gsp-output-len", type=int, default=32)
    p.add_argument("--sharegpt-output-len", type=int, default=None, help="fixed output length for ShareGPT prompts")
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s, Poisson arrivals (default inf: all at once)")
    p.add_argument("--max-concurrency", type=int, default=None, help="at most this many requests in flight")
    p.add_argument("--warmup-requests", type=int, default=1, help="requests sent (and not counted) before the run")
    p.add_argument("--disable-ignore-eos", action="store_true", help="let requests stop at EOS")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--output-file", default="", help="append the result as one JSON line (default: none)")
    p.add_argument("--output-details", action="store_true",
                   help="add each request's input/output length, TTFT, ITLs, error and id to the JSON line")


def get_json(url: str, api_key: str) -> Any:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as resp:
        return json.loads(resp.read())


def load_tokenizer(path: str, url: str, api_key: str) -> Tokenizer:
    if not path:
        path = get_json(url + "/get_model_info", api_key).get("tokenizer_path", "")
        if not path:
            raise SystemExit("the server does not tell its tokenizer path; pass --tokenizer")
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise SystemExit(f"no tokenizer at {file}; pass --tokenizer")
    return Tokenizer.from_file(file)


def served_model(url: str, api_key: str) -> str:
    """The first id of GET /v1/models, or "default" when the server does not say."""
    try:
        return str(get_json(url + "/v1/models", api_key)["data"][0]["id"])
    except (OSError, ValueError, LookupError, TypeError):
        return "default"


def build_dataset(ns: argparse.Namespace, tok: Tokenizer) -> list[BenchRequest]:
    vocab = tok.get_vocab_size(with_added_tokens=False)
    if ns.dataset_name == "random":
        return random_dataset(
            ns.num_prompts, ns.random_input_len, ns.random_output_len, ns.random_range_ratio, vocab, ns.seed
        )
    if ns.dataset_name == "generated-shared-prefix":
        return shared_prefix_dataset(
            ns.gsp_num_groups,
            ns.gsp_prompts_per_group,
            ns.gsp_system_prompt_len,
            ns.gsp_question_len,
            ns.gsp_output_len,
            vocab,
            ns.seed,
        )
    if not ns.dataset_path:
        raise SystemExit("--dataset-name sharegpt needs --dataset-path FILE")
    return sharegpt_dataset(ns.dataset_path, ns.num_prompts, tok, ns.seed, ns.sharegpt_output_len)


def make_backend(ns: argparse.Namespace, url: str) -> Backend:
    cls = BACKENDS[ns.backend]
    model = ns.model or ("default" if ns.backend == "sglang" else served_model(url, ns.api_key))
    return cls(model=model, ignore_eos=not ns.disable_ignore_eos)


def main(ns: argparse.Namespace) -> int:
    url = (ns.base_url or f"http://{ns.host}:{ns.port}").rstrip("/")
    tok = load_tokenizer(ns.tokenizer, url, ns.api_key)
    requests = build_dataset(ns, tok)
    backend = make_backend(ns, url)
    if backend.needs_text:  # token-id prompts (random, shared-prefix) go as their text
        requests = [r if r.text is not None else replace(r, text=tok.decode(r.input_ids or [])) for r in requests]
    print(f"#Input tokens: {sum(r.prompt_len for r in requests)}", file=sys.stderr)
    print(f"#Output tokens: {sum(r.output_len for r in requests)}", file=sys.stderr)
    if ns.warmup_requests > 0:
        warm = [replace(r, output_len=min(r.output_len, 16)) for r in requests[: ns.warmup_requests]]
        results, _ = asyncio.run(run(url, warm, float("inf"), None, backend, ns.api_key))
        failed = [r.error for r in results if not r.success]
        if failed:
            print(f"warm-up failed: {failed[0]}", file=sys.stderr)
            return 1
    print(f"Starting benchmark: {len(requests)} prompts, request rate {ns.request_rate}", file=sys.stderr)
    results, duration = asyncio.run(
        run(url, requests, ns.request_rate, ns.max_concurrency, backend, ns.api_key, ns.seed)
    )

    def retokenize(text: str) -> int:
        return len(tok.encode(text, add_special_tokens=False).ids)

    summary = summarize(results, duration, ns.backend, ns.request_rate, ns.max_concurrency, retokenize)
    print(format_block(summary), flush=True)
    errors = [r.error for r in results if not r.success]
    if errors:
        print(f"{len(errors)} requests failed; first error: {errors[0]}", file=sys.stderr)
    if ns.output_file:
        config: dict[str, Any] = {
            "dataset_name": ns.dataset_name,
            "num_prompts": ns.num_prompts,
            "base_url": url,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        if ns.output_details:
            config |= details(results)
        with open(ns.output_file, "a", encoding="utf-8") as f:
            f.write(jsonl_record(summary, config) + "\n")
    return 0 if summary.completed else 1
