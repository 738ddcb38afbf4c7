"""ExLlamaV2Sampler on synthetic logits: every stage checked against a plain reference written here."""
import math
import random

import numpy as np
import pytest
import torch

from exllamav2.generator.sampler import ExLlamaV2Sampler
from exllamav2.generator.sampler_penalties import apply_repetition_penalties, dry_penalty
from test_dynamic_tiny import tiny  # noqa: F401  (fixture: a tiny model with SmolLM2's real tokenizer)

Settings = ExLlamaV2Sampler.Settings
V = 12


def plain(**kw) -> Settings:
    """Settings with every stage off unless asked for."""
    base = dict(temperature=1.0, top_k=0, top_p=0.0, token_repetition_penalty=1.0)
    base.update(kw)
    return Settings(**base)


def final_distribution(logits: torch.Tensor, settings, tokenizer=None, **kw) -> np.ndarray:
    """(b, V) probabilities of the sampler's final distribution, read through return_top_tokens."""
    vocab = logits.shape[-1]
    _, ktok, kprob, _, _ = ExLlamaV2Sampler.sample(logits, settings, None, 0.5, tokenizer,
                                                   return_top_tokens=vocab, **kw)
    out = np.zeros((logits.shape[0], vocab))
    for row in range(logits.shape[0]):
        out[row, ktok[row, 0].numpy()] = kprob[row, 0].double().numpy()
    return out


def ref_softmax(x, temperature=1.0):
    e = np.exp((x - x.max()) / temperature)
    return e / e.sum()


def renorm_kept(p, kept):
    q = np.array([p[i] if i in kept else 0.0 for i in range(len(p))])
    return q / q.sum()


def ref_top_k(p, k):
    return set(np.argsort(-p, kind="stable")[:k].tolist())


def ref_top_p(p, top_p):
    kept, total = set(), 0.0
    for i in np.argsort(-p, kind="stable"):
        total += p[i]
        if kept and total > top_p:
            break
        kept.add(int(i))
    return kept


def ref_min_p(p, min_p):
    return {i for i in range(len(p)) if p[i] >= min_p * p.max()}


def ref_top_a(p, top_a):
    return {i for i in range(len(p)) if p[i] >= top_a * p.max() ** 2}


def ref_tfs(p, z):
    order = np.argsort(-p, kind="stable")
    s = p[order]
    d = [abs(s[i] - 2 * s[i + 1] + s[i + 2]) for i in range(len(s) - 2)]
    total, cum, k = sum(d), 0.0, 0
    for di in d:
        cum += di / total
        if cum > z:
            break
        k += 1
    return set(order[:k + 1].tolist())


def ref_typical(p, mass):
    entropy = -sum(q * math.log(q) for q in p)
    order = sorted(range(len(p)), key=lambda i: abs(-math.log(p[i]) - entropy))
    kept, total = set(), 0.0
    for i in order:
        kept.add(i)
        total += p[i]
        if total >= mass:
            break
    return kept


STAGES = [
    ("top_k", 4, ref_top_k),
    ("top_k", 9, ref_top_k),
    ("top_p", 0.55, ref_top_p),
    ("top_p", 0.9, ref_top_p),
    ("min_p", 0.2, ref_min_p),
    ("top_a", 0.3, ref_top_a),
    ("tfs", 0.7, ref_tfs),
    ("tfs", 0.95, ref_tfs),
    ("typical", 0.5, ref_typical),
    ("typical", 0.9, ref_typical),
]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("field,value,reference", STAGES)
def test_truncation_keeps_exactly_the_reference_set(field, value, reference, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, 1, V, generator=gen) * 2.0
    p = ref_softmax(logits[0, 0].double().numpy())
    kept = reference(p, value)
    got = final_distribution(logits, plain(**{field: value}))[0]
    assert {i for i in range(V) if got[i] > 0} == kept
    np.testing.assert_allclose(got, renorm_kept(p, kept), atol=1e-6)


def test_typical_agrees_with_hf_warper():
    transformers = pytest.importorskip("transformers")
    warper = transformers.TypicalLogitsWarper(mass=0.7)
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 1, V, generator=gen) * 2.0
    hf_kept = torch.isfinite(warper(None, logits[:, 0, :].clone())).numpy()
    got = final_distribution(logits, plain(typical=0.7)) > 0
    assert (got == hf_kept).all()


