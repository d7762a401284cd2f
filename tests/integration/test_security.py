"""NATS auth on the embedded server, secrets off the command line, and `--nats-subject-prefix`
isolating two deployments that share one nats-server."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.errors import NoServersError

from services.launcher.tiny_model import create_tiny_model
from tests.conftest import Server
from tests.integration.client import generate

GREEDY = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}


def nats_port(server: Any) -> int:
    for line in server.log().splitlines():
        if "Listening for client connections on 127.0.0.1:" in line:
            return int(line.rsplit(":", 1)[1])
    raise AssertionError("no nats-server port in the log")


async def refused(url: str, **options: Any) -> bool:
    try:
        nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0, allow_reconnect=False, **options)
    except (NoServersError, nats.errors.Error, OSError):
        return True
    await nc.close()
    return False


def child_cmdlines(server: Any) -> str:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    ("flags", "good"),
    [
        (("--nats-user", "dp", "--nats-password", "pw-Secret-1"), {"user": "dp", "password": "pw-Secret-1"}),
        (("--nats-token", "tok-Secret-2"), {"token": "tok-Secret-2"}),
    ],
)
async def test_nats_auth_end_to_end(server_factory: Any, flags: tuple[str, ...], good: dict[str, str]) -> None:
    server = server_factory(*flags)
    out = generate(server.url, text="authenticated", sampling_params=GREEDY)
    assert out["meta_info"]["completion_tokens"] == 8  # every service connected with the credentials
    url = f"nats://127.0.0.1:{nats_port(server)}"
    assert await refused(url)  # no credentials
    assert await refused(url, user="dp", password="wrong") and await refused(url, token="wrong")
    assert not await refused(url, **good)
    secret = flags[-1]
    assert secret not in child_cmdlines(server)  # passed through the environment / a 0600 file


@pytest.mark.slow
def test_subject_prefix_isolates_deployments(tiny_model: Path, nats_url: str, tmp_path: Path) -> None:
    other = Path(create_tiny_model(tmp_path / "tiny-seed1", arch="llama", seed=1))
    a = Server(tiny_model, tmp_path / "a.log", "--nats-url", nats_url, "--nats-subject-prefix", "a")
    try:
        b = Server(other, tmp_path / "b.log", "--nats-url", nats_url, "--nats-subject-prefix", "b")
        try:
            prompt = "which deployment answers"
            # both at once, each several times: every answer comes from its own model
            outs_a = [generate(a.url, text=prompt, sampling_params=GREEDY)["output_ids"] for _ in range(3)]
            outs_b = [generate(b.url, text=prompt, sampling_params=GREEDY)["output_ids"] for _ in range(3)]
            assert len({tuple(o) for o in outs_a}) == 1 and len({tuple(o) for o in outs_b}) == 1
            assert outs_a[0] != outs_b[0]  # different weights, different greedy output
        finally:
            b.stop()
        # a alone gives the same answer as while b was running
        assert generate(a.url, text=prompt, sampling_params=GREEDY)["output_ids"] == outs_a[0]
    finally:
        a.stop()
    # a solo deployment of the seed-1 model answers like b did
    solo = Server(other, tmp_path / "solo.log", "--nats-url", nats_url)
    try:
        assert generate(solo.url, text=prompt, sampling_params=GREEDY)["output_ids"] == outs_b[0]
    finally:
        solo.stop()


@pytest.mark.slow
async def test_nats_tls_end_to_end(server_factory: Any, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    server = server_factory("--nats-tls-cert", str(cert), "--nats-tls-key", str(key), "--nats-tls-ca", str(cert))
    out = generate(server.url, text="over tls", sampling_params=GREEDY)
    assert out["meta_info"]["completion_tokens"] == 8  # every service spoke TLS to the embedded server
    url = f"nats://127.0.0.1:{nats_port(server)}"
    assert await refused(url)  # a plain-text client cannot talk to it
    ctx = ssl.create_default_context(cafile=str(cert))
    assert not await refused(url, tls=ctx)
