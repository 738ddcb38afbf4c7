"""Replicas under load and faults: `serve --replicas N` (exllamav2/server/cluster.py) on a local Ray instance,
driven over loopback by the official openai client and httpx. Bounded: every request has a deadline, every phase a
fixed count, and the script stops by itself.

    python bench/bench_replicas.py [-m MODEL] [--rounds 3] [--streams 64] [--max-tokens 32] [--with-tests]

Phases, each a table:
1. prefix-cache hit rate: the same workload (8 long system prompts x 6 questions, 4 at a time, shuffled) through
   the prefix-aware router and through Ray Serve's default power-of-two-choices router; hit rate = prompt tokens
   read from cached pages / prompt tokens (the replicas' own /metrics counters);
2. rounds of `--streams` concurrent streaming requests over 2 replicas, half disconnecting after 3 chunks:
   completed / disconnected / cleanly failed (a status and a message) / hung (no end within the deadline),
   p50/p95 latency of the completed ones, then KV pages in use and each replica's RSS after the round (pages must
   be back to 0 and memory flat);
3. one replica killed (SIGKILL) while 32 streams run: the same outcome counts, the time until every request had
   ended, and the time until Ray Serve's replacement reports;
4. throughput of 1 replica (all cores, batch 32) against 2 replicas (half the cores and batch 16 each):
   generated tokens/s at `--streams` concurrent requests.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import random
import signal
import statistics
import sys
import threading
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

DEADLINE_S = 180.0
TOPICS = ["astronomy", "cooking", "tax law", "gardening", "chess", "medieval history", "sailing", "databases"]
QUESTIONS = ["What matters most?", "Give one example.", "What is a common mistake?", "How do I start?",
             "What should I read?", "Summarise in a sentence."]


def system_prompt(topic: str) -> str:
    return (f"You are an expert in {topic}. Answer the user's questions about {topic} accurately, briefly and "
            f"kindly; when a question is not about {topic}, say so and stop. ") * 6


def scrape(url: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for s in fam.samples:
            r = s.labels.get("replica")
            if r is not None:
                out.setdefault(s.name, {}).setdefault(r, 0.0)
                out[s.name][r] += s.value
    return out


def total(m: dict, name: str) -> float:
    return sum(m.get(name, {}).values())


def wait_idle(url: str, timeout: float = 60.0) -> dict:
    deadline = time.time() + timeout
    while True:
        time.sleep(1.2)
        m = scrape(url)
        busy = total(m, "exllamav2_kv_pages_used") + total(m, "exllamav2_running_jobs") + \
            total(m, "exllamav2_queue_depth")
        if busy == 0 or time.time() > deadline:
            return m


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def stream_one(url: str, model: str, prompt: str, max_tokens: int, disconnect_after: int | None,
               results: list, lock: threading.Lock) -> None:
    """Outcome: ("completed", latency) / ("disconnected", latency) / ("failed", "status: message")."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    outcome = None
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=DEADLINE_S) as r:
            if r.status_code != 200:
                outcome = ("failed", f"{r.status_code}: {r.read().decode()[:160]}")
            else:
                chunks, done = 0, False
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        break
                    if '"error"' in line:
                        outcome = ("failed", f"stream error event: {line[6:200]}")
                        break
                    chunks += 1
                    if disconnect_after is not None and chunks >= disconnect_after:
                        outcome = ("disconnected", time.perf_counter() - t0)
                        break
                if outcome is None:
                    outcome = ("completed", time.perf_counter() - t0) if done else \
                        ("failed", "stream ended without [DONE] or an error event")
    except httpx.HTTPError as e:
        outcome = ("failed", f"transport: {type(e).__name__}: {e}")
    with lock:
        results.append(outcome)


