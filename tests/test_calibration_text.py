"""The shipped calibration text: big, broad (code, CJK, Cyrillic) and free of copy-paste padding."""

from importlib import resources

import pytest

from exllamav2 import ExLlamaV2Config, ExLlamaV2Tokenizer
from exllamav2.conversion.calibration import DEFAULT_FILE, read_calibration_text
from exllamav2.default_models import smollm2_gguf_path

WINDOW = 4096
STRIDE = 64  # every repeat of WINDOW + STRIDE characters or more contains a checked window


@pytest.fixture(scope="module")
def raw() -> bytes:
    return resources.files("exllamav2.conversion").joinpath(DEFAULT_FILE).read_bytes()


@pytest.fixture(scope="module")
def text(raw) -> str:
    return raw.decode("utf-8")


def test_size_and_utf8(raw):
    assert len(raw) >= 150_000
    raw.decode("utf-8", errors="strict")


def test_reader_returns_shipped_text(text):
    assert read_calibration_text(None)[0] == text


def test_tokenizes_to_enough_tokens(text):
    tokenizer = ExLlamaV2Tokenizer(ExLlamaV2Config(smollm2_gguf_path()))
    ids = tokenizer.encode(text, add_bos=False)
    assert ids.numel() >= 35_000


def test_covers_code_and_scripts(text):
    assert "def " in text and "{" in text and "#include" in text and "SELECT" in text
    assert any("\u4e00" <= c <= "\u9fff" for c in text), "no CJK ideographs"
    assert any("\u3040" <= c <= "\u30ff" for c in text), "no Japanese kana"
    assert any("\uac00" <= c <= "\ud7a3" for c in text), "no Hangul"
    assert any("\u0400" <= c <= "\u04ff" for c in text), "no Cyrillic"
    assert any("\u0600" <= c <= "\u06ff" for c in text), "no Arabic"


def test_no_repeated_window(text):
    for start in range(0, len(text) - WINDOW + 1, STRIDE):
        window = text[start:start + WINDOW]
        again = text.find(window, start + 1)
        assert again == -1, f"characters {start}..{start + WINDOW} repeat at {again}"
