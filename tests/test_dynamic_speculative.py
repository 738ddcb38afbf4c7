"""Speculative decoding in the dynamic generator (exllamav2/generator/dynamic_draft.py, dynamic.py::_verify):
with a draft model or n-gram drafts, every job's output equals the same job without speculation, whatever else
runs beside it, across page boundaries, with stop conditions, limits, banned strings, filters, seeded sampling
and preemption. Tiny random Llama models in fp32 with SmolLM2's tokenizer (test_dynamic_tiny.py); the drafts are
the main model with slightly perturbed weights (it agrees often, so drafts are accepted and rejected) and a
smaller model (the main model's first layer only)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from transformers import LlamaForCausalLM

from exllamav2 import ExLlamaV2Cache
from exllamav2.generator.dynamic import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob
from exllamav2.generator.dynamic_draft import NgramDraft
from exllamav2.generator.filters import ExLlamaV2PrefixFilter, ExLlamaV2SelectFilter
from exllamav2.generator.sampler import ExLlamaV2Sampler
from test_dynamic_tiny import PAGE, load_tiny, tiny  # noqa: F401  (fixture)

PROMPTS = ["one two three one two three one two three one two",
           "The quick brown fox",
           "a b c d e f g h a b c d e f g h a b c d e f g h a b c d e f g h a b c d",  # crosses two pages
           "Hello"]


def draft_dir(main_dir: str, out, layers: int | None = None, noise: float = 0.0) -> str:
    """A draft model from the main model's weights: its first `layers` layers, linears perturbed by `noise`."""
    hf = LlamaForCausalLM.from_pretrained(main_dir)
    if layers is not None:
        hf.model.layers = hf.model.layers[:layers]
        hf.config.num_hidden_layers = layers
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() >= 2 and "embed" not in name:
                p.add_(torch.randn(p.shape, generator=g) * noise)
    hf.save_pretrained(str(out), safe_serialization=True)
    for f in os.listdir(main_dir):
        if "token" in f:
            shutil.copy(os.path.join(main_dir, f), str(out))
    return str(out)


@pytest.fixture(scope="module")
def drafts(tiny, tmp_path_factory):
    d, _, _ = tiny
    return {"close": load_tiny(draft_dir(d, tmp_path_factory.mktemp("draft_close"), noise=0.005))[0],
            "small": load_tiny(draft_dir(d, tmp_path_factory.mktemp("draft_small"), layers=1))[0]}