def run_streams(url: str, model: str, n: int, max_tokens: int, disconnect_half: bool, during=None) -> dict:
    results: list = []
    lock = threading.Lock()
    threads = []
    for i in range(n):
        prompt = f"Request {i}: " + QUESTIONS[i % len(QUESTIONS)]
        t = threading.Thread(target=stream_one, args=(url, model, prompt, max_tokens,
                                                      3 if disconnect_half and i % 2 else None, results, lock),
                             daemon=True)
        threads.append(t)
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    if during is not None:
        during()
    deadline = time.time() + DEADLINE_S + 10
    for t in threads:
        t.join(max(0.0, deadline - time.time()))
    ended_s = time.perf_counter() - t0
    with lock:
        got = list(results)
    lat = sorted(x for k, x in got if k == "completed")
    return {"completed": sum(k == "completed" for k, _ in got),
            "disconnected": sum(k == "disconnected" for k, _ in got),
            "failed": sum(k == "failed" for k, _ in got),
            "hung": sum(t.is_alive() for t in threads),
            "p50": statistics.median(lat) if lat else float("nan"),
            "p95": lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else float("nan"),
            "ended_s": ended_s, "failures": sorted({x for k, x in got if k == "failed"})[:3]}


def start(args, replicas: int, routing: str = "prefix", max_batch: int = 16):
    from exllamav2.server.cluster_process import ReplicatedServer

    extra = ["--routing", routing, "--page-size", str(args.page_size), "--max-batch-size", str(max_batch),
             "--cache-tokens", str(args.cache_tokens), "--model-name", "bench"]
    if args.dtype:
        extra += ["--dtype", args.dtype]
    print(f"  starting serve --replicas {replicas} --routing {routing} ...", flush=True)
    t0 = time.perf_counter()
    srv = ReplicatedServer(args.model, replicas, extra, log_path=args.log, timeout=600)
    print(f"  ready in {time.perf_counter() - t0:.0f} s", flush=True)
    return srv


