"""The NATS bus: connect with reconnect, typed publish / subscribe, request / reply.

Every payload is a msgspec Struct in msgpack. A payload that does not decode as the subject's type
is logged with its subject and dropped; a handler that raises is logged; neither stops the service.
Drop logging is throttled per subscription (a flood of garbage must not flood the log): the first
20 drops each, then every 1000th with the running count.

`--nats-url` may list several servers (a NATS cluster); they are tried in order.
`connect_options(args)` turns the `--nats-user/--nats-password/--nats-token/--nats-tls-*` flags
into nats.connect options; every service connects with them.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from shared.config import ServerArgs
from shared.log import Throttle
from shared.messages import encode

T = TypeVar("T")
log = logging.getLogger("bus")

Handler = Callable[[T], Awaitable[None]]
Responder = Callable[[T], Awaitable[msgspec.Struct]]


def connect_options(args: ServerArgs) -> dict[str, Any]:
    """nats.connect's auth / TLS options from the server args (empty when none are set)."""
    options: dict[str, Any] = {}
    if args.nats_user or args.nats_password:
        options["user"], options["password"] = args.nats_user, args.nats_password
    if args.nats_token:
        options["token"] = args.nats_token
    if args.nats_tls_ca or args.nats_tls_cert or args.nats_url.startswith("tls://"):
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=args.nats_tls_ca or None)
        if args.nats_tls_cert:
            ctx.load_cert_chain(args.nats_tls_cert, args.nats_tls_key)
        options["tls"] = ctx
    return options


def server_list(url: str) -> list[str]:
    """`--nats-url` as nats.connect's servers: one URL, or several comma-separated (a multi-node
    deployment lists its node's server first, then another node's; a reconnect tries them in turn)."""
    return [u.strip() for u in url.split(",") if u.strip()]


class Bus:
    def __init__(self, nc: Client, name: str) -> None:
        self.nc = nc
        self.name = name
        self.dropped = 0  # messages that failed to decode
        self.drop_log = Throttle(first=20, every=1000)  # keyed by subscription (a pattern), so bounded

    @classmethod
    async def connect(cls, url: str, name: str, **options: Any) -> Bus:
        async def on_error(e: Exception) -> None:
            log.warning("nats error: %r", e)

        async def on_disconnect() -> None:
            log.warning("nats disconnected")

        async def on_reconnect() -> None:
            log.info("nats reconnected url=%s", nc.connected_url.netloc if nc.connected_url else "?")

        nc = await nats.connect(
            servers=server_list(url),
            dont_randomize=True,  # in the given order: this node's server first (a NATS cluster)
            name=name,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.25,
            connect_timeout=2,
            allow_reconnect=True,
            error_cb=on_error,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
            pending_size=64 * 1024 * 1024,
            **options,
        )
        return cls(nc, name)

    async def publish(self, subject: str, msg: msgspec.Struct) -> None:
        """Publishes `msg`; one addressed from bad input (a gateway id that makes no subject) is
        dropped and logged, not raised into the handler that answers it."""
        try:
            await self.nc.publish(subject, encode(msg))
        except nats.errors.BadSubjectError:
            if self.drop_log.should_log("bad subject"):
                log.warning("dropped a %s to the invalid subject %r", type(msg).__name__, subject[:200])

    async def subscribe(
        self, subject: str, kind: type[T], handler: Handler[T], queue: str = ""
    ) -> Subscription:
        decoder = msgspec.msgpack.Decoder(kind)

        async def on_msg(msg: Msg) -> None:
            item = self._decode(decoder, msg, subject)
            if item is None:
                return
            try:
                await handler(item)
            except Exception:
                log.exception("handler failed subject=%s", msg.subject)

        return await self.nc.subscribe(subject, queue=queue, cb=on_msg, pending_msgs_limit=1_000_000)

    async def serve(self, subject: str, kind: type[T], responder: Responder[T], queue: str = "") -> Subscription:
        """Request / reply: the responder's Struct is the reply."""
        decoder = msgspec.msgpack.Decoder(kind)

        async def on_msg(msg: Msg) -> None:
            item = self._decode(decoder, msg, subject)
            if item is None or not msg.reply:
                return
            try:
                reply = await responder(item)
            except Exception:
                log.exception("responder failed subject=%s", msg.subject)
                return
            await msg.respond(encode(reply))

        return await self.nc.subscribe(subject, queue=queue, cb=on_msg)

    async def request(self, subject: str, msg: msgspec.Struct, kind: type[T], timeout: float = 1.0) -> T:
        reply = await self.nc.request(subject, encode(msg), timeout=timeout)
        return msgspec.msgpack.decode(reply.data, type=kind)

    def _decode(self, decoder: msgspec.msgpack.Decoder[Any], msg: Msg, subscription: str) -> Any:
        try:
            return decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as e:  # bad UTF-8 is the last
            self.dropped += 1
            if self.drop_log.should_log(subscription):
                log.warning(
                    "dropped undecodable message subject=%s bytes=%d dropped_total=%d error=%s",
                    msg.subject, len(msg.data), self.dropped, str(e)[:200],
                )
            return None

    async def close(self, timeout: float = 3.0) -> None:
        """Drains (delivers what is pending) unless the server is unreachable, then closes."""
        if self.nc.is_closed:
            return
        if self.nc.is_connected:
            try:
                await asyncio.wait_for(self.nc.drain(), timeout)
                return
            except Exception as e:
                log.warning("drain failed (%r); closing", e)
        await self.nc.close()
