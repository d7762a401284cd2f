"""Moving one request's KV rows from a prefill rank to a decode rank, behind a small interface.

Each side holds one `TransferEngine`. Both sides start their pair when a task is sent (`connect`,
`sender`), so its setup overlaps the prefill; the prefill rank's `KVSender` gets the rows once
prefilled, the decode rank's `KVReceiver` (a buffer of the size it expects) is posted when the
prefill rank says they are coming. So a pair's timeout bounds moving the rows, never the wait in
the prefill rank's queue. Both are polled with SGLang's states:

    BOOTSTRAPPING -> WAITING_FOR_INPUT (sender: rows not given yet) -> TRANSFERRING -> SUCCESS
                                                                     any of them -> FAILED

`GlooTransferEngine` is torch.distributed's gloo point-to-point over TCP (as vLLM's P2P connector
uses NCCL on GPUs): one two-process group per (decode instance, prefill instance, generation),
met at a TCPStore the prefill rank hosts on its node's address (its bootstrap address, advertised
in its load reports); the request's tag tells its rows apart on the pair. A peer that dies fails
every transfer on the pair at once (gloo sees the connection close). NATS never carries KV: its
payload limit (1 MB by default) and at-most-once delivery are wrong for bulk data.

`FakeTransferEngine` moves rows inside one process, for unit tests.
"""

from __future__ import annotations

import datetime
import enum
import logging
import threading
import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import torch
import torch.distributed as dist

from services.launcher.nodes import route_source_addr
from services.launcher.rendezvous import listen
from shared.bounded import BoundedDict
from shared.bus import server_list

log = logging.getLogger("scheduler.transfer")

CONNECT_TIMEOUT_S = 10.0  # a decode rank reaching a prefill rank's store
PAIR_TIMEOUT_S = 300.0  # a pair's setup, or one request's rows from posted to moved
BROKEN_PAIRS = 4096  # broken pairs remembered (by then the ranks that used them moved on to new ones)
KEPT_BUFFER_BYTES = 1 << 30  # receive buffers a decode rank keeps for reuse, at most
FOREVER = datetime.timedelta(days=365)


def bootstrap_host(node_addr: str, nats_url: str) -> str:
    """The address a prefill rank advertises to decode ranks: --node-addr, else the local address
    on its route to the bus (127.0.0.1 on one host; its own address in a compose network, where
    the decode ranks reach it as they reach the bus)."""
    if node_addr:
        return node_addr
    first = urllib.parse.urlsplit(server_list(nats_url or "nats://127.0.0.1:4222")[0])
    try:
        return route_source_addr(first.hostname or "127.0.0.1")
    except OSError as e:
        log.warning("no route to the bus at %s (%s): advertising 127.0.0.1", first.hostname, e)
        return "127.0.0.1"


class KVPoll(enum.IntEnum):
    FAILED = 0
    BOOTSTRAPPING = 1
    WAITING_FOR_INPUT = 2
    TRANSFERRING = 3
    SUCCESS = 4


@dataclass(frozen=True)
class Peer:
    """The other side of a pair: the prefill rank's bootstrap address and the pair's key (the decode
    rank names it: both instances and a generation, new after a pair broke)."""

    addr: str
    key: str


class Transfer:
    """One request's rows on one side; `poll` never blocks."""

    def __init__(self) -> None:
        self.state = KVPoll.BOOTSTRAPPING
        self.error = ""
        self.nbytes = 0
        self._lock = threading.Lock()
        self.result: Future[KVPoll] = Future()  # SUCCESS or FAILED, set from a transfer thread

    def poll(self) -> KVPoll:
        return self.state

    @property
    def done(self) -> bool:
        return self.state in (KVPoll.SUCCESS, KVPoll.FAILED)

    def _set(self, state: KVPoll, error: str = "") -> None:
        with self._lock:
            if self.done:
                return
            self.state, self.error = state, error
        if self.done:
            self.result.set_result(state)

    def fail(self, error: str) -> None:
        self._set(KVPoll.FAILED, error)