def test_stages_compose_in_order():
    # top_k, then top_p on the renormalised top_k mass, then min_p on what is left
    logits = torch.tensor([[[3.0, 2.6, 2.2, 2.0, 1.0, 0.5, 0.0, -1.0]]])
    p = ref_softmax(logits[0, 0].double().numpy())
    kept = ref_top_k(p, 5)
    p1 = renorm_kept(p, kept)
    kept = ref_top_p(p1, 0.85)
    p2 = renorm_kept(p1, kept)
    kept = ref_min_p(p2, 0.6)
    got = final_distribution(logits, plain(top_k=5, top_p=0.85, min_p=0.6))[0]
    np.testing.assert_allclose(got, renorm_kept(p2, kept), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax(dtype):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(6, 1, 1000, generator=gen) * 3).to(dtype)
    expect = logits.float().argmax(dim=-1)
    for settings in (Settings.greedy(), Settings(temperature=0.005, top_k=0, top_p=0.95),
                     Settings(top_k=1, temperature=1.5, top_p=0.3, min_p=0.2, typical=0.2)):
        tokens, _, _, probs, _ = ExLlamaV2Sampler.sample(logits, settings, None, 0.99, None)
        assert torch.equal(tokens, expect)
        assert torch.all(probs == 1.0)


def test_greedy_takes_first_of_tied_maxima_and_leaves_logits_alone():
    logits = torch.tensor([[[0.0, 5.0, 1.0, 5.0]]])
    before = logits.clone()
    tokens, *_ = ExLlamaV2Sampler.sample(logits, Settings.greedy(token_repetition_penalty=1.3),
                                         torch.tensor([[2, 3]]), 0.5, None)
    assert tokens.item() == 1
    assert torch.equal(logits, before)


def _draws(seed, n=40):
    rng = random.Random(seed)
    logits = torch.randn(1, 1, 50, generator=torch.Generator().manual_seed(9))
    settings = Settings(top_k=0, top_p=0.0, temperature=1.5)
    return [ExLlamaV2Sampler.sample(logits, settings, None, rng.random(), None)[0].item() for _ in range(n)]


def test_seeded_draws_repeat_and_seeds_differ():
    assert _draws(1) == _draws(1)
    assert _draws(1) != _draws(2)


def _chi_square(counts, probs):
    expected = probs * counts.sum()
    live = expected > 0
    assert counts[~live].sum() == 0, "drew a token of probability 0"
    return float(((counts[live] - expected[live]) ** 2 / expected[live]).sum()), int(live.sum()) - 1


@pytest.mark.parametrize("kw", [dict(temperature=0.7), dict(temperature=1.0, top_p=0.9, top_k=5),
                                dict(temperature=1.3, min_p=0.1, temperature_last=True)])
def test_empirical_distribution_matches(kw):
    n = 20000
    logits = torch.tensor([[[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0]]])
    target = final_distribution(logits, plain(**kw))[0]
    draws = np.random.default_rng(3).random(n).tolist()
    tokens, *_ = ExLlamaV2Sampler.sample(logits.expand(n, 1, -1), plain(**kw), None, draws, None)
    counts = np.bincount(tokens.flatten().numpy(), minlength=logits.shape[-1]).astype(np.float64)
    stat, dof = _chi_square(counts, target)
    assert stat < 3 * dof + 15, (stat, dof)  # far above the 99.9% point for these dof


def test_temperature_scales_the_softmax():
    logits = torch.tensor([[[2.0, 1.0, 0.0, -1.0]]])
    x = logits[0, 0].double().numpy()
    got = final_distribution(logits, plain(temperature=0.6))[0]
    np.testing.assert_allclose(got, ref_softmax(x, 0.6), atol=1e-6)
    # temperature_last applies p ** (1/T) after truncation: same result without truncation
    got = final_distribution(logits, plain(temperature=0.6, temperature_last=True))[0]
    np.testing.assert_allclose(got, ref_softmax(x, 0.6), atol=1e-6)


def test_temperature_last_acts_after_truncation():
    logits = torch.tensor([[[2.0, 1.0, 0.5, -1.0]]])
    p = ref_softmax(logits[0, 0].double().numpy())
    kept = ref_min_p(p, 0.2)
    q = renorm_kept(p, kept) ** (1 / 2.0)
    got = final_distribution(logits, plain(min_p=0.2, temperature=2.0, temperature_last=True))[0]
    np.testing.assert_allclose(got, q / q.sum(), atol=1e-6)


