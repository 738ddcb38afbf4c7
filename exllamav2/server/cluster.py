"""`serve --replicas N`: N engine replicas as a Ray Serve application behind Ray Serve's HTTP proxy, on the
single-process server's routes (the `ray` extra: `pip install "exllamav2[ray]"`).

    HTTP proxy (Ray Serve) -> gateway (ray_gateway.py) -> prefix-aware router (ray_router.py)
                           -> engine replica x N (ray_replica.py: load_engine + the app of app.py)

Started alone it starts a local Ray instance; with `ray_address` it joins a cluster (every node must see the
model at the same path). Each replica claims one GPU when the cluster has them, else an equal share of the CPU
cores, and runs torch with that many threads. Back-pressure: at most `max_ongoing` requests per replica (its running
batch plus as many waiting), at most `max_queued` waiting in front of all replicas; beyond that a 503 with
Retry-After."""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

APP_NAME = "exllamav2"
BOARD_NAMESPACE = "exllamav2"


class ClusterError(RuntimeError):
    """Ray could not be started or joined; the CLI prints it and exits 1."""


@dataclass
class ReplicaResources:
    num_cpus: float
    num_gpus: float
    torch_threads: int

    @property
    def device(self) -> str:
        return "one GPU" if self.num_gpus else f"{self.num_cpus:g} CPU cores ({self.torch_threads} torch threads)"


def replica_resources(replicas: int, cluster: dict, nodes: list[dict]) -> ReplicaResources:
    """One GPU each when the cluster has any; else an equal share of the CPU cores, no more than the largest node
    has (a replica runs on one node)."""
    if replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {replicas}")
    if cluster.get("GPU", 0) >= 1:
        return ReplicaResources(1.0, 1.0, 1)
    total = float(cluster.get("CPU", 0))
    if total <= 0:
        raise ValueError("the Ray cluster reports no CPU resources to run replicas on")
    largest = max((float(n.get("Resources", {}).get("CPU", 0)) for n in nodes if n.get("Alive", True)),
                  default=total)
    share = min(total / replicas, largest)
    if share >= 1:
        share = math.floor(share)
    return ReplicaResources(share, 0.0, max(1, int(share)))


def build_app(engine_kwargs: dict, replicas: int, resources: ReplicaResources, *, api_key: str | None = None,
              max_batch_size: int = 16, max_queue: int = 64, max_request_bytes: int = 8 * 1024 * 1024,
              routing: str = "prefix", backend: str | None = None, retries: int = 2,
              cpu_activations: str | None = None):
    """The Ray Serve application (bind it with serve.run). `routing`: "prefix" (ray_router.PrefixAffinityRouter)
    or "default" (Ray Serve's power-of-two-choices, for comparison)."""
    import ray
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from .ray_gateway import GatewayDeployment
    from .ray_metrics import MetricsBoard
    from .ray_replica import EngineReplica

    if routing not in ("prefix", "default"):
        raise ValueError(f"routing must be 'prefix' or 'default', got {routing!r}")
    # detached, so /metrics outlives a driver that leaves the app running on a cluster; run() removes it
    board_name = f"{APP_NAME}-metrics-board-{os.getpid()}-{time.time_ns()}"
    board = MetricsBoard.options(name=board_name, namespace=BOARD_NAMESPACE, lifetime="detached").remote()
    ray.get(board.snapshot.remote())
    max_ongoing = 2 * max_batch_size  # the running batch plus as many ready to join it
    engine_kwargs = {**engine_kwargs, "max_batch_size": max_batch_size, "max_queue": max_ongoing,
                     "max_request_bytes": max_request_bytes}
    env = {"OMP_NUM_THREADS": str(resources.torch_threads)}
    if cpu_activations:
        from ..ops.dispatch import CPU_ACTIVATIONS_ENV
        env[CPU_ACTIVATIONS_ENV] = cpu_activations  # read when a replica's process imports the ops
    router = {}
    if routing == "prefix":
        from .ray_router import PrefixAffinityRouter
        router["request_router_config"] = RequestRouterConfig(request_router_class=PrefixAffinityRouter)
    engine = serve.deployment(EngineReplica, name="engine").options(
        num_replicas=replicas, max_ongoing_requests=max_ongoing, max_queued_requests=max_queue,
        ray_actor_options={"num_cpus": resources.num_cpus, "num_gpus": resources.num_gpus,
                           "runtime_env": {"env_vars": env}},
        health_check_period_s=2, health_check_timeout_s=30, graceful_shutdown_timeout_s=5, **router)
    gateway = serve.deployment(GatewayDeployment, name="gateway").options(
        num_replicas=1, max_ongoing_requests=10_000, ray_actor_options={"num_cpus": 0})
    app = gateway.bind(engine.bind(engine_kwargs, api_key, board_name, resources.torch_threads, backend),
                       board_name, max_request_bytes, retries, api_key)
    return app, board