class KVReceiver(Transfer):
    """Decode side: `buffer` (nbytes of uint8) holds the rows once poll() is SUCCESS; it is the
    start of `base`, a buffer the engine may have received into before."""

    def __init__(self, nbytes: int, base: torch.Tensor | None = None) -> None:
        super().__init__()
        self.nbytes = nbytes
        self.base = torch.empty(nbytes, dtype=torch.uint8) if base is None else base
        self.buffer = self.base[:nbytes]


class KVSender(Transfer):
    """Prefill side: `send` the request's rows once they are computed."""

    def __init__(self) -> None:
        super().__init__()
        self._rows: Future[torch.Tensor | None] = Future()  # None: cancelled

    def send(self, rows: torch.Tensor) -> None:
        """Ships `rows` (any dtype; sent as their bytes). The tensor must not change until done."""
        rows = rows.contiguous().view(-1).view(torch.uint8)
        self.nbytes = rows.numel()
        self._rows.set_result(rows)

    def cancel(self, why: str) -> None:
        """Nothing will be sent (the decode rank was told so): FAILED, the pair untouched."""
        self.error = why
        self._rows.set_result(None)


class TransferEngine(ABC):
    bootstrap_addr = ""  # prefill side: where decode ranks meet it

    def connect(self, peer: Peer) -> None:
        """Decode side: starts setting up the pair `peer` if it is new (it never blocks)."""
        return None

    @abstractmethod
    def receiver(self, peer: Peer, tag: int, nbytes: int) -> KVReceiver:
        """Decode side: expects `nbytes` under `tag` from the pair `peer`."""

    @abstractmethod
    def sender(self, peer: Peer, tag: int) -> KVSender:
        """Prefill side: will send under `tag` to the pair `peer`."""

    def broken(self, peer: Peer) -> str:
        """Why the pair `peer` is broken ("" while it works): its peer died, or an operation failed."""
        return ""

    def release(self, rx: KVReceiver) -> None:
        """Decode side: nothing reads `rx`'s buffer any more (its rows are installed); the engine
        may receive into it again."""
        return None

    def close(self) -> None:
        return None


