"""serve with --prefill-dp-size / --decode-dp-size (services/launcher/layout.py): each side's
schedulers in worlds of their own with the side's layout and local DP ranks, every other child
counting both sides' ranks, the layouts it refuses, and the sides' placement on several nodes."""

from __future__ import annotations

import re
import signal
from typing import Any

import pytest

from services.launcher import cli, nodes
from services.launcher.layout import (
    ATTN_TP_MESSAGE,
    deployment_args,
    node_ranks,
    node_worlds,
    process_name,
    scheduler_ranks,
    sides,
    validate_sides,
    world_of,
)
from services.launcher.nodes import NodePlan
from services.launcher.startup import shape
from shared.config import ServerArgs

PD = ("--prefill-dp-size", "1", "--decode-dp-size", "2")


def side_flags(rank: dict[str, object]) -> tuple[object, ...]:
    """(mode, dp_rank_base, dp_rank, dp_size, tp_rank, tp_size, DP attention) of a scheduler."""
    return (rank["disaggregation_mode"], rank["dp_rank_base"], rank["dp_rank"], rank["dp_size"],
            rank.get("tp_rank", 0), rank["tp_size"], rank["enable_dp_attention"])


def test_decode_ranks_come_first_and_prefill_ranks_follow_with_local_dp_ranks() -> None:
    a = ServerArgs.parse([*PD])
    ranks = scheduler_ranks(a)
    assert [side_flags(r) for r in ranks] == [
        ("decode", 0, 0, 2, 0, 1, False),
        ("decode", 0, 1, 2, 0, 1, False),
        ("prefill", 2, 0, 1, 0, 1, False),
    ]
    assert [process_name(a, r) for r in ranks] == ["decode-scheduler0", "decode-scheduler1", "prefill-scheduler2"]
    assert [world_of(a, r) for r in ranks] == ["", "", ""]  # tp 1: each rank alone


def test_each_side_has_its_own_tp_and_dp_attention() -> None:
    a = ServerArgs.parse([*PD, "--decode-tp-size", "2", "--decode-enable-dp-attention"])
    ranks = scheduler_ranks(a)
    assert [side_flags(r) for r in ranks] == [
        ("decode", 0, 0, 2, 0, 2, True),
        ("decode", 0, 1, 2, 1, 2, True),
        ("prefill", 2, 0, 1, 0, 1, False),
    ]
    assert ranks[0]["dist_init_addr"] == ranks[1]["dist_init_addr"] and "dist_init_addr" not in ranks[2]
    assert [process_name(a, r) for r in ranks] == ["decode-scheduler0-tp0", "decode-scheduler1-tp1", "prefill-scheduler2"]
    assert [world_of(a, r) for r in ranks] == ["decode-schedulers", "decode-schedulers", ""]


def test_the_sides_never_share_a_world() -> None:
    a = ServerArgs.parse(["--prefill-dp-size", "2", "--decode-dp-size", "2", "--tp-size", "2", "--enable-dp-attention"])
    ranks = scheduler_ranks(a)
    worlds = {world_of(a, r): r["dist_init_addr"] for r in ranks}
    assert sorted(worlds) == ["decode-schedulers", "prefill-schedulers"]
    assert len(set(worlds.values())) == 2  # two TCP stores
    assert [process_name(a, r) for r in ranks] == [
        "decode-scheduler0-tp0", "decode-scheduler1-tp1", "prefill-scheduler2-tp0", "prefill-scheduler3-tp1",
    ]


