"""Node 0's launcher decides when a world across nodes restarts and at which epoch
(services/launcher/worlds.py): the coordinators of node 0 and node 1 over a fake bus, a fake
clock, and a real supervisor whose members are sleeping processes."""

from __future__ import annotations

import sys
from typing import Any

import msgspec
import pytest

from services.launcher.nodes import NodePlan
from services.launcher.supervisor import Supervisor, epoch_of
from services.launcher.worlds import REPORT_S, WorldCoordinator
from shared.messages import NodeReport, WorldDown, WorldEpochs
from shared.subjects import Subjects

WORLD = "schedulers"


class FakeBus:
    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.subscribed: list[str] = []
        self.sent: list[tuple[str, msgspec.Struct]] = []
        self.inbox: list[tuple[float, msgspec.Struct]] = []

    def subscribe(self, subject: str, kind: type) -> None:
        self.subscribed.append(subject)

    def publish(self, subject: str, msg: msgspec.Struct) -> None:
        self.sent.append((subject, msg))

    def deliver(self, msg: msgspec.Struct) -> None:
        self.inbox.append((self.clock(), msg))

    def received(self) -> list[tuple[float, msgspec.Struct]]:
        out, self.inbox = self.inbox, []
        return out

    def last(self, kind: type) -> Any:
        return next(m for _, m in reversed(self.sent) if isinstance(m, kind))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def plan(node: int) -> NodePlan:
    return NodePlan(2, node, f"10.9.0.{node + 1}", "10.9.0.1:29500", 4222, 6222, (), "lo")


@pytest.fixture
def node():  # noqa: ANN201
    made: list[Supervisor] = []

    def build(k: int) -> tuple[WorldCoordinator, Supervisor, FakeBus, Clock]:
        clock = Clock()
        sup = Supervisor()
        made.append(sup)
        bus = FakeBus(clock)
        coord = WorldCoordinator(sup, plan(k), {WORLD: {0, 1}}, bus, Subjects(), clock=clock)  # type: ignore[arg-type]
        sleeper = [sys.executable, "-c", "import time; time.sleep(60)", "--dist-store-prefix", f"{WORLD}/0"]
        sup.add(f"scheduler{k}-tp{k}", sleeper, group=WORLD)
        return coord, sup, bus, clock

    yield build
    for sup in made:
        sup.stop(timeout=5)


def running_epoch(sup: Supervisor) -> int | None:
    (member,) = sup.members(WORLD)
    return epoch_of(member) if member.exited is None and member.proc is not None else None


def test_node0_holds_a_broken_world_until_node1_reports_after_the_break(node) -> None:  # noqa: ANN001
    coord, sup, bus, clock = node(0)
    bus.deliver(NodeReport(node_rank=1, instance_id="a"))
    coord.step()
    assert running_epoch(sup) == 0 and bus.last(WorldEpochs).epochs == {WORLD: 0}
    sup.members(WORLD)[0].proc.kill()  # its collective failed: it exits
    sup.members(WORLD)[0].proc.wait()
    clock.now += 0.2
    assert sup.poll() is None
    assert WORLD in sup.held and bus.last(WorldEpochs).epochs == {WORLD: 1}
    bus.deliver(NodeReport(node_rank=1, instance_id="a"))  # already on its way when node 1 died
    coord.step()
    assert running_epoch(sup) is None  # held: a report that old proves nothing
    clock.now += REPORT_S + 0.1
    bus.deliver(NodeReport(node_rank=1, instance_id="a"))
    coord.step()
    assert running_epoch(sup) == 1 and WORLD not in sup.held


def test_node0_moves_on_once_per_broken_epoch_and_when_a_node_relaunches(node) -> None:  # noqa: ANN001
    coord, sup, bus, clock = node(0)
    bus.deliver(NodeReport(node_rank=1, instance_id="a"))
    bus.deliver(WorldDown(world=WORLD, epoch=0, node_rank=1))
    bus.deliver(WorldDown(world=WORLD, epoch=0, node_rank=1))  # the same break, twice: one move
    coord.step()
    assert coord.epochs[WORLD] == 1 and running_epoch(sup) is None
    clock.now += 1
    bus.deliver(NodeReport(node_rank=1, instance_id="a"))
    coord.step()
    assert running_epoch(sup) == 1
    clock.now += 1
    bus.deliver(NodeReport(node_rank=1, instance_id="b"))  # node 1's launcher started again
    coord.step()
    assert coord.epochs[WORLD] == 2 and running_epoch(sup) is None
    assert bus.last(WorldEpochs).nodes == {1: "b"}
    clock.now += 1
    bus.deliver(NodeReport(node_rank=1, instance_id="b"))
    coord.step()
    assert running_epoch(sup) == 2


def test_node1_starts_only_at_an_epoch_that_names_it_and_is_newer_than_its_break(node) -> None:  # noqa: ANN001
    coord, sup, bus, clock = node(1)
    assert running_epoch(sup) is None  # held until node 0 names the epoch
    coord.step()
    assert bus.last(NodeReport).instance_id == coord.instance_id
    bus.deliver(WorldEpochs(epochs={WORLD: 3}, nodes={1: "an-older-launcher"}))
    coord.step()
    assert running_epoch(sup) is None
    bus.deliver(WorldEpochs(epochs={WORLD: 3}, nodes={1: coord.instance_id}))
    coord.step()
    assert running_epoch(sup) == 3
    sup.members(WORLD)[0].proc.kill()
    sup.members(WORLD)[0].proc.wait()
    assert sup.poll() is None
    assert bus.last(WorldDown) == WorldDown(world=WORLD, epoch=3, node_rank=1)
    bus.deliver(WorldEpochs(epochs={WORLD: 3}, nodes={1: coord.instance_id}))  # node 0 has not moved yet
    coord.step()
    assert running_epoch(sup) is None
    bus.deliver(WorldEpochs(epochs={WORLD: 4}, nodes={1: coord.instance_id}))
    coord.step()
    assert running_epoch(sup) == 4
    bus.deliver(WorldEpochs(epochs={WORLD: 5}, nodes={1: coord.instance_id}))  # moved by a break elsewhere
    coord.step()
    assert running_epoch(sup) == 5