class GlooTransferEngine(TransferEngine):
    """Each blocking gloo call waits in a daemon thread of its own (a process never waits for
    them at exit). Both sides keep a receive posted on every pair under CANARY_TAG, which is never
    sent: it fails the moment the other process dies, so `broken` says so even while no rows are
    moving, and the pair is dropped (a prefill rank keeps no pair of a decode rank that died, a
    decode rank no store client of a prefill rank that died). Waits pass their own timeout: a
    pair's default timeout would end a wait that is only long, and gloo closes a pair whose
    operation timed out."""

    PREFILL, DECODE = 0, 1  # ranks within a pair
    CANARY_TAG = 0  # request tags start at 1

    def __init__(self, role: str, host: str = "127.0.0.1", timeout_s: float = PAIR_TIMEOUT_S) -> None:
        if role not in ("prefill", "decode"):
            raise ValueError(f"a transfer engine serves a prefill or a decode rank, not {role!r}")
        self.role = role
        self.host = host
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self._pairs: dict[str, Future[dist.ProcessGroupGloo]] = {}
        self._broken: BoundedDict[str, str] = BoundedDict(BROKEN_PAIRS)  # pair key -> why
        self._stores: dict[str, dist.TCPStore] = {}
        self._kept: list[torch.Tensor] = []  # receive buffers released for reuse (decode side)
        self._lock = threading.Lock()
        self._store: dist.TCPStore | None = None
        if role == "prefill":  # the store listens on `host` only: TCPStore alone binds every interface
            listener = listen(host, 0)
            port = listener.getsockname()[1]
            # the store owns the socket from here (it closes it): a Python socket object closing the
            # same fd again later would close whatever reused the number
            self._store = dist.TCPStore(host, port, is_master=True, wait_for_workers=False,
                                        timeout=self.timeout, master_listen_fd=listener.detach(),
                                        use_libuv=False)
            self.bootstrap_addr = f"{host}:{port}"

    @staticmethod
    def _thread(fn: Callable[..., None], *args: object) -> None:
        threading.Thread(target=fn, args=args, name="kv-transfer", daemon=True).start()

    # --- pairs ---------------------------------------------------------------------------------

    def _pair(self, peer: Peer) -> Future[dist.ProcessGroupGloo]:
        with self._lock:
            pair = self._pairs.get(peer.key)
            if pair is None:
                pair = self._pairs[peer.key] = Future()
                self._thread(self._connect, peer, pair)
            return pair

    def _connect(self, peer: Peer, pair: Future[dist.ProcessGroupGloo]) -> None:
        """Blocks until the other side joins the pair too."""
        try:
            if self.role == "prefill":
                assert self._store is not None
                store, rank = self._store, self.PREFILL
            else:
                store, rank = self._decode_store(peer.addr), self.DECODE
            options = dist.ProcessGroupGloo._Options()
            options._timeout = self.timeout
            options._devices = [dist.ProcessGroupGloo.create_device(hostname=self.host)]  # this rank's address
            pg = dist.ProcessGroupGloo(dist.PrefixStore(f"pair/{peer.key}", store), rank, 2, options)
        except Exception as e:  # noqa: BLE001 - the peer is gone or unreachable
            self._break(peer, f"connecting to {peer.addr} failed: {e}")
            pair.set_exception(e)
            return
        log.info("kv pair %s connected (%s side, bootstrap %s)", peer.key, self.role, peer.addr)
        pair.set_result(pg)
        self._canary(peer, pg)

    def _canary(self, peer: Peer, pg: dist.ProcessGroupGloo) -> None:
        other = ("decode", self.DECODE) if self.role == "prefill" else ("prefill", self.PREFILL)
        try:
            pg.recv([torch.empty(1, dtype=torch.uint8)], other[1], self.CANARY_TAG).wait(FOREVER)
        except Exception as e:  # noqa: BLE001
            self._break(peer, f"the {other[0]} rank's end of the pair closed: {e}")

    def _decode_store(self, addr: str) -> dist.TCPStore:
        with self._lock:
            store = self._stores.get(addr)
        if store is None:
            host, _, port = addr.rpartition(":")
            connect = min(CONNECT_TIMEOUT_S, self.timeout.total_seconds())
            store = dist.TCPStore(host, int(port), is_master=False, timeout=datetime.timedelta(seconds=connect))
            with self._lock:
                self._stores[addr] = store
        return store

    def _break(self, peer: Peer, why: str) -> None:
        """A pair that failed is never used again (a new one gets a new key); on the decode side
        its store client goes too (a rank has one pair per prefill instance)."""
        with self._lock:
            self._pairs.pop(peer.key, None)
            if peer.key not in self._broken:
                self._broken[peer.key] = why
            if self.role == "decode":
                self._stores.pop(peer.addr, None)

    def broken(self, peer: Peer) -> str:
        with self._lock:
            return self._broken.get(peer.key, "")

    # --- transfers -----------------------------------------------------------------------------

    def connect(self, peer: Peer) -> None:
        self._pair(peer)

    def receiver(self, peer: Peer, tag: int, nbytes: int) -> KVReceiver:
        rx = KVReceiver(nbytes, self._kept_buffer(nbytes))
        self._thread(self._receive, self._pair(peer), peer, tag, rx)
        return rx

    def _kept_buffer(self, nbytes: int) -> torch.Tensor | None:
        """The smallest kept buffer of at least `nbytes`: a fresh one pays a page fault per 4 KiB
        on every receive (about half of a 94 MB transfer's time on loopback here)."""
        with self._lock:
            fits = [i for i, b in enumerate(self._kept) if b.numel() >= nbytes]
            if not fits:
                return None
            return self._kept.pop(min(fits, key=lambda i: self._kept[i].numel()))

    def release(self, rx: KVReceiver) -> None:
        # only a receive that succeeded: a failed one's gloo operation may not be over
        if rx.poll() != KVPoll.SUCCESS or rx.base.numel() == 0:
            return
        with self._lock:
            self._kept.append(rx.base)
            self._kept.sort(key=torch.Tensor.numel, reverse=True)
            while sum(b.numel() for b in self._kept) > KEPT_BUFFER_BYTES:
                self._kept.pop()  # the smallest
        rx.base = rx.buffer = torch.empty(0, dtype=torch.uint8)

    def sender(self, peer: Peer, tag: int) -> KVSender:
        tx = KVSender()
        self._thread(self._send, self._pair(peer), peer, tag, tx)
        return tx

    def _receive(self, pair: Future[dist.ProcessGroupGloo], peer: Peer, tag: int, rx: KVReceiver) -> None:
        try:
            pg = pair.result()
            rx._set(KVPoll.TRANSFERRING)
            if rx.nbytes:
                pg.recv([rx.buffer], self.PREFILL, tag).wait(self.timeout)
        except Exception as e:  # noqa: BLE001 - any failure of the pair fails the transfer
            self._break(peer, str(e))
            rx.fail(f"receiving from {peer.addr} failed: {e}")
            return
        rx._set(KVPoll.SUCCESS)

    def _send(self, pair: Future[dist.ProcessGroupGloo], peer: Peer, tag: int, tx: KVSender) -> None:
        try:
            pg = pair.result()
            tx._set(KVPoll.WAITING_FOR_INPUT)
            rows = tx._rows.result()
            if rows is None:
                tx.fail(tx.error or "cancelled")
                return
            tx._set(KVPoll.TRANSFERRING)
            if rows.numel():
                pg.send([rows], self.DECODE, tag).wait(self.timeout)
        except Exception as e:  # noqa: BLE001
            self._break(peer, str(e))
            tx.fail(f"sending to pair {peer.key} failed: {e}")
            return
        tx._set(KVPoll.SUCCESS)


