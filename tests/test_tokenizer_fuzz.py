"""Differential fuzzing of ExLlamaV2Tokenizer against HF transformers' tokenizers built from the same GGUF files:
encode, decode, round trips, the incremental stream and chat templates, plus bad input. Three vocabularies:
SmolLM2 (byte-level BPE), Gemma-3 (SentencePiece with byte fallback) and a small Llama-style SentencePiece GGUF
written here (byte fallback, the decoder's leading-space strip, an UNKNOWN-typed <unk>). Hypothesis runs
derandomized with a bounded number of examples, so every run checks the same cases."""

from __future__ import annotations

import functools
import itertools
import types

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exllamav2 import ExLlamaV2Config
from exllamav2.tokenizer import ChatTemplateError, ExLlamaV2Tokenizer
from exllamav2.tokenizer.gguf_metadata import read_gguf_metadata
from test_tokenizer_common import CONVERSATION, gemma3_gguf_path, hf_from_gguf, make_config, smollm2_gguf_path

FUZZ = settings(max_examples=100, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# --- random text ------------------------------------------------------------------------------------

PIECES = {
    "ascii": [chr(c) for c in range(32, 127)],
    "space": [" ", "  ", "\t", "\n", "\r\n", "\r", "\n\n", "   ", "\u00a0", "\u3000", "\u2581", "\v", "\f"],
    "digit": list("0123456789") + ["١", "٢", "٣", "½"],
    "punct": list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~") + ["…", "—", "«", "»", "“", "”"],
    "accent": ["é", "e\u0301", "ñ", "n\u0303", "ü", "Å", "a\u030a", "ǅ", "ﬁ", "İ", "ß", "\u0301", "\u0327"],
    "cjk": list("日本語中文的一是不了人我在有他这为之大来以个们한국어ひらがなカタカナ"),
    "emoji": ["😀", "🎉", "👍🏽", "👨\u200d👩\u200d👧", "🏳️\u200d🌈", "❤️", "🇫🇷", "\U0001f9ea", "\U0001fae0", "\u200d", "\ufe0f"],
    "rtl": list("שלוםمرحبا") + ["\u200f", "\u202e"],
    "control": [chr(c) for c in range(32)] + ["\x7f", "\x85", "\u2028", "\ufeff", "\ufffd", "\U0010ffff", "\ue000"],
}
SPECIAL_TEXT = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>",
                "<pad>", "<unk>", "<mask>", "<s>", "</s>", "<think>", "<0x41>", "[multimodal]"]

_piece = st.one_of(
    st.sampled_from([p for group in PIECES.values() for p in group]),
    st.sampled_from(SPECIAL_TEXT),
    st.builds(lambda c, n: c * n, st.sampled_from(["a", "Z", "9", "日", "🫠", " ", "\n", "ab"]), st.integers(20, 300)),
    st.text(st.characters(codec="utf-8"), max_size=4),
)
texts = st.lists(_piece, max_size=24).map("".join)


# --- the vocabularies -------------------------------------------------------------------------------

class _Pair(types.SimpleNamespace):
    def __repr__(self) -> str:  # hypothesis prints it with every falsifying example
        return f"<{self.name}>"


def _pair(name: str, ours: ExLlamaV2Tokenizer, hf) -> _Pair:
    vocab = hf.backend_tokenizer.get_vocab(with_added_tokens=True)
    return _Pair(
        name=name, ours=ours, hf=hf, vocab=vocab, size=ours.actual_vocab_size,
        specials=sorted(ours.extended_id_to_piece),
        bytes=sorted(i for p, i in vocab.items() if len(p) == 6 and p.startswith("<0x")),
        chars=sorted(i for p, i in vocab.items() if len(p) == 1),
    )


def _llama_spm_gguf(path) -> str:
    """A Llama-style SentencePiece vocabulary: <unk> typed UNKNOWN (llama.cpp's usual), 256 byte tokens, control
    and user-defined tokens, then Gemma-3's first ordinary pieces (scored by rank) and every ASCII character."""
    from gguf import GGUFWriter

    meta = read_gguf_metadata(gemma3_gguf_path())
    pieces = [t for t, ty in zip(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]) if ty == 1 and " " not in t]
    pieces = pieces[:6000] + [t for t in pieces[6000:] if len(t) == 1 and t.isascii() or t == "\u2581"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "<|im_start|>", "<|im_end|>", "<think>", *pieces]
    types_ = [2, 3, 3] + [6] * 256 + [3, 3, 4] + [1] * len(pieces)
    scores = [0.0] * (len(tokens) - len(pieces)) + [-float(i) for i in range(len(pieces))]
    w = GGUFWriter(str(path), "llama")
    w.add_context_length(2048)
    w.add_embedding_length(64)
    w.add_block_count(1)
    w.add_feed_forward_length(128)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types_)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.fixture(scope="module")
