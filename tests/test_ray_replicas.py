"""`serve --replicas 2` live on a local Ray instance (issue #21), through the official openai client: greedy answers
equal the single-process server's; both replicas serve, as /metrics labelled by replica shows; requests sharing a
prefix stay on one replica and hit its prefix cache; a client that goes away frees its job and pages on the
replica; a full queue is a 503 with Retry-After; a killed replica leaves no hung request and the app serves again
once Ray Serve has restarted it. One cluster for the module (Ray and two replicas take ~30-80 s to start on 2
cores); the tiny random Llama with SmolLM2's tokenizer. The burst and the kill are marked slow (they add ~35 s,
with the replacement replica's start); `python bench/bench_replicas.py --with-tests` runs them, as does
`pytest -m slow`."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import openai
import pytest

pytest.importorskip("ray.serve")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from exllamav2.server import load_engine, start_in_thread  # noqa: E402
from exllamav2.server.cluster_process import ReplicatedServer  # noqa: E402
from test_dynamic_tiny import PAGE, tiny  # noqa: E402,F401  (fixture)

ENGINE = dict(dtype="float32", page_size=PAGE, cache_tokens=2048, max_seq_len=512, max_batch_size=4)
CLI = ["--dtype", "float32", "--page-size", str(PAGE), "--cache-tokens", "2048", "--max-seq-len", "512",
       "--max-batch-size", "4", "--max-queue", "12", "--model-name", "tiny", "--max-request-bytes", "65536"]
PROMPTS = ["The capital of France is", "Once upon a time", "def main():\n", "1, 2, 3, 4, 5,"]
SHARED = ("You are a helpful assistant. Answer briefly and precisely, and say so when you do not know. " * 4)


@pytest.fixture(scope="module")
def cluster(tiny, tmp_path_factory):
    log = str(tmp_path_factory.mktemp("ray_serve") / "serve.log")
    srv = ReplicatedServer(tiny[0], 2, CLI, log_path=log, env={"OMP_NUM_THREADS": "1"})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=cluster.url + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def single(tiny):
    engine = load_engine(tiny[0], model_name="tiny", **ENGINE)
    srv = start_in_thread(engine)
    yield openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)
    srv.stop()
    engine.close()


def scrape(cluster) -> dict:
    """{metric sample name: {replica or "": {labels tuple: value}}} from the app's /metrics."""
    out: dict = {}
    for fam in text_string_to_metric_families(cluster.get("/metrics")):
        for s in fam.samples:
            labels = dict(s.labels)
            replica = labels.pop("replica", "")
            out.setdefault(s.name, {}).setdefault(replica, {})[tuple(sorted(labels.items()))] = s.value
    return out


def per_replica(m: dict, name: str, **labels) -> dict:
    key = tuple(sorted(labels.items()))
    return {r: v.get(key, 0.0) for r, v in m.get(name, {}).items() if r}


def settled_metrics(cluster, timeout=20.0) -> dict:
    """/metrics once two scrapes 1.2 s apart agree on every replica's request and token counts (replicas post
    their metrics every second; under load a post can come late)."""
    keys = ("exllamav2_requests_total", "exllamav2_generation_tokens_total", "exllamav2_prompt_tokens_total")
    deadline = time.time() + timeout
    last = None
    while True:
        m = scrape(cluster)
        now = {k: m.get(k) for k in keys}
        if now == last or time.time() > deadline:
            return m
        last = now
        time.sleep(1.2)


def wait_idle(cluster, timeout=30.0) -> dict:
    deadline = time.time() + timeout
    while True:
        m = scrape(cluster)
        used = per_replica(m, "exllamav2_kv_pages_used")
        running = per_replica(m, "exllamav2_running_jobs")
        queued = per_replica(m, "exllamav2_queue_depth")
        if used and all(v == 0 for v in [*used.values(), *running.values(), *queued.values()]):
            return m
        if time.time() > deadline:
            raise AssertionError(f"pages still held: {used}, running {running}, queued {queued}")
        time.sleep(0.25)


def test_greedy_answers_equal_the_single_process_server(cluster, client, single):
    for prompt in PROMPTS:
        kw = dict(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
        want = single.completions.create(**kw).choices[0].text
        assert client.completions.create(**kw).choices[0].text == want
        streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True))
        assert streamed == want
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    kw = dict(model="tiny", messages=messages, max_tokens=10, temperature=0)
    want = single.chat.completions.create(**kw).choices[0].message.content
    assert client.chat.completions.create(**kw).choices[0].message.content == want
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length"
    assert [m.id for m in client.models.list().data] == ["tiny"]
    # errors are the single-process server's own
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="other", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny", prompt="x", max_tokens=1, temperature=-3)
    # the gateway enforces the body limit itself, before anything reaches a replica
    r = httpx.post(cluster.url + "/v1/completions", json={"model": "tiny", "prompt": "x" * 70000}, timeout=30)
    assert r.status_code == 413 and "--max-request-bytes" in r.json()["error"]["message"]


