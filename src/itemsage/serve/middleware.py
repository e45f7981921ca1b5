"""The service's middlewares and metrics: Prometheus metrics (prometheus_client), the request
counter/latency middleware, the 500 handler that logs a traceback id, and the request-body limit
(413 by size, 408 for a stalled or overlong body), and the fast path that answers the hot JSON routes
before FastAPI's routing. serve.py's `create_app` installs them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Iterator

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from itemsage.serve.bodies import error_response

log = logging.getLogger("itemsage.serve")

DEFAULT_BODY_TIMEOUT_S = 10.0  # silence while a request body is still expected -> 408
DEFAULT_BODY_DEADLINE_S = 60.0  # a whole body must arrive within this (an 8 MB body at ~1 Mbit/s)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


# ---- metrics (prometheus_client: one registry per app, process metrics included) ----------------


class Metrics:
    """Request counters per endpoint, method and status, a latency histogram per endpoint, index
    reloads by outcome, the served index (read at scrape time), and the process's own metrics
    (CPU, memory, open files: prometheus_client's process and platform collectors, and GC)."""

    def __init__(self, info: Callable[[], dict[str, Any]]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram
        from prometheus_client.gc_collector import GCCollector
        from prometheus_client.platform_collector import PlatformCollector
        from prometheus_client.process_collector import ProcessCollector

        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("itemsage_requests", "HTTP requests by endpoint, method and status.",
                                ["endpoint", "method", "status"], registry=self.registry)
        self.latency = Histogram("itemsage_request_duration_seconds",
                                 "Request latency, from first byte in to last out.", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.reloads = Counter("itemsage_index_reloads", "Index reloads by outcome.", ["outcome"],
                               registry=self.registry)
        self.registry.register(_IndexCollector(info))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        # The labelled children, looked up once per label set: `labels()` takes a lock and builds
        # its key on every call, a measurable part of a sub-millisecond request.
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def observe(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        key = (endpoint, method, status)
        children = self._children.get(key)
        if children is None:  # bounded: route paths x methods x statuses
            children = self._children[key] = (self.requests.labels(endpoint, method, str(status)),
                                              self.latency.labels(endpoint))
        children[0].inc()
        children[1].observe(seconds)

    def reload(self, outcome: str) -> None:
        self.reloads.labels(outcome).inc()

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class _IndexCollector:
    """The served index version, model and size, read from the service when /metrics is scraped."""

    def __init__(self, info: Callable[[], dict[str, Any]]) -> None:
        self.info = info

    def describe(self) -> list[Any]:
        return []  # labels change with reloads: nothing fixed to declare

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        info = self.info()
        version = GaugeMetricFamily("itemsage_index_info", "The index version being served (value 1).",
                                    labels=["version", "model"])
        version.add_metric([str(info["index_version"]), str(info["model_fingerprint"])], 1)
        yield version
        yield GaugeMetricFamily("itemsage_index_products", "Products in the served index.", value=info["products"])


class MetricsMiddleware:
    """Counts every response (413s and 500s included) under its route path, 'other' if unrouted."""

    def __init__(self, app: ASGIApp, metrics: Metrics, paths: Callable[[], set[str]]) -> None:
        self.app = app
        self.metrics = metrics
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what ServerErrorMiddleware answers if the app raises before responding

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope.get("path", "")
            endpoint = path if path in self.paths() else "other"  # bounded label set
            self.metrics.observe(endpoint, scope.get("method", ""), status, time.perf_counter() - start)


class InternalErrorMiddleware:
    """A real bug (an exception no handler turned into a 4xx) becomes a logged 500 JSON response.

    Done here rather than with an `Exception` handler: Starlette re-raises after such a handler, and
    uvicorn then closes the keep-alive connection; answering here leaves it open for the next request.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method", ""), scope.get("path", ""))
            if started:  # half a response is out: the server can only close the connection
                raise
            await error_response(500, "internal error; the server log has the traceback")(scope, receive, send)


class BodyLimitMiddleware:
    """413 for a body over `max_bytes`: by its Content-Length, or by counting a streamed body.

    The body is read here in full (it is small by construction) and replayed to the app, so a
    chunked upload without Content-Length is held to the same limit before any parsing starts.
    A body that stops arriving for `timeout_s` (or is not complete after `deadline_s`) gets a 408
    and the connection is closed: a client that declares more than it sends is not held forever.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
                 deadline_s: float = DEFAULT_BODY_DEADLINE_S) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.deadline_s = deadline_s

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, status: int, message: str,
                      close: bool = False) -> None:
        headers = {"connection": "close"} if close else None  # the unread rest of the body cannot be skipped
        await error_response(status, message, headers)(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_big = (f"request body is larger than the server's limit of {self.max_bytes} bytes; send "
                   "fewer or shorter vectors, or start the server with a larger max_body_bytes")
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await self._refuse(scope, receive, send, 400, "Content-Length must be a non-negative integer")
                return
            if int(declared) > self.max_bytes:
                await self._refuse(scope, receive, send, 413, too_big)
                return
        chunks: list[bytes] = []
        size = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.deadline_s
        while True:
            wait = min(self.timeout_s, deadline - loop.time())
            try:
                async with asyncio.timeout(max(wait, 0.0)):  # no extra task per message, unlike wait_for
                    message = await receive()
            except TimeoutError:
                declared_text = f"of the {int(declared)} declared " if declared is not None else ""
                await self._refuse(scope, receive, send, 408,
                                   f"the request body stopped arriving: {size} bytes {declared_text}came, then "
                                   f"none for {wait:g} s (the server waits {self.timeout_s:g} s between pieces and "
                                   f"{self.deadline_s:g} s in all); send the whole body, with a Content-Length "
                                   "that matches it", close=True)
                return
            if message["type"] == "http.disconnect":
                return  # the client left; nothing to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send, 413, too_big)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls wait for the disconnect, as the server's would

        await self.app(scope, replay, send)


class FastPathMiddleware:
    """Answers the hot JSON routes before FastAPI's routing, validation and serialisation, which cost
    about as much CPU as a cheap search itself (BENCHMARKS.md, serving).

    `routes` maps a path to `handle(body) -> Response | None` for `POST` requests whose Content-Type
    is exactly `application/json`. The body is read in full (BodyLimitMiddleware, outside this one,
    holds it to its limit); a handler answers with a response or returns None, and then the request
    goes on to the app with its body replayed, as if this middleware were not there. Handlers return
    None for every body they do not take on the spot, so each error response and its wording stays
    FastAPI's own. A request traced by FastAPI's native telemetry always goes through the app (its
    spans name the route).
    """

    def __init__(self, app: ASGIApp, routes: dict[str, Callable[[bytes], Any]]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handle = self.routes.get(scope.get("path", "")) if scope["type"] == "http" else None
        if (handle is None or scope.get("method") != "POST" or scope.get("root_path")
                or scope.get("fastapi.telemetry") is not None or _content_type(scope) != b"application/json"):
            await self.app(scope, receive, send)
            return
        messages: list[Message] = []
        while True:
            messages.append(await receive())
            if messages[-1]["type"] != "http.request" or not messages[-1].get("more_body", False):
                break
        if messages[-1]["type"] == "http.request":  # not a disconnect: the whole body came
            response = handle(b"".join(m.get("body", b"") for m in messages))
            if response is not None:
                await response(scope, receive, send)
                return
        pending = iter(messages)

        async def replay() -> Message:  # what came, in order, then the server's own receive
            message = next(pending, None)
            return message if message is not None else await receive()

        await self.app(scope, replay, send)


def _content_type(scope: Scope) -> bytes | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-type":
            return value
    return None
