"""Server throughput: aggregate generated tokens/s at 1, 4 and 16 concurrent streaming requests against the same
prompts sent one by one, through a live server on 127.0.0.1 (in-process, uvicorn in a thread).

    python bench/bench_server.py [-m MODEL] [--max-tokens 32] [--levels 1,4,16]

Both modes run in the same process, interleaved per level, so machine noise hits them alike; the table's ratio
is concurrent / sequential tokens/s.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import time

PROMPTS = ["The capital of France is", "Once upon a time", "def quicksort(items):", "The three laws of robotics",
           "A recipe for pancakes:", "In the beginning", "Photosynthesis is", "The stock market today",
           "Dear diary,", "The best way to learn Python", "Mount Everest is", "Here is a haiku about rain:",
           "SELECT name FROM", "The history of Rome", "Quantum computers", "My favourite book is"]


def run_requests(client, model: str, prompts: list[str], max_tokens: int, concurrency: int) -> tuple[int, float]:
    def one(p):
        r = client.completions.create(model=model, prompt=p, max_tokens=max_tokens, temperature=0)
        return r.usage.completion_tokens

    t0 = time.perf_counter()
    if concurrency == 1:
        tokens = sum(one(p) for p in prompts)
    else:
        with cf.ThreadPoolExecutor(concurrency) as ex:
            tokens = sum(ex.map(one, prompts))
    return tokens, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description="exllamav2 server throughput")
    ap.add_argument("-m", "--model", default=None, help="model folder or .gguf (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--levels", default="1,4,16")
    ap.add_argument("--page-size", type=int, default=256)
    ap.add_argument("--dtype", default=None)
    args = ap.parse_args()

    import openai
    from exllamav2.server import load_engine, start_in_thread

    levels = [int(x) for x in args.levels.split(",")]
    engine = load_engine(args.model, max_batch_size=max(levels), page_size=args.page_size, dtype=args.dtype,
                         cache_tokens=max(levels) * 4 * args.page_size)
    srv = start_in_thread(engine)
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=3600)
    try:
        run_requests(client, engine.model_name, PROMPTS[:2], 4, 1)  # warm-up
        rows = []
        for n in levels:
            prompts = (PROMPTS * (n // len(PROMPTS) + 1))[:n]
            seq_tok, seq_s = run_requests(client, engine.model_name, prompts, args.max_tokens, 1)
            con_tok, con_s = run_requests(client, engine.model_name, prompts, args.max_tokens, n)
            rows.append((n, seq_tok / seq_s, con_tok / con_s))
        print(f"model: {engine.model_name}   max_tokens: {args.max_tokens}   (tokens/s, generated tokens only)")
        print(f"{'concurrent':>10} | {'one by one':>11} | {'concurrent':>11} | {'ratio':>6}")
        print("-" * 48)
        for n, seq, con in rows:
            print(f"{n:>10} | {seq:>11.1f} | {con:>11.1f} | {con / seq:>6.2f}")
    finally:
        srv.stop()
        engine.close()


if __name__ == "__main__":
    main()
