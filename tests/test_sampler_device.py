"""The device sampling path (exllamav2/generator/sampler_device.py) against the host path (ExLlamaV2Sampler.sample)
and against the distributions it must draw from; rows independent of their batch; no host sync inside it."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from exllamav2.generator.sampler import ExLlamaV2Sampler
from exllamav2.generator.sampler_device import (DeviceSamplingParams, counter_uniforms, device_sampling_supported,
                                                sample_on_device)
from host_sync import SyncTrace, host_syncs
from test_dynamic_tiny import tiny  # noqa: F401  (fixture: a tiny model with SmolLM2's real tokenizer)

Settings = ExLlamaV2Sampler.Settings


def random_settings(r: random.Random, **fixed) -> Settings:
    """Every feature of the sampler, each on or off at random."""
    kw = dict(temperature=r.choice([0.0, 0.5, 0.8, 1.0, 1.3]), top_k=r.choice([0, 1, 5, 20, 50]),
              top_p=r.choice([0.0, 0.5, 0.9]), min_p=r.choice([0, 0.05]), top_a=r.choice([0, 0.2]),
              tfs=r.choice([0, 0.9]), typical=r.choice([0, 0.8]), skew=r.choice([0, 0.5, -0.5]),
              smoothing_factor=r.choice([0, 0.3]), temperature_last=r.random() < .3,
              token_repetition_penalty=r.choice([1.0, 1.2]), token_repetition_range=r.choice([-1, 8]),
              token_repetition_decay=r.choice([0, 4]), token_frequency_penalty=r.choice([0.0, 0.5]),
              token_presence_penalty=r.choice([0.0, 0.25]), dry_multiplier=r.choice([0.0, 0.8]),
              dry_sequence_breakers={3, 7}, dry_range=r.choice([0, 12]), dry_max_ngram=r.choice([3, 20]),
              xtc_probability=r.choice([0.0, 0.5, 1.0]), xtc_threshold=0.05, xtc_ignore_tokens=frozenset({1}),
              min_temp=r.choice([0, 0.5]), max_temp=r.choice([0, 1.5]), mirostat=r.random() < 0.2)
    kw.update(fixed)
    return Settings(**kw)


def host_sample(logits_row, settings, history, u, tokenizer=None, blocked=None):
    h = torch.tensor([history], dtype=torch.long) if history else None
    t, _, _, p, _ = ExLlamaV2Sampler.sample(logits_row.view(1, 1, -1), settings, h, u, tokenizer,
                                            blocked_tokens=blocked)
    return t.item(), p.item()


def device_sample(logits, settings, histories, us, tokenizer=None, blocked=None):
    params = DeviceSamplingParams.build(settings, logits.shape[-1], logits.device, tokenizer, histories, blocked)
    return sample_on_device(logits, params, torch.tensor(us, dtype=torch.float32)).to_host()


def test_every_feature_matches_the_host_path():
    """Random settings per row, each row against the host path for its own settings, history and draw."""
    r = random.Random(0)
    g = torch.Generator().manual_seed(0)
    vocab, rows = 64, 0
    for _ in range(150):
        b = 4
        settings = [random_settings(r) for _ in range(b)]
        logits = torch.randn(b, vocab, generator=g) * 3
        hist = [torch.randint(0, vocab, (r.randint(0, 30),), generator=g).tolist() for _ in range(b)]
        us = [r.random() for _ in range(b)]
        tokens, probs, _, ok = device_sample(logits, settings, hist, us)
        assert all(ok)
        for i in range(b):
            t, p = host_sample(logits[i], settings[i].clone(), hist[i], us[i])
            assert tokens[i] == t, (settings[i], hist[i], us[i])
            assert probs[i] == pytest.approx(p, abs=1e-5)
            rows += 1
    assert rows == 600


@pytest.mark.parametrize("greedy", [dict(temperature=0.0), dict(top_k=1, temperature=1.0)])
def test_greedy_rows_equal_the_host_path_with_real_tokenizer(tiny, greedy):
    """Greedy and top-k=1 rows: penalties, DRY (the tokenizer's default breakers), token bias, blocked tokens and
    the vocabulary mask of the model's padded logits, exactly as on the host; ties take the first maximum."""
    from exllamav2.generator.sampler_device import is_greedy
    _, _, tok = tiny
    vocab = tok.get_vocab_size() + 32  # the model's logits are padded past the tokenizer's vocabulary
    r = random.Random(1)
    g = torch.Generator().manual_seed(1)
    b = 6
    logits = torch.randn(b, vocab, generator=g).round()  # rounded: many ties
    logits[:, vocab - 32:] = 50.0  # padding ids would win if not masked
    bias = torch.zeros(tok.get_vocab_size() + 32)
    bias[torch.randint(0, 1000, (50,), generator=g)] = 2.0
    settings = [random_settings(r, dry_sequence_breakers=None, xtc_ignore_tokens=None, **greedy)
                for _ in range(b)]
    settings[0].token_bias = bias
    settings[1].dry_multiplier = 2.0
    assert all(is_greedy(s) for s in settings)
    hist = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (40, 0, 7, 25, 3, 60)]
    hist[1] = hist[0][:20] + hist[0][:19]  # a long repeat for DRY
    blocked = [[int(logits[0].argmax())], None, [], [5, 6], None, None]
    tokens, probs, _, _ = device_sample(logits, settings, hist, [0.5] * b, tok, blocked)
    for i in range(b):
        t, _ = host_sample(logits[i], settings[i].clone(), hist[i], 0.5, tok, blocked[i] or None)
        assert tokens[i] == t
        assert tokens[i] < tok.get_vocab_size() and probs[i] == 1.0
    assert tokens[0] != int(logits[0].argmax())


