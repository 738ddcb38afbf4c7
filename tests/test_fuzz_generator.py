"""Randomized fuzz of the generators (bench/fuzz_generator.py): the same request gives the same tokens, text and end
reason alone or among others in the dynamic generator (greedy and seeded, random sampler settings, stop tokens and
strings, banned strings, filters, late arrivals, a cancelled job, prefix sharing, caches small enough to make jobs
wait or be preempted), the streaming generator agrees, and bad requests are refused naming the parameter while the
generator keeps serving. Plus regression tests for what the fuzz found (banned-string rewinds, error isolation)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))

import fuzz_generator as fz  # noqa: E402

from exllamav2 import ExLlamaV2Cache, ops  # noqa: E402
from exllamav2.generator import ExLlamaV2Sampler  # noqa: E402
from exllamav2.generator.dynamic import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob  # noqa: E402
from exllamav2.generator.streaming import ExLlamaV2StreamingGenerator  # noqa: E402


@pytest.fixture(scope="module")
def tiny_fuzz(tmp_path_factory):
    """The fuzz's fp32 random Llama with SmolLM2's tokenizer, in the default batch invariance (auto: its dense fp32
    linears run the C++ GEMV at every row count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the rounds are small; more threads only contend
    model, tok = fz.load_model("tiny", str(tmp_path_factory.mktemp("fuzz_tiny")))
    yield model, tok
    torch.set_num_threads(threads)


def _rounds(model, tok, seeds, extras=True):
    failures = []
    for seed in seeds:
        line, mism, config, reqs = fz.fuzz_round(model, tok, seed, extras=extras)
        if mism:
            failures.append(line + "\n  " + "\n  ".join(mism))
    assert not failures, "\n".join(failures)


def test_fuzz_tiny_rounds(tiny_fuzz):
    """40 fixed random rounds on the tiny model: every job equals itself alone (and the streaming generator)."""
    _rounds(*tiny_fuzz, seeds=range(1000, 1040))


def test_fuzz_robustness(tiny_fuzz):
    """Bad requests are refused with an error naming the parameter; the generator keeps serving afterwards."""
    problems = fz.robustness(*tiny_fuzz)
    # a stop token id past the vocabulary can never match; it is accepted (tokenizers may name ids the model lacks)
    problems = [p for p in problems if not p.startswith("stop token id >= vocab")]
    assert not problems, "\n".join(problems)


def _job_with(tok, banned, stop=()):
    class _Gen:  # what ExLlamaV2DynamicJob.prepare reads from its generator
        tokenizer = tok
        page_size = 16
    job = ExLlamaV2DynamicJob(torch.tensor([[1, 2, 3]]), 10, banned_strings=banned, stop_conditions=list(stop))
    job.prepare(_Gen())
    return job


def test_banned_string_inside_a_token_keeps_text_and_tokens_together(tiny_fuzz):
    """' hello' then ' world' with 'o w' banned: ' hell' must not be released before the rewind that drops
    ' hello' (it was: full_completion ' hell there' for the tokens of ' there')."""
    _, tok = tiny_fuzz
    (hello,), (world,), (there,) = (tok.encode(s)[0].tolist() for s in (" hello", " world", " there"))
    job = _job_with(tok, ["o w"])
    texts = [job.accept_token(t, {})["text"] for t in (hello, world, there)]
    assert texts == ["", "", " there"]
    assert job.new_token_ids == [there] and job.full_completion == " there"
    assert job.blocked_at == {0: {hello}}


def test_banned_string_blames_the_token_it_starts_in(tiny_fuzz):
    """Text held for a stop string ('s' of 's t') must not move the banned-string checkpoint back: 'a' banned
    and found in ' modular' blocks ' modular', not ' locks' before it (it blocked ' locks')."""
    _, tok = tiny_fuzz
    (locks,), (modular,), (x,) = (tok.encode(s)[0].tolist() for s in (" locks", " modular", " cookie"))
    job = _job_with(tok, ["a"], stop=["s t"])
    out = [job.accept_token(t, {}) for t in (locks, modular)]
    assert job.new_token_ids == [locks] and job.blocked_at == {1: {modular}}
    assert out[0]["text"] == " lock" and out[1]["text"] == ""
    r = job.accept_token(x, {})
    assert r["text"] == "s cookie" and r["token_ids"] == [locks, x]
    assert job.full_completion == tok.decode_list(job.new_token_ids)


def test_streaming_rewind_keeps_an_incomplete_character(tiny_fuzz):
    """A banned-string rewind right after a lone byte token: the streaming generator's text still equals the
    decode of its tokens (it dropped the byte's U+FFFD)."""
    model, tok = tiny_fuzz
    ids = torch.tensor([[27867, 563]])
    sg = ExLlamaV2StreamingGenerator(model, ExLlamaV2Cache(model, 1, 128), tok)
    sg.set_stop_conditions([])
    sg.begin_stream_ex(ids, ExLlamaV2Sampler.Settings.greedy(token_repetition_penalty=1.05), banned_strings=["in"],
                       max_new_tokens=67)
    toks, text = [], ""
    while True:
        r = sg.stream_ex()
        toks += r["chunk_token_ids"].flatten().tolist()
        text += r["chunk"]
        if r["eos"]:
            break
    prompt = tok.decode_list(ids[0].tolist())
    assert text == tok.decode_list(ids[0].tolist() + toks)[len(prompt):]


def test_a_failing_job_does_not_stall_the_others(tiny_fuzz):
    """A job whose every token is masked raises once, naming itself, and is cancelled; the job beside it still
    gets all its tokens (results of the failing step come with the next iterate()) and equals itself alone."""
    model, tok = tiny_fuzz
    ids = tok.encode("the cat sat on a mat")
    greedy = ExLlamaV2Sampler.Settings.greedy()
    dead = ExLlamaV2Sampler.Settings.greedy()
    dead.token_bias = torch.full((49152,), float("-inf"))

    def make():
        return ExLlamaV2DynamicGenerator(model, ExLlamaV2Cache(model, 1, 256), tok, page_size=16)

    gen = make()
    alone = ExLlamaV2DynamicJob(ids, 8, gen_settings=greedy, stop_conditions=[])
    gen.enqueue(alone)
    while gen.num_remaining_jobs():
        gen.iterate()

    gen = make()
    good = ExLlamaV2DynamicJob(ids, 8, gen_settings=greedy, stop_conditions=[], identifier="good")
    bad = ExLlamaV2DynamicJob(ids, 8, gen_settings=dead, stop_conditions=[], identifier="bad")
    gen.enqueue([bad, good])
    streamed, errors = [], []
    for _ in range(100):
        if not gen.num_remaining_jobs() and not gen._carry:
            break
        try:
            for r in gen.iterate():
                if r["stage"] == "streaming" and r["identifier"] == "good":
                    streamed += r["token_ids"].flatten().tolist()
        except ValueError as e:
            errors.append(str(e))
    assert len(errors) == 1 and "'bad'" in errors[0] and "no token can be sampled" in errors[0]
    assert bad.finished and good.finished
    assert streamed == good.new_token_ids == alone.new_token_ids
    assert gen.page_table.num_used_pages() == 0


@pytest.mark.parametrize("field,value", [("top_p", 1.5), ("top_p", -0.1), ("min_p", 2.0), ("typical", -1.0),
                                         ("temperature", -1.0), ("temperature", float("nan")), ("top_k", -1),
                                         ("token_repetition_penalty", 0.0), ("xtc_probability", 2.0)])
def test_bad_settings_are_refused_naming_the_field(field, value):
    s = ExLlamaV2Sampler.Settings()
    setattr(s, field, value)
    with pytest.raises(ValueError, match=field):
        ExLlamaV2DynamicJob(torch.tensor([[1, 2]]), 4, gen_settings=s)


def test_bad_request_shapes_are_refused_naming_the_parameter(tiny_fuzz):
    model, tok = tiny_fuzz
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(TypeError, match="stop_conditions"):
        ExLlamaV2DynamicJob(ids, 4, stop_conditions="the end")  # each character would have been a stop string
    with pytest.raises(TypeError, match="banned_strings"):
        ExLlamaV2DynamicJob(ids, 4, banned_strings="the")
    with pytest.raises(TypeError, match="gen_settings"):
        ExLlamaV2DynamicJob(ids, 4, gen_settings={"top_p": 0.5})
    with pytest.raises(ValueError, match="input_ids"):
        ExLlamaV2DynamicJob(ids.float(), 4)
    gen = ExLlamaV2DynamicGenerator(model, ExLlamaV2Cache(model, 1, 128), tok, page_size=16)
    for job, name in ((ExLlamaV2DynamicJob(torch.tensor([[1, 10**7]]), 4), "input_ids"),
                      (ExLlamaV2DynamicJob(torch.tensor([[1, -2]]), 4), "input_ids"),
                      (ExLlamaV2DynamicJob(ids, 4, return_top_tokens=10**6), "return_top_tokens")):
        with pytest.raises(ValueError, match=name):
            gen.enqueue(job)
    s = ExLlamaV2Sampler.Settings()
    s.token_bias = torch.zeros(7)
    with pytest.raises(ValueError, match="token_bias"):
        gen.enqueue(ExLlamaV2DynamicJob(ids, 4, gen_settings=s))
    assert not gen.num_remaining_jobs()


@pytest.mark.slow
def test_fuzz_tiny_many_rounds(tiny_fuzz):
    _rounds(*tiny_fuzz, seeds=range(2000, 2300))


@pytest.mark.slow
def test_fuzz_smollm2_rounds(smollm2_gguf):
    """SmolLM2 in its default weights (packed GGUF blocks, bf16): invariant without set_batch_invariant."""
    model, tok = fz.load_model("smollm2")
    ops.set_batch_invariant(False)
    try:
        known, failures = [], []
        for seed in range(3000, 3012):
            line, mism, _, _ = fz.fuzz_round(model, tok, seed)
            other = [m for m in mism if not m.startswith("generate_simple batched row")]
            (failures if other else known if mism else []).append(line + "\n  " + "\n  ".join(mism))
    finally:
        ops.set_batch_invariant(None)
    assert not failures, "\n".join(failures)
    if known:
        # the CPU attention kernel cuts keys into splits at absolute key positions, so a left-padded row of the
        # base generator's batch sums its keys in other groups than the same prompt alone (csrc/attention.cpp);
        # at a near-tie that flips a token (seed 3004). The dynamic generator (serve) is exact.
        pytest.xfail("left-padded generate_simple batches round differently from alone:\n" + "\n".join(known))


def test_banned_strings_match_case_insensitively(tiny_fuzz):
    """As in the original and in the streaming generator: a banned " s" also bans " Sacramento" (the dynamic job
    matched banned strings as given, so the two generators gave other tokens for the same request)."""
    import random as _random
    model, tok = tiny_fuzz
    config, reqs = fz.random_round(_random.Random(3100123), tok, model.config.max_seq_len)
    r = fz.Request(**{**reqs[0].__dict__, "enqueue_step": 0, "cancel_step": None})
    assert r.banned_strings == [" 1", " s"]
    alone, _, problems = fz.run_jobs(model, tok, config, [r])
    assert not problems
    assert " s" not in alone[0].text.lower()
    assert fz.check_streaming(model, tok, r, alone[0]) == []
