"""exllamav2/gguf/header.py and tensors.py, the package's one GGUF parser: the gguf library's GGUFReader (used here
only, as the oracle) reads the same metadata, tensor infos and tensor data from the tiny files the GGUF tests write
and from SmolLM2; damaged headers, absurd counts included, are GGUFErrors naming the file, with no large allocation."""

import struct
import tracemalloc

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from exllamav2.gguf import GGUFError
from exllamav2.gguf.header import read_header
from exllamav2.gguf.tensors import read_gguf
from exllamav2.tokenizer.gguf_metadata import read_gguf_metadata
from test_gguf_support import write_tiny_gguf

_READER_ONLY = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}  # GGUFReader's pseudo-fields


def _flat(value):
    """ReaderField.contents() flattens arrays of arrays; ours keeps them nested."""
    if isinstance(value, list) and value and isinstance(value[0], list):
        return [v for inner in value for v in _flat(inner)]
    return value


def assert_matches_reader(path: str) -> None:
    reader = GGUFReader(path)
    header, tensors = read_gguf(path)
    assert list(header.fields) == [k for k in reader.fields if k not in _READER_ONLY]
    assert header.version == reader.fields["GGUF.version"].contents()
    for key, field in header.fields.items():
        want = reader.fields[key]
        assert field.type == want.types[0], key
        if field.item_type is not None and len(want.types) > 1:
            assert field.item_type == want.types[1], key
        assert _flat(field.contents()) == want.contents(), key
    assert header.alignment == reader.alignment and header.data_start == reader.data_offset
    assert [t.name for t in tensors] == [t.name for t in reader.tensors]
    for ours, want in zip(tensors, reader.tensors):
        assert ours.tensor_type == want.tensor_type, ours.name
        assert list(ours.shape) == want.shape.tolist(), ours.name
        assert (ours.n_elements, ours.n_bytes, ours.data_offset) == (want.n_elements, want.n_bytes, want.data_offset)
        assert ours.data.dtype == want.data.dtype and ours.data.shape == want.data.shape, ours.name
        assert np.array_equal(ours.data.view(np.uint8), np.asarray(want.data).view(np.uint8)), ours.name
        assert not ours.data.flags.writeable


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_K", "Q6_K"])
def test_tiny_files_match_gguf_reader(tmp_path, qtype):
    k_quant = qtype.endswith("_K")
    path = write_tiny_gguf(str(tmp_path / f"{qtype}.gguf"), qtype=qtype, tied=False,
                           **(dict(hidden=256, ffn=256) if k_quant else {}))
    assert_matches_reader(path)


def test_gemma3_and_rope_freqs_tiny_files_match_gguf_reader(tmp_path):
    assert_matches_reader(write_tiny_gguf(str(tmp_path / "g.gguf"), arch="gemma3"))
    assert_matches_reader(write_tiny_gguf(str(tmp_path / "r.gguf"), head_dim=16,
                                          rope_freqs=np.linspace(1.0, 8.0, 8, dtype=np.float32)))


@pytest.mark.parametrize("qtype", ["F16", "Q8_0"])
def test_moe_file_matches_gguf_reader(tmp_path, qtype):
    from test_gguf_moe import build, write_moe_gguf
    assert_matches_reader(write_moe_gguf(build("qwen2_moe"), str(tmp_path / "moe.gguf"), qtype))


def test_every_value_type_matches_gguf_reader(tmp_path):
    path = str(tmp_path / "kv.gguf")
    w = GGUFWriter(path, "llama")
    for vtype in GGUFValueType:
        if vtype not in (GGUFValueType.STRING, GGUFValueType.ARRAY):
            w.add_key_value(f"t.{vtype.name.lower()}", True if vtype == GGUFValueType.BOOL else 7, vtype)
    w.add_float32("t.f32_inexact", 0.1)
    w.add_array("t.strings", ["a", "ü", "", "日本"])
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.1, 2.5])
    w.add_array("t.bools", [True, False])
    w.add_array("t.nested", [[1, 2], [3]])
    w.add_array("t.nested_strings", [["x"], ["y", "z"]])
    w.add_tensor("t.f16", np.arange(8, dtype=np.float16))
    w.add_tensor("t.i32", np.arange(6, dtype=np.int32).reshape(2, 3))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_matches_reader(path)
    meta = read_gguf_metadata(path)
    assert meta["t.nested"] == [[1, 2], [3]] and meta["t.nested_strings"] == [["x"], ["y", "z"]]
    assert isinstance(read_header(path).fields["t.floats"].value, np.ndarray)


def test_smollm2_matches_gguf_reader(smollm2_gguf):
    assert_matches_reader(smollm2_gguf)


@pytest.mark.slow
def test_gemma3_matches_gguf_reader(gemma3_gguf):
    assert_matches_reader(gemma3_gguf)


# ------------------------------------------------------------------------------------------------ damaged headers

