"""Restarts of the torch.distributed worlds of a multi-node deployment, decided by node 0's launcher.

On one node the supervisor restarts a broken world by itself (a fresh store port). A world whose
ranks live on several nodes can only restart whole if every node starts its members again at the
same rendezvous epoch (`nodes.world_prefix`), and only once every node of the world is there.
Every world of a multi-node deployment meets at node 0's store, so node 0 decides for all of them
(one inside another node included: it starts once node 0 is there, not before, and its restarts
cost a round trip to node 0). The launchers talk over the bus (subjects `launcher.*`):

- every launcher sends `NodeReport` (its node, a fresh instance id per start) every REPORT_S;
- node 0 sends `WorldEpochs` (each world's epoch and the launcher instances it knows)
  every REPORT_S and at once when an epoch moves;
- a node whose local member died stops the world's other local members and sends `WorldDown`;
- a launcher that ends the deployment (a process kept dying at its start) sends `LauncherStop`,
  and every other launcher ends with it (node 0's API would otherwise serve without those ranks,
  or node k's ranks wait for a node 0 that is gone).

Node 0 moves a world to the next epoch when one of its members died anywhere (locally, or a
`WorldDown` of the current epoch) or when a node of the world came back as a new launcher
instance (a dead node's ranks are gone). It restarts its own members at the new epoch once every
node of the world has reported since the world broke (a live launcher reports within REPORT_S;
a dead node's last report may be younger than any timeout), and within NODE_TIMEOUT_S; until then
they stay stopped (a world with a node away cannot form, its rendezvous would only time out). The other nodes start their
members when they see an epoch newer than the one they went down at (on a fresh launcher: the
first epoch that lists the launcher's own instance, so a restarted node never joins a stale one).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import msgspec

from services.launcher.nodes import NodePlan
from services.launcher.supervisor import Supervisor, epoch_of
from shared.bus import Bus
from shared.messages import LauncherStop, NodeReport, WorldDown, WorldEpochs
from shared.subjects import Subjects

log = logging.getLogger("launcher")

REPORT_S = 0.5
NODE_TIMEOUT_S = 3.0


class LauncherBus:
    """The launcher's NATS client, on a thread of its own (the supervisor loop is synchronous):
    what arrives waits in `inbox` for the loop, with the clock() of its arrival; publishes are
    fire-and-forget."""

    def __init__(self, url: str, options: dict[str, Any], clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True, name="launcher-bus").start()
        self.bus: Bus = self._run(Bus.connect(url, name="launcher", **options)).result(timeout=30)
        self.inbox: queue.SimpleQueue[tuple[float, msgspec.Struct]] = queue.SimpleQueue()

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def subscribe(self, subject: str, kind: type[msgspec.Struct]) -> None:
        async def put(item: msgspec.Struct) -> None:
            self.inbox.put((self.clock(), item))

        self._run(self.bus.subscribe(subject, kind, put)).result(timeout=10)

    def publish(self, subject: str, msg: msgspec.Struct) -> None:
        self._run(self.bus.publish(subject, msg))

    def received(self) -> list[tuple[float, msgspec.Struct]]:
        out = []
        while not self.inbox.empty():
            out.append(self.inbox.get_nowait())
        return out

    def close(self) -> None:
        self._run(self.bus.close()).result(timeout=5)
        self.loop.call_soon_threadsafe(self.loop.stop)


class WorldCoordinator:
    """This launcher's part in the protocol above (node 0's or another node's); all its state is
    touched only by `step` and the supervisor's callback, both on the supervisor loop's thread."""

    def __init__(
        self, sup: Supervisor, plan: NodePlan, worlds: dict[str, set[int]], bus: LauncherBus, subjects: Subjects,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sup, self.plan, self.bus, self.subjects, self.clock = sup, plan, bus, subjects, clock
        self.worlds = worlds  # world -> the nodes its ranks run on (layout.node_worlds)
        self.instance_id = uuid.uuid4().hex[:8]
        self.epochs = dict.fromkeys(worlds, 0)  # node 0: the authority; elsewhere: unused
        self.nodes: dict[int, tuple[str, float]] = {}  # node 0: node -> (launcher instance, clock() seen)
        self.broke_at = dict.fromkeys(worlds, float("-inf"))  # node 0: clock() when each last broke
        self.down_at: dict[str, int] = dict.fromkeys(worlds, -1)  # other nodes: start above this epoch
        self.last_report = float("-inf")
        sup.coordinated |= set(worlds)
        sup.on_world_down = self.world_down
        bus.subscribe(subjects.launcher_stop, LauncherStop)
        if plan.is_head:
            bus.subscribe(subjects.nodes, NodeReport)
            bus.subscribe(subjects.world_down, WorldDown)
        else:
            sup.held |= set(worlds)  # until node 0 names the epoch
            bus.subscribe(subjects.world_epochs, WorldEpochs)

    def step(self) -> str | None:
        """The supervisor loop's turn: handle what arrived, start what may start, report. Returns
        why the deployment ends when another node's launcher ended it."""
        for at, msg in self.bus.received():
            if isinstance(msg, LauncherStop) and msg.instance_id != self.instance_id:
                return f"node {msg.node_rank}'s launcher ended the deployment: {msg.reason}"
            if isinstance(msg, NodeReport):
                self.on_node_report(msg, at)
            elif isinstance(msg, WorldDown):
                log.warning("world %s: a member on node %d died at epoch %d", msg.world, msg.node_rank, msg.epoch)
                self.next_epoch(msg.world, msg.epoch)
            elif isinstance(msg, WorldEpochs):
                self.on_epochs(msg)
        if self.plan.is_head:
            self.start_ready()
        if self.clock() - self.last_report >= REPORT_S:
            self.last_report = self.clock()
            if self.plan.is_head:
                self.publish_epochs()
            else:
                self.bus.publish(self.subjects.nodes, NodeReport(node_rank=self.plan.node_rank, instance_id=self.instance_id))
        return None

    def end(self, reason: str) -> None:
        """Tells every other launcher that this one ends the deployment (sent when the bus closes)."""
        stop = LauncherStop(node_rank=self.plan.node_rank, instance_id=self.instance_id, reason=reason)
        self.bus.publish(self.subjects.launcher_stop, stop)

    def world_down(self, world: str, epoch: int) -> None:
        """Supervisor callback: a local member died (its local peers are stopped already)."""
        if self.plan.is_head:
            self.next_epoch(world, epoch)
        else:
            self.down_at[world] = max(self.down_at[world], epoch)
            self.bus.publish(self.subjects.world_down, WorldDown(world=world, epoch=epoch, node_rank=self.plan.node_rank))

    # --- node 0 ------------------------------------------------------------------------------

    def next_epoch(self, world: str, died_at: int) -> None:
        """The world broke at `died_at`: stop it here and move it on (once per epoch)."""
        if world not in self.epochs or died_at < self.epochs[world]:
            return  # news of an epoch already left behind
        self.epochs[world] = died_at + 1
        self.broke_at[world] = self.clock()
        log.warning("world %s moves to epoch %d", world, self.epochs[world])
        self.sup.hold(world)
        self.publish_epochs()

    def on_node_report(self, report: NodeReport, at: float) -> None:
        before = self.nodes.get(report.node_rank)
        self.nodes[report.node_rank] = (report.instance_id, at)
        if before is not None and before[0] != report.instance_id:
            log.warning("node %d's launcher started again (%s): its worlds restart", report.node_rank, report.instance_id)
            for world, nodes in self.worlds.items():
                if report.node_rank in nodes:
                    self.next_epoch(world, self.epochs[world])

    def node_up(self, node: int, since: float) -> bool:
        """Node `node`'s launcher reported well after `since` (a report already on its way when
        the node died arrives just after) and within NODE_TIMEOUT_S."""
        seen = self.nodes.get(node)
        if node == self.plan.node_rank:
            return True
        return seen is not None and seen[1] > since + REPORT_S and self.clock() - seen[1] < NODE_TIMEOUT_S

    def start_ready(self) -> None:
        for world in sorted(self.sup.held & set(self.worlds)):
            if all(self.node_up(n, self.broke_at[world]) for n in self.worlds[world]):
                self.sup.start_world(world, self.epochs[world])

    def publish_epochs(self) -> None:
        nodes = {n: seen[0] for n, seen in self.nodes.items()}
        self.bus.publish(self.subjects.world_epochs, WorldEpochs(epochs=dict(self.epochs), nodes=nodes))

    # --- the other nodes ---------------------------------------------------------------------

    def on_epochs(self, msg: WorldEpochs) -> None:
        if msg.nodes.get(self.plan.node_rank) != self.instance_id:
            return  # node 0 has not heard from this launcher yet: its epochs may predate it
        for world, epoch in msg.epochs.items():
            if world not in self.worlds:
                continue
            if world in self.sup.held:
                if epoch > self.down_at[world]:
                    self.sup.start_world(world, epoch)
            elif epoch != epoch_of(self.sup.members(world)[0]):
                log.warning("world %s: node 0 moved it to epoch %d", world, epoch)
                self.sup.start_world(world, epoch)