class FakeTransferEngine(TransferEngine):
    """In-process pairs for unit tests: a sender's rows land in the receiver with the same key and
    tag. `fail_next` fails the next transfer on both sides."""

    _receivers: dict[tuple[str, int], KVReceiver] = {}

    def __init__(self, role: str) -> None:
        self.role = role
        self.bootstrap_addr = "fake:0" if role == "prefill" else ""
        self.fail_next = ""

    def receiver(self, peer: Peer, tag: int, nbytes: int) -> KVReceiver:
        rx = KVReceiver(nbytes)
        rx._set(KVPoll.TRANSFERRING)
        FakeTransferEngine._receivers[(peer.key, tag)] = rx
        return rx

    def sender(self, peer: Peer, tag: int) -> KVSender:
        engine = self

        class _Sender(KVSender):
            def send(self, rows: torch.Tensor) -> None:
                super().send(rows)
                data = self._rows.result()
                assert data is not None
                rx = FakeTransferEngine._receivers.pop((peer.key, tag), None)
                if engine.fail_next or rx is None or rx.nbytes != data.numel():
                    why = engine.fail_next or ("no receiver" if rx is None else f"{data.numel()} != {rx.nbytes} bytes")
                    engine.fail_next = ""
                    self.fail(why)
                    if rx is not None:
                        rx.fail(why)
                    return
                rx.buffer.copy_(data)
                rx._set(KVPoll.SUCCESS)
                self._set(KVPoll.SUCCESS)

        tx = _Sender()
        tx._set(KVPoll.WAITING_FOR_INPUT)
        return tx
