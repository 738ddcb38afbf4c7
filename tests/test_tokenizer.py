"""ExLlamaV2Tokenizer on SmolLM2 (GGUF, byte-level BPE) and from a tokenizer.json folder, against HF transformers."""

from __future__ import annotations

import json
import os

import pytest
import torch

from exllamav2.tokenizer import (
    ChatTemplateError,
    ExLlamaV2Tokenizer,
    save_hf_tokenizer_files,
    tokenizer_from_gguf,
)
from test_tokenizer_common import (
    CONVERSATION,
    SAMPLE_TEXT,
    assert_matches_hf,
    assert_stream_matches_decode,
    hf_from_gguf,
    make_config,
    smollm2_gguf_path,
)


@pytest.fixture(scope="module")
def gguf_path():
    return smollm2_gguf_path()


@pytest.fixture(scope="module")
def hf(gguf_path):
    return hf_from_gguf(gguf_path)


@pytest.fixture(scope="module")
def ours(gguf_path):
    return ExLlamaV2Tokenizer(make_config(os.path.dirname(gguf_path), gguf_path))


@pytest.fixture(scope="module")
def hf_folder(hf, tmp_path_factory):
    folder = tmp_path_factory.mktemp("smollm2_hf_tokenizer")
    hf.save_pretrained(folder)
    return str(folder)


def test_gguf_matches_hf(ours, hf):
    assert_matches_hf(ours, hf)


def test_special_ids_from_gguf(ours, hf):
    assert ours.bos_token_id == hf.bos_token_id
    assert ours.eos_token_id == hf.eos_token_id
    assert ours.pad_token_id == hf.pad_token_id
    assert ours.eos_token_ids == [hf.eos_token_id]
    assert ours.single_id("<|im_end|>") == hf.convert_tokens_to_ids("<|im_end|>")
    assert ours.extended_piece_to_id["<|im_start|>"] == hf.convert_tokens_to_ids("<|im_start|>")
    assert ours.newline_token_id == hf.encode("\n", add_special_tokens=False)[-1]
    assert ours.space_token_id == hf.encode(" ", add_special_tokens=False)[-1]
    assert ours.get_vocab_size() == ours.actual_vocab_size == len(hf)


def test_config_ids_take_precedence(gguf_path):
    cfg = make_config(None, gguf_path, bos_token_id=0, eos_token_id=2, pad_token_id=None,
                      generation_config={"eos_token_id": [2, 0]})
    tok = ExLlamaV2Tokenizer(cfg)
    assert tok.bos_token_id == 0
    assert tok.eos_token_ids == [2, 0]


def test_chat_template_matches_hf(ours, hf):
    expected = hf.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(CONVERSATION, add_generation_prompt=True) == expected
    expected = hf.apply_chat_template(CONVERSATION[:3], tokenize=False, add_generation_prompt=False)
    assert ours.apply_chat_template(CONVERSATION[:3], add_generation_prompt=False) == expected


def test_batch_encode_left_pads(ours):
    texts = ["short", SAMPLE_TEXT, ""]
    ids, offsets = ours.encode(texts, add_bos=True, return_offsets=True)
    singles = [ours.encode(t, add_bos=True)[0] for t in texts]
    assert ids.shape == (3, max(len(s) for s in singles))
    assert offsets.shape == (3, 1)
    for row, single in enumerate(singles):
        pad_len = ids.shape[1] - len(single)
        assert offsets[row, 0].item() == -pad_len
        assert ids[row, pad_len:].tolist() == single.tolist()
        assert (ids[row, :pad_len] == ours.pad_token_id).all()
    mask = ours.padding_mask(ids)
    assert mask.shape == ids.shape
    for row, single in enumerate(singles):
        pad_len = ids.shape[1] - len(single)
        assert (mask[row, :pad_len] < -1e4).all() and (mask[row, pad_len:] == 0).all()
    assert ours.decode(ids) == [ours.decode(s) for s in singles]


def test_padding_mask_keeps_pad_id_inside_text(ours):
    # SmolLM2's pad id is <|im_end|>, which also appears inside chat prompts.
    ids = ours.encode("<|im_start|>user\nhi<|im_end|>\n", encode_special_tokens=True)
    assert ours.pad_token_id in ids[0].tolist()
    assert (ours.padding_mask(ids) == 0).all()


@pytest.mark.parametrize("chunk", [1, 3])
def test_stream_never_splits_characters(ours, chunk):
    assert_stream_matches_decode(ours, "naïve 日本語 😀🎉👍🏽 Ærø — ok", chunk)


def test_id_to_piece_list(ours, hf):
    pieces = ours.get_id_to_piece_list()
    assert len(pieces) == ours.actual_vocab_size
    hello = hf.encode(" hello", add_special_tokens=False)
    assert len(hello) == 1 and pieces[hello[0]] == " hello"
    assert pieces[ours.eos_token_id] == ""
    assert ours.get_id_to_piece_list(True)[ours.eos_token_id] == "<|im_end|>"
    assert ours.get_piece_to_id_dict()[" hello"] == hello[0]
    assert ours.num_tokens(SAMPLE_TEXT) == ours.encode(SAMPLE_TEXT).shape[1]
    assert ours.single_token(5).tolist() == [[5]]


def test_tokenizer_json_folder_matches_hf(hf, hf_folder):
    tok = ExLlamaV2Tokenizer(make_config(hf_folder))
    assert_matches_hf(tok, hf)
    assert tok.bos_token_id == hf.bos_token_id and tok.pad_token_id == hf.pad_token_id
    expected = hf.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(CONVERSATION) == expected