def prefix_workload(url: str) -> tuple[float, float, float]:
    """(hit rate, prompt tokens, cached tokens) of the shuffled shared-prefix workload."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=DEADLINE_S)
    work = [(t, q) for t in TOPICS for q in QUESTIONS]
    random.Random(0).shuffle(work)
    before = wait_idle(url)

    def one(item):
        topic, q = item
        client.chat.completions.create(model="bench", max_tokens=2, temperature=0,
                                       messages=[{"role": "system", "content": system_prompt(topic)},
                                                 {"role": "user", "content": q}])

    with cf.ThreadPoolExecutor(4) as ex:
        list(ex.map(one, work))
    after = wait_idle(url)
    prompt = total(after, "exllamav2_prompt_tokens_total") - total(before, "exllamav2_prompt_tokens_total")
    hits = total(after, "exllamav2_prefix_cache_hit_tokens_total") - \
        total(before, "exllamav2_prefix_cache_hit_tokens_total")
    return hits / max(prompt, 1), prompt, hits


def throughput(url: str, n: int, max_tokens: int) -> float:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=DEADLINE_S)

    def one(i):
        r = client.completions.create(model="bench", prompt=f"Request {i}: " + QUESTIONS[i % 6],
                                      max_tokens=max_tokens, temperature=0)
        return r.usage.completion_tokens

    one(0)  # warm-up
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(n) as ex:
        tokens = sum(ex.map(one, range(n)))
    return tokens / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description="exllamav2 replicas under load and faults (Ray Serve, loopback)")
    ap.add_argument("-m", "--model", default=None, help="model folder or .gguf (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--max-tokens", dest="max_tokens", type=int, default=32)
    ap.add_argument("--page-size", dest="page_size", type=int, default=32)
    ap.add_argument("--cache-tokens", dest="cache_tokens", type=int, default=16384)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--log", default="bench_replicas.log", help="the servers' log (default: ./bench_replicas.log)")
    ap.add_argument("--with-tests", dest="with_tests", action="store_true",
                    help="first run tests/test_ray_replicas.py with its slow tests (the burst and the killed replica)")
    args = ap.parse_args()
    if args.with_tests:
        import subprocess
        tests = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "test_ray_replicas.py")
        rc = subprocess.call([sys.executable, "-m", "pytest", "-q", tests, "-m", "slow or not slow"])
        print(f"tests/test_ray_replicas.py (slow included): {'passed' if rc == 0 else f'FAILED (exit {rc})'}")
    print(f"machine: {os.cpu_count()} CPU cores; Ray and the bench client share them with the replicas", flush=True)

    print("\n1. prefix-cache hit rate, 2 replicas, 48 chat requests (8 system prompts x 6 questions, 4 at a time)")
    rates = {}
    srv = start(args, 2, "default")  # one app at a time: a second would replace the first (same app name)
    try:
        rates["default"] = prefix_workload(srv.url)
    finally:
        srv.stop()
    srv = start(args, 2, "prefix")  # kept for phases 2 and 3
    try:
        rates["prefix"] = prefix_workload(srv.url)
    except BaseException:
        srv.stop()
        raise
    print("| routing | prompt tokens | from cache | hit rate |\n|---|---|---|---|")
    for routing, (rate, prompt, hits) in sorted(rates.items(), reverse=True):
        name = "prefix-aware (ours)" if routing == "prefix" else "Ray default (power of two)"
        print(f"| {name} | {prompt:.0f} | {hits:.0f} | {rate:.1%} |")

    try:
        print(f"\n2. {args.rounds} rounds of {args.streams} concurrent streams ({args.max_tokens} tokens), half "
              f"disconnecting after 3 chunks")
        pids = {r["replica"]: r["pid"] for r in srv.replicas()}
        base = wait_idle(srv.url)
        print(f"   baseline: pages in use {total(base, 'exllamav2_kv_pages_used'):.0f}, RSS "
              + ", ".join(f"{rss_mb(p):.0f} MB" for p in pids.values()))
        print("| round | completed | disconnected | cleanly failed | hung | p50 s | p95 s | pages in use after | "
              "replica RSS after (MB) |\n|---|---|---|---|---|---|---|---|---|")
        for k in range(args.rounds):
            res = run_streams(srv.url, "bench", args.streams, args.max_tokens, disconnect_half=True)
            m = wait_idle(srv.url)
            print(f"| {k + 1} | {res['completed']} | {res['disconnected']} | {res['failed']} | {res['hung']} | "
                  f"{res['p50']:.2f} | {res['p95']:.2f} | {total(m, 'exllamav2_kv_pages_used'):.0f} | "
                  + ", ".join(f"{rss_mb(p):.0f}" for p in pids.values()) + " |", flush=True)
            if res["failures"]:
                print(f"   failures: {res['failures']}")

        print("\n3. one replica killed (SIGKILL) 1.5 s into 32 concurrent streams (64 tokens each)")
        victim = srv.replicas()[0]
        killed_at = []

        def kill():
            time.sleep(1.5)
            os.kill(victim["pid"], signal.SIGKILL)
            killed_at.append(time.perf_counter())

        res = run_streams(srv.url, "bench", 32, 64, disconnect_half=False, during=kill)
        srv.wait_replicas(2, timeout=300, exclude={victim["replica"]})
        back_s = time.perf_counter() - killed_at[0]
        ok = httpx.post(srv.url + "/v1/completions", json={"model": "bench", "prompt": "Hello", "max_tokens": 4},
                        timeout=60).status_code
        print("| completed | cleanly failed | hung | all ended after (s) | replacement reporting after kill (s) | "
              "next request |\n|---|---|---|---|---|---|")
        print(f"| {res['completed']} | {res['failed']} | {res['hung']} | {res['ended_s']:.1f} | {back_s:.1f} | "
              f"{ok} |")
        if res["failures"]:
            print(f"   failure messages: {res['failures']}")
    finally:
        srv.stop()

    print(f"\n4. throughput, {args.streams} concurrent requests x {args.max_tokens} tokens")
    rows = []
    for n in (1, 2):
        srv = start(args, n, "prefix", max_batch=32 // n)  # the same 32 decoding at once in both
        try:
            rows.append((n, throughput(srv.url, args.streams, args.max_tokens)))
        finally:
            srv.stop()
    print("| replicas | cores each | batch each | generated tokens/s |\n|---|---|---|---|")
    for n, tps in rows:
        print(f"| {n} | {os.cpu_count() / n:g} | {32 // n} | {tps:.1f} |")
    print(f"   2 replicas / 1 replica: {rows[1][1] / rows[0][1]:.2f}x. On one machine the replicas split the same "
          f"cores, so this shows the cost or gain of splitting them (and Ray's overhead), not what a second machine "
          f"adds.")


if __name__ == "__main__":
    main()
