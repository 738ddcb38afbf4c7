"""One engine replica of the replicated server (exllamav2/server/cluster.py): the model loaded once, the dynamic
generator, and the very app of the single-process server (exllamav2/server/app.py, `create_app`) run in-process
for each request the gateway (exllamav2/server/ray_gateway.py) forwards. So every route, check, error and the SSE
stream are the single-process server's own; the replica only carries ASGI messages over Ray.

A request cancelled by Ray (the client went away, so the gateway cancelled its call) is delivered to the app as
`http.disconnect`, which cancels its jobs and frees their pages, as a closed connection does on one process.
Every `METRICS_PERIOD_S` the replica posts its /metrics text to the metrics board (exllamav2/server/ray_metrics.py),
where the gateway reads it and labels it by replica."""

from __future__ import annotations

import asyncio
import os
import threading
from dataclasses import dataclass, field

METRICS_PERIOD_S = 1.0
_DONE = object()


@dataclass
class RoutedRequest:
    """An HTTP request as the gateway forwards it. `routing_text` is what the prefix router matches on."""
    method: str
    path: str
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    routing_text: str = ""
    client: tuple[str, int] | None = None
    extra: dict = field(default_factory=dict)


class EngineReplica:
    """The deployment class (decorated with serve.deployment in exllamav2/server/cluster.py)."""

    def __init__(self, engine_kwargs: dict, api_key: str | None, board_name: str | None, torch_threads: int,
                 backend: str | None = None):
        import torch

        torch.set_num_threads(max(1, torch_threads))
        if backend:
            from .. import ops
            ops.set_backend(backend)
        from .app import create_app
        from .engine import load_engine

        self.engine = load_engine(**engine_kwargs)
        # one forward before the replica reports ready, so first-use costs (kernels built at first call) are paid
        # while Ray Serve waits for the replica, not by the first request (whose client may time out)
        with torch.inference_mode():
            self.engine.model.forward(torch.tensor([[0]]), last_id_only=True)
        self.app = create_app(self.engine, api_key)
        self.replica_id = _replica_id()
        self.board = None
        self._stop = threading.Event()
        if board_name is not None:
            import ray
            from .cluster import BOARD_NAMESPACE
            self.board = ray.get_actor(board_name, namespace=BOARD_NAMESPACE)
            self._info = {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                          "torch_threads": torch.get_num_threads(),
                          "device": "cuda" if torch.cuda.is_available() else "cpu"}
            threading.Thread(target=self._push_metrics, name="exllamav2-metrics-push", daemon=True).start()

    async def handle(self, req: RoutedRequest):
        """Runs the app on the request; yields its ASGI messages (http.response.start, then http.response.body)."""
        out: asyncio.Queue = asyncio.Queue()
        gone = asyncio.Event()
        body_given = False

        async def receive():
            nonlocal body_given
            if not body_given:
                body_given = True
                return {"type": "http.request", "body": req.body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            await out.put(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "scheme": "http",
                 "method": req.method, "path": req.path, "raw_path": req.path.encode(), "root_path": "",
                 "query_string": req.query_string, "headers": req.headers, "client": req.client,
                 "server": ("replica", 0)}
        task = asyncio.create_task(self.app(scope, receive, send))
        task.add_done_callback(lambda _: out.put_nowait(_DONE))
        try:
            while True:
                message = await out.get()
                if message is _DONE:
                    break
                yield message
            await task
        finally:
            if not task.done():  # the caller went away: the app sees the client disconnect and cancels its jobs
                gone.set()
                try:
                    await asyncio.wait_for(asyncio.shield(task), 10)
                except BaseException:
                    task.cancel()

    def metrics_text(self) -> str:
        metrics = self.app.state.metrics
        return metrics.render()[0].decode() if metrics is not None else ""

    def check_health(self) -> None:
        """Ray Serve's health check: a generator thread that died makes the replica unhealthy (restarted)."""
        thread = getattr(self.engine.generator, "thread", None)
        if thread is not None and not thread.is_alive():
            raise RuntimeError("the generator thread has stopped")

    def _push_metrics(self) -> None:
        import ray

        while not self._stop.wait(METRICS_PERIOD_S):
            try:
                ray.get(self.board.put.remote(self.replica_id, self.metrics_text(), self._info), timeout=10)
            except Exception:  # the board is gone (the app is being removed); nothing to report to
                pass

    def __del__(self):
        if hasattr(self, "_stop"):
            self._stop.set()
        engine = getattr(self, "engine", None)
        if engine is not None:
            try:
                engine.close()
            except Exception:
                pass


def _replica_id() -> str:
    try:
        from ray import serve
        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return f"pid{os.getpid()}"