def test_rows_do_not_depend_on_their_batch():
    """A row gives the same token and probability alone as among rows with other settings and history lengths
    (which change the candidate width and the history's padding)."""
    r = random.Random(2)
    g = torch.Generator().manual_seed(2)
    vocab, b = 200, 8
    for _ in range(20):
        settings = [random_settings(r) for _ in range(b)]
        logits = torch.randn(b, vocab, generator=g) * 2
        hist = [torch.randint(0, vocab, (r.randint(0, 50),), generator=g).tolist() for _ in range(b)]
        us = counter_uniforms(torch.arange(b) * 7 + 3, torch.full((b,), 11)).tolist()
        together = device_sample(logits, settings, hist, us)
        for i in range(b):
            alone = device_sample(logits[i:i + 1], [settings[i]], [hist[i]], [us[i]])
            assert [x[0] for x in alone] == [x[i] for x in together]


def test_top_k_min_p_and_top_p_bounds_hold_for_every_draw():
    """Over many draws: never a token outside the top k, never one under min_p * p_max, never one beyond the
    top-p set (computed here from the softmax)."""
    g = torch.Generator().manual_seed(3)
    n, vocab = 4000, 100
    logits = (torch.randn(1, vocab, generator=g) * 2).expand(n, vocab).contiguous()
    probs = torch.softmax(logits[0], -1)
    us = counter_uniforms(torch.full((n,), 5), torch.arange(n))
    order = torch.argsort(probs, descending=True, stable=True)

    def draw(**kw):
        params = DeviceSamplingParams.build([Settings(token_repetition_penalty=1.0, **kw)] * n, vocab, "cpu")
        return sample_on_device(logits, params, us).tokens

    t = draw(top_k=7, top_p=0.0, temperature=1.0)
    assert set(t.tolist()) <= set(order[:7].tolist()) and len(set(t.tolist())) == 7
    t = draw(top_k=0, top_p=0.0, min_p=0.1, temperature=1.0)
    assert bool((probs[t] >= 0.1 * probs.max()).all())
    assert len(set(t.tolist())) == int((probs >= 0.1 * probs.max()).sum())
    t = draw(top_k=0, top_p=0.6, temperature=1.0)
    keep = int((probs[order].cumsum(0) <= 0.6).sum().clamp(min=1))
    assert set(t.tolist()) <= set(order[:keep].tolist())


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.6])
def test_draw_frequencies_match_the_softmax(temperature):
    n = 20000
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    settings = Settings(temperature=temperature, top_k=0, top_p=0.0, token_repetition_penalty=1.0)
    params = DeviceSamplingParams.build([settings] * n, logits.shape[0], "cpu")
    us = counter_uniforms(torch.full((n,), 123), torch.arange(n))
    tokens = sample_on_device(logits.expand(n, -1), params, us).tokens
    counts = np.bincount(tokens.numpy(), minlength=logits.shape[0]).astype(np.float64)
    expected = torch.softmax(logits.double() / temperature, 0).numpy() * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 3 * 7 + 15, (counts, expected)  # dof 7: far above the 99.9% point