def test_smoothing_factor_is_quadratic():
    logits = torch.tensor([[[2.0, 1.0, 0.0, -1.0]]])
    x = logits[0, 0].double().numpy()
    e = np.exp(-0.3 * (x - x.max()) ** 2 / 0.8)
    got = final_distribution(logits, plain(temperature=0.8, smoothing_factor=0.3))[0]
    np.testing.assert_allclose(got, e / e.sum(), atol=1e-6)


def test_dynamic_temperature_follows_entropy():
    logits = torch.tensor([[[2.0, 1.0, 0.0, -1.0]], [[0.1, 0.0, 0.0, -0.1]]])
    got = final_distribution(logits, plain(min_temp=0.5, max_temp=2.0, temp_exponent=1.5))
    for row in range(2):
        p = ref_softmax(logits[row, 0].double().numpy())
        h = -(p * np.log(p)).sum() / math.log(len(p))
        t = 0.5 + 1.5 * h ** 1.5
        q = p ** (1 / t)
        np.testing.assert_allclose(got[row], q / q.sum(), atol=1e-5)


def test_skew_bends_the_draw():
    logits = torch.tensor([[[1.0, 0.8, 0.6, 0.4, 0.2, 0.0]]])
    p = ref_softmax(logits[0, 0].double().numpy())
    cum = np.cumsum(p)
    for r in (0.05, 0.3, 0.6, 0.9):
        for skew in (0.0, 1.0, -1.0):
            expect = int(np.searchsorted(cum, r ** math.exp(-skew)))
            tok, *_ = ExLlamaV2Sampler.sample(logits, plain(skew=skew), None, r, None)
            assert tok.item() == expect, (r, skew)


def test_mirostat_truncates_by_surprise_and_updates_mu():
    logits = torch.tensor([[[3.0, 2.0, 1.0, 0.0, -1.0]], [[0.0, 0.0, 0.0, 0.0, 0.0]]])
    settings = plain(mirostat=True, mirostat_tau=1.5, mirostat_eta=0.1)
    tokens, _, kprobs, probs, _ = ExLlamaV2Sampler.sample(logits, settings, None, [0.5, 0.5], None,
                                                          return_top_tokens=5)
    mu0 = 2 * 1.5  # mu starts at 2 tau
    for row in range(2):
        p = ref_softmax(logits[row, 0].double().numpy())
        kept = {i for i in range(5) if p[i] >= 2 ** -mu0} or {int(p.argmax())}
        assert int((kprobs[row, 0] > 0).sum()) == len(kept)
        expect_mu = mu0 + 0.1 * (1.5 + math.log2(probs[row, 0].item()))
        assert settings.mirostat_mu[row] == pytest.approx(expect_mu, abs=1e-5)
    assert settings.mirostat_mu[0] != settings.mirostat_mu[1]


def ref_penalties(logits, seq, rep, rng, decay, freq, pres):
    """The original's C++ loop, transcribed."""
    out = logits.copy()
    seen = set()
    sust = len(seq) if rng == -1 else rng
    beg = max(len(seq) - sust - decay, 0)
    rp, fp, pp = rep, freq, pres
    for i in range(len(seq) - 1, beg - 1, -1):
        t = seq[i]
        if t not in seen:
            out[t] = out[t] / rp if out[t] > 0 else out[t] * rp
            out[t] -= pp
            seen.add(t)
        out[t] -= fp
        sust -= 1
        if sust < 0:
            rp += (1 - rep) / decay
            fp -= freq / decay
            pp -= pres / decay
    return out


@pytest.mark.parametrize("rep,rng,decay,freq,pres", [
    (1.3, -1, 0, 0.0, 0.0), (1.3, 4, 0, 0.0, 0.0), (1.2, 3, 4, 0.1, 0.2), (1.0, 5, 0, 0.25, 0.0),
    (1.0, -1, 0, 0.0, 0.5), (1.5, 2, 6, 0.3, 0.1),
])
def test_repetition_penalties_match_the_original_loop(rep, rng, decay, freq, pres):
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 10, generator=gen) * 3
    seq = torch.tensor([[1, 2, 3, 1, 4, 5, 1, 6, 7, 2, 8, 9], [0, 0, 0, 9, 9, 8, 1, 1, 2, 3, 3, 4]])
    got = apply_repetition_penalties(logits.clone(), seq, rep, rng, decay, freq, pres)
    for row in range(2):
        expect = ref_penalties(logits[row].double().numpy(), seq[row].tolist(), rep, rng, decay, freq, pres)
        np.testing.assert_allclose(got[row].double().numpy(), expect, rtol=1e-5, atol=1e-5)
        changed = set(np.nonzero(got[row].numpy() != logits[row].numpy())[0].tolist())
        window = seq[row].tolist()[-(rng + decay):] if rng != -1 else seq[row].tolist()
        assert changed == set(window)