def llama_spm_path(tmp_path_factory):
    return _llama_spm_gguf(tmp_path_factory.mktemp("llama_spm") / "llama-spm.gguf")


@functools.lru_cache(maxsize=None)
def _real_pair(name: str) -> _Pair:
    path = smollm2_gguf_path() if name == "smollm2" else gemma3_gguf_path()
    return _pair(name, ExLlamaV2Tokenizer(ExLlamaV2Config(path)), hf_from_gguf(path))


@pytest.fixture(scope="module", autouse=True)
def _release_pairs():
    yield
    _real_pair.cache_clear()  # HF's Gemma tokenizer is large; later test modules need not keep it


@pytest.fixture(scope="module", params=["smollm2", "gemma3", "llama_spm"])
def pair(request):
    if request.param == "llama_spm":
        path = request.getfixturevalue("llama_spm_path")
        return _pair(request.param, ExLlamaV2Tokenizer(make_config(None, path)), hf_from_gguf(path))
    return _real_pair(request.param)


@st.composite
def token_ids(draw, p, max_size: int = 16) -> list[int]:
    """Ids biased towards what breaks decoders: specials, byte tokens (partial UTF-8), single characters."""
    pools = [pool for pool in (p.specials, p.bytes, p.chars) if pool]
    one = st.one_of(*(st.sampled_from(pool) for pool in pools), st.integers(0, p.size - 1))
    return draw(st.lists(one, max_size=max_size))


# --- encode / decode against HF ---------------------------------------------------------------------

@FUZZ
@given(text=texts)
def test_encode_matches_hf(pair, text):
    ours, hf = pair.ours, pair.hf
    for parse_special in (False, True):
        expected = hf.encode(text, add_special_tokens=False, split_special_tokens=not parse_special)
        assert ours.encode(text, encode_special_tokens=parse_special)[0].tolist() == expected
        assert ours.num_tokens(text, encode_special_tokens=parse_special) == len(expected)
    plain = hf.encode(text, add_special_tokens=False)
    with_default = ours.encode(text, add_bos=ours.add_bos_token_default, encode_special_tokens=True)
    assert with_default[0].tolist() == hf.encode(text)
    both = ours.encode(text, add_bos=True, add_eos=True, encode_special_tokens=True)[0].tolist()
    assert both == [ours.bos_token_id] + plain + [ours.eos_token_id]


@FUZZ
@given(data=st.data())
def test_decode_matches_hf(pair, data):
    ids = data.draw(token_ids(pair))
    for keep_special in (False, True):
        expected = pair.hf.decode(ids, skip_special_tokens=not keep_special)
        assert pair.ours.decode(ids, decode_special_tokens=keep_special) == expected
        assert pair.ours.decode(torch.tensor(ids, dtype=torch.long), decode_special_tokens=keep_special) == expected
    # ids past the vocabulary (a model's padded embedding rows) have no text, in HF and here
    past_end = ids + [pair.size, pair.size + 7]
    assert pair.ours.decode(past_end) == pair.hf.decode(past_end, skip_special_tokens=True)


@FUZZ
@given(text=texts)
def test_round_trip_where_hf_round_trips(pair, text):
    ours, hf = pair.ours, pair.hf
    for parse_special in (False, True):
        hf_text = hf.decode(hf.encode(text, add_special_tokens=False, split_special_tokens=not parse_special),
                            skip_special_tokens=not parse_special)
        ours_text = ours.decode(ours.encode(text, encode_special_tokens=parse_special)[0],
                                decode_special_tokens=parse_special)
        assert ours_text == hf_text  # so wherever HF gives the text back, so do we


