"""The replicated server's parts that need no running Ray (issue #21): prefix-affinity bookkeeping
(exllamav2/server/cluster_prefix.py), replica resources (cluster.py), /metrics labelled by replica
(ray_metrics.py, parsed back with prometheus_client), and the CLI guards (`--replicas` without Ray exits 2 with
the install line; plain `serve` never imports Ray; `--ray-address` needs `--replicas`)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from exllamav2.server.cluster_prefix import PrefixTable, block_keys, routing_text

SYSTEM = "You are a careful assistant who answers in one short paragraph. " * 3


def test_routing_text_of_completions_and_chats():
    assert routing_text({"prompt": "abc"}) == "abc"
    assert routing_text({"prompt": ["first", "second"]}) == "first"
    a = routing_text({"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}]})
    b = routing_text({"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "yo"}]})
    assert a[:len(SYSTEM)] == b[:len(SYSTEM)] and a != b
    parts = routing_text({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"},
                                                                     {"type": "text", "text": "y"}]}]})
    assert "xy" in parts
    for bad in (None, [], {"messages": "nope"}, {"prompt": 5}, {"messages": [5]}):
        assert routing_text(bad) == ""


def test_block_keys_chain_over_the_whole_prefix():
    k1 = block_keys("a" * 64 + "b" * 64 + "c" * 10, 64)
    k2 = block_keys("a" * 64 + "x" * 64, 64)
    k3 = block_keys("z" * 64 + "b" * 64, 64)
    assert len(k1) == 2 and len(k2) == 2  # only whole blocks
    assert k1[0] == k2[0] and k1[1] != k2[1]
    assert k3[1] != k1[1]  # the same second block after a different first one is another key


def test_prefix_table_prefers_the_holder_then_the_least_loaded():
    t = PrefixTable(block_chars=16, imbalance_limit=2)
    reps = ["r0", "r1", "r2"]
    shared = "S" * 64
    t.routed("r1", shared + "first question")
    order, how = t.choose(reps, shared + "second question")
    assert order[0] == "r1" and how == "prefix"
    # a prompt nobody holds goes to the least loaded (r1 has one in flight)
    order, how = t.choose(reps, "T" * 64)
    assert order[0] in ("r0", "r2") and how == "least_loaded" and order[-1] == "r1"
    # the longest match wins
    t.routed("r2", shared + "Q" * 32)
    assert t.choose(reps, shared + "Q" * 32 + "tail")[0][0] == "r2"
    # a holder far busier than the least loaded gives the request up
    for _ in range(3):
        t.started("r2")
    assert t.choose(reps, shared + "Q" * 32)[0][0] != "r2"
    for _ in range(4):
        t.completed("r2")
    assert t.choose(reps, shared + "Q" * 32)[0][0] == "r2"
    # a replica that went away is forgotten; its successor starts empty
    t.keep_only(["r0", "r2", "r3"])
    assert "r1" not in t.blocks and t.matched_blocks("r3", block_keys(shared, 16)) == 0


def test_prefix_table_forgets_the_least_recent_blocks():
    t = PrefixTable(block_chars=8, imbalance_limit=0, max_blocks=4)
    t.remember("r0", "a" * 32)
    t.remember("r0", "b" * 32)
    assert len(t.blocks["r0"]) == 4
    assert t.matched_blocks("r0", block_keys("b" * 32, 8)) == 4
    assert t.matched_blocks("r0", block_keys("a" * 32, 8)) == 0
    with pytest.raises(ValueError, match="block_chars"):
        PrefixTable(block_chars=0)


def test_replica_resources():
    pytest.importorskip("ray")
    from exllamav2.server.cluster import replica_resources

    node = lambda cpus: {"Alive": True, "Resources": {"CPU": cpus}}
    r = replica_resources(2, {"CPU": 2.0}, [node(2)])
    assert (r.num_cpus, r.num_gpus, r.torch_threads) == (1, 0, 1)
    r = replica_resources(3, {"CPU": 16.0}, [node(16)])
    assert (r.num_cpus, r.torch_threads) == (5, 5)
    r = replica_resources(4, {"CPU": 2.0}, [node(2)])
    assert (r.num_cpus, r.torch_threads) == (0.5, 1)
    r = replica_resources(2, {"CPU": 64.0}, [node(8), node(8), node(48)])
    assert r.num_cpus == 32
    r = replica_resources(2, {"CPU": 64.0}, [node(16)] * 4)
    assert r.num_cpus == 16  # a replica runs on one node
    r = replica_resources(2, {"CPU": 32.0, "GPU": 2.0}, [node(32)])
    assert (r.num_gpus, r.num_cpus) == (1, 1)
    with pytest.raises(ValueError, match="replicas"):
        replica_resources(0, {"CPU": 2.0}, [node(2)])
    with pytest.raises(ValueError, match="no CPU"):
        replica_resources(1, {}, [])


def test_metrics_labelled_by_replica_parse_back():
    pytest.importorskip("ray")
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from exllamav2.server.ray_metrics import GatewayMetrics

    texts = {}
    for name, n in (("rA", 3), ("rB", 5)):
        reg = CollectorRegistry()
        c = Counter("exllamav2_requests", "by status", ["route", "status"], registry=reg)
        c.labels("/v1/completions", "200").inc(n)
        Gauge("exllamav2_kv_pages_used", "pages", registry=reg).set(n * 2)
        h = Histogram("exllamav2_time_to_first_token_seconds", "ttft", registry=reg, buckets=(0.1, 1))
        h.observe(0.05 * n)
        texts[name] = generate_latest(reg).decode()
    gm = GatewayMetrics()
    gm.retries.inc()
    body, ctype = gm.render(texts, {"prefix": 4, "least_loaded": 2})
    assert ctype.startswith("text/plain")
    fams = {f.name: f for f in text_string_to_metric_families(body.decode())}
    reqs = {s.labels["replica"]: s.value for s in fams["exllamav2_requests"].samples if s.name.endswith("_total")}
    assert reqs == {"rA": 3.0, "rB": 5.0}
    pages = {s.labels["replica"]: s.value for s in fams["exllamav2_kv_pages_used"].samples}
    assert pages == {"rA": 6.0, "rB": 10.0}
    counts = {s.labels["replica"]: s.value for s in fams["exllamav2_time_to_first_token_seconds"].samples
              if s.name.endswith("_count")}
    assert counts == {"rA": 1.0, "rB": 1.0}
    routed = {s.labels["policy"]: s.value for s in fams["exllamav2_gateway_routed"].samples}
    assert routed == {"prefix": 4.0, "least_loaded": 2.0}
    assert [s.value for s in fams["exllamav2_gateway_retries"].samples if s.name.endswith("_total")] == [1.0]
    assert [s.value for s in fams["exllamav2_gateway_replicas"].samples] == [2.0]


GUARDS = """
import sys
import exllamav2.commands.serve
from exllamav2.server import create_app, load_engine, start_in_thread
assert not any(m == "ray" or m.startswith("ray.") for m in sys.modules), "plain serve imported ray"
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "ray":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _Block())
from exllamav2.cli import main
sys.exit(main(["serve", "-m", "/nonexistent/model", "--replicas", "2"]))
"""


def test_plain_serve_needs_no_ray_and_replicas_without_ray_say_how_to_install_it():
    p = subprocess.run([sys.executable, "-c", GUARDS], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert p.returncode == 2, p.stderr
    assert 'pip install "exllamav2[ray]"' in p.stderr and "Traceback" not in p.stderr


def test_ray_address_needs_replicas():
    from exllamav2.cli import main

    with pytest.raises(SystemExit, match="--ray-address needs --replicas"):
        main(["serve", "-m", "/nonexistent", "--ray-address", "auto"])


def test_replicas_with_a_missing_model_fail_before_ray_starts(capsys):
    ray = pytest.importorskip("ray")
    from exllamav2.cli import main

    assert main(["serve", "-m", "/nonexistent/model", "--replicas", "2"]) == 1
    err = capsys.readouterr().err
    assert "/nonexistent/model" in err and "Traceback" not in err
    assert not ray.is_initialized()


def test_gateway_holds_a_reply_back_until_its_first_token():
    """The gateway's relay (ray_gateway._Reply) sends nothing before the first token, so a replica that dies
    before can be replaced unseen; a 503 passing through gets Retry-After."""
    pytest.importorskip("ray.serve")
    import asyncio

    from exllamav2.server.app import _Formatter, _sse
    from exllamav2.server.ray_gateway import _Reply

    async def relay(messages):
        sent = []

        async def send(m):
            sent.append(m)

        reply = _Reply(send)
        seen = []
        for m in messages:
            await reply.message(m)
            seen.append(len(sent))
        return reply, sent, seen

    sse = [(b"content-type", b"text/event-stream; charset=utf-8")]
    # the chunks exactly as the single-process app streams them (app.py): its role-only first chunk, then a token
    fmt = _Formatter(None, True, "chatcmpl-1", 0, "tiny", None)
    body = lambda text: {"type": "http.response.body", "body": text.encode(), "more_body": True}
    role, token = _sse(fmt.chunk(0, None, [], None, role=True)), _sse(fmt.chunk(0, "Hi", [], None))
    reply, sent, seen = asyncio.run(relay([{"type": "http.response.start", "status": 200, "headers": sse},
                                           body(role), body(token)]))
    assert seen == [0, 0, 3] and reply.committed and reply.stream  # start + role + token, all at the token
    reply, sent, seen = asyncio.run(relay([{"type": "http.response.start", "status": 503,
                                            "headers": [(b"content-type", b"application/json")]},
                                           {"type": "http.response.body", "body": b"{}", "more_body": False}]))
    assert seen == [0, 2] and dict(sent[0]["headers"])[b"retry-after"] == b"1"


def test_gateway_checks_the_api_key_and_body_size_before_forwarding():
    """Nothing reaches a replica without the key, or over the size limit (the gateway answers itself)."""
    pytest.importorskip("ray.serve")
    import asyncio
    import json

    from exllamav2.server.ray_gateway import Gateway

    gw = Gateway(engines=None, board=None, max_request_bytes=100, api_key="secret")

    def call(headers, body=b"{}"):
        sent = []

        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(m):
            sent.append(m)

        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "query_string": b"",
                 "headers": headers}
        asyncio.run(gw(scope, receive, send))
        return sent[0]["status"], json.loads(sent[1]["body"])["error"]

    status, err = call([])
    assert status == 401 and err["code"] == "invalid_api_key"
    status, err = call([(b"authorization", b"Bearer wrong")])
    assert status == 401
    status, err = call([(b"authorization", b"Bearer secret"), (b"content-length", b"500")], b"x" * 500)
    assert status == 413 and "--max-request-bytes" in err["message"]
    status, err = call([(b"authorization", b"Bearer secret")], b"x" * 500)  # no length: counted as it arrives
    assert status == 413
