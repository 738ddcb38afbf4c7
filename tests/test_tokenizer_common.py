"""Shared pieces for the tokenizer tests (no tests here): model paths, a config stand-in, HF comparisons."""

from __future__ import annotations

import os
import types


SAMPLE_TEXT = (
    "def greet(name):\n    return f\"Hello, {name}!\"  # comment\n\n"
    "Café, naïve, façade — Ærøskøbing. 日本語のテキスト、中文。 😀🎉👍🏽\n"
    "   multiple   spaces\t\ttabs\r\nend <|im_start|>user<|im_end|> <bos><eos><start_of_turn>"
)

CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is 2 + 2? Réponds en français."},
    {"role": "assistant", "content": "Quatre."},
    {"role": "user", "content": "And 3 + 3? 😀"},
]


def smollm2_gguf_path() -> str:
    # importlib.resources.files() would import the package, which needs the `llm` app; find it instead.
    from exllamav2.default_models import smollm2_gguf_path as path
    return path()


def gemma3_gguf_path() -> str:
    from exllamav2.default_models import gemma3_gguf_path as path
    return path()


def make_config(model_dir: str | None, gguf_path: str | None = None, **overrides):
    """Stand-in for ExLlamaV2Config with the attributes the tokenizer reads."""
    fields = dict(model_dir=model_dir, gguf_path=gguf_path, bos_token_id=None, eos_token_id=None,
                  pad_token_id=None, generation_config={}, vocab_size=None)
    fields.update(overrides)
    return types.SimpleNamespace(**fields)


def hf_from_gguf(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def assert_matches_hf(ours, hf, text: str = SAMPLE_TEXT) -> None:
    """Ids and decoded text equal to HF's, with and without special-token parsing, with and without BOS."""
    for parse_special in (False, True):
        expected = hf.encode(text, add_special_tokens=False, split_special_tokens=not parse_special)
        got = ours.encode(text, encode_special_tokens=parse_special)
        assert got.shape == (1, len(expected))
        assert got[0].tolist() == expected
        for keep_special in (False, True):
            assert ours.decode(got[0], decode_special_tokens=keep_special) == hf.decode(
                expected, skip_special_tokens=not keep_special
            )
    with_bos = ours.encode(text, add_bos=ours.add_bos_token_default, encode_special_tokens=True)
    assert with_bos[0].tolist() == hf.encode(text)


def assert_stream_matches_decode(ours, text: str, chunk: int) -> None:
    ids = ours.encode(text, encode_special_tokens=True)[0].tolist()
    stream = ours.stream()
    pieces = [stream.feed(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    pieces.append(stream.finish())
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == ours.decode(ids)
    assert sum(1 for p in pieces if p) > 1  # it really streamed
