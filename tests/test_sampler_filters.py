"""Filters, token healing, tokenizer-derived sets and the Settings helpers of ExLlamaV2Sampler."""
import importlib.util
import os
from types import SimpleNamespace

import pytest
import torch

from exllamav2.generator.filters import ExLlamaV2PrefixFilter, ExLlamaV2SelectFilter
from exllamav2.generator.sampler import ExLlamaV2Sampler, none_tensor
from exllamav2.generator.sampler_hooks import ExLlamaV2PostSamplingResult, run_post_sampling_hooks

Settings = ExLlamaV2Sampler.Settings

PIECES = ["<eos>", "a", "b", "ab", "abc", "c", " ", "ca", "cat", "dog", "d", "o", "g", "\n", "A", "Cat",
          ".", "x", "X", "t", "tx", "C"]


class PieceTokenizer:
    """The slice of the tokenizer interface the sampler and filters use, over a fixed piece list."""

    def __init__(self, pieces):
        self.pieces = list(pieces)
        self.eos_token_id = 0
        self.newline_token_id = self.pieces.index("\n")
        self.extended_id_to_piece = {0: pieces[0]}

    def get_vocab_size(self):
        return len(self.pieces)

    def get_id_to_piece_list(self, include_special_tokens=False):
        if include_special_tokens:
            return self.pieces
        return ["" if i in self.extended_id_to_piece else p for i, p in enumerate(self.pieces)]


@pytest.fixture(scope="module")
def tok():
    return PieceTokenizer(PIECES)


def ids(*pieces):
    return {PIECES.index(p) for p in pieces}


def ref_pass(rest):
    """Plain loop: non-empty pieces that are a prefix of `rest` or extend it."""
    return {i for i, p in enumerate(PIECES) if i != 0 and p and (rest.startswith(p) or p.startswith(rest))}


def test_prefix_filter_walks_the_prefix(tok):
    f = ExLlamaV2PrefixFilter(None, tok, ["cat", "dog"])
    f.begin("")
    pass_tokens, end_tokens = f.next()
    assert pass_tokens == ref_pass("cat") | ref_pass("dog") == ids("c", "ca", "cat", "d", "dog")
    assert end_tokens == set()
    f.feed(PIECES.index("ca"))
    assert f.next()[0] == ref_pass("t") == ids("t", "tx")
    f.feed(PIECES.index("tx"))
    assert f.next() == (None, set())


def test_select_filter_passes_prefixes_and_ends_on_completion(tok):
    f = ExLlamaV2SelectFilter(None, tok, ["cat", "cab", "dog"])
    f.begin("")
    pass_tokens, end_tokens = f.next()
    assert pass_tokens == ids("c", "ca", "cat", "d", "dog")
    assert end_tokens == ids("cat", "dog")
    f.feed(PIECES.index("ca"))
    pass_tokens, end_tokens = f.next()
    assert pass_tokens == end_tokens == ids("t", "b")


def test_select_filter_case_insensitive_keeps_the_prefix_cased(tok):
    f = ExLlamaV2SelectFilter(None, tok, ["Cat"], case_insensitive=True)
    f.begin("x")
    pass_tokens, _ = f.next()
    assert pass_tokens == ids("x")  # "X" differs from the prefix in case
    f.feed(PIECES.index("x"))
    pass_tokens, end_tokens = f.next()
    assert pass_tokens == ids("c", "ca", "cat", "Cat", "C")
    assert end_tokens == ids("cat", "Cat")


def _logits_favouring(*pieces, vocab=len(PIECES)):
    logits = torch.zeros(1, 1, vocab)
    for rank, p in enumerate(pieces):
        logits[0, 0, PIECES.index(p)] = 10.0 - rank
    return logits


def test_sample_is_restricted_to_filter_pass_tokens(tok):
    f = ExLlamaV2SelectFilter(None, tok, ["cat", "dog"])
    f.begin("")
    logits = _logits_favouring("x", "dog", "ca")
    token, ktok, kprob, _, end = ExLlamaV2Sampler.sample(logits, Settings.greedy(), None, 0.5, tok, filters=[f],
                                                         return_top_tokens=len(PIECES))
    assert token.item() == PIECES.index("dog") and end is True
    live = set(ktok[0, 0][kprob[0, 0] > 0].tolist())
    assert live == {PIECES.index("dog")}
    token, ktok, kprob, _, end = ExLlamaV2Sampler.sample(logits, Settings(top_k=0, top_p=0.0), None, 0.5, tok,
                                                         filters=[f], return_top_tokens=len(PIECES))
    assert set(ktok[0, 0][kprob[0, 0] > 0].tolist()) == ids("c", "ca", "cat", "d", "dog")
    f.feed(PIECES.index("ca"))
    token, *_, end = ExLlamaV2Sampler.sample(logits, Settings.greedy(), None, 0.5, tok, filters=[f])
    assert token.item() == PIECES.index("t") and end is True


