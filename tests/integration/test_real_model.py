"""The default model, SmolLM2-135M-Instruct (Q4_1 GGUF), served for real: greedy output over the bus
equals transformers' `generate` on the same GGUF file (float32) at dp 1, dp 2 and tp 3 (its 9
attention / 3 KV heads do not split over 2 ranks), prompt
logprobs agree, and the chat endpoint knows the capital of France.

The GGUF is converted once per session into a temporary $DPSERVE_CACHE_DIR; transformers reads
the file itself (`gguf_file=`), so tokenizer, weights and q/k un-permutation are all checked.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import gguf as gguf_py
import pytest
import torch

from shared.checkpoint import default_gguf, ensure_converted
from tests.conftest import Server
from tests.integration.client import generate, post
from tests.integration.tp_reference import wait_ranks

transformers = pytest.importorskip("transformers")

MAX_NEW = 24
EOS = 2  # <|im_end|>
PLAIN = [
    "Once upon a time",
    "The three primary colors are",
    "def fibonacci(n):\n",
    "Water boils at 100 degrees Celsius, which is",
]
CHAT = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three fruits.",
    "What is 12 times 12?",
]


@dataclass
class Reference:
    model_dir: Path  # the converted checkpoint the servers load
    prompts: list[str]  # texts as the server receives them (chat ones already rendered)
    outputs: list[list[int]]  # transformers' greedy ids, up to and including EOS
    logprobs: list[float]  # transformers' prompt logprobs of prompts[0], from the second token


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    try:
        gguf = default_gguf()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DPSERVE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        model_dir = ensure_converted(gguf)
        # Only for transformers' reading (after ours): it parses the file once for the tokenizer,
        # the config and the weights, and builds gguf's tensor-name map once per module (~400);
        # both are pure functions of the unchanged file, so each runs once (the weights were
        # compared equal to the uncached load; 74 s -> 12 s on 2 busy cores).
        mp.setattr(gguf_py, "GGUFReader", functools.cache(gguf_py.GGUFReader))
        mp.setattr(gguf_py, "get_tensor_name_map", functools.cache(gguf_py.get_tensor_name_map))
        tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        hf = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    chats = [tok.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True) for c in CHAT]
    prompts = PLAIN + chats
    outputs = []
    with torch.inference_mode():
        for text in prompts:
            ids = torch.tensor([tok.encode(text)])
            out = hf.generate(ids, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=EOS, pad_token_id=EOS)
            new = out[0, ids.shape[1]:].tolist()
            outputs.append(new[: new.index(EOS) + 1] if EOS in new else new)
        ids = torch.tensor([tok.encode(prompts[4])])
        logits = hf(ids).logits[0, :-1].float().log_softmax(-1)
        logprobs = logits.gather(1, ids[0, 1:, None])[:, 0].tolist()
    return Reference(model_dir, prompts, outputs, logprobs)


@pytest.fixture
def serve(reference: Reference, tmp_path: Path) -> Iterator[type]:
    started: list[Server] = []

    def start(*flags: str) -> Server:
        # float32 like the reference (`--dtype auto` would take the checkpoint's bfloat16 on a CPU with native bf16)
        server = Server(reference.model_dir, tmp_path / "serve.log", "--max-total-tokens", "8192", "--dtype", "float32", *flags)
        started.append(server)
        return server

    yield start  # type: ignore[misc]
    for server in started:
        server.stop()


def check_greedy(server: Server, ref: Reference, ranks: int = 1, together: bool = False) -> None:
    """Every prompt once; with several DP ranks, prompt i is routed to rank i % ranks. `together`:
    all at once, so they decode in one batch (fewer steps: what keeps tp on 2 cores quick)."""

    def one(i: int) -> None:
        extra = {} if ranks == 1 else {"routed_dp_rank": i % ranks}
        body = {"temperature": 0, "max_new_tokens": MAX_NEW}
        out = generate(server.url, text=ref.prompts[i], sampling_params=body, **extra)
        assert out["output_ids"] == ref.outputs[i], (ref.prompts[i], extra, out["text"])

    with ThreadPoolExecutor(len(ref.prompts) if together else 1) as pool:
        list(pool.map(one, range(len(ref.prompts))))


def test_dp1_greedy_logprobs_and_chat(serve, reference: Reference) -> None:  # noqa: ANN001
    server = serve()
    check_greedy(server, reference)

    out = generate(server.url, text=reference.prompts[4], return_logprob=True, logprob_start_len=0,
                   sampling_params={"max_new_tokens": 0})
    ours = [lp for lp, _, _ in out["meta_info"]["input_token_logprobs"]]
    assert ours[0] is None and len(ours) == len(reference.logprobs) + 1
    torch.testing.assert_close(torch.tensor(ours[1:]), torch.tensor(reference.logprobs), atol=1e-3, rtol=0)

    status, body = post(server.url + "/v1/chat/completions", {
        "model": "SmolLM2-135M-Instruct", "max_tokens": 32, "temperature": 0,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
    })
    assert status == 200, body
    assert "Paris" in body["choices"][0]["message"]["content"], body
    assert body["model"] == "SmolLM2-135M-Instruct"


def test_dp2_greedy(serve, reference: Reference) -> None:  # noqa: ANN001
    server = serve("--dp-size", "2")
    wait_ranks(server.url, 2)
    check_greedy(server, reference, ranks=2, together=True)


def test_tp3_greedy(serve, reference: Reference) -> None:  # noqa: ANN001
    # tp 3, not 2: SmolLM2-135M has 9 attention heads and 3 KV heads, which 2 ranks cannot split
    server = serve("--tp-size", "3")
    check_greedy(server, reference, together=True)
