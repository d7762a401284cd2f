"""`dpserve serve --help`: every flag described and in its section, no secret printed, env defaults kept."""

from __future__ import annotations

import dataclasses

import pytest

from services.launcher.cli import main
from shared.config import GROUPS, SECRET_FIELDS, ServerArgs

FIELDS = [f for f in dataclasses.fields(ServerArgs) if f.name != "extra"]


def serve_help(capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("f", FIELDS, ids=lambda f: f.name)
def test_every_field_has_help_and_a_group(f: dataclasses.Field[object]) -> None:
    assert f.metadata["help"].strip()
    assert "\n" not in f.metadata["help"]
    assert f.metadata["group"] in GROUPS


def test_help_lists_every_group_and_flag(capsys: pytest.CaptureFixture[str]) -> None:
    out = serve_help(capsys)
    for title in GROUPS:
        assert f"\n{title}:\n" in out
    for f in FIELDS:
        assert "--" + f.name.replace("_", "-") in out
        assert "DPSERVE_" + f.name.upper() in out


def test_help_never_prints_a_secret(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    assert set(SECRET_FIELDS) == {"api_key", "nats_password", "nats_token"}
    for name in SECRET_FIELDS:
        monkeypatch.setenv("DPSERVE_" + name.upper(), f"hunter2-{name}")
    out = serve_help(capsys)
    assert "hunter2" not in out
    assert "(env DPSERVE_API_KEY: set)" in " ".join(out.split())


def test_env_defaults_still_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DPSERVE_DP_SIZE", "3")
    monkeypatch.setenv("DPSERVE_DISABLE_RADIX_CACHE", "1")
    monkeypatch.setenv("DPSERVE_API_KEY", "k")
    args = ServerArgs.parse([])
    assert (args.dp_size, args.disable_radix_cache, args.api_key) == (3, True, "k")
    assert ServerArgs.parse(["--dp-size", "2"]).dp_size == 2  # a flag beats the env


def test_choices_are_argparse_choices() -> None:
    for flag, bad in [("--schedule-policy", "sjf"), ("--load-balance-method", "nope"), ("--dtype", "fp8")]:
        with pytest.raises(SystemExit):
            ServerArgs.parse([flag, bad])