@pytest.mark.parametrize("parse_special", [False, True])
def test_round_trip_of_mixed_text(pair, parse_special):
    text = ("lead\n\n\tx    y 日本語のテキスト 😀👨\u200d👩\u200d👧🇫🇷 e\u0301 שלום 12345678 \r\n"
            "<|im_start|>user<|im_end|> <start_of_turn> <bos> trailing  ")
    ids = pair.ours.encode(text, encode_special_tokens=parse_special)[0]
    assert pair.ours.decode(ids, decode_special_tokens=parse_special) == text
    # leading spaces: HF's Llama-style Metaspace adds no marker before one already there, and the decoder strips
    # one space, so "  x" comes back as " x" there; byte-level and Gemma vocabularies give it back whole
    lead = "  x"
    back = pair.ours.decode(pair.ours.encode(lead, encode_special_tokens=parse_special)[0])
    assert back == pair.hf.decode(pair.hf.encode(lead, add_special_tokens=False)) == (" x" if pair.name == "llama_spm" else lead)


def test_batch_decode_equals_row_decodes(pair):
    rows = ["hi", "naïve 日本語 😀", "", "<|im_start|>x"]
    ids = pair.ours.encode(rows, add_bos=True)
    assert pair.ours.decode(ids) == [pair.ours.decode(pair.ours.encode(r, add_bos=True)[0]) for r in rows]
    assert pair.ours.decode(ids.tolist()) == pair.ours.decode(ids)
    assert pair.ours.decode(ids.numpy()) == pair.ours.decode(ids)


# --- streaming --------------------------------------------------------------------------------------

def _stream_pieces(ours, ids, chunks, keep_special):
    stream, pos, pieces = ours.stream(keep_special), 0, []
    for n in chunks:
        pieces.append(stream.feed(ids[pos:pos + n]))
        pos += n
    pieces.append(stream.feed(ids[pos:]))
    pieces.append(stream.finish())
    return pieces


@FUZZ
@given(data=st.data())
def test_stream_concatenates_to_full_decode(pair, data):
    ours = pair.ours
    if data.draw(st.booleans()):
        ids = data.draw(token_ids(pair))
    else:
        ids = ours.encode(data.draw(texts), encode_special_tokens=True)[0].tolist()
    chunks = data.draw(st.lists(st.integers(0, 3), max_size=len(ids)))
    for keep_special in (False, True):
        pieces = _stream_pieces(ours, ids, chunks, keep_special)
        assert "".join(pieces) == ours.decode(ids, decode_special_tokens=keep_special)
        # what the generators rely on when they restart a stream: many ids at once give what one by one gives
        one_by_one = ours.stream(keep_special)
        assert ours.stream(keep_special).feed(ids) == "".join(one_by_one.feed(i) for i in ids)


SMALL_ALPHABETS = {
    "smollm2": ["Ã", "©", "Ġ", "a", "<|im_end|>", "æ"],  # byte-level: 0xC3, 0xA9, space, a, special, 0xE6
    "gemma3": ["<0xC3>", "<0xA9>", "<0x41>", "▁a", "a", "<start_of_turn>"],
    "llama_spm": ["<0xC3>", "<0xA9>", "<0x41>", "▁a", "▁", "</s>"],
}


def test_stream_exhaustive_short_sequences(pair):
    """Every sequence of up to 3 ids over a few troublesome tokens, cut every way, both special modes."""
    alphabet = [pair.vocab[p] for p in SMALL_ALPHABETS[pair.name]]
    for length in (1, 2, 3):
        for ids in itertools.product(alphabet, repeat=length):
            ids = list(ids)
            for keep_special in (False, True):
                full = pair.ours.decode(ids, decode_special_tokens=keep_special)
                for cuts in itertools.product((False, True), repeat=length - 1):
                    bounds = [0] + [i + 1 for i, cut in enumerate(cuts) if cut] + [length]
                    chunks = [b - a for a, b in zip(bounds, bounds[1:])]
                    pieces = _stream_pieces(pair.ours, ids, chunks, keep_special)
                    assert "".join(pieces) == full, (ids, chunks, pieces)