def test_counter_uniforms_are_uniform_and_per_row():
    seeds = torch.arange(50).repeat_interleave(2000)
    counters = torch.arange(2000).repeat(50)
    u = counter_uniforms(seeds, counters)
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    counts = torch.histc(u, bins=20, min=0.0, max=1.0).double()
    expected = u.numel() / 20
    assert float(((counts - expected) ** 2 / expected).sum()) < 19 * 3 + 15
    # a row's draw is a function of its own (seed, counter); other seeds differ
    assert torch.equal(counter_uniforms(seeds[777:778], counters[777:778]), u[777:778])
    assert not torch.equal(u[:2000], u[2000:4000])
    with pytest.raises(ValueError, match="int64"):
        counter_uniforms(torch.zeros(3), torch.zeros(3, dtype=torch.long))


def test_mirostat_state_follows_the_host_path():
    g = torch.Generator().manual_seed(4)
    s_host = Settings(mirostat=True, mirostat_tau=2.0, mirostat_eta=0.3, top_k=0, top_p=0.0,
                      token_repetition_penalty=1.0)
    s_dev = s_host.clone()
    mu = None
    for step in range(12):
        logits = torch.randn(1, 30, generator=g) * 2
        u = (step * 0.37) % 1
        t_host, _ = host_sample(logits[0], s_host, [], u)
        params = DeviceSamplingParams.build([s_dev], 30, "cpu", mirostat_mu=[mu])
        tokens, _, mus, _ = sample_on_device(logits, params, torch.tensor([u])).to_host()
        mu = mus[0]
        assert tokens[0] == t_host
        assert mu == pytest.approx(s_host.mirostat_mu[0], abs=1e-5)


def test_dead_rows_are_flagged_not_raised():
    logits = torch.zeros(3, 10)
    logits[1] = float("-inf")
    logits[2, 4] = float("nan")
    params = DeviceSamplingParams.build([Settings()] * 3, 10, "cpu")
    *_, ok = sample_on_device(logits, params, torch.full((3,), 0.5)).to_host()
    assert ok == [True, False, False]


def test_what_needs_the_host_is_declared_and_refused():
    assert Settings(cfg_scale=1.5).needs_host and not Settings().needs_host
    assert not device_sampling_supported(Settings(), filters=[object()])
    assert not device_sampling_supported(Settings(), return_top_tokens=3)
    assert device_sampling_supported(Settings(dry_multiplier=1.0, mirostat=True, xtc_probability=0.5))
    with pytest.raises(ValueError, match="cfg_scale"):
        DeviceSamplingParams.build([Settings(cfg_scale=1.5)], 10, "cpu")
    with pytest.raises(ValueError, match="blocked_tokens of row 0"):
        DeviceSamplingParams.build([Settings()], 10, "cpu", blocked_tokens=[[12]])
    params = DeviceSamplingParams.build([Settings()] * 2, 10, "cpu")
    with pytest.raises(ValueError, match="params are for 2 rows"):
        sample_on_device(torch.zeros(3, 10), params, torch.zeros(3))
    with pytest.raises(ValueError, match=r"uniforms must be \(2,\)"):
        sample_on_device(torch.zeros(2, 10), params, torch.zeros(1))
    with pytest.raises(ValueError, match="logits must be a"):
        sample_on_device(torch.zeros(2, 1, 10), params, torch.zeros(2))


def test_sampling_every_feature_makes_no_host_sync(tiny):
    _, _, tok = tiny
    r = random.Random(5)
    g = torch.Generator().manual_seed(5)
    vocab, b = tok.get_vocab_size() + 32, 5
    settings = [random_settings(r, dry_multiplier=0.8, dry_sequence_breakers=None, xtc_ignore_tokens=None,
                                xtc_probability=0.5, mirostat=i == 2, temperature=0.0 if i == 3 else 0.9,
                                token_repetition_penalty=1.1) for i in range(b)]
    settings[4].token_bias = torch.zeros(vocab)
    hist = [torch.randint(0, vocab - 32, (n,), generator=g).tolist() for n in (10, 0, 33, 5, 17)]
    params = DeviceSamplingParams.build(settings, vocab, "cpu", tok, hist, [[1, 2], None, None, None, [9]])
    assert params.penalties and params.dry_breakers is not None and params.xtc and params.mirostat
    logits = torch.randn(b, vocab, generator=g)
    us = torch.rand(b, generator=g)
    with SyncTrace() as t:
        out = sample_on_device(logits, params, us)
    assert not host_syncs(t.ops), f"host syncs in device sampling: {host_syncs(t.ops)}"
    assert out.tokens.shape == (b,)