def test_without_the_sides_nothing_changes() -> None:
    a = ServerArgs.parse(["--dp-size", "2"])
    assert deployment_args(a) is a
    assert scheduler_ranks(a) == [{"dp_rank": 0}, {"dp_rank": 1}]
    assert [process_name(a, r) for r in scheduler_ranks(a)] == ["scheduler0", "scheduler1"]
    a = ServerArgs.parse(["--dp-size", "2", "--tp-size", "2"])
    ranks = scheduler_ranks(a)
    assert [process_name(a, r) for r in ranks] == ["scheduler0-tp0", "scheduler0-tp1", "scheduler1-tp0", "scheduler1-tp1"]
    assert [world_of(a, r) for r in ranks] == ["scheduler0", "scheduler0", "scheduler1", "scheduler1"]
    a = ServerArgs.parse(["--dp-size", "2", "--tp-size", "2", "--enable-dp-attention"])
    assert {world_of(a, r) for r in scheduler_ranks(a)} == {"schedulers"}
    assert shape(a) == "2 DP x 2 TP"


def test_every_child_parses_its_flags_and_the_others_count_both_sides() -> None:
    """A deployment-wide --enable-dp-attention with tp 2 would not divide by P + D = 3: the other
    children get each side's DP attention spelled out instead."""
    a = ServerArgs.parse([*PD, "--tp-size", "2", "--enable-dp-attention", "--prefill-tp-size", "1"])
    total = deployment_args(a)
    other = ServerArgs.parse(total.to_cli())
    assert (other.dp_size, other.prefill_dp_size, other.decode_dp_size) == (3, 1, 2)
    assert (other.decode_tp_size, other.decode_enable_dp_attention) == (2, True)
    assert (other.prefill_tp_size, other.prefill_enable_dp_attention) == (1, True)
    assert sides(total) == sides(a)
    schedulers = [ServerArgs.parse(total.to_cli(**r)) for r in scheduler_ranks(total)]
    assert [(s.disaggregation_mode, s.dp_rank_base + s.dp_rank, s.dp_size, s.tp_size) for s in schedulers] == [
        ("decode", 0, 2, 2), ("decode", 1, 2, 2), ("prefill", 2, 1, 1),
    ]
    assert shape(total) == "decode 2 DP x 2 TP, prefill 1 DP x 1 TP"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ([*PD, "--tp-size", "2"], f"decode side 2 DP x 2 TP: {ATTN_TP_MESSAGE}"),
        ([*PD, "--prefill-tp-size", "2"], f"prefill side 1 DP x 2 TP: {ATTN_TP_MESSAGE}"),
        ([*PD, "--decode-tp-size", "4", "--decode-enable-dp-attention"], "decode side 2 DP x 4 TP with DP attention"),
        ([*PD, "--dp-size", "2"], "--dp-size 2 contradicts --prefill-dp-size 1 + --decode-dp-size 2"),
    ],
)
def test_layouts_serve_cannot_run_yet_are_refused(flags: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        validate_sides(ServerArgs.parse(flags))


def two_nodes(*flags: str, node_rank: int = 0) -> ServerArgs:
    """serve's args on node `node_rank` of 2 as the launcher hands them on (after `deployment_args`)."""
    a = ServerArgs.parse(["--nnodes", "2", "--node-rank", str(node_rank), "--dist-init-addr", "10.9.0.1:29500",
                          "--node-addr", "127.0.0.1", "--gloo-socket-ifname", "lo", *flags])
    validate_sides(a)
    return deployment_args(a)


def placed(*flags: str) -> dict[int, list[tuple[str, object]]]:
    """node -> its schedulers' (process name, rendezvous prefix or None)."""
    out = {}
    for k in (0, 1):
        a = two_nodes(*flags, node_rank=k)
        out[k] = [(process_name(a, r), r.get("dist_store_prefix")) for r in node_ranks(a, NodePlan.from_args(a))]
    return out


def test_on_two_nodes_the_decode_side_goes_to_node0_and_the_prefill_side_to_node1() -> None:
    """The sides' processes in one list, decode first, cut in equal shares (`nodes.node_of`)."""
    pd2 = ("--prefill-dp-size", "2", "--decode-dp-size", "2")
    assert placed(*pd2) == {
        0: [("decode-scheduler0", None), ("decode-scheduler1", None)],
        1: [("prefill-scheduler2", None), ("prefill-scheduler3", None)],
    }
    assert node_worlds(two_nodes(*pd2), 0) == {}  # tp 1: no world to restart
    # with DP attention, each side is one world of 2 ranks, on one node, under its own name
    dpa = (*pd2, "--tp-size", "2", "--enable-dp-attention")
    assert placed(*dpa) == {
        0: [("decode-scheduler0-tp0", "decode-schedulers/0"), ("decode-scheduler1-tp1", "decode-schedulers/0")],
        1: [("prefill-scheduler2-tp0", "prefill-schedulers/0"), ("prefill-scheduler3-tp1", "prefill-schedulers/0")],
    }
    assert node_worlds(two_nodes(*dpa), 0) == {"decode-schedulers": {0}, "prefill-schedulers": {1}}  # node 0: all
    assert node_worlds(two_nodes(*dpa, node_rank=1), 1) == {"prefill-schedulers": {1}}
    a = two_nodes(*dpa)
    for world in ("decode-schedulers", "prefill-schedulers"):
        modes = {r["disaggregation_mode"] for r in scheduler_ranks(a) if world_of(a, r) == world}
        assert modes == {world.split("-")[0]}  # no world spans both sides


def test_sides_that_do_not_split_evenly_share_a_node() -> None:
    assert placed("--prefill-dp-size", "1", "--decode-dp-size", "3") == {
        0: [("decode-scheduler0", None), ("decode-scheduler1", None)],
        1: [("decode-scheduler2", None), ("prefill-scheduler3", None)],
    }


@pytest.mark.parametrize(
    ("flags", "processes"),
    [
        (["--prefill-dp-size", "1", "--decode-dp-size", "1"], 2),
        (["--prefill-dp-size", "2", "--decode-dp-size", "2"], 4),
        (["--prefill-dp-size", "2", "--decode-dp-size", "2", "--tp-size", "2", "--enable-dp-attention"], 4),
        (["--prefill-dp-size", "1", "--decode-dp-size", "2", "--decode-tp-size", "2", "--decode-enable-dp-attention"], 3),
        (["--prefill-dp-size", "1", "--decode-dp-size", "2"], 3),
    ],
)
def test_nnodes_must_divide_both_sides_scheduler_processes(flags: list[str], processes: int) -> None:
    """Not tp x dp (--dp-size, if given, is P + D, and the sides have a tp size each)."""
    assert ServerArgs.parse(flags).scheduler_processes == processes
    multi = ["--nnodes", "2", "--dist-init-addr", "h:1"]
    if processes % 2:
        with pytest.raises(ValueError, match=f"--nnodes 2 must divide the {processes} scheduler ranks"):
            ServerArgs.parse([*multi, *flags])
    else:
        ServerArgs.parse([*multi, *flags])


def test_every_scheduler_of_either_side_counts_the_same_processes() -> None:
    """A child parses the flags again: a decode scheduler with DP attention still counts the
    prefill side by the prefill side's own flags (its --enable-dp-attention is its side's)."""
    a = two_nodes("--prefill-dp-size", "2", "--decode-dp-size", "2", "--decode-tp-size", "2",
                  "--decode-enable-dp-attention")
    children = [ServerArgs.parse(a.to_cli(**r)) for r in scheduler_ranks(a)] + [ServerArgs.parse(a.to_cli())]
    assert [c.scheduler_processes for c in children] == [4, 4, 4, 4, 4]


def test_refusal_message_says_why() -> None:
    assert ATTN_TP_MESSAGE == (
        "prefill/decode disaggregation needs attention TP 1 on each side (tp 1, or DP attention with dp = tp): "
        "the KV of one DP group is not split over TP ranks yet"
    )
    validate_sides(ServerArgs.parse([*PD, "--dp-size", "3"]))  # the total is fine


class FakeSupervisor:
    def __init__(self, max_start_failures: int) -> None:
        self.children: list[tuple[str, list[str], str]] = []

    def add(self, name: str, argv: list[str], env: dict[str, str] | None = None, group: str = "") -> None:
        self.children.append((name, argv, group))

    def poll(self) -> None:
        return None

    def stop(self, timeout: float = 10.0, grace: float = 0.0) -> None:
        pass


def test_serve_waits_for_both_sides_and_hands_the_total_to_the_other_children(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    sups: list[FakeSupervisor] = []
    calls: list[str] = []

    def server_info(url: str) -> dict[str, Any]:  # 2 ranks up at first, then all 3
        calls.append(url)
        return {"internal_states": [{"dp_rank": r, "max_total_num_tokens": 64} for r in range(min(len(calls) + 1, 3))]}

    monkeypatch.setattr(cli, "Supervisor", lambda n: sups.append(FakeSupervisor(n)) or sups[-1])
    monkeypatch.setattr(cli, "resolve_model_path", lambda path: path)
    monkeypatch.setattr(cli, "server_info", server_info)
    monkeypatch.setattr(cli, "health_ok", lambda url: True)
    monkeypatch.setattr(cli, "supervise", lambda sup, stopping, coordinator: 0)
    monkeypatch.setattr(signal, "signal", lambda signum, handler: None)
    args = ServerArgs.parse([*PD, "--nats-url", "nats://127.0.0.1:1", "--model-path", "m"])
    assert cli.serve_forever(args) == 0
    assert len(calls) == 3  # 2 of 3 ranks up did not end the startup; the banner asked once more
    children = {name: (ServerArgs.parse(argv[3:]), group) for name, argv, group in sups[0].children}
    for name in ("tokenizer", "detokenizer", "dispatcher", "gateway"):
        assert (children[name][0].dp_size, children[name][0].prefill_dp_size) == (3, 1)
    decode, prefill = children["decode-scheduler1"][0], children["prefill-scheduler2"][0]
    assert (decode.disaggregation_mode, decode.dp_size, decode.dp_rank_base, decode.dp_rank) == ("decode", 2, 0, 1)
    assert (prefill.disaggregation_mode, prefill.dp_size, prefill.dp_rank_base, prefill.dp_rank) == ("prefill", 1, 2, 0)
    out = capsys.readouterr().out
    assert "(dp_size=3)" in out and "ranks        decode 2 DP x 1 TP, prefill 1 DP x 1 TP" in out


def test_on_node1_of_2_serve_gives_its_schedulers_the_node_address_it_resolved(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without --node-addr the launcher binds the route's source address; the prefill ranks'
    KV transfer binds and advertises the same one, never 127.0.0.1."""
    sups: list[FakeSupervisor] = []
    monkeypatch.setattr(cli, "Supervisor", lambda n: sups.append(FakeSupervisor(n)) or sups[-1])
    monkeypatch.setattr(cli, "resolve_model_path", lambda path: path)
    monkeypatch.setattr(cli, "start_node", lambda sup, args, plan: None)
    monkeypatch.setattr(cli, "WorldCoordinator", lambda *a: None)
    monkeypatch.setattr(cli, "supervise", lambda sup, stopping, coordinator: 0)
    monkeypatch.setattr(signal, "signal", lambda signum, handler: None)
    monkeypatch.setattr(nodes, "route_source_addr", lambda host: "10.9.0.2")
    args = ServerArgs.parse(["--prefill-dp-size", "1", "--decode-dp-size", "1", "--nnodes", "2", "--node-rank", "1",
                             "--dist-init-addr", "10.9.0.1:29500", "--gloo-socket-ifname", "lo",
                             "--nats-url", "nats://10.9.0.1:4222", "--model-path", "m"])
    assert cli.serve_forever(args) == 0
    (name, argv, _), = sups[0].children
    child = ServerArgs.parse(argv[3:])
    assert (name, child.disaggregation_mode, child.node_addr) == ("prefill-scheduler1", "prefill", "10.9.0.2")


def test_serve_refuses_a_layout_before_it_starts_anything(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(cli, "Supervisor", lambda n: pytest.fail("started"))
    assert cli.serve_forever(ServerArgs.parse([*PD, "--tp-size", "2"])) == 2
    assert ATTN_TP_MESSAGE in caplog.text