def test_both_replicas_serve_as_metrics_show(cluster, client):
    before = per_replica(settled_metrics(cluster), "exllamav2_requests_total", route="/v1/completions",
                         status="200")
    threads = [threading.Thread(target=client.completions.create,
                                kwargs=dict(model="tiny", prompt=f"{i} {PROMPTS[i % 4]}", max_tokens=24,
                                            temperature=0)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    m = settled_metrics(cluster)
    after = per_replica(m, "exllamav2_requests_total", route="/v1/completions", status="200")
    served = {r: after[r] - before.get(r, 0) for r in after}
    assert len(after) == 2
    assert sum(served.values()) == 8 and all(n > 0 for n in served.values()), served
    for name in ("exllamav2_kv_pages_free", "exllamav2_queue_depth", "exllamav2_prefix_cache_hit_tokens_total",
                 "exllamav2_time_to_first_token_seconds_count", "exllamav2_prompt_tokens_total"):
        assert len(per_replica(m, name)) == 2, name
    assert sum(per_replica(m, "exllamav2_generation_tokens_total").values()) >= 8 * 24
    assert sum(v for v in m["exllamav2_gateway_routed_total"][""].values()) >= 8


def test_shared_prefix_stays_on_one_replica_and_hits_its_cache(cluster, client):
    m0 = settled_metrics(cluster)
    req0 = per_replica(m0, "exllamav2_requests_total", route="/v1/completions", status="200")
    hits0 = per_replica(m0, "exllamav2_prefix_cache_hit_tokens_total")
    for i in range(4):
        client.completions.create(model="tiny", prompt=SHARED + f"Question {i}: why?", max_tokens=2, temperature=0)
    m = settled_metrics(cluster)
    req = per_replica(m, "exllamav2_requests_total", route="/v1/completions", status="200")
    got = {r: req[r] - req0.get(r, 0) for r in req}
    holder = max(got, key=got.get)
    assert got[holder] == 4, got
    hits = per_replica(m, "exllamav2_prefix_cache_hit_tokens_total")
    assert hits[holder] - hits0.get(holder, 0) >= 3 * PAGE  # three requests reused the shared pages


def test_disconnect_frees_the_job_and_its_pages(cluster):
    wait_idle(cluster)
    gen0 = sum(per_replica(settled_metrics(cluster), "exllamav2_generation_tokens_total").values())
    for stream in (True, False):
        body = {"model": "tiny", "prompt": "Tell me a long story", "max_tokens": 480, "temperature": 0,
                "stream": stream}
        if stream:
            with httpx.stream("POST", cluster.url + "/v1/completions", json=body, timeout=60) as r:
                assert r.status_code == 200
                first = next(line for line in r.iter_lines() if line.startswith("data: "))
                assert '"choices"' in first
        else:
            # the tiny model writes the 480 tokens in ~0.45 s on 2 cores: the client leaves well before that
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(cluster.url + "/v1/completions", json=body, timeout=0.1)
        wait_idle(cluster)
        m = settled_metrics(cluster)
        # a cancelled job never reports its tokens; 480 of them would have been counted had it run to the end
        assert sum(per_replica(m, "exllamav2_generation_tokens_total").values()) - gen0 < 480


@pytest.mark.slow
def test_full_queues_answer_503_with_retry_after(cluster):
    """2 replicas x 8 ongoing (batch of 4 + 4 ready) + 12 waiting in front = 28; 40 long streams at once: the rest
    are refused at once with 503 and Retry-After, and everything is released when the clients leave."""
    statuses, release = [], threading.Event()
    lock = threading.Lock()

    def one(i):
        body = {"model": "tiny", "prompt": f"{i} Tell me a long story", "max_tokens": 400, "temperature": 0,
                "stream": True}
        try:
            with httpx.stream("POST", cluster.url + "/v1/completions", json=body, timeout=90) as r:
                with lock:
                    statuses.append((r.status_code, r.headers.get("retry-after"),
                                     r.read().decode() if r.status_code != 200 else ""))
                release.wait(90)
        except httpx.HTTPError as e:
            with lock:
                statuses.append((None, None, repr(e)))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    deadline = time.time() + 90
    while time.time() < deadline and not any(s == 503 for s, _, _ in statuses):
        time.sleep(0.1)
    release.set()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    refused = [(ra, text) for s, ra, text in statuses if s == 503]
    assert refused, statuses
    assert all(ra is not None and int(ra) >= 1 and "queue" in text for ra, text in refused), refused
    assert all(s in (200, 503) for s, _, _ in statuses), statuses
    wait_idle(cluster, timeout=60)


@pytest.mark.slow
def test_killed_replica_leaves_no_hung_request_and_is_restarted(cluster, client):
    wait_idle(cluster)
    victim = cluster.replicas()[0]
    results: dict = {}

    def one(i, stream):
        try:
            kw = dict(model="tiny", prompt=f"{i} Once upon a time", max_tokens=300, temperature=0)
            if stream:
                text = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True))
            else:
                text = client.completions.create(**kw).choices[0].text
            results[(i, stream)] = ("ok", len(text))
        except openai.APIStatusError as e:
            results[(i, stream)] = (e.status_code, str(e))
        except openai.APIError as e:  # an error event inside a stream that had begun
            results[(i, stream)] = ("stream_error", str(e))

    threads = [threading.Thread(target=one, args=(i, i % 2 == 0)) for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    os.kill(victim["pid"], signal.SIGKILL)
    for t in threads:
        t.join(90)
    assert not any(t.is_alive() for t in threads), "a request hung after its replica was killed"
    assert len(results) == 8
    for (i, stream), (how, detail) in results.items():
        if how == "ok":
            continue
        assert "replica" in detail and "retry" in detail, detail  # a clear message, never a bare failure
        assert how in (503, "stream_error"), (how, detail)
        # a request that had not begun its reply is sent again to the other replica
        assert stream, f"request {i} (not streamed) failed instead of being retried: {detail}"
    # the app serves again, and Ray Serve brings the replica count back to 2
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=4, temperature=0)
    assert r.choices[0].text
    live = cluster.wait_replicas(2, timeout=120, exclude={victim["replica"]})
    assert victim["replica"] not in {r["replica"] for r in live}
    for p in PROMPTS:
        client.completions.create(model="tiny", prompt=p, max_tokens=4, temperature=0)
    m = settled_metrics(cluster)
    assert sum(m["exllamav2_gateway_replica_failures_total"][""].values()) >= 1