def test_single_pass_token_short_circuits(tok):
    f = ExLlamaV2PrefixFilter(None, tok, "tx")
    f.begin("")
    f.feed(PIECES.index("t"))  # only "x" continues; "tx" no longer fits
    token, ktok, kprob, prob, end = ExLlamaV2Sampler.sample(_logits_favouring("a"), Settings(), None, 0.5, tok,
                                                            filters=[f])
    assert token.tolist() == [[PIECES.index("x")]] and prob.item() == 1.0 and end is False
    assert ktok is none_tensor and kprob is none_tensor


def test_filters_intersect_and_prefer_eos(tok):
    class Fixed:
        def __init__(self, pass_tokens, end_tokens):
            self.result = (pass_tokens, end_tokens)

        def next(self):
            return self.result

    a = Fixed(ids("<eos>", "a", "b", "c"), ids("c"))
    b = Fixed(ids("<eos>", "b", "c", "d"), set())
    logits = _logits_favouring("d", "a", "c", "b")
    token, *_, end = ExLlamaV2Sampler.sample(logits, Settings.greedy(), None, 0.5, tok, filters=[a, b])
    assert token.item() == PIECES.index("c") and end is True
    token, *_ = ExLlamaV2Sampler.sample(logits, Settings.greedy(), None, 0.5, tok, filters=[a, b],
                                        filter_prefer_eos=True)
    assert token.item() == 0
    with pytest.raises(ValueError, match="exclude every token"):
        ExLlamaV2Sampler.sample(logits, Settings(), None, 0.5, tok, filters=[a, Fixed(ids("x"), set())])
    with pytest.raises(ValueError, match="batch size 1"):
        ExLlamaV2Sampler.sample(logits.expand(2, 1, -1), Settings(), None, 0.5, tok, filters=[a])


def test_token_healing_restricts_to_extensions_of_the_prefix_piece(tok):
    logits = _logits_favouring("dog", "ab", "cat")
    prefix = torch.tensor([[PIECES.index("c")], [PIECES.index("a")]])
    _, ktok, kprob, _, _ = ExLlamaV2Sampler.sample(logits.expand(2, 1, -1), Settings(top_k=0, top_p=0.0),
                                                   None, [0.3, 0.6], tok, prefix_token=prefix,
                                                   return_top_tokens=len(PIECES))
    assert set(ktok[0, 0][kprob[0, 0] > 0].tolist()) == ids("c", "ca", "cat")
    assert set(ktok[1, 0][kprob[1, 0] > 0].tolist()) == ids("a", "ab", "abc")


def test_ids_beyond_the_tokenizer_vocabulary_are_masked(tok):
    logits = torch.zeros(1, 1, 32)
    logits[0, 0, len(PIECES):] = 50.0
    logits[0, 0, 3] = 1.0
    token, *_ = ExLlamaV2Sampler.sample(logits, Settings.greedy(), None, 0.5, tok)
    assert token.item() == 3
    _, ktok, kprob, _, _ = ExLlamaV2Sampler.sample(logits, Settings(top_k=0, top_p=0.0), None, 0.5, tok,
                                                   return_top_tokens=32)
    assert set(ktok[0, 0][kprob[0, 0] > 0].tolist()) == set(range(len(PIECES)))


def test_default_dry_breakers_and_xtc_ignore_sets(tok):
    assert ExLlamaV2Sampler.get_dry_default_sequence_breaker_tokens(tok) == ids("<eos>", "\n", ".")
    assert ExLlamaV2Sampler.get_default_xtc_mask_tokens(tok) == ids("<eos>", "\n")


