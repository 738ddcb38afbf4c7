"""The gateway of the replicated server (exllamav2/server/cluster.py): the Ray Serve ingress behind Ray's HTTP
proxy. It reads each request, forwards it to an engine replica (exllamav2/server/ray_replica.py, which runs the
single-process app) through the prefix-aware router (exllamav2/server/ray_router.py), and relays the reply.

What it adds to the single-process server:
- a replica that dies before its reply has begun (for a stream: before its first token) is replaced: the request
  goes to another replica, up to `retries` times; after that, or once tokens have been sent, the client gets a
  503 (`code: replica_failed`), in a stream as a final SSE error event; never a hang;
- when every replica's queue is full (Ray Serve's max_ongoing_requests per replica, max_queued_requests in front),
  a 503 with `Retry-After`; every 503 passing through gets a Retry-After;
- `GET /metrics`: each replica's metrics labelled by replica, and the gateway's own (exllamav2/server/ray_metrics.py);
- `GET /replicas`: the replicas heard from lately (id, pid, node, device), for operators and tests.
A client that goes away makes Ray cancel the gateway's call, and the cancellation reaches the replica, which
cancels the jobs and frees their pages."""

from __future__ import annotations

import asyncio
import json

from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from .app import error_response
from .cluster_prefix import routing_decisions, routing_text
from .ray_metrics import GatewayMetrics
from .ray_replica import RoutedRequest

RETRY_AFTER_S = 1
REPLICA_GONE = (ActorDiedError, ActorUnavailableError, RayActorError, DeploymentUnavailableError)
_ROLE_ONLY = b'"delta": {"role": "assistant", "content": ""}'  # app.py's first chat chunk, sent before any token


class _Reply:
    """The replica's reply as it reaches the client: held back until the first token (or the end), so a replica
    that dies before can be replaced without the client seeing anything."""

    def __init__(self, send):
        self.send, self.start, self.held, self.committed = send, None, [], False
        self.stream = False

    async def message(self, m: dict) -> None:
        if m["type"] == "http.response.start":
            headers = list(m.get("headers") or [])
            self.stream = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers)
            if m["status"] == 503 and not any(k.lower() == b"retry-after" for k, _ in headers):
                headers.append((b"retry-after", str(RETRY_AFTER_S).encode()))
            self.start = {**m, "headers": headers}
            return
        if not self.committed:
            body = m.get("body", b"")
            self.held.append(m)
            if self.stream and _ROLE_ONLY in body and m.get("more_body", False):
                return
            await self.commit()
            return
        await self.send(m)

    async def commit(self) -> None:
        self.committed = True
        await self.send(self.start)
        for m in self.held:
            await self.send(m)
        self.held = []


