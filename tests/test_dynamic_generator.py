"""The dynamic generator on a tiny random Llama (fp32): greedy outputs equal the plain reference loop under
continuous batching with chunked prefill, prefix reuse skips cached pages, cancellation frees pages, stop
conditions, banned strings, seeds, logprobs."""

from __future__ import annotations

import pytest
import torch

from exllamav2 import ExLlamaV2Cache
from exllamav2.generator.dynamic import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob
from exllamav2.generator.sampler import ExLlamaV2Sampler
from test_dynamic_tiny import PAGE, greedy_reference, tiny  # noqa: F401  (fixture)

GREEDY = ExLlamaV2Sampler.Settings.greedy()
PROMPTS = ["The capital of France is", "Once upon a time, in a land far away, there lived a dragon who loved " * 3,
           "1, 2, 3", "def fibonacci(n):\n    if n < 2:\n        return n\n" * 2, "Hello"]


def make_gen(model, tok, cache_tokens=64 * PAGE, **kw):
    cache = ExLlamaV2Cache(model, 1, cache_tokens)
    kw.setdefault("max_chunk_size", 24)
    return ExLlamaV2DynamicGenerator(model, cache, tok, page_size=PAGE, **kw)


def run_all(gen):
    results = []
    while gen.num_remaining_jobs():
        results += gen.iterate()
    return results


def test_batched_greedy_equals_reference(tiny):
    _, model, tok = tiny
    gen = make_gen(model, tok)
    n = [12, 7, 20, 9, 15]
    jobs = [ExLlamaV2DynamicJob(tok.encode(p), k, gen_settings=GREEDY, identifier=i)
            for i, (p, k) in enumerate(zip(PROMPTS, n))]
    gen.enqueue(jobs)
    results = run_all(gen)
    for job, p, k in zip(jobs, PROMPTS, n):
        ref = greedy_reference(model, tok.encode(p), k)
        assert job.new_token_ids == ref
        assert job.full_completion == tok.decode(torch.tensor(ref))
    # several prompts were prefilled in chunks while others decoded: steps < total tokens processed
    assert gen.num_forwards < sum(n) + sum(tok.encode(p).shape[1] for p in PROMPTS) // 24 + len(PROMPTS)
    eos = [r for r in results if r["stage"] == "streaming" and r["eos"]]
    assert {r["identifier"] for r in eos} == set(range(len(PROMPTS)))
    for r in eos:
        assert r["eos_reason"] == "max_new_tokens" and r["new_tokens"] == n[r["identifier"]]
        assert r["prompt_tokens"] == tok.encode(PROMPTS[r["identifier"]]).shape[1]
        assert {"time_enqueued", "time_prefill", "time_generate", "cached_tokens", "full_completion"} <= r.keys()
    streamed = "".join(r["text"] for r in results if r["stage"] == "streaming" and r["identifier"] == 1)
    assert streamed == jobs[1].full_completion
    assert gen.page_table.num_free_pages() == gen.page_table.num_pages


def test_jobs_join_while_others_run(tiny):
    _, model, tok = tiny
    gen = make_gen(model, tok)
    a = ExLlamaV2DynamicJob(tok.encode(PROMPTS[0]), 10, gen_settings=GREEDY)
    gen.enqueue(a)
    for _ in range(4):
        gen.iterate()
    b = ExLlamaV2DynamicJob(tok.encode(PROMPTS[3]), 6, gen_settings=GREEDY)
    gen.enqueue(b)
    run_all(gen)
    assert a.new_token_ids == greedy_reference(model, tok.encode(PROMPTS[0]), 10)
    assert b.new_token_ids == greedy_reference(model, tok.encode(PROMPTS[3]), 6)