def start(args, log=print):
    """Starts (or joins) Ray, starts Serve's proxy on args.host:args.port and deploys the app; returns the URL and
    the metrics board actor."""
    import ray
    from ray import serve

    if args.model is not None:
        # the model's own errors (missing folder, broken config.json) here, once, not from every replica
        from ..config import ExLlamaV2Config
        ExLlamaV2Config(args.model)
    log(f"Ray: {'joining ' + args.ray_address if args.ray_address else 'starting a local instance'} ...")
    try:
        # "local": a new instance even when `ray start` left a cluster address behind on this machine (which
        # ray.init() without an address would join)
        ray.init(address=args.ray_address or "local", include_dashboard=False, logging_level="warning",
                 ignore_reinit_error=True)
    except Exception as e:
        where = f"the Ray cluster at --ray-address {args.ray_address}" if args.ray_address else "a local Ray instance"
        raise ClusterError(f"could not start or join {where}: {type(e).__name__}: {e}") from None
    resources = replica_resources(args.replicas, ray.cluster_resources(), ray.nodes())
    serve.start(http_options={"host": args.host, "port": args.port})
    engine_kwargs = dict(model_path=args.model, cache_tokens=args.cache_tokens, page_size=args.page_size,
                         max_chunk_size=args.max_chunk_size, max_seq_len=args.max_seq_len, dtype=args.dtype,
                         model_name=args.model_name, interventions_dir=args.interventions_dir,
                         gguf_dequantize=args.dense_gguf,
                         encode_special_tokens_in_content=args.encode_special_tokens_in_content)
    if args.model is not None:
        engine_kwargs["model_path"] = os.path.abspath(args.model)
    app, board = build_app(engine_kwargs, args.replicas, resources, api_key=args.api_key,
                       max_batch_size=args.max_batch_size, max_queue=args.max_queue,
                       max_request_bytes=args.max_request_bytes, backend=args.backend,
                       routing=getattr(args, "routing", "prefix"),
                       cpu_activations=getattr(args, "cpu_activations", None))
    log(f"starting {args.replicas} replica(s), each on {resources.device}, {getattr(args, 'routing', 'prefix')} "
        f"routing; each loads the model ...")
    try:
        serve.run(app, name=APP_NAME, route_prefix="/")
    except BaseException:
        ray.kill(board)
        raise
    return f"http://{args.host}:{args.port}", board


def run(args) -> int:
    """The CLI: serve until SIGINT/SIGTERM, then remove the app (and stop the local Ray instance)."""
    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    import ray

    board = None
    try:
        try:
            url, board = start(args, log)
        except (ClusterError, ValueError, OSError) as e:
            log(f"error: {e}")
            return 1
        log(f"serving on {url} (OpenAI API under /v1, /metrics by replica, /replicas); Ctrl-C stops")
        print(f"READY {url}", flush=True)
        stop.wait()
        return 0
    finally:
        if ray.is_initialized():
            log("stopping ...")
            _tear_down(args, board)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _tear_down(args, board) -> None:
    import ray
    from ray import serve

    try:
        serve.delete(APP_NAME)
        if board is not None:
            ray.kill(board)
        if not args.ray_address:
            serve.shutdown()
    except Exception:
        pass
    ray.shutdown()
