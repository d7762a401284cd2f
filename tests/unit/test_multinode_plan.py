"""Multi-node placement and addresses (services/launcher/nodes.py, layout.py), the flags' checks,
the bus's server list and a world's rendezvous epoch in its members' flags."""

from __future__ import annotations

import pytest

from services.launcher.layout import node_ranks, node_worlds
from services.launcher.nodes import NodePlan, interface_of, node_of, route_source_addr
from services.launcher.supervisor import Child, epoch_of, free_port, fresh_dist_addr, set_epoch
from shared.bus import server_list
from shared.config import ServerArgs

NODE0 = "10.9.0.1"


def args(*flags: str) -> ServerArgs:
    return ServerArgs.parse(["--nnodes", "2", "--dist-init-addr", f"{NODE0}:29500", "--node-addr", "127.0.0.1",
                             "--gloo-socket-ifname", "lo", *flags])


def placed(*flags: str) -> dict[int, list[tuple[int, int]]]:
    """node -> its (dp_rank, tp_rank) processes."""
    out = {}
    for k in (0, 1):
        a = args("--node-rank", str(k), *flags)
        out[k] = [(int(r["dp_rank"]), int(r.get("tp_rank", 0))) for r in node_ranks(a, NodePlan.from_args(a))]
    return out


def test_placement_keeps_replicas_and_attention_groups_inside_a_node_where_they_fit() -> None:
    assert placed("--dp-size", "2") == {0: [(0, 0)], 1: [(1, 0)]}
    assert placed("--tp-size", "2") == {0: [(0, 0)], 1: [(0, 1)]}  # one world across the nodes
    assert placed("--tp-size", "2", "--dp-size", "2") == {0: [(0, 0), (0, 1)], 1: [(1, 0), (1, 1)]}
    dpa = ("--tp-size", "2", "--dp-size", "2", "--enable-dp-attention")
    assert placed(*dpa) == {0: [(0, 0)], 1: [(1, 1)]}
    dpa4 = ("--tp-size", "4", "--dp-size", "2", "--enable-dp-attention")
    assert placed(*dpa4) == {0: [(0, 0), (0, 1)], 1: [(1, 2), (1, 3)]}  # node k: tp ranks [2k, 2k+2)
    assert [node_of(i, 8, 4) for i in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_world_ranks_meet_at_node0_store_under_their_world_prefix() -> None:
    a = args("--node-rank", "1", "--tp-size", "2", "--dp-size", "2")
    ranks = node_ranks(a, NodePlan.from_args(a))
    assert {(r["dist_init_addr"], r["dist_store_prefix"]) for r in ranks} == {(f"{NODE0}:29500", "scheduler1/0")}
    a = args("--node-rank", "1", "--tp-size", "2", "--dp-size", "2", "--enable-dp-attention")
    assert [r["dist_store_prefix"] for r in node_ranks(a, NodePlan.from_args(a))] == ["schedulers/0"]
    a = args("--dp-size", "2")  # replicas of one rank have no world
    assert all("dist_store_prefix" not in r for r in node_ranks(a, NodePlan.from_args(a)))


def test_plan_binds_the_node_address_and_lists_the_local_nats_server_first() -> None:
    worker = NodePlan.from_args(args("--node-rank", "1", "--node-addr", "10.9.0.2", "--dp-size", "2"))
    assert worker.nats_url == f"nats://10.9.0.2:4222,nats://{NODE0}:4222"
    assert worker.nats_cluster_argv() == [
        "--cluster_name", "dpserve", "--cluster", "nats://10.9.0.2:6222", "--routes", f"nats://{NODE0}:6222",
    ]
    head = NodePlan.from_args(args("--node-addr", NODE0, "--dp-size", "2", "--nats-port", "4333"))
    assert head.nats_url == f"nats://{NODE0}:4333" and "--routes" not in head.nats_cluster_argv()
    routes = NodePlan.from_args(args("--dp-size", "2", "--nats-routes", "nats://a:1, nats://b:2"))
    assert routes.nats_routes == ("nats://a:1", "nats://b:2")


def test_defaults_come_from_the_route_and_the_interface() -> None:
    assert route_source_addr("127.0.0.1") == "127.0.0.1"
    assert interface_of("127.0.0.1") == "lo"
    a = ServerArgs.parse(["--nnodes", "2", "--dist-init-addr", "127.0.0.1:29500", "--dp-size", "2"])
    plan = NodePlan.from_args(a)
    assert (plan.node_addr, plan.gloo_ifname) == ("127.0.0.1", "lo")
    with pytest.raises(ValueError, match="no network interface holds 192.0.2.77"):
        interface_of("192.0.2.77")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--nnodes", "2", "--dp-size", "2"], "needs --dist-init-addr HOST:PORT"),
        (["--nnodes", "2", "--dist-init-addr", "10.9.0.1", "--dp-size", "2"], "needs --dist-init-addr HOST:PORT"),
        (["--nnodes", "2", "--dist-init-addr", "h:1", "--dp-size", "3"], "must divide the 3 scheduler ranks"),
        (["--nnodes", "2", "--node-rank", "2", "--dist-init-addr", "h:1"], r"--node-rank 2 must be in \[0"),
        (["--max-start-failures", "0"], "--max-start-failures must be >= 1"),
    ],
)
def test_bad_node_flags_are_refused(flags: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServerArgs.parse(flags)


def test_server_list_keeps_the_order() -> None:
    assert server_list("nats://a:1") == ["nats://a:1"]
    assert server_list("nats://b:2, nats://a:1,") == ["nats://b:2", "nats://a:1"]


def test_a_world_restarts_at_another_epoch_of_the_same_store() -> None:
    member = Child("scheduler0-tp0", ["x", "--dist-init-addr", f"{NODE0}:29500", "--dist-store-prefix", "schedulers/0"])
    assert epoch_of(member) == 0
    set_epoch(member, 7)
    assert member.argv[1:] == ["--dist-init-addr", f"{NODE0}:29500", "--dist-store-prefix", "schedulers/7"]
    alone = Child("scheduler0-tp0", ["x", "--dist-init-addr", "127.0.0.1:5555"])
    fresh_dist_addr([alone])
    assert alone.argv[2] != "127.0.0.1:5555"  # one node: a fresh store port, as before


def test_every_world_of_a_multinode_deployment_is_node0s_to_restart() -> None:
    replicas = args("--tp-size", "2", "--dp-size", "2")  # each replica inside one node
    assert node_worlds(replicas, 0) == {"scheduler0": {0}, "scheduler1": {1}}
    assert node_worlds(replicas, 1) == {"scheduler1": {1}}
    dpa = args("--tp-size", "2", "--dp-size", "2", "--enable-dp-attention")
    assert node_worlds(dpa, 1) == {"schedulers": {0, 1}}
    assert node_worlds(args("--dp-size", "2"), 0) == {}


def test_a_rank_that_cannot_reach_the_rendezvous_has_a_broken_world() -> None:
    """Joining fails within the timeout as WorldBroken (the scheduler's exit status 3), not a hang
    or a generic crash that would count against the rank."""
    from services.scheduler.dist_sync import WorldBroken, init_world
    from services.scheduler.dp_attention import ParallelLayout

    layout = ParallelLayout.from_args(2, 1, 1, enable_dp_attention=False)
    with pytest.raises(WorldBroken, match="join the world"):
        init_world(layout, f"127.0.0.1:{free_port()}", "cpu", timeout_s=1.0, store_prefix="scheduler0/0")