def run(model, tok, prompts=PROMPTS, max_new=40, cache_len=512, settings=None, job_kw=None, **gen_kw):
    """All prompts as concurrent jobs; returns (per job: (new token ids, its final result), the generator)."""
    gen = ExLlamaV2DynamicGenerator(model, ExLlamaV2Cache(model, 1, cache_len), tok, page_size=PAGE, **gen_kw)
    jobs = []
    for i, p in enumerate(prompts):
        kw = {"stop_conditions": [], **(job_kw(i) if job_kw else {})}
        mn = max_new[i] if isinstance(max_new, list) else max_new
        jobs.append(ExLlamaV2DynamicJob(tok.encode(p), mn, gen_settings=settings or ExLlamaV2Sampler.Settings.greedy(),
                                        identifier=i, **kw))
    gen.enqueue(jobs)
    last = {}
    streamed = {i: [] for i in range(len(jobs))}
    steps = 0
    gen.crossings = 0  # steps in which a job accepted drafts across a page boundary
    while gen.num_remaining_jobs():
        steps += 1
        assert steps < 2000, "the generator made no progress"
        before = {j: len(j.sequence) for j in gen.active}
        for r in gen.iterate():
            if r["stage"] == "streaming":
                streamed[r["identifier"]] += r["token_ids"].flatten().tolist()
                if r["eos"]:
                    last[r["identifier"]] = r
        gen.crossings += sum(1 for j, n in before.items() if len(j.sequence) - n > 1
                             and (n - 1) // PAGE != (len(j.sequence) - 1) // PAGE)
        for j in gen.active:  # rejected drafts' pages went back: a decoding job holds its sequence's pages only
            if j.remaining_input() == 1:
                assert len(j.pages) <= -(-len(j.sequence) // PAGE), "a job kept pages of rejected drafts"
    assert gen.page_table.num_used_pages() == 0, "pages were not released"
    for i, j in enumerate(jobs):
        assert streamed[i] == j.new_token_ids, "the results' token_ids do not add up to the job's tokens"
    return [(j.new_token_ids, last[i]) for i, j in enumerate(jobs)], gen


def tokens(out):
    return [t for t, _ in out]


def test_ngram_draft_proposes_what_followed_the_latest_occurrence():
    d = NgramDraft(3)
    assert d.draft([5, 6, 7, 8], 3) == []  # no suffix occurred before
    # the suffix (7, 8) last occurred at 2..3, followed by 9, 1; then the continuation repeats with period 4
    assert d.draft([5, 6, 7, 8, 9, 1, 7, 8], 4) == [9, 1, 7, 8]
    # the longest suffix wins: (2, 3) occurs twice, but (1, 2, 3) only before 4
    d = NgramDraft(3)
    assert d.draft([1, 2, 3, 4, 0, 2, 3, 5, 1, 2, 3], 2) == [4, 0]
    # the sequence grew: the index follows; a shorter sequence (a rewind) rebuilds it
    assert d.draft([1, 2, 3, 4, 0, 2, 3, 5, 1, 2, 3, 4, 0, 2], 2) == [3, 5]
    assert d.draft([1, 2, 1, 2], 3) == [1, 2, 1]
    # one matching token is too weak a hint, unless max_ngram says so
    assert NgramDraft(3).draft([1, 2, 3, 1], 2) == []
    assert NgramDraft(1).draft([1, 2, 3, 1], 2) == [2, 3]
    with pytest.raises(ValueError, match="max_ngram"):
        NgramDraft(0)


def test_ngram_drafts_give_the_plain_output(tiny):
    _, model, tok = tiny
    plain, _ = run(model, tok)
    spec, gen = run(model, tok, use_ngram_draft=True, num_draft_tokens=3)
    assert tokens(spec) == tokens(plain)
    assert gen.num_drafted_tokens > 0
    assert sum(r["accepted_draft_tokens"] + r["rejected_draft_tokens"] for _, r in spec) == gen.num_drafted_tokens


@pytest.mark.parametrize("which,k", [("close", 4), ("close", 2), ("small", 3)])
def test_draft_model_gives_the_plain_output(tiny, drafts, which, k):
    _, model, tok = tiny
    plain, plain_gen = run(model, tok)
    spec, gen = run(model, tok, draft_model=drafts[which], num_draft_tokens=k)
    assert tokens(spec) == tokens(plain)
    acc = sum(r["accepted_draft_tokens"] for _, r in spec)
    rej = sum(r["rejected_draft_tokens"] for _, r in spec)
    assert acc + rej == gen.num_drafted_tokens > 0 and rej > 0
    if which == "close":  # many drafts are right: fewer forwards than the plain run, some across page boundaries
        assert acc > 0 and gen.num_forwards < plain_gen.num_forwards and gen.crossings > 0


def test_stop_conditions_and_limits_inside_a_draft(tiny, drafts):
    """A stop token, a stop string and max_new_tokens that fall inside an accepted draft end the job exactly where
    the plain job ends."""
    _, model, tok = tiny
    free, _ = run(model, tok)
    stop_token = free[0][0][9]
    stop_string = tok.decode(torch.tensor(free[2][0][6:8]))
    kw = {0: {"stop_conditions": [stop_token]}, 2: {"stop_conditions": [stop_string]}}
    limits = [40, 13, 40, 7]
    plain, _ = run(model, tok, max_new=limits, job_kw=lambda i: kw.get(i, {}))
    spec, _ = run(model, tok, max_new=limits, job_kw=lambda i: kw.get(i, {}), draft_model=drafts["close"])
    assert tokens(spec) == tokens(plain)
    for (_, a), (_, b) in zip(plain, spec):
        assert (a["eos_reason"], a["full_completion"]) == (b["eos_reason"], b["full_completion"])
    assert [r["eos_reason"] for _, r in spec] == ["stop_token", "max_new_tokens", "stop_string", "max_new_tokens"]


def test_banned_strings_rewind_through_drafts(tiny, drafts):
    _, model, tok = tiny
    free, _ = run(model, tok)
    banned = [tok.decode(torch.tensor(free[i][0][4:6])) for i in range(2)]
    plain, _ = run(model, tok, job_kw=lambda i: {"banned_strings": banned})
    for kw in ({"draft_model": drafts["close"]}, {"use_ngram_draft": True}):
        spec, _ = run(model, tok, job_kw=lambda i: {"banned_strings": banned}, **kw)
        assert tokens(spec) == tokens(plain)
        assert [r["full_completion"] for _, r in spec] == [r["full_completion"] for _, r in plain]


def test_seeded_sampling_gives_the_plain_output(tiny, drafts):
    """Each position is sampled as the plain step samples it (same RNG draw), so a seeded job is reproduced."""
    _, model, tok = tiny
    s = ExLlamaV2Sampler.Settings(temperature=0.7, top_k=20, top_p=0.9, token_repetition_penalty=1.1)
    plain, _ = run(model, tok, settings=s, job_kw=lambda i: {"seed": 100 + i})
    spec, gen = run(model, tok, settings=s, job_kw=lambda i: {"seed": 100 + i}, draft_model=drafts["close"])
    assert tokens(spec) == tokens(plain)
    assert sum(r["accepted_draft_tokens"] for _, r in spec) > 0


def test_filters_are_fed_token_by_token_through_drafts(tiny, drafts):
    _, model, tok = tiny

    def filters(i):
        if i % 2:
            return {"filters": [ExLlamaV2SelectFilter(model, tok, ["lorem ipsum dolor", "sit amet consectetur"])]}
        return {"filters": [ExLlamaV2PrefixFilter(model, tok, "The answer is")]}
    plain, _ = run(model, tok, job_kw=filters)
    spec, _ = run(model, tok, job_kw=filters, draft_model=drafts["close"])
    assert tokens(spec) == tokens(plain)
    assert [r["full_completion"] for _, r in spec] == [r["full_completion"] for _, r in plain]
    assert plain[0][1]["full_completion"].startswith("The answer is")


def test_preempted_jobs_with_drafts(tiny, drafts):
    """A cache of six pages cannot hold the four jobs at once: jobs are preempted and resumed, drafts wait when
    pages are short, and the tokens are still those of the plain, unconstrained run."""
    _, model, tok = tiny
    plain, _ = run(model, tok, max_new=50)
    spec, gen = run(model, tok, max_new=50, cache_len=6 * PAGE, draft_model=drafts["close"])
    assert tokens(spec) == tokens(plain)
    assert gen.num_preemptions > 0


def test_bad_speculative_arguments(tiny, drafts):
    _, model, tok = tiny
    cache = ExLlamaV2Cache(model, 1, 4 * PAGE)
    with pytest.raises(ValueError, match="either draft_model or use_ngram_draft"):
        ExLlamaV2DynamicGenerator(model, cache, tok, page_size=PAGE, draft_model=drafts["small"], use_ngram_draft=True)
    with pytest.raises(ValueError, match="draft_cache.max_seq_len=32 must equal"):
        ExLlamaV2DynamicGenerator(model, cache, tok, page_size=PAGE, draft_model=drafts["small"],
                                  draft_cache=ExLlamaV2Cache(drafts["small"], 1, 2 * PAGE))
    with pytest.raises(ValueError, match="draft_cache was made for another model"):
        ExLlamaV2DynamicGenerator(model, cache, tok, page_size=PAGE, draft_model=drafts["small"],
                                  draft_cache=ExLlamaV2Cache(drafts["close"], 1, 4 * PAGE))
    with pytest.raises(ValueError, match="num_draft_tokens must be a positive int"):
        ExLlamaV2DynamicGenerator(model, cache, tok, page_size=PAGE, use_ngram_draft=True, num_draft_tokens=0)
    with pytest.raises(ValueError, match="draft_cache was given without a draft_model"):
        ExLlamaV2DynamicGenerator(model, cache, tok, page_size=PAGE, draft_cache=cache)


def test_smollm2_ngram_and_draft_model_give_the_plain_output(smollm2_default):
    """SmolLM2 in its default weights (int4 blocks, bf16 activations), asked to copy a sentence: n-gram drafts are
    accepted (fewer forwards) and the tokens are the plain job's, bit for bit; so are a draft model's (the model
    itself, so its drafts are right: verified rows computed as one-token sequences equal the plain decode's)."""
    model, tok = smollm2_default
    text = "The keeper climbed the spiral stairs, lit the lamp and watched the ships pass far below."
    prompt = tok.apply_chat_template([{"role": "user", "content": f"Repeat this sentence exactly:\n\n{text}"}])

    def go(**kw):
        gen = ExLlamaV2DynamicGenerator(model, ExLlamaV2Cache(model, 1, 512), tok, page_size=64, **kw)
        job = ExLlamaV2DynamicJob(tok.encode(prompt, encode_special_tokens=True), 32, stop_conditions=[],
                                  gen_settings=ExLlamaV2Sampler.Settings.greedy())
        gen.enqueue(job)
        last = None
        while gen.num_remaining_jobs():
            for r in gen.iterate():
                last = r if r.get("eos") else last
        return job.new_token_ids, last, gen

    plain, _, plain_gen = go()
    ngram, r, gen = go(use_ngram_draft=True)
    assert ngram == plain
    assert r["accepted_draft_tokens"] > 0 and gen.num_forwards < plain_gen.num_forwards
    same, r, _ = go(draft_model=model, draft_cache=ExLlamaV2Cache(model, 1, 512), num_draft_tokens=3)
    assert same == plain and r["accepted_draft_tokens"] > 0


@pytest.mark.slow
def test_speculation_with_the_compiled_decode_step(tiny, drafts):
    """With model.compile_decode(), plain decode steps run compiled (runtime/paged_decode.py) and so do verified
    drafts (one single-token sequence per position is a decode-only step): the tokens stay the eager plain ones."""
    _, model, tok = tiny
    eager, _ = run(model, tok)
    runner = model.compile_decode(max_seq_len=512, progress=False, paged=True)
    try:
        compiled, _ = run(model, tok)
        spec, gen = run(model, tok, draft_model=drafts["close"], num_draft_tokens=4)
        ngram, _ = run(model, tok, use_ngram_draft=True)
        assert runner.paged.failed is None and runner.paged._steps
        assert tokens(compiled) == tokens(eager) == tokens(spec) == tokens(ngram)
        assert sum(r["accepted_draft_tokens"] for _, r in spec) > 0
    finally:
        model.decode_runner = None
