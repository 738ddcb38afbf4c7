"""Pages are allocated as jobs grow, not reserved up front: a job without a token budget does not block short
ones, jobs that together outgrow the cache are preempted and resume with exactly the tokens they would have
produced, and a resumed job finds its own pages again by prefix hash (tiny random Llama, fp32)."""

from __future__ import annotations

import pytest
import torch

from exllamav2 import ExLlamaV2Cache, ops
from exllamav2.generator.dynamic import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob
from exllamav2.generator.sampler import ExLlamaV2Sampler
from test_dynamic_tiny import PAGE, greedy_reference, tiny  # noqa: F401  (fixture)

GREEDY = ExLlamaV2Sampler.Settings.greedy()


def make_gen(model, tok, pages, **kw):
    kw.setdefault("max_chunk_size", 32)
    return ExLlamaV2DynamicGenerator(model, ExLlamaV2Cache(model, 1, pages * PAGE), tok, page_size=PAGE, **kw)


def ids_of(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, 40000, (1, n), generator=g)


def step_until(gen, cond, limit=5000):
    for _ in range(limit):
        if cond():
            return
        gen.iterate()
    raise AssertionError("condition not reached")


def test_unbounded_job_does_not_block_short_ones(tiny):
    """A job that may run to the context limit (what a request without max_tokens asks for) holds only the
    pages it has written: a short job that arrives later runs beside it, and one that arrives when the long job
    fills the cache preempts it, finishes, and the long job still produces the greedy reference."""
    _, model, tok = tiny
    gen = make_gen(model, tok, pages=12)  # 192 tokens, less than the model's context of 512
    long_ids = ids_of(6, 1)
    long_job = ExLlamaV2DynamicJob(long_ids, 12 * PAGE - 6, gen_settings=GREEDY, stop_conditions=[])
    gen.enqueue(long_job)
    for _ in range(8):
        gen.iterate()
    short = ExLlamaV2DynamicJob(ids_of(5, 2), 6, gen_settings=GREEDY, stop_conditions=[])
    gen.enqueue(short)
    step_until(gen, lambda: short.finished)
    assert not long_job.finished and len(long_job.new_token_ids) < 40
    assert short.new_token_ids == greedy_reference(model, ids_of(5, 2), 6)

    # the long job now fills the whole cache; a short job still gets through, by preempting it
    step_until(gen, lambda: gen.page_table.num_free_pages() == 0)
    late = ExLlamaV2DynamicJob(ids_of(7, 3), 5, gen_settings=GREEDY, stop_conditions=[])
    gen.enqueue(late)
    step_until(gen, lambda: late.finished, limit=200)
    assert not long_job.finished and long_job.preemptions >= 1 and gen.num_preemptions >= 1
    assert late.new_token_ids == greedy_reference(model, ids_of(7, 3), 5)
    step_until(gen, lambda: not gen.num_remaining_jobs())
    assert len(long_job.new_token_ids) == 12 * PAGE - 6
    assert long_job.new_token_ids == greedy_reference(model, long_ids, 12 * PAGE - 6)
    assert gen.page_table.num_free_pages() == gen.page_table.num_pages
    # a budget beyond the cache is capped at what the cache can hold (the context is 512 tokens)
    capped = ExLlamaV2DynamicJob(long_ids, 10_000, gen_settings=GREEDY, stop_conditions=[])
    gen.enqueue(capped)
    assert capped.max_new_tokens == 12 * PAGE - 6
    gen.cancel(capped)


@pytest.fixture
def batch_invariant():
    ops.set_batch_invariant(True)
    yield
    ops.set_batch_invariant(None)


def test_preempted_jobs_resume_with_the_same_tokens(tiny, batch_invariant):
    """Six jobs that together need twice the cache: they are admitted as their prompts fit, preempted when the
    pages run out, and every one ends with exactly the tokens of its run in a cache big enough for all (sampled
    with seeds, and greedy against the plain reference loop). The model's weights are dense float32, whose GEMM
    rounds a row by the call's row count, so the batch-invariant mode is on: a resumed job prefills again rows it
    first decoded alone, and a seeded sample follows the logits to the last bit."""
    _, model, tok = tiny
    sampled = ExLlamaV2Sampler.Settings(temperature=1.0, top_k=0, top_p=0.9, token_repetition_penalty=1.0)
    specs = [(ids_of(10 + 7 * i, 10 + i), 40 + 3 * i, GREEDY if i % 2 else sampled) for i in range(6)]

    def run(pages):
        gen = make_gen(model, tok, pages=pages, max_batch_size=6)
        jobs = [ExLlamaV2DynamicJob(ids, n, gen_settings=s, seed=100 + i, stop_conditions=[])
                for i, (ids, n, s) in enumerate(specs)]
        gen.enqueue(jobs)
        peak = 0
        while gen.num_remaining_jobs():
            gen.iterate()
            peak = max(peak, gen.num_active_jobs())
        assert gen.page_table.num_free_pages() == gen.page_table.num_pages
        return gen, jobs, peak

    roomy, ref_jobs, _ = run(64)
    assert roomy.num_preemptions == 0
    tight, jobs, peak = run(12)
    need = sum(j.total_pages(PAGE) for j in jobs)
    assert need > 2 * 12  # reserving up front would have run at most a few at a time
    assert tight.num_preemptions > 0 and peak >= 4
    for j, r in zip(jobs, ref_jobs):
        assert j.new_token_ids == r.new_token_ids and j.full_completion == r.full_completion
    for (ids, n, s), j in zip(specs, jobs):
        if s is GREEDY:
            assert j.new_token_ids == greedy_reference(model, ids, n)
    # resumed jobs found their published pages again instead of recomputing their whole prompt
    assert tight.num_cached_tokens > 0


def test_resume_reuses_pages_and_prefix_reuse_still_works(tiny):
    """A preempted job publishes its pages; resuming, it recomputes only the part page that was not full. Prefix
    reuse between jobs works as before."""
    _, model, tok = tiny
    gen = make_gen(model, tok, pages=16)
    ids = ids_of(3 * PAGE + 4, 7)
    job = ExLlamaV2DynamicJob(ids, 30, gen_settings=GREEDY, stop_conditions=[])
    other = ExLlamaV2DynamicJob(ids_of(5, 8), 30, gen_settings=GREEDY, stop_conditions=[])
    gen.enqueue([job, other])
    step_until(gen, lambda: len(job.new_token_ids) >= PAGE)
    written = job.kv_len
    gen._preempt(job)  # as the generator does when pages run out
    assert job in gen.pending and job.pages == [] and gen.page_table.num_cached_pages() >= written // PAGE
    prefilled = gen.num_prefilled_tokens
    cached = gen.num_cached_tokens
    gen.iterate()  # resumes at once: there is room
    assert job in gen.active and job.kv_len == len(job.sequence) - 1
    assert gen.num_cached_tokens - cached == ids.shape[1]  # the whole prompt came from the cache
    step_until(gen, lambda: not gen.num_remaining_jobs())
    assert gen.num_prefilled_tokens == prefilled
    assert job.new_token_ids == greedy_reference(model, ids, 30)
    assert other.new_token_ids == greedy_reference(model, ids_of(5, 8), 30)
    # a new job with the same prompt reuses the prompt's full pages
    again = ExLlamaV2DynamicJob(ids, 4, gen_settings=GREEDY, stop_conditions=[])
    gen.enqueue(again)
    step_until(gen, lambda: again.finished)
    assert again.cached_tokens == 3 * PAGE
    assert again.new_token_ids == greedy_reference(model, ids, 4)