def test_dry_default_breakers_stop_a_match(tok):
    # "a b . a b" would push "." (a breaker: never penalised); "c a b c a b" pushes "c"
    hist = [[PIECES.index(p) for p in ("c", "a", "b", "c", "a", "b")],
            [PIECES.index(p) for p in ("a", "b", ".", "a", "b")]]
    logits = torch.zeros(2, 1, len(PIECES))
    logits[:, 0, PIECES.index("c")] = 1.0
    logits[:, 0, PIECES.index(".")] = 1.0
    settings = Settings.greedy(dry_multiplier=2.0)
    tokens, *_ = ExLlamaV2Sampler.sample(logits[:1], settings, torch.tensor(hist[:1]), 0.5, tok)
    assert tokens.item() == PIECES.index(".")
    tokens, *_ = ExLlamaV2Sampler.sample(logits[1:], settings, torch.tensor(hist[1:]), 0.5, tok)
    assert tokens.item() == PIECES.index("c")


def test_settings_helpers(tok):
    g = Settings.greedy(top_p=0.5, temperature=0.7)
    assert (g.top_k, g.top_p, g.temperature, g.token_repetition_penalty) == (1, 0.5, 0.7, 1.0)

    s = Settings(mirostat=True, token_repetition_penalty=1.2, token_repetition_range=64, dry_multiplier=0.5,
                 xtc_probability=0.3, token_bias=torch.zeros(32))
    s.mirostat_mu = [3.0]
    c = s.clone()
    c.mirostat_mu[0] = 1.0
    c.post_sampling_hooks.append(print)
    assert s.mirostat_mu == [3.0] and s.post_sampling_hooks == []
    assert c.token_repetition_range == 64

    gc = s.greedy_clone()
    assert (gc.top_k, gc.token_repetition_penalty, gc.token_repetition_range, gc.dry_multiplier,
            gc.xtc_probability, gc.token_bias) == (1, 1.2, 64, 0.5, 0.3, None)

    d = Settings()
    d.disallow_tokens(tok, [2, 5])
    assert d.token_bias.shape == (32,) and torch.isneginf(d.token_bias).nonzero().flatten().tolist() == [2, 5]
    a = Settings()
    a.allow_tokens(tok, [3, "cat"])
    assert torch.isfinite(a.token_bias).nonzero().flatten().tolist() == sorted([3, PIECES.index("cat")])
    with pytest.raises(ValueError, match="allow_tokens"):
        a.allow_tokens(tok, [1.5])
    with pytest.raises(ValueError, match="not a single token"):
        a.allow_tokens(tok, ["zebra"])

    token, *_ = ExLlamaV2Sampler.sample(_logits_favouring("dog", "a"), Settings.greedy(token_bias=a.token_bias),
                                        None, 0.5, tok)
    assert token.item() in (3, PIECES.index("cat"))


def test_post_sampling_hooks_edit_the_result():
    def force_seven(result):
        result.sampled_token = torch.tensor([[7]])
        result.feed_filters = False

    result = run_post_sampling_hooks([force_seven], ExLlamaV2PostSamplingResult(sampled_token=torch.tensor([[1]])))
    assert result.sampled_token.item() == 7 and result.feed_filters is False


def test_select_filter_with_the_real_smollm2_tokenizer():
    from exllamav2.default_models import smollm2_gguf_path
    path = smollm2_gguf_path()
    from exllamav2.tokenizer.tokenizer import ExLlamaV2Tokenizer
    tok = ExLlamaV2Tokenizer(SimpleNamespace(model_dir=None, gguf_path=path))
    options = [" Yes, certainly", " No way"]
    gen = torch.Generator().manual_seed(0)
    for trial in range(3):
        f = ExLlamaV2SelectFilter(None, tok, options)
        f.begin("")
        text, end = "", False
        for _ in range(12):
            logits = torch.randn(1, 1, tok.get_vocab_size() + 64, generator=gen)
            token, *_, end = ExLlamaV2Sampler.sample(logits, Settings(), None, 0.1 + 0.3 * trial, tok, filters=[f])
            f.feed(token.item())
            text += tok.get_id_to_piece_list()[token.item()]
            if end:
                break
        assert end and text in options

    s = Settings()
    s.allow_tokens(tok, [" Yes", tok.eos_token_id])
    allowed = torch.isfinite(s.token_bias).nonzero().flatten().tolist()
    assert allowed == sorted([tok.single_id(" Yes"), tok.eos_token_id])
    assert tok.newline_token_id in ExLlamaV2Sampler.get_default_xtc_mask_tokens(tok)