def test_repetition_penalty_through_sample_moves_greedy_choice():
    logits = torch.tensor([[[4.0, 3.9, 1.0, 0.0]]])
    tok, *_ = ExLlamaV2Sampler.sample(logits, Settings.greedy(token_repetition_penalty=1.5),
                                      torch.tensor([[0, 2]]), 0.5, None)
    assert tok.item() == 1
    tok, *_ = ExLlamaV2Sampler.sample(logits, Settings.greedy(token_repetition_penalty=1.5, token_repetition_range=1),
                                      torch.tensor([[0, 2]]), 0.5, None)
    assert tok.item() == 0


def test_token_bias_blocked_and_disallowed():
    logits = torch.tensor([[[3.0, 2.0, 1.0, 0.0, -1.0]]])
    tok, *_ = ExLlamaV2Sampler.sample(logits, Settings.greedy(), None, 0.5, None, blocked_tokens=[0, 1])
    assert tok.item() == 2
    s = Settings.greedy()
    s.token_bias = torch.tensor([0.0, 0.0, 0.0, 3.5, 0.0] + [0.0] * 27)
    tok, *_ = ExLlamaV2Sampler.sample(logits, s, None, 0.5, None)
    assert tok.item() == 3
    got = final_distribution(logits, plain(token_bias=torch.tensor([0.0, -1.0, 0.5, 0.0, 0.0])))[0]
    np.testing.assert_allclose(got, ref_softmax(np.array([3.0, 1.0, 1.5, 0.0, -1.0])), atol=1e-6)


def test_batch_rows_are_independent():
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(4, 1, 30, generator=gen) * 2
    history = torch.randint(0, 30, (4, 16), generator=gen)
    draws = [0.1, 0.45, 0.7, 0.95]
    settings = Settings(top_k=10, top_p=0.9, min_p=0.02, token_repetition_penalty=1.2,
                        dry_multiplier=0.8, dry_sequence_breakers=set())
    tokens, ktok, kprob, probs, _ = ExLlamaV2Sampler.sample(logits, settings, history, draws, None,
                                                            return_top_tokens=5)
    for row in range(4):
        t, kt, kp, p, _ = ExLlamaV2Sampler.sample(logits[row:row + 1], settings, history[row:row + 1],
                                                  draws[row], None, return_top_tokens=5)
        assert t.item() == tokens[row, 0].item()
        assert torch.equal(kt[0], ktok[row]) and torch.allclose(kp[0], kprob[row])
        assert p.item() == pytest.approx(probs[row, 0].item())


def test_single_draw_for_a_batch_is_deterministic_per_row():
    logits = torch.zeros(8, 1, 100)
    a, *_ = ExLlamaV2Sampler.sample(logits, plain(), None, 0.25, None)
    b, *_ = ExLlamaV2Sampler.sample(logits, plain(), None, 0.25, None)
    assert torch.equal(a, b)
    assert len(set(a.flatten().tolist())) > 1


def test_dry_penalises_the_token_that_extends_a_repeat():
    #           the context ends with "5 6 7", which earlier was followed by 8
    seq = torch.tensor([5, 6, 7, 8, 1, 2, 5, 6, 7])
    breakers = torch.zeros(10, dtype=torch.bool)
    pen = dry_penalty(seq, breakers, 10, allowed_length=2, base=1.75, multiplier=0.8, max_ngram=20, dry_range=0)
    expect = torch.zeros(10)
    expect[8] = 0.8 * 1.75 ** (3 - 2)
    assert torch.allclose(pen, expect)
    # max_ngram caps the match length; a match shorter than allowed_length is free
    pen = dry_penalty(seq, breakers, 10, 2, 1.75, 0.8, max_ngram=2, dry_range=0)
    assert pen[8].item() == pytest.approx(0.8) and pen.count_nonzero() == 1
    assert dry_penalty(seq, breakers, 10, 4, 1.75, 0.8, 20, 0) is None
    # a breaker inside the suffix stops the match; dry_range hides the earlier occurrence
    breakers[6] = True
    assert dry_penalty(seq, breakers, 10, 2, 1.75, 0.8, 20, 0) is None
    assert dry_penalty(seq, torch.zeros(10, dtype=torch.bool), 10, 2, 1.75, 0.8, 20, dry_range=5) is None


