"""Tokenizers built from large GGUF vocabularies are kept on disk (exllamav2/tokenizer/build_cache.py): the second
build of the same metadata reads the file (the merges are not derived again) and encodes exactly as the build
did; other metadata is another entry; a damaged entry is rebuilt; an unwritable cache only costs the build.
A slice of Gemma-3's vocabulary (its metadata, fast to read) keeps the builds short."""

from __future__ import annotations

import pytest

from exllamav2.tokenizer import build_cache, gguf_tokenizer
from exllamav2.tokenizer.gguf_metadata import read_gguf_metadata
from exllamav2.tokenizer.gguf_tokenizer import tokenizer_from_gguf

TEXTS = ["Hello   world, the lighthouse keeper's log!", "def f(x):\n\treturn x ** 2  # ünïcödé ✓", "  "]


@pytest.fixture(scope="module")
def meta(gemma3_gguf):
    full = read_gguf_metadata(gemma3_gguf)
    n = 4000
    m = {k: v for k, v in full.items() if not k.startswith("tokenizer.ggml.") or not isinstance(v, list)}
    for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        m[k] = full[k][:n]
    return m


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EXLLAMAV2_TOKENIZER_CACHE", str(tmp_path / "tok"))
    monkeypatch.setattr(build_cache, "MIN_TOKENS", 0)
    return tmp_path / "tok"


def encodings(info):
    return [info.tokenizer.encode(t).ids for t in TEXTS]


def test_second_build_reads_the_file(meta, cache, gemma3_gguf, monkeypatch):
    built = tokenizer_from_gguf(gemma3_gguf, metadata=meta)
    (entry,) = cache.glob("*.json")

    derive = gguf_tokenizer.merges_from_vocab

    def no_merges(*a, **k):
        raise AssertionError("merges derived again")
    monkeypatch.setattr(gguf_tokenizer, "merges_from_vocab", no_merges)
    read = tokenizer_from_gguf(gemma3_gguf, metadata=meta)
    assert encodings(read) == encodings(built)
    assert read.bos_token_id == built.bos_token_id and read.add_bos_token == built.add_bos_token
    # other metadata is another entry (built, so the derivation runs again)
    monkeypatch.setattr(gguf_tokenizer, "merges_from_vocab", derive)
    other = dict(meta, **{"tokenizer.ggml.scores": [s + 1.0 for s in meta["tokenizer.ggml.scores"]]})
    tokenizer_from_gguf(gemma3_gguf, metadata=other)
    assert len(list(cache.glob("*.json"))) == 2 and entry.exists()


def test_damaged_or_unwritable_cache_costs_only_the_build(meta, cache, gemma3_gguf, tmp_path, monkeypatch):
    want = encodings(tokenizer_from_gguf(gemma3_gguf, metadata=meta))
    (entry,) = cache.glob("*.json")
    entry.write_text("{ not a tokenizer")
    assert encodings(tokenizer_from_gguf(gemma3_gguf, metadata=meta)) == want
    assert encodings(tokenizer_from_gguf(gemma3_gguf, metadata=meta)) == want  # the entry was rewritten
    assert entry.read_text().startswith("{") and len(entry.read_text()) > 1000
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("EXLLAMAV2_TOKENIZER_CACHE", str(blocker / "tok"))   # cannot be created
    assert encodings(tokenizer_from_gguf(gemma3_gguf, metadata=meta)) == want
    assert not list(tmp_path.glob("a_file*/**/*.tmp"))