def test_stream_holds_a_byte_run_until_it_ends(pair):
    """Regression: with byte fallback, a valid run ('é' = <0xC3><0xA9>) followed by a stray continuation byte
    decodes to three U+FFFD as a whole, and the stream had returned 'é' already. Byte-level BPE decodes the same
    bytes to 'é' + U+FFFD, so there 'é' is final at once."""
    ours, v = pair.ours, pair.vocab
    c3, a9 = (v["Ã"], v["©"]) if pair.name == "smollm2" else (v["<0xC3>"], v["<0xA9>"])
    ids = [c3, a9, a9]
    stream = ours.stream()
    pieces = [stream.feed(i) for i in ids] + [stream.finish()]
    assert "".join(pieces) == ours.decode(ids) == pair.hf.decode(ids)
    if pair.name == "smollm2":
        assert pieces == ["", "é", "", "\ufffd"]
    else:
        assert pieces == ["", "", "", "\ufffd" * 3]
        stream = ours.stream()
        assert [stream.feed(i) for i in [c3, a9, v["a"]]] == ["", "", "éa"]
    # many ids at once: the text before the unfinished run comes out, as it would one by one
    assert ours.stream().feed([v["a"], c3]) == "a"


# --- special tokens and defaults ------------------------------------------------------------------------

def test_named_special_tokens_are_special_like_hf(pair):
    """Regression: BOS/EOS/UNK/PAD are special in HF whatever their GGUF type (llama.cpp types <unk> UNKNOWN);
    "<unk>" in text was split into pieces here and id 0 was not skipped in decoding."""
    ours, hf = pair.ours, pair.hf
    assert ours.tokenizer.get_added_tokens_decoder() == hf.backend_tokenizer.get_added_tokens_decoder()
    for token_id in (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.unk_token_id):
        if token_id is not None:
            assert token_id in ours.extended_id_to_piece
            piece = ours.extended_id_to_piece[token_id]
            assert ours.encode("x" + piece + "x", encode_special_tokens=True)[0].tolist() == hf.encode(
                "x" + piece + "x", add_special_tokens=False)
    if pair.name == "llama_spm":
        assert ours.encode("a<unk>b", encode_special_tokens=True)[0].tolist()[1] == ours.unk_token_id == 0
        assert ours.decode([0, pair.vocab["a"]]) == "a"


def test_folder_add_bos_follows_post_processor(pair, tmp_path):
    """Regression: a tokenizer.json whose post-processor adds BOS, with no add_bos_token in tokenizer_config.json
    (what HF saves for these GGUFs), encodes with BOS in HF; add_bos_token_default said False here."""
    pair.hf.save_pretrained(tmp_path)
    ours = ExLlamaV2Tokenizer(make_config(str(tmp_path)))
    text = "Hello <start_of_turn> 日本"
    assert ours.add_bos_token_default == (pair.hf.encode(text)[:1] == [ours.bos_token_id])
    assert ours.encode(text, add_bos=ours.add_bos_token_default, encode_special_tokens=True)[0].tolist() == pair.hf.encode(text)


# --- chat templates (SmolLM2 has one) ---------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2():
    p = _real_pair("smollm2")
    return p.ours, p.hf


_messages = st.lists(st.tuples(st.sampled_from(["system", "user", "assistant"]), texts), min_size=1, max_size=4).map(
    lambda ms: [{"role": r, "content": c} for r, c in ms])


@settings(FUZZ, max_examples=60)
@given(messages=_messages, add_generation_prompt=st.booleans())
def test_chat_template_and_encode_chat_match_hf(smollm2, messages, add_generation_prompt):
    ours, hf = smollm2
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == text
    ids = ours.encode_chat(messages, add_generation_prompt=add_generation_prompt)[0].tolist()
    trusting = hf.encode(text, add_special_tokens=False)
    forged = any(piece in m["content"] for m in messages for piece in ours.extended_piece_to_id)
    if not forged:
        assert ids == trusting
    else:  # control-token text inside a message stays text: only the template's markup is special
        markup = hf.apply_chat_template([dict(m, content="x") for m in messages], tokenize=False,
                                        add_generation_prompt=add_generation_prompt)
        count = lambda seq: sum(i in ours.extended_id_to_piece for i in seq)  # noqa: E731
        assert count(ids) == count(hf.encode(markup, add_special_tokens=False)) < count(trusting)
    if ours.decode(trusting, decode_special_tokens=True) == text:
        assert ours.decode(ids, decode_special_tokens=True) == text


# --- bad input ------------------------------------------------------------------------------------------

