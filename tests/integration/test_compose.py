"""The compose files, run without Docker: every service's command and environment as local processes.

The nats image becomes a local nats-server, the image's model path the tiny model, and each gateway
replica gets its own port (compose maps a host port range onto the same container port); `${VAR:-x}`
takes its default. docker-compose.yml runs at the scaled counts `--scale tokenizer=3 --scale
detokenizer=2 --scale gateway=2`, docker-compose.pd.yml (prefill/decode disaggregation) as written;
schedulers at their `deploy.replicas`, and each service's health check command must pass.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.launcher.supervisor import free_port, health_ok
from tests.integration.client import generate, post
from tests.integration.failures import wait_loads
from tests.integration.test_disaggregation import metric, wait_metric

ROOT = Path(__file__).resolve().parents[2]
SCALE = {"tokenizer": 3, "detokenizer": 2, "gateway": 2}


def compose(name: str = "docker-compose.yml") -> dict[str, Any]:
    text = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: m[2], (ROOT / name).read_text())
    return dict(yaml.safe_load(text))


def local(argv: list[str]) -> list[str]:
    return [sys.executable if a == "python" else a for a in argv]


def test_compose_file_shape() -> None:
    services = compose()["services"]
    assert services["nats"]["image"].startswith("nats")
    for name in ("gateway", "tokenizer", "detokenizer", "dispatcher", "scheduler"):
        svc = services[name]
        assert svc["command"][:3] == ["python", "-m", f"services.{name}"]
        assert "healthcheck" in svc and svc["environment"]["DPSERVE_NATS_URL"] == "nats://nats:4222"
    assert services["scheduler"]["environment"]["DPSERVE_DP_RANK"] == "-1"
    assert services["scheduler"]["deploy"]["replicas"] == int(services["scheduler"]["environment"]["DPSERVE_DP_SIZE"])
    host, container = services["gateway"]["ports"][0].rsplit(":", 1)
    low, high = (int(p) for p in host.split("-"))
    assert high - low + 1 >= SCALE["gateway"]  # scaled gateways need distinct host ports


def test_pd_compose_file_shape() -> None:
    services = compose("docker-compose.pd.yml")["services"]
    sides = {name: svc for name, svc in services.items() if "DPSERVE_DISAGGREGATION_MODE" in svc.get("environment", {})}
    assert {name: svc["environment"]["DPSERVE_DISAGGREGATION_MODE"] for name, svc in sides.items()} == {
        "prefill-scheduler": "prefill", "decode-scheduler": "decode"}
    ranks = sum(svc["deploy"]["replicas"] for svc in sides.values())
    for name, svc in services.items():
        if name == "nats":
            continue
        assert int(svc["environment"]["DPSERVE_DP_SIZE"]) == ranks, name  # every service counts both sides
    for svc in sides.values():
        assert svc["command"] == ["python", "-m", "services.scheduler"]
        assert svc["environment"]["DPSERVE_DP_RANK"] == "-1"


def run_compose(file: str, scale: dict[str, int], model: Path, nats_url: str, log_dir: Path,
                extra_env: dict[str, str]) -> Iterator[dict[str, Any]]:
    services = compose(file)["services"]
    log = open(log_dir / "log", "wb")
    procs: list[subprocess.Popen[bytes]] = []
    envs: dict[str, list[dict[str, str]]] = {}
    for name, svc in services.items():
        if name == "nats":
            continue
        count = scale.get(name, svc.get("deploy", {}).get("replicas", 1))
        for _ in range(count):
            env = {k: str(v) for k, v in svc["environment"].items()}
            env |= {"DPSERVE_NATS_URL": nats_url, "DPSERVE_MODEL_PATH": str(model), "DPSERVE_TORCH_THREADS": "1"}
            env |= extra_env
            if name == "gateway":
                env |= {"DPSERVE_HOST": "127.0.0.1", "DPSERVE_PORT": str(free_port())}
            envs.setdefault(name, []).append(env)
            procs.append(subprocess.Popen(local(svc["command"]), env=os.environ | env, stdout=log, stderr=log, cwd=ROOT))
    urls = [f"http://127.0.0.1:{e['DPSERVE_PORT']}" for e in envs["gateway"]]
    deadline = time.monotonic() + 180
    while not all(health_ok(u) for u in urls):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "deployment did not start"
        time.sleep(0.3)
    yield {"urls": urls, "envs": envs, "services": services}
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(30)
    log.close()


@pytest.fixture(scope="module")
def deployment(tiny_model: Path, nats_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    yield from run_compose("docker-compose.yml", SCALE, tiny_model, nats_url, tmp_path_factory.mktemp("compose"), {})


@pytest.fixture(scope="module")
def pd_deployment(tiny_model: Path, nats_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    # the same bus as `deployment`, under its own subjects
    yield from run_compose("docker-compose.pd.yml", {}, tiny_model, nats_url, tmp_path_factory.mktemp("compose-pd"),
                           {"DPSERVE_NATS_SUBJECT_PREFIX": "pd"})


def health_checks_pass(deployment: dict[str, Any]) -> None:
    deadline = time.monotonic() + 60  # every scheduler replica registered and reporting
    for name, envs in deployment["envs"].items():
        test = deployment["services"][name]["healthcheck"]["test"]
        assert test[0] == "CMD"
        for env in envs:
            while True:
                rc = subprocess.run(local(test[1:]), env=os.environ | env, cwd=ROOT, timeout=30).returncode
                if rc == 0 or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert rc == 0, f"health check of {name} failed"


@pytest.mark.slow
def test_scaled_compose_serves(deployment: dict[str, Any]) -> None:
    urls = deployment["urls"]
    params = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}

    def run(i: int) -> dict[str, Any]:
        return generate(urls[i % len(urls)], text=f"prompt {i}", sampling_params=params)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, range(16)))
    assert all(r["meta_info"]["completion_tokens"] == 8 for r in results)
    # the same prompt through either gateway gives the same greedy answer
    a, b = (generate(u, text="same", sampling_params=params)["output_ids"] for u in urls)
    assert a == b
    status, chat = post(urls[1] + "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert status == 200 and chat["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.slow
def test_compose_health_checks_pass(deployment: dict[str, Any]) -> None:
    health_checks_pass(deployment)


@pytest.mark.slow
def test_pd_compose_ships_long_prompts_and_answers_as_colocated(deployment: dict[str, Any],
                                                                 pd_deployment: dict[str, Any]) -> None:
    """A long prompt is prefilled on the prefill replica and its KV shipped to a decode replica; a
    short one is prefilled where it decodes; both answer as the colocated deployment does."""
    (url,) = pd_deployment["urls"]
    ranks = int(pd_deployment["envs"]["gateway"][0]["DPSERVE_DP_SIZE"])
    # every replica registered and reporting: until the prefill rank reports, prompts stay on decode ranks
    wait_loads(url, "every rank live", lambda ls: sorted(r for r, v in ls.items() if v["status"] == "live")
               == list(range(ranks)), 120)
    params = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
    long = [20 + (i * 37 + i * i) % 900 for i in range(600)]  # over --disaggregation-min-prompt-tokens (256)
    short = long[:40]
    for prompt, where in ((long, "remote"), (short, "local")):
        before = metric(url, "dpserve:prefill_requests_total", mode="decode", where=where)
        out = generate(url, input_ids=prompt, sampling_params=params)
        assert out["output_ids"] == generate(deployment["urls"][0], input_ids=prompt, sampling_params=params)["output_ids"]
        assert wait_metric(url, "dpserve:prefill_requests_total", before + 1, mode="decode", where=where) == before + 1
    assert metric(url, "dpserve:kv_transfer_bytes_total", mode="prefill") > 0
    health_checks_pass(pd_deployment)
