"""The dynamic generator with its plain rows sampled on the device (generator/dynamic_sampling.py): the same tokens
as the host path, alone or batched, with a host-path row (a filter, top tokens) beside device rows; and a decode
step followed by device sampling makes no host sync."""

from __future__ import annotations

import random

import torch

from exllamav2 import ExLlamaV2Cache
from exllamav2.generator.dynamic import ExLlamaV2DynamicJob
from exllamav2.generator.dynamic_sampling import samples_on_device
from exllamav2.generator.filters import ExLlamaV2PrefixFilter
from exllamav2.generator.sampler import ExLlamaV2Sampler
from exllamav2.generator.sampler_device import DeviceSamplingParams, sample_on_device
from exllamav2.runtime.paged_decode import paged_decode_step
from host_sync import SyncTrace, host_syncs
from test_dynamic_generator import PROMPTS, make_gen, run_all
from test_dynamic_tiny import build_tiny_dir, load_tiny, tiny  # noqa: F401  (fixture)

Settings = ExLlamaV2Sampler.Settings

SETTINGS = [
    Settings(),  # the defaults: top-k 50, top-p 0.8, repetition penalty over the whole context
    Settings(temperature=1.3, top_k=0, top_p=0.95, min_p=0.02, token_frequency_penalty=0.3,
             token_presence_penalty=0.2, token_repetition_range=16, token_repetition_decay=8),
    Settings(temperature=0.9, top_k=30, dry_multiplier=0.8, xtc_probability=0.5, xtc_threshold=0.05, skew=0.3),
    Settings(temperature=1.0, mirostat=True, mirostat_tau=3.0, top_k=0, top_p=0.0, typical=0.9),
    Settings.greedy(token_repetition_penalty=1.2),
]


def _jobs(tok, seed0: int, with_host_rows: bool = False):
    jobs = [ExLlamaV2DynamicJob(tok.encode(p), 14, min_new_tokens=3, gen_settings=s, seed=seed0 + i, identifier=i,
                                stop_conditions=[tok.eos_token_id])
            for i, (p, s) in enumerate(zip(PROMPTS, SETTINGS))]
    if with_host_rows:
        # a job with top tokens and one with a filter take the host path in the same steps
        jobs.append(ExLlamaV2DynamicJob(tok.encode(PROMPTS[0]), 6, gen_settings=SETTINGS[0], seed=99,
                                        return_top_tokens=2, identifier="top"))
        jobs.append(ExLlamaV2DynamicJob(tok.encode(PROMPTS[2]), 6, gen_settings=SETTINGS[1], seed=98,
                                        filters=[ExLlamaV2PrefixFilter(None, tok, " 4")], identifier="filter"))
    return jobs


def _run(model, tok, device_sampling: bool, jobs) -> dict:
    gen = make_gen(model, tok)
    gen.device_sampling = device_sampling
    gen.enqueue(jobs)
    run_all(gen)
    return {j.identifier: j.new_token_ids for j in jobs}


def test_device_sampling_gives_the_host_paths_tokens(tiny):
    _, model, tok = tiny
    host = _run(model, tok, False, _jobs(tok, 10, with_host_rows=True))
    jobs = _jobs(tok, 10, with_host_rows=True)
    assert [samples_on_device(j) for j in jobs] == [True] * len(SETTINGS) + [False, False]
    device = _run(model, tok, True, jobs)
    assert device == host
    assert all(len(t) >= 3 for t in host.values())
    assert jobs[3].gen_settings.mirostat_mu is not None  # mirostat's state came back from the device


def test_device_sampled_job_alone_equals_batched(tmp_path):
    """Under the determinism mode (README "Determinism"): bf16 weights, every linear row through the GEMV kernel.
    (The fp32 tiny model's linears go through torch's GEMM, whose rounding depends on the row count, so a sampled
    token near a tie may flip between alone and batched: that is not what this checks.)"""
    from exllamav2 import ops
    model, tok = load_tiny(build_tiny_dir(tmp_path), "bfloat16")
    ops.set_batch_invariant(True)
    try:
        batched = _run(model, tok, True, _jobs(tok, 20))
        for i in range(len(SETTINGS)):
            alone = _run(model, tok, True, [_jobs(tok, 20)[i]])
            assert alone[i] == batched[i]
    finally:
        ops.set_batch_invariant(None)


def test_decode_step_and_device_sampling_make_no_host_sync(tmp_path):
    """A plain sampled decode step: the paged decode step's logits straight into sample_on_device, with the
    default settings (repetition penalty over the history, top-k, top-p), in one trace."""
    model, tok = load_tiny(build_tiny_dir(tmp_path), "bfloat16")
    ps, b, pages = 4, 3, 48
    cache = ExLlamaV2Cache(model, 1, ps * pages)
    g = torch.Generator().manual_seed(0)
    r = random.Random(0)
    vocab = model.config.vocab_size
    settings = [Settings(), Settings(temperature=1.2, min_p=0.05, dry_multiplier=0.5), Settings.greedy()]
    with torch.inference_mode():
        paged_decode_step(model, torch.zeros(1, b, dtype=torch.long), cache,
                          torch.zeros(b, pages, dtype=torch.long), torch.ones(b, dtype=torch.long), ps, ps * pages)
        for step in range(3):
            past = torch.randint(1, 40, (b,), generator=g)
            table = torch.randperm(pages, generator=g)[:b * 12].view(b, 12)
            table = torch.cat((table, torch.zeros(b, pages - 12, dtype=torch.long)), 1)
            ids = torch.randint(0, 1000, (1, b), generator=g)
            hist = [torch.randint(0, 1000, (int(p),), generator=g).tolist() for p in past]
            params = DeviceSamplingParams.build(settings, vocab, "cpu", tok, hist)  # set up before the step
            uniforms = torch.tensor([r.random() for _ in range(b)])
            with SyncTrace() as t:
                logits = paged_decode_step(model, ids, cache, table, past, ps, ps * pages)
                out = sample_on_device(logits, params, uniforms)
            assert not host_syncs(t.ops), f"host syncs in a sampled decode step: {host_syncs(t.ops)}"
            tokens, *_ = out.to_host()
            assert tokens[2] == int(logits[2].argmax()) and all(0 <= x < tok.get_vocab_size() for x in tokens)