BAD_INPUTS = [
    ("decode", lambda t: t.decode([28, 1.5]), TypeError, r"decode: token ids must be integers, got float 1\.5 at position 1"),
    ("decode float tensor", lambda t: t.decode(torch.tensor([28.0])), TypeError, r"decode: token ids must be integers.*float32"),
    ("decode float array", lambda t: t.decode(np.array([[28.0]])), TypeError, r"decode: token ids must be integers.*float64"),
    ("decode str", lambda t: t.decode("hello"), TypeError, r"decode: expected token ids.*got str; use encode"),
    ("decode None", lambda t: t.decode(None), TypeError, r"decode: expected token ids.*got NoneType"),
    ("decode None id", lambda t: t.decode([28, None]), TypeError, r"got NoneType None at position 1"),
    ("decode bool", lambda t: t.decode([True]), TypeError, r"got bool True at position 0"),
    ("decode mixed", lambda t: t.decode([28, [29]]), TypeError, r"a mix of both"),
    ("decode 3-D", lambda t: t.decode(torch.zeros(1, 1, 1, dtype=torch.long)), ValueError, r"1-D or 2-D.*\(1, 1, 1\)"),
    ("decode nested row", lambda t: t.decode([[28, [29]]]), TypeError, r"decode \(row 0\): .*list \[29\] at position 1"),
    ("decode_list rows", lambda t: t.decode_list([[28]]), TypeError, r"decode_list: expected one sequence"),
    ("encode None", lambda t: t.encode(None), TypeError, r"encode: expected a str or a list of str, got NoneType"),
    ("encode int", lambda t: t.encode(5), TypeError, r"encode: expected a str or a list of str, got int"),
    ("encode bytes", lambda t: t.encode(b"abc"), TypeError, r"got bytes"),
    ("encode list", lambda t: t.encode(["a", 3]), TypeError, r"got int at position 1"),
    ("encode surrogate", lambda t: t.encode("ab\ud800"), ValueError, r"encode: text holds a lone surrogate U\+D800 at index 2"),
    ("encode batch surrogate", lambda t: t.encode(["a", "\udfff"]), ValueError, r"text 1 holds a lone surrogate U\+DFFF"),
    ("num_tokens list", lambda t: t.num_tokens(["a"]), TypeError, r"num_tokens: expected a str, got list"),
    ("num_tokens surrogate", lambda t: t.num_tokens("\ud800"), ValueError, r"num_tokens: .*lone surrogate"),
    ("single_id None", lambda t: t.single_id(None), TypeError, r"single_id: expected a str, got NoneType"),
    ("cached_encode_str", lambda t: t.cached_encode_str(["a"]), TypeError, r"cached_encode_str: expected a str"),
    ("padding_mask", lambda t: t.padding_mask([[1, 2]]), TypeError, r"padding_mask: expected a tensor"),
    ("feed float", lambda t: t.stream().feed(1.5), TypeError, r"stream\.feed: expected token ids.*got float"),
    ("feed str", lambda t: t.stream().feed("ab"), TypeError, r"stream\.feed: .*got str; use encode"),
    ("feed float list", lambda t: t.stream().feed([28, 2.0]), TypeError, r"stream\.feed: token ids must be integers"),
    ("encode_chat surrogate", lambda t: t.encode_chat([{"role": "user", "content": "\ud83d"}]), ValueError,
     r"encode_chat: .*lone surrogate U\+D83D"),
]


@pytest.mark.parametrize("call, error, message", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_a_clear_error(smollm2, call, error, message):
    with pytest.raises(error, match=message):
        call(smollm2[0])


def test_ids_in_every_accepted_form_decode_alike(smollm2):
    ours, _ = smollm2
    ids = ours.encode("naïve 日本語 😀")[0]
    text = ours.decode(ids)
    assert text == "naïve 日本語 😀"
    for form in (ids.tolist(), tuple(ids.tolist()), ids.numpy(), ids.to(torch.int32), [np.int64(i) for i in ids]):
        assert ours.decode(form) == text
    assert ours.decode(ids[:1].reshape(())) == ours.decode(int(ids[0])) == ours.decode([int(ids[0])])
    assert ours.decode(torch.tensor([])) == ours.decode([]) == ""  # empty: any dtype (torch.tensor([]) is float)
    assert ours.decode(torch.zeros(2, 0)) == ours.decode([[], []]) == ["", ""]
    stream = ours.stream()
    assert stream.feed(np.int64(ids[0])) + stream.feed(ids[1:]) + stream.finish() == text
    # negative ids are dropped like ids past the vocabulary (HF would raise OverflowError deep inside)
    assert ours.decode([-1] + ids.tolist()) == text
    with pytest.raises(ChatTemplateError):
        ours.apply_chat_template(CONVERSATION, template_name="nope")
