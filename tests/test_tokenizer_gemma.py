"""ExLlamaV2Tokenizer on Gemma-3 (GGUF, SentencePiece-style vocabulary with byte fallback) against HF transformers.
HF builds this tokenizer from the GGUF in ~25 s (once per module); ours takes ~3 s."""

from __future__ import annotations

import json
import os

import pytest

from exllamav2.tokenizer import ChatTemplateError, ExLlamaV2Tokenizer, tokenizer_from_gguf
from test_tokenizer_common import (
    CONVERSATION,
    assert_matches_hf,
    assert_stream_matches_decode,
    gemma3_gguf_path,
    hf_from_gguf,
    make_config,
)


@pytest.fixture(scope="module")
def gguf_path():
    return gemma3_gguf_path()


@pytest.fixture(scope="module")
def hf(gguf_path):
    return hf_from_gguf(gguf_path)


@pytest.fixture(scope="module")
def ours(gguf_path):
    return ExLlamaV2Tokenizer(make_config(os.path.dirname(gguf_path), gguf_path))


def test_gguf_matches_hf(ours, hf):
    assert_matches_hf(ours, hf)


def test_spaces_newlines_and_bytes_match_hf(ours, hf):
    text = "  lead\n\n\n  x    y\u00a0z \u2581 \U0001f9ea\U0001fae0 <table><tr> [multimodal] \x01"
    assert_matches_hf(ours, hf, text)


def test_tokenizer_json_structure_equals_hf(gguf_path, hf):
    ours = json.loads(tokenizer_from_gguf(gguf_path).tokenizer.to_str())
    theirs = json.loads(hf.backend_tokenizer.to_str())
    for key in ("normalizer", "pre_tokenizer", "decoder", "post_processor", "added_tokens"):
        assert ours[key] == theirs[key], key
    assert ours["model"]["vocab"] == theirs["model"]["vocab"]
    assert ours["model"]["merges"] == theirs["model"]["merges"]


def test_special_ids(ours, hf):
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
    assert ours.add_bos_token_default
    assert ours.newline_token_id == hf.encode("\n", add_special_tokens=False)[-1]
    assert ours.single_id("<start_of_turn>") == hf.convert_tokens_to_ids("<start_of_turn>")


def test_hf_has_no_chat_template_either(hf):
    with pytest.raises(ValueError):
        hf.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)


def test_no_chat_template_is_a_clear_error(ours):
    with pytest.raises(ChatTemplateError, match="no chat template"):
        ours.apply_chat_template(CONVERSATION)


@pytest.mark.parametrize("chunk", [1, 2])
def test_stream_never_splits_characters(ours, chunk):
    assert_stream_matches_decode(ours, " naïve 日本語 😀🎉👍🏽 \U0001f9ea\U0001fae0 Ærø", chunk)


def test_ids_follow_gguf_metadata(ours, gguf_path):
    from exllamav2.tokenizer.gguf_metadata import read_gguf_metadata

    meta = read_gguf_metadata(gguf_path)
    assert ours.bos_token_id == meta["tokenizer.ggml.bos_token_id"]
    assert ours.eos_token_id == meta["tokenizer.ggml.eos_token_id"]
    assert ours.pad_token_id == meta["tokenizer.ggml.padding_token_id"]
    assert ours.actual_vocab_size == len(meta["tokenizer.ggml.tokens"])


def test_round_trip_and_special_parsing(ours):
    text = "  lead\n\n  x    y 日本語 😀 <start_of_turn>user"
    plain = ours.encode(text)[0].tolist()
    parsed = ours.encode(text, encode_special_tokens=True)[0].tolist()
    turn = ours.single_id("<start_of_turn>")
    assert turn not in plain and turn in parsed
    assert ours.decode(plain) == text
    assert ours.decode(parsed, decode_special_tokens=True) == text
    assert ours.decode(ours.encode(text, add_bos=True)[0], decode_special_tokens=True) == "<bos>" + text