def test_dry_through_sample():
    logits = torch.zeros(1, 1, 10)
    logits[0, 0, 8] = 1.0
    history = torch.tensor([[5, 6, 7, 8, 1, 2, 5, 6, 7]])
    tok, *_ = ExLlamaV2Sampler.sample(logits, Settings.greedy(), history, 0.5, None)
    assert tok.item() == 8
    settings = Settings.greedy(dry_multiplier=0.8, dry_sequence_breakers=set())
    tok, *_ = ExLlamaV2Sampler.sample(logits, settings, history, 0.5, None)
    assert tok.item() != 8


def test_xtc_removes_top_choices_when_it_fires():
    logits = torch.log(torch.tensor([[[0.4, 0.3, 0.15, 0.1, 0.05]]]))
    p = np.array([0.4, 0.3, 0.15, 0.1, 0.05])
    fired = final_distribution(logits, plain(xtc_probability=1.0, xtc_threshold=0.12, xtc_ignore_tokens=frozenset()))
    np.testing.assert_allclose(fired[0], renorm_kept(p, {2, 3, 4}), atol=1e-6)
    # an ignored token above the threshold stays, and does not count
    ignored = final_distribution(logits, plain(xtc_probability=1.0, xtc_threshold=0.12,
                                               xtc_ignore_tokens=frozenset({0})))
    np.testing.assert_allclose(ignored[0], renorm_kept(p, {0, 2, 3, 4}), atol=1e-6)
    # fewer than two tokens over the threshold: nothing happens
    nothing = final_distribution(logits, plain(xtc_probability=1.0, xtc_threshold=0.35, xtc_ignore_tokens=frozenset()))
    np.testing.assert_allclose(nothing[0], p, atol=1e-6)


def test_xtc_fires_with_its_probability():
    logits = torch.log(torch.tensor([[[0.5, 0.4, 0.1]]]))
    settings = plain(xtc_probability=0.3, xtc_threshold=0.2, xtc_ignore_tokens=frozenset())
    # draws below 0.3 fire: only token 1 (the least likely over the threshold) or 2 can come
    n = 4000
    draws = np.random.default_rng(0).random(n)
    tokens, *_ = ExLlamaV2Sampler.sample(logits.expand(n, 1, -1), settings, None, draws.tolist(), None)
    tokens = tokens.flatten().numpy()
    assert (tokens[draws < 0.3] != 0).all()
    # overall: P(0) = 0.7 * 0.5
    assert abs((tokens == 0).mean() - 0.35) < 0.03


def test_cfg_mixes_log_probabilities():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 1, 20, generator=gen) * 2
    lp = torch.log_softmax(logits[:, 0], dim=-1)
    mix = 1.8 * lp[0] - 0.8 * lp[1]
    tok, *_ = ExLlamaV2Sampler.sample(logits, Settings.greedy(cfg_scale=1.8), torch.zeros(2, 3, dtype=torch.long),
                                      0.5, None)
    assert tok.shape == (1, 1) and tok.item() == mix.argmax().item()


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="logits"):
        ExLlamaV2Sampler.sample(torch.zeros(1, 5), Settings(), None, 0.5, None)
    with pytest.raises(ValueError, match="random"):
        ExLlamaV2Sampler.sample(torch.zeros(1, 1, 5), Settings(), None, 1.5, None)
    with pytest.raises(ValueError, match="random draws for batch"):
        ExLlamaV2Sampler.sample(torch.zeros(3, 1, 5), Settings(), None, [0.1, 0.2], None)
    with pytest.raises(ValueError, match="cfg_scale"):
        ExLlamaV2Sampler.sample(torch.zeros(1, 1, 5), Settings(cfg_scale=1.5), None, 0.5, None)
    with pytest.raises(ValueError, match="blocked_tokens"):
        ExLlamaV2Sampler.sample(torch.zeros(1, 1, 5), Settings(), None, 0.5, None, blocked_tokens=[7])
    with pytest.raises(ValueError, match="no token can be sampled"):
        ExLlamaV2Sampler.sample(torch.full((1, 1, 5), float("-inf")), Settings(), None, 0.5, None)
    # the greedy path checks the chosen logit only: a NaN anywhere, or every logit -inf, still fails loudly
    nan_row = torch.tensor([[[0.5, 3.0, float("nan"), 1.0], [0.0, 1.0, 2.0, 3.0]]]).transpose(0, 1)
    with pytest.raises(ValueError, match=r"row\(s\) \[0\]"):
        ExLlamaV2Sampler.sample(nan_row, Settings.greedy(), None, 0.5, None)
    with pytest.raises(ValueError, match=r"row\(s\) \[1\]"):
        ExLlamaV2Sampler.sample(torch.tensor([[[1.0, 2.0]], [[float("-inf"), float("-inf")]]]), Settings.greedy(),
                                None, 0.5, None)