def test_prefix_reuse_prefills_only_new_tokens(tiny):
    _, model, tok = tiny
    gen = make_gen(model, tok)
    system = "You are a helpful assistant who answers in great detail. " * 6
    p1, p2 = system + "What is a cat?", system + "Why is the sky blue?"
    ids1, ids2 = tok.encode(p1), tok.encode(p2)
    shared = next(i for i in range(ids1.shape[1]) if ids1[0, i] != ids2[0, i])
    assert shared >= 4 * PAGE
    gen.generate(p1, 4, gen_settings=GREEDY, stop_conditions=[])
    before = gen.num_prefilled_tokens
    job = ExLlamaV2DynamicJob(ids2, 5, gen_settings=GREEDY)
    gen.enqueue(job)
    last = [r for r in run_all(gen) if r.get("eos")][-1]
    expected_cached = (shared // PAGE) * PAGE
    assert last["cached_tokens"] == job.cached_tokens == expected_cached
    assert gen.num_prefilled_tokens - before == ids2.shape[1] - expected_cached
    assert job.new_token_ids == greedy_reference(model, ids2, 5)
    # the identical prompt reuses every full page but the one holding its last token
    job3 = ExLlamaV2DynamicJob(ids1, 3, gen_settings=GREEDY)
    gen.enqueue(job3)
    run_all(gen)
    assert job3.cached_tokens == ((ids1.shape[1] - 1) // PAGE) * PAGE
    assert job3.new_token_ids == greedy_reference(model, ids1, 3)


def test_cancel_frees_pages(tiny):
    _, model, tok = tiny
    gen = make_gen(model, tok, max_batch_size=2)
    total = gen.page_table.num_pages
    jobs = [ExLlamaV2DynamicJob(tok.encode(p), 30, gen_settings=GREEDY) for p in PROMPTS[:3]]
    gen.enqueue(jobs)
    for _ in range(3):
        gen.iterate()
    assert gen.num_active_jobs() == 2 and gen.num_pending_jobs() == 1
    held = total - gen.page_table.num_free_pages()
    assert held == len(jobs[0].pages) + len(jobs[1].pages) > 0  # pages grow with the jobs (none reserved)
    gen.cancel(jobs[0])
    assert total - gen.page_table.num_free_pages() == len(jobs[1].pages)
    gen.cancel(jobs[2])  # still pending
    gen.cancel(jobs[1])
    assert gen.num_remaining_jobs() == 0 and gen.page_table.num_free_pages() == total
    assert gen.iterate() == []


def test_stop_strings_tokens_and_banned_strings(tiny):
    _, model, tok = tiny
    prompt = PROMPTS[1]
    ids = tok.encode(prompt)
    ref_ids = greedy_reference(model, ids, 24)
    ref_text = tok.decode(torch.tensor(ref_ids))
    gen = make_gen(model, tok)
    # stop string from the middle of the reference text
    stop = ref_text[len(ref_text) // 2: len(ref_text) // 2 + 3]
    assert stop and ref_text.find(stop) > 0
    out, last = gen.generate(prompt, 24, gen_settings=GREEDY, stop_conditions=[stop], completion_only=True,
                             return_last_results=True)
    assert out == ref_text[:ref_text.find(stop)]
    assert last["eos_reason"] == "stop_string" and last["eos_triggering_string"] == stop
    # stop token: the reference's 5th token
    job = ExLlamaV2DynamicJob(ids, 24, gen_settings=GREEDY, stop_conditions=[ref_ids[4]])
    gen.enqueue(job)
    last = [r for r in run_all(gen) if r.get("eos")][-1]
    assert job.new_token_ids == ref_ids[:ref_ids.index(ref_ids[4]) + 1] and last["eos_reason"] == "stop_token"
    # min_new_tokens blocks the stop token early
    job = ExLlamaV2DynamicJob(ids, 24, min_new_tokens=10, gen_settings=GREEDY, stop_conditions=[ref_ids[0]])
    gen.enqueue(job)
    run_all(gen)
    assert job.new_token_ids[0] != ref_ids[0] and len(job.new_token_ids) >= 10
    # a banned string never appears; the output differs from the reference from the ban on
    banned = ref_text[3:9]
    out = gen.generate(prompt, 24, gen_settings=GREEDY, banned_strings=[banned], completion_only=True,
                       stop_conditions=[])
    assert banned not in out and out != ref_text
    assert gen.page_table.num_free_pages() == gen.page_table.num_pages


def test_seeds_logprobs_and_validation(tiny):
    _, model, tok = tiny
    gen = make_gen(model, tok)
    s = ExLlamaV2Sampler.Settings(temperature=1.5, top_k=0, top_p=1.0, token_repetition_penalty=1.0)
    a = gen.generate(PROMPTS[:2], 10, seed=7, gen_settings=s, stop_conditions=[])
    b = gen.generate(PROMPTS[:2], 10, seed=7, gen_settings=s, stop_conditions=[])
    assert a == b
    ids = tok.encode(PROMPTS[0])
    job = ExLlamaV2DynamicJob(ids, 3, gen_settings=GREEDY, return_logprobs=3, return_probs=True, return_top_tokens=2)
    gen.enqueue(job)
    results = [r for r in run_all(gen) if r["stage"] == "streaming"]
    first = results[0]
    expect = torch.log_softmax(model.forward(ids)[0, -1], -1)
    lp = first["logprobs"][0]
    assert lp["token"] == int(expect.argmax())
    assert lp["logprob"] == pytest.approx(float(expect.max()), abs=1e-4)
    assert [t for t, _ in lp["top_logprobs"]] == expect.topk(3).indices.tolist()
    assert first["top_k_tokens"].shape == (1, 1, 2) and first["token_probs"].shape == (1, 1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        ExLlamaV2DynamicJob(ids, -1)
    with pytest.raises(ValueError, match="max_seq_len"):
        gen.enqueue(ExLlamaV2DynamicJob(torch.zeros(1, 600, dtype=torch.long), 4))
    with pytest.raises(ValueError, match="batch_size=1"):
        ExLlamaV2DynamicGenerator(model, ExLlamaV2Cache(model, 2, 64), tok, page_size=PAGE)


@pytest.mark.slow
def test_smollm2_bf16_batched_greedy_equals_reference(smollm2_gguf):
    """The real model in bf16: batched, chunked-prefill greedy output equals the plain loop (slow on a CPU)."""
    from exllamav2 import ExLlamaV2, ExLlamaV2Config
    from exllamav2.tokenizer import ExLlamaV2Tokenizer

    cfg = ExLlamaV2Config(smollm2_gguf)
    cfg.max_seq_len = 1024
    model = ExLlamaV2(cfg)
    model.load()
    tok = ExLlamaV2Tokenizer(cfg)
    gen = make_gen(model, tok)
    prompts = ["The capital of France is", "1, 2, 3, 4,", "def fibonacci(n):"]
    jobs = [ExLlamaV2DynamicJob(tok.encode(p), 8, gen_settings=GREEDY) for p in prompts]
    gen.enqueue(jobs)
    run_all(gen)
    for job, p in zip(jobs, prompts):
        assert job.new_token_ids == greedy_reference(model, tok.encode(p), 8)