class Gateway:
    """The ASGI app; `engines` is the engine deployment's handle."""

    def __init__(self, engines, board, max_request_bytes: int, retries: int = 2, api_key: str | None = None):
        self.engines, self.board, self.max_bytes, self.retries = engines, board, max_request_bytes, retries
        self.api_key = api_key
        self.metrics = GatewayMetrics()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                m = await receive()
                if m["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif m["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        status = [500]

        async def send_counted(m):
            if m["type"] == "http.response.start":
                status[0] = m["status"]
            await send(m)

        path = scope.get("path", "")
        try:
            if scope["method"] == "GET" and path == "/metrics":
                await self._metrics(scope, receive, send_counted)
            elif scope["method"] == "GET" and path == "/replicas":
                await self._replicas(scope, receive, send_counted)
            else:
                await self._forward(scope, receive, send_counted)
        finally:
            route = path if path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health",
                                     "/metrics", "/replicas") else "other"
            self.metrics.requests.labels(route, str(status[0])).inc()

    async def _read_body(self, scope, receive) -> bytes | None:
        headers = dict(scope.get("headers") or ())
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return None
        chunks, seen = [], 0
        while True:
            m = await receive()
            if m["type"] == "http.disconnect":
                raise asyncio.CancelledError()
            chunks.append(m.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.max_bytes:
                return None
            if not m.get("more_body", False):
                return b"".join(chunks)

    async def _forward(self, scope, receive, send) -> None:
        if self.api_key and scope.get("path", "").startswith("/v1/"):  # as the replicas would, before the body
            auth = dict(scope.get("headers") or ()).get(b"authorization", b"").decode("latin-1")
            if auth != f"Bearer {self.api_key}":
                return await error_response(401, "invalid or missing API key", "invalid_request_error", None,
                                            "invalid_api_key")(scope, receive, send)
        body = await self._read_body(scope, receive)
        if body is None:
            return await error_response(413, f"the request body is larger than this server's limit of "
                                             f"{self.max_bytes} bytes (serve --max-request-bytes)",
                                        "invalid_request_error", None, "request_too_large")(scope, receive, send)
        text = ""
        if scope["method"] == "POST" and body:
            try:
                if len(body) > 65536:  # a big body is parsed off the event loop
                    text = await asyncio.to_thread(lambda: routing_text(json.loads(body)))
                else:
                    text = routing_text(json.loads(body))
            except (ValueError, RecursionError):
                pass  # the replica answers the 400
        req = RoutedRequest(scope["method"], scope.get("path", ""), scope.get("query_string", b""),
                            list(scope.get("headers") or ()), body, text, scope.get("client"))
        for attempt in range(self.retries + 1):
            reply = _Reply(send)
            call = self.engines.options(stream=True).handle.remote(req)
            try:
                async for m in call:
                    await reply.message(m)
                if not reply.committed:
                    if reply.start is None:
                        raise RuntimeError("the replica ended the request without a reply")
                    await reply.commit()
                return
            except BackPressureError:
                self.metrics.rejected.inc()
                return await _overloaded()(scope, receive, send)
            except REPLICA_GONE as e:
                stage = "streaming" if reply.committed else "before_reply"
                self.metrics.replica_failures.labels(stage).inc()
                if reply.committed:
                    return await _stream_failed(send, reply, e)
                if attempt < self.retries:
                    self.metrics.retries.inc()
                    continue
                return await _replica_failed(e)(scope, receive, send)
            except asyncio.CancelledError:
                call.cancel()  # the client went away: the replica cancels the jobs and frees their pages
                raise
            except Exception as e:  # anything else from Ray: an OpenAI-style 500 (or error event), never a hang
                call.cancel()
                if reply.committed:
                    return await _stream_failed(send, reply, e, status=500)
                return await error_response(500, f"internal error: {type(e).__name__}: {e}", "server_error")(
                    scope, receive, send)

    async def _snapshot(self) -> dict:
        try:
            return await self.board.snapshot.remote()
        except REPLICA_GONE:  # the board is gone (the app is being removed): the gateway's own metrics only
            return {}

    async def _metrics(self, scope, receive, send) -> None:
        from fastapi.responses import Response

        snap = await self._snapshot()
        body, content_type = self.metrics.render({r: text for r, (_, text, _) in snap.items()},
                                                 routing_decisions())
        await Response(body, media_type=content_type)(scope, receive, send)

    async def _replicas(self, scope, receive, send) -> None:
        from fastapi.responses import JSONResponse

        snap = await self._snapshot()
        data = [{"replica": r, "last_seen_s": round(age, 3), **info} for r, (age, _, info) in sorted(snap.items())]
        await JSONResponse({"object": "list", "data": data})(scope, receive, send)


def _overloaded():
    r = error_response(503, "every replica's queue is full; retry later", "server_error", None, "queue_full")
    r.headers["retry-after"] = str(RETRY_AFTER_S)
    return r


def _failure_message(e: BaseException) -> str:
    return (f"the replica serving this request failed ({type(e).__name__}); Ray Serve restarts it, retry the "
            f"request")


def _replica_failed(e: BaseException):
    r = error_response(503, _failure_message(e), "server_error", None, "replica_failed")
    r.headers["retry-after"] = str(RETRY_AFTER_S)
    return r


async def _stream_failed(send, reply: _Reply, e: BaseException, status: int = 503) -> None:
    """Tokens were sent already, so the status cannot change: the stream ends with an OpenAI-style error event
    (the openai client raises it as an APIError) carrying the status it would have had."""
    if reply.stream:
        message = _failure_message(e) if status == 503 else f"internal error: {type(e).__name__}: {e}"
        event = {"error": {"message": message, "type": "server_error", "param": None,
                           "code": "replica_failed" if status == 503 else None, "status": status}}
        await send({"type": "http.response.body", "body": f"data: {json.dumps(event)}\n\n".encode(),
                    "more_body": False})
    else:
        await send({"type": "http.response.body", "body": b"", "more_body": False})


@serve.ingress()
class GatewayDeployment:
    """The ingress deployment: its ASGI app is a Gateway over the engine deployment's handle."""

    def __init__(self, engines, board_name: str, max_request_bytes: int, retries: int = 2,
                 api_key: str | None = None):
        import ray

        from .cluster import BOARD_NAMESPACE
        board = ray.get_actor(board_name, namespace=BOARD_NAMESPACE)
        self._gateway = Gateway(engines, board, max_request_bytes, retries, api_key)

    def __serve_build_asgi_app__(self):
        return self._gateway
