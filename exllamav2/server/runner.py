"""Running the app: in the foreground (the CLI) or in a background thread on a free port (tests, benchmarks)."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from .app import create_app
from .engine import ServerEngine


def run_server(engine: ServerEngine, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
               log_level: str = "info") -> None:
    uvicorn.run(create_app(engine, api_key), host=host, port=port, log_level=log_level)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class BackgroundServer:
    def __init__(self, server: uvicorn.Server, thread: threading.Thread, url: str):
        self.server, self.thread, self.url = server, thread, url

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_in_thread(engine: ServerEngine, api_key: str | None = None, host: str = "127.0.0.1",
                    port: int | None = None, timeout: float = 30.0) -> BackgroundServer:
    """Start uvicorn in a daemon thread; returns once it accepts connections. `.url` is the base URL."""
    port = port or free_port(host)
    config = uvicorn.Config(create_app(engine, api_key), host=host, port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="exllamav2-server", daemon=True)
    thread.start()
    deadline = time.time() + timeout
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.05)
    return BackgroundServer(server, thread, f"http://{host}:{port}")