def test_saved_gguf_tokenizer_files_load_in_hf(gguf_path, hf, tmp_path):
    from transformers import AutoTokenizer

    info = tokenizer_from_gguf(gguf_path)
    save_hf_tokenizer_files(info, tmp_path)
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert reloaded.encode(SAMPLE_TEXT) == hf.encode(SAMPLE_TEXT)
    assert reloaded.apply_chat_template(CONVERSATION, tokenize=False) == hf.apply_chat_template(CONVERSATION, tokenize=False)
    ours = ExLlamaV2Tokenizer(make_config(str(tmp_path)))
    assert_matches_hf(ours, hf)


def test_named_chat_templates_and_jinja_file(hf_folder, tmp_path):
    for name in ("tokenizer.json",):
        with open(os.path.join(hf_folder, name), encoding="utf-8") as f:
            (tmp_path / name).write_text(f.read(), encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "chat_template": [
            {"name": "default", "template": "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content | tojson }}{% endfor %}"},
            {"name": "strict", "template": "{{ raise_exception('no ' + flavour) }}"},
        ],
    }), encoding="utf-8")
    tok = ExLlamaV2Tokenizer(make_config(str(tmp_path)))
    assert tok.apply_chat_template([{"role": "user", "content": "é"}]) == '<|im_start|>[user]"é"'
    with pytest.raises(Exception, match="no salt"):
        tok.apply_chat_template(CONVERSATION, template_name="strict", flavour="salt")
    with pytest.raises(ChatTemplateError, match="missing"):
        tok.apply_chat_template(CONVERSATION, template_name="missing")

    (tmp_path / "tokenizer_config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(ChatTemplateError, match="no chat template"):
        ExLlamaV2Tokenizer(make_config(str(tmp_path))).apply_chat_template(CONVERSATION)
    (tmp_path / "chat_template.jinja").write_text("{{ messages | length }}", encoding="utf-8")
    assert ExLlamaV2Tokenizer(make_config(str(tmp_path))).apply_chat_template(CONVERSATION) == "4"


def test_pad_falls_back_to_eos(hf_folder, tmp_path):
    with open(os.path.join(hf_folder, "tokenizer.json"), encoding="utf-8") as f:
        (tmp_path / "tokenizer.json").write_text(f.read(), encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|im_end|>"}}), encoding="utf-8")
    tok = ExLlamaV2Tokenizer(make_config(str(tmp_path)))
    assert tok.eos_token_id == tok.single_id("<|im_end|>")
    assert tok.pad_token_id == tok.eos_token_id


def test_folder_without_tokenizer_names_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        ExLlamaV2Tokenizer(make_config(str(tmp_path)))


def test_malformed_tokenizer_json_names_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer.json"):
        ExLlamaV2Tokenizer(make_config(str(tmp_path)))


def test_not_a_gguf_file_is_named(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(ValueError, match="not a GGUF file"):
        ExLlamaV2Tokenizer(make_config(str(tmp_path), str(bogus)))


def test_decode_accepts_lists_and_drops_invalid_ids(ours):
    ids = ours.encode("hello world")[0]
    assert ours.decode(ids.tolist()) == "hello world"
    assert ours.decode(torch.cat([ids, torch.tensor([-1, ours.actual_vocab_size + 5])])) == "hello world"
    assert ours.decode(ids.unsqueeze(0)) == ["hello world"]


def test_stream_started_after_a_prompt_never_returns_prompt_text(ours):
    """A prompt cut inside a character (its last token one byte of three) is context, not output: the streaming
    generator starts its text stream after the prompt's tail, and the first text it gets for new tokens holds none
    of the prompt's bytes. Priming by feed() used to hold the cut character back and return it (as U+FFFD) with the
    first new token's text."""
    cut = ours.encode("Hi 漢")[0].tolist()[:-1]
    new = ours.encode(" the")[0].tolist()
    s = ours.stream()
    s.start_after(cut[-2:])
    assert s.feed(new) == " the"
    primed = ours.stream()
    primed.feed(cut[-2:])
    assert primed.feed(new) != " the"  # the old priming: the prompt's held bytes come out with " the"


def test_lookups_wait_for_another_threads_encode(ours):
    """The tokenizer's own lookups (_last_id, and single_id's fallback) encode under the lock that an encode of
    plain text holds while it switches the shared tokenizer to splitting special tokens as text: they wait for it
    instead of seeing a special token's text split."""
    import threading
    special = "<|im_end|>"
    want = ours.extended_piece_to_id[special]
    seen = []
    with ours._encode_lock:
        ours.tokenizer.encode_special_tokens = True  # what _encode_lists sets, under the lock, for plain text
        try:
            t = threading.Thread(target=lambda: seen.append(ours._last_id(special)))
            t.start()
            t.join(0.3)
            assert not seen  # waiting for the lock
        finally:
            ours.tokenizer.encode_special_tokens = False
    t.join()
    assert seen == [want]


def test_llama3_style_vocabularies_take_whole_words_before_merges():
    # "abc" is in the vocabulary but no merge reaches it ("a" + "bc" is not a merge): Llama 3's tokenizer (and
    # llama.cpp for its pre-tokenizer names) takes the whole word; GPT-2's rule merges pair by pair
    meta = {"general.architecture": "llama", "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.tokens": ["a", "b", "c", "Ġ", "bc", "abc"], "tokenizer.ggml.merges": ["b c"],
            "tokenizer.ggml.add_bos_token": False}
    for pre, expected in (("llama-bpe", [5]), ("tekken", [5]), ("gpt2", [0, 4]), ("qwen2", [0, 4])):
        info = tokenizer_from_gguf("vocab.gguf", metadata={**meta, "tokenizer.ggml.pre": pre})
        assert info.tokenizer.encode("abc", add_special_tokens=False).ids == expected, pre
        assert info.tokenizer.encode("bc", add_special_tokens=False).ids == [4], pre