def test_repetition_penalties_skip_padding_and_out_of_vocab_ids():
    logits = torch.tensor([[1.0, -1.0, 2.0, 0.5]])
    got = apply_repetition_penalties(logits.clone(), torch.tensor([[-1, 7, 1, -1]]), 2.0, -1, 0, 0.0, 0.0)
    assert torch.equal(got, torch.tensor([[1.0, -2.0, 2.0, 0.5]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_plain_greedy_fast_path_equals_the_general_path(tiny, dtype):
    """Plain greedy settings with a float draw take sampler._greedy (no fp32 copy of the logits); a list of draws
    takes the general path. Both give the same tokens, probabilities and errors: rounded logits (many ties), rows
    whose maximum lies in the padding past the tokenizer's vocabulary, a history without penalties."""
    from exllamav2.generator import sampler as sampler_module
    calls = []
    real = sampler_module._greedy
    sampler_module._greedy = lambda *a: calls.append(1) or real(*a)
    try:
        real_tok = tiny[2]
        vocab = real_tok.get_vocab_size() + 32  # a model's logits padded past the tokenizer's vocabulary
        gen = torch.Generator().manual_seed(3)
        for trial in range(40):
            b = 1 + trial % 4
            logits = (torch.randn(b, 1, vocab, generator=gen) * 2).round().to(dtype)
            logits[trial % b, 0, vocab - 32:] = 40.0  # padding wins unless masked
            tok = real_tok if trial % 2 else None
            hist = torch.randint(0, vocab - 32, (b, 5), generator=gen) if trial % 3 == 0 else None
            for settings in (Settings.greedy(), plain(top_k=1, temperature=0.7)):
                n = len(calls)
                fast = ExLlamaV2Sampler.sample(logits, settings, hist, 0.25, tok)
                assert len(calls) == n + 1, "the float draw must take the fast path"
                slow = ExLlamaV2Sampler.sample(logits, settings, hist, [0.25] * b, tok)
                assert len(calls) == n + 1, "a list of draws must take the general path"
                assert torch.equal(fast[0], slow[0]) and fast[0].dtype == slow[0].dtype == torch.long
                assert torch.equal(fast[3], slow[3]) and fast[4] is slow[4] is False
        for bad in (float("-inf"), float("nan")):
            logits = torch.zeros(2, 1, 8, dtype=dtype)
            logits[1] = bad
            for draw in (0.5, [0.5, 0.5]):
                with pytest.raises(ValueError, match=r"row\(s\) \[1\]"):
                    ExLlamaV2Sampler.sample(logits, Settings.greedy(), None, draw, None)
        with pytest.raises(ValueError, match="must lie in"):
            ExLlamaV2Sampler.sample(torch.zeros(1, 1, 8), Settings.greedy(), None, 1.5, None)
        # anything that changes the logits first keeps the general path
        n = len(calls)
        ExLlamaV2Sampler.sample(torch.zeros(1, 1, 8), Settings.greedy(token_repetition_penalty=1.2),
                                torch.tensor([[1, 2]]), 0.5, None)
        ExLlamaV2Sampler.sample(torch.zeros(1, 1, 8), Settings.greedy(), None, 0.5, None, blocked_tokens=[3])
        assert len(calls) == n
    finally:
        sampler_module._greedy = real
