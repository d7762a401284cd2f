"""The HTTP front door: the aiohttp app over a `GatewayState`, and the service that runs it.

`build_app(state)` puts the middlewares and every route module over one state, so tests run the
real app with a fake bus and no NATS. `GatewayService` builds the state on the real bus, feeds it
the bus's outputs, load reports and metrics snapshots, and serves the app.

Routes: `/generate` (services/gateway/generate.py), the OpenAI routes (openai.py), SGLang's
operational routes and `/health` (sglang_routes.py), `/metrics` (metrics.py), `/openapi.json`
(openapi.py). Every error answer is JSON (services/gateway/replies.py). This module is imported
by the entry point only.
"""

from __future__ import annotations

from aiohttp import web

from services.gateway.auth import api_key_middleware
from services.gateway.generate import add_generate_route
from services.gateway.metrics import add_metrics_routes
from services.gateway.openai import add_openai_routes
from services.gateway.openapi import add_openapi_route
from services.gateway.replies import MAX_BODY_BYTES, allow_any_origin, cors, json_errors
from services.gateway.sglang_routes import add_sglang_routes
from services.gateway.shutdown import drain_requests
from services.gateway.state import GatewayState
from shared.actor import Service
from shared.config import ServerArgs
from shared.messages import LoadReport, TextBatch
from shared.metrics import MetricsSnapshot, publish_snapshots


def build_app(state: GatewayState) -> web.Application:
    # CORS first: a preflight carries no API key and is answered even while draining
    middlewares = [cors, json_errors] + ([api_key_middleware(state.args.api_key)] if state.args.api_key else [])
    middlewares = [*middlewares, state.draining.middleware()]
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=middlewares)
    app.on_response_prepare.append(allow_any_origin)
    add_generate_route(app, state)
    add_openai_routes(app, state)
    add_sglang_routes(app, state)
    add_metrics_routes(app, state.metrics, state.gateway_id, lambda: len(state.streams))
    add_openapi_route(app)
    return app


class GatewayService(Service):
    name = "gateway"

    def __init__(self, args: ServerArgs) -> None:
        super().__init__(args)
        self.state: GatewayState  # built in `start`, on the connected bus

    async def start(self) -> None:
        state = self.state = GatewayState(self.bus, self.subjects, self.args, requester=self.bus)
        self.spawn(state.recovery.watchdog())  # lost steps (services/gateway/migrate.py)
        await self.bus.subscribe(self.subjects.out(state.gateway_id), TextBatch, state.on_output)
        await self.bus.subscribe(self.subjects.load_all, LoadReport, state.liveness.on_report)  # feeds metrics
        await self.bus.subscribe(self.subjects.metrics, MetricsSnapshot, state.metrics.snapshots.on_snapshot)
        self.spawn(
            publish_snapshots(
                self.bus,
                self.subjects.metrics,
                "gateway",
                state.gateway_id,
                lambda: state.metrics.local_samples(len(state.streams)),
            )
        )
        runner = web.AppRunner(
            build_app(state), handler_cancellation=True, access_log=None, shutdown_timeout=5.0
        )
        await runner.setup()
        # Closed in reverse: HTTP first (its handlers may publish aborts), then the aborts drain,
        # then (pushed by Service.run before start) the bus.
        self.stack.push_async_callback(state.drain)
        self.stack.push_async_callback(runner.cleanup)
        await web.TCPSite(runner, self.args.host, self.args.port).start()
        self.log.info(
            "listening http://%s:%d gateway_id=%s", self.args.host, self.args.port, state.gateway_id
        )

    async def stop(self) -> None:
        """SIGTERM: refuse new requests, let running ones finish within the grace period."""
        await drain_requests(self.state.draining, self.state.streams, self.args.shutdown_grace_period)
