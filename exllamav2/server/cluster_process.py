"""`serve --replicas N` in a child process, for tests and benchmarks (tests/test_ray_replicas.py,
bench/bench_replicas.py): started on a free port, waited for until it answers, read for its replicas, stopped with
SIGINT (which removes the Serve app and stops the local Ray instance it started)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

from .runner import free_port


class ReplicatedServer:
    def __init__(self, model: str | None, replicas: int, extra_args=(), host: str = "127.0.0.1", port: int | None = None,
                 log_path: str | None = None, env: dict | None = None, timeout: float = 300.0):
        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.log_path = log_path
        cmd = [sys.executable, "-m", "exllamav2", "serve", *(["-m", model] if model else []),
               "--replicas", str(replicas), "--host", host, "--port", str(self.port), *extra_args]
        self._log = open(log_path, "w") if log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     env={**os.environ, **(env or {})}, start_new_session=True)
        deadline = time.time() + timeout
        line = ""
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith("READY ") or (not line and self.proc.poll() is not None):
                break
        if not line.startswith("READY "):
            self.stop()
            raise RuntimeError(f"serve --replicas {replicas} did not start within {timeout:.0f} s"
                               + (f"; see {log_path}" if log_path else ""))
        try:
            self.wait_replicas(replicas, timeout=max(10.0, deadline - time.time()))
        except BaseException:
            self.stop()  # never leave a Ray instance behind
            raise

    def get(self, path: str, timeout: float = 10.0):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return r.read().decode()

    def replicas(self) -> list[dict]:
        return json.loads(self.get("/replicas"))["data"]

    def wait_replicas(self, n: int, timeout: float = 120.0, exclude=()) -> list[dict]:
        """Waits until n replicas (other than those in `exclude`) post their metrics; returns them."""
        deadline = time.time() + timeout
        while True:
            live = [r for r in self.replicas() if r["replica"] not in exclude and r["last_seen_s"] < 3]
            if len(live) >= n:
                return live
            if time.time() > deadline:
                raise TimeoutError(f"{len(live)} of {n} replicas reported within {timeout:.0f} s: {live}")
            time.sleep(0.25)

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self._log is not subprocess.DEVNULL:
            self._log.close()