def _string(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


def _header(kvs: list[bytes], *, version: int = 3, tensor_count: int = 0, kv_count: int | None = None) -> bytes:
    count = len(kvs) if kv_count is None else kv_count
    return b"GGUF" + struct.pack("<IQQ", version, tensor_count, count) + b"".join(kvs) + bytes(64)


def _array_kv(key: bytes, item_type: GGUFValueType, count: int, items: bytes = b"") -> bytes:
    return _string(key) + struct.pack("<IIQ", GGUFValueType.ARRAY, item_type, count) + items


def test_empty_array_and_handmade_header(tmp_path):
    path = tmp_path / "h.gguf"
    path.write_bytes(_header([_array_kv(b"a.empty", GGUFValueType.FLOAT32, 0),
                              _string(b"a.name") + struct.pack("<I", GGUFValueType.STRING) + _string(b"x")]))
    assert read_gguf_metadata(path) == {"a.empty": [], "a.name": "x"}


@pytest.mark.parametrize("content, match", [
    (b"", r"empty"),
    (b"GGU", r"not a GGUF file"),
    (_header([], version=1), r"unsupported GGUF version 1"),
    (_header([], version=3 << 24), r"big-endian"),
    (_header([], kv_count=1 << 40), r"claims 1099511627776 metadata entries.*truncated or corrupt"),
    (_header([], tensor_count=1 << 40), r"1099511627776 tensors.*truncated or corrupt"),
    (_header([struct.pack("<Q", 1 << 62)]), r"metadata key #0 at byte 32 needs 4611686018427387904 bytes"),
    (_header([_string(b"k") + struct.pack("<I", 99)]), r"metadata 'k' has unknown GGUF value type 99"),
    (_header([_array_kv(b"k", GGUFValueType.STRING, 20_000_000)]), r"'k' claims 20000000 STRING items"),
    (_header([_array_kv(b"k", GGUFValueType.UINT64, 1 << 40)]), r"'k' claims 1099511627776 UINT64 items"),
    (_header([_array_kv(b"k", GGUFValueType.STRING, 2, _string(b"a") + struct.pack("<Q", 1000))]),
     r"'k': its strings run past the end"),
    (_header([_string(b"k") + struct.pack("<I", GGUFValueType.ARRAY)
              + struct.pack("<IQ", GGUFValueType.ARRAY, 1) * 20]), r"'k' nests arrays more than 8 deep"),
    (_header([_string(b"k") + struct.pack("<IB", GGUFValueType.UINT8, 1)] * 2), r"'k' appears twice"),
], ids=["empty", "short", "v1", "big_endian", "kv_count", "tensor_count", "key_length", "value_type", "string_count",
        "number_count", "string_length", "nesting", "duplicate"])
def test_damaged_header_is_a_clear_error(tmp_path, content, match):
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    tracemalloc.start()
    try:
        with pytest.raises(GGUFError, match=r"bad\.gguf: .*" + match):
            read_header(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak  # the counts are refused before anything is allocated for them


def test_damaged_tensor_infos_are_clear_errors(tmp_path):
    def tensor(name: bytes, dims: tuple[int, ...], ggml_type: int) -> bytes:
        return _string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type, 0)

    cases = [
        ([tensor(b"w", (32,), 4242)], r"tensor 'w' has unknown ggml type 4242"),
        ([tensor(b"w", (33, 2), 8)], r"tensor 'w' rows hold 33 values, not a multiple of the Q8_0 block size 32"),
        ([tensor(b"w", (32,), 0)] * 2, r"tensor 'w' appears twice"),
        ([tensor(b"w", (1 << 20, 1 << 20), 0)], r"tensor 'w' ends at byte \d+ but the file has \d+ bytes; .*truncated"),
    ]
    for infos, match in cases:
        path = tmp_path / "bad.gguf"
        path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, len(infos), 0) + b"".join(infos) + bytes(64))
        with pytest.raises(GGUFError, match=r"bad\.gguf: " + match):
            read_gguf(path)


def test_tokenizer_reads_the_configs_parsed_header(smollm2_gguf, monkeypatch):
    """A tokenizer made from a GGUF model's config takes the metadata its GGUFFile parsed (the header is not read
    a second time: ~80 ms on Gemma-3), and encodes as one built from the file alone."""
    import exllamav2.tokenizer.gguf_tokenizer as gguf_tokenizer
    from exllamav2 import ExLlamaV2Config, ExLlamaV2Tokenizer
    config = ExLlamaV2Config(smollm2_gguf)
    assert config.gguf_file is not None and config.gguf_file.all_metadata() == read_gguf_metadata(smollm2_gguf)
    from_file = gguf_tokenizer.tokenizer_from_gguf(smollm2_gguf).tokenizer
    monkeypatch.setattr(gguf_tokenizer, "read_gguf_metadata",
                        lambda path: pytest.fail(f"the header of {path} was read again"))
    tok = ExLlamaV2Tokenizer(config)
    text = "Hello, world! Ünïcödé and numbers 12345."
    assert tok.encode(text)[0].tolist() == from_file.encode(text, add_special_tokens=False).ids
