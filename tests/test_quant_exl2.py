"""EXL2 format: bitstream packing, hand-built test vectors, naive-loop dequantisation, validation errors."""

import pytest
import torch

from exllamav2.quant.exl2 import (
    EXL2_WIDTHS, QuantFormatError, exl2_codes, exl2_dequantize, exl2_group_map, exl2_pack, parse_q_groups, read_exl2,
)

U32 = 0xFFFFFFFF


def stream_words(values, bits):
    """Independent writer: a little-endian bitstream as a Python int, cut into 32-bit words."""
    stream = 0
    for i, v in enumerate(values):
        stream |= int(v) << (i * bits)
    nwords = -(-len(values) * bits // 32)
    return [(stream >> (32 * j)) & U32 for j in range(nwords)]


def read_stream(words, index, bits, start_word=0):
    """Independent generic bit reader over a column of uint32 words."""
    stream = 0
    for j, w in enumerate(words[start_word:]):
        stream |= (int(w) & U32) << (32 * j)
    return (stream >> (index * bits)) & ((1 << bits) - 1)


def make_exl2(groups, out, seed=0, perm=True):
    g = torch.Generator().manual_seed(seed)
    n_in = sum(r for _, r in groups)
    codes = torch.cat([torch.randint(0, 1 << b, (r, out), generator=g) for b, r in groups])
    scale_codes = torch.randint(0, 16, (len(groups), out), generator=g)
    scale_max = (torch.rand(len(groups), generator=g) * 0.1 + 0.01).half()
    p = torch.randperm(n_in, generator=g) if perm else None
    return exl2_pack(codes, groups, scale_codes, scale_max, p), codes, scale_codes, scale_max, p


@pytest.mark.parametrize("bits", EXL2_WIDTHS)
def test_pack_unpack_round_trip_every_width(bits):
    rows = 64 if bits != 2 else 48  # 2-bit sections may end on 16 rows
    groups = [(bits, 32)] * (rows // 32) + ([(bits, 16)] if rows % 32 else [])
    t, codes, *_ = make_exl2(groups, 40, seed=bits)
    e = read_exl2(t, "layer", rows, 40)
    assert t["q_weight"].shape == (rows * bits // 32, 64)
    assert torch.equal(exl2_codes(e)[:, :40], codes)
    # the padded columns hold the zero point
    assert (exl2_codes(e)[:, 40:] == 1 << (bits - 1)).all()
    # every column's words equal an independent bitstream writer's, group by group
    col = 7
    words = t["q_weight"][:, col].tolist()
    start = 0
    for gi, (b, r) in enumerate(groups):
        expect = stream_words(codes[sum(x for _, x in groups[:gi]):][:r, col].tolist(), b)
        assert [w & U32 for w in words[start:start + len(expect)]] == expect
        start += len(expect)


@pytest.mark.parametrize("bits,index,words", [
    (3, 10, [0xC0000000, 0x1, 0x0]),        # 3-bit value 10 takes stream bits 30..32
    (3, 21, [0x0, 0x80000000, 0x3]),        # 3-bit value 21 takes bits 63..65
    (5, 6, [0xC0000000, 0x7, 0, 0, 0]),     # 5-bit value 6 takes bits 30..34
    (5, 25, [0, 0, 0, 0xE0000000, 0x3]),    # 5-bit value 25 takes bits 125..129
    (6, 5, [0xC0000000, 0xF, 0]),           # 6-bit value 5 takes bits 30..35
    (4, 3, [0x0000F000]),                   # 4-bit nibble 3
    (8, 2, [0x00FF0000]),                   # 8-bit byte 2
    (2, 15, [0xC0000000]),                  # 2-bit field 15
])
def test_hand_built_straddling_vectors(bits, index, words):
    rows = {8: 4, 6: 16, 5: 32, 4: 8, 3: 32, 2: 16}[bits]
    codes = torch.zeros(rows, 32, dtype=torch.int64)
    codes[index, 0] = (1 << bits) - 1
    t = exl2_pack(codes, [(bits, rows)], torch.zeros(1, 32, dtype=torch.int64), torch.ones(1).half())
    assert [w & U32 for w in t["q_weight"][:, 0].tolist()] == words
    assert read_stream(words, index, bits) == (1 << bits) - 1
    assert torch.equal(exl2_codes(read_exl2(t, "l"))[:, 0], codes[:, 0])


def test_mixed_widths_with_permutation_match_naive_loop():
    groups = [(8, 32), (4, 32), (4, 32), (3, 32)]
    out = 24
    t, *_ = make_exl2(groups, out, seed=3)
    got = exl2_dequantize(t, "m", out_features=out)  # fp16, (out, in)
    assert got.shape == (out, 128) and got.dtype == torch.float16

    # naive: read everything back from the raw tensors with the independent bit reader
    qw = t["q_weight"]
    qg = t["q_groups"].tolist()
    inv = t["q_invperm"].tolist()
    sc_words = t["q_scale"]
    smax = (t["q_scale_max"] * (1 / 256)).tolist()  # fp16 pre-multiply, as the original's loader
    bounds, k0 = [], 0
    for gi in range(len(qg) // 2):
        b, start = qg[2 * gi], qg[2 * gi + 1]
        nxt = qg[2 * gi + 3] if 2 * gi + 3 < len(qg) else qw.shape[0]
        rows = (nxt - start) * 32 // b
        bounds.append((k0, k0 + rows, b, start))
        k0 += rows
    expect = torch.empty(out, 128, dtype=torch.float16)
    for r in range(128):
        k = inv[r]
        gi, (lo, hi, b, start) = next((i, x) for i, x in enumerate(bounds) if x[0] <= k < x[1])
        for n in range(out):
            q = read_stream(qw[:, n].tolist(), k - lo, b, start_word=start)
            code = (int(sc_words[gi, n // 8]) >> (4 * (n % 8))) & 15
            scale = torch.tensor(float((code + 1) ** 2) * smax[gi]).half()
            expect[n, r] = (torch.tensor(float(q - (1 << (b - 1)))) * scale.float()).half()
    assert torch.equal(got, expect)

    w32 = exl2_dequantize(t, "m", dtype=torch.float32, out_features=out)
    assert torch.allclose(w32, got.float(), rtol=2e-3, atol=1e-6)


def test_group_map_matches_definition():
    t, *_ = make_exl2([(6, 32), (4, 64), (2, 16)], 32, perm=False)
    e = read_exl2(t, "g")
    gm = exl2_group_map(e.layout).view(-1, 2).tolist()
    expect = [[0, 32 - j] for j in range(32)] + [[1, 64 - j] for j in range(64)] + [[2, 16 - j] for j in range(16)]
    assert gm == expect


def test_unpermuted_identity_and_bias():
    t, codes, *_ = make_exl2([(4, 32)], 32, perm=False)
    t["bias"] = torch.arange(32).half()
    e = read_exl2(t, "b", 32, 32)
    assert torch.equal(e.q_perm, torch.arange(32)) and torch.equal(e.bias, torch.arange(32).half())


def _bad(mutate, match, in_features=64, out_features=32):
    t, *_ = make_exl2([(4, 32), (3, 32)], 32)
    mutate(t)
    with pytest.raises(QuantFormatError, match=match):
        read_exl2(t, "model.layers.0.mlp.up_proj", in_features, out_features)


def test_error_widths_not_descending():
    _bad(lambda t: t.__setitem__("q_groups", torch.tensor([3, 0, 4, 3], dtype=torch.int16)),
         r"up_proj\.q_groups: bit widths must be in descending order")


def test_error_unknown_width():
    _bad(lambda t: t.__setitem__("q_groups", torch.tensor([7, 0, 3, 4], dtype=torch.int16)),
         r"up_proj\.q_groups: unknown bit width")


def test_error_invperm_not_permutation():
    def m(t):
        t["q_invperm"][0] = t["q_invperm"][1]
    _bad(m, r"up_proj\.q_invperm: expected a permutation")


def test_error_q_scale_shape():
    _bad(lambda t: t.__setitem__("q_scale", t["q_scale"][:1]), r"up_proj\.q_scale: shape")


def test_error_q_scale_max_shape():
    _bad(lambda t: t.__setitem__("q_scale_max", t["q_scale_max"][:1]), r"up_proj\.q_scale_max: shape")


def test_error_rows_do_not_add_up():
    # 96 input features for groups that hold 64 rows
    _bad(lambda t: t.__setitem__("q_invperm", torch.arange(96, dtype=torch.int32)), r"up_proj\.q_groups: row counts do not add up",
         in_features=None)


def test_error_in_features_disagree():
    _bad(lambda t: None, r"up_proj\.q_invperm: length 64", in_features=80)


def test_error_group_not_whole_rows():
    # a 5-bit group of 3 q_weight rows is 19.2 rows
    _bad(lambda t: t.__setitem__("q_groups", torch.tensor([5, 0, 3, 3], dtype=torch.int16)), r"up_proj\.q_groups: group 0")


def test_error_missing_tensor_and_bad_width():
    _bad(lambda t: t.pop("q_scale_max"), r"up_proj\.q_scale_max")
    _bad(lambda t: None, r"up_proj\.q_weight: width 32", out_features=64)


def test_parse_q_groups_rejects_odd_length():
    with pytest.raises(QuantFormatError, match=r"x\.q_groups"):
        parse_q_groups(torch.tensor([4, 0, 3], dtype=torch.int16), 4, 32, "x")
