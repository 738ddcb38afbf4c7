"""The `triton` backend's GGUF kernels (exllamav2/ops/triton/gguf_kernels.py, gguf_linear.py) under the Triton
interpreter on CPU tensors: every block type decoded bit for bit as gguf-py's own `gguf.quants.dequantize`, the
matmul equal to the torch backend's dequantise-then-matmul (few rows fused, many rows through the dequantised
scratch matrix), fused parts, split-K, ragged shapes, batch invariance, resident bytes and bad input.
fp16 activations (the interpreter's bf16 tl.dot multiplies bit patterns; one bf16 check goes through the
kernel's fp32 dot). The interpreter is slow (~0.5 s per call here), so shapes stay at a few tiles."""

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from exllamav2 import ops  # noqa: E402
from exllamav2.gguf import GGUFFile  # noqa: E402
from exllamav2.ops.cpu import kernels as cpu_kernels  # noqa: E402
from exllamav2.quant.gguf import GgufWeight  # noqa: E402
from exllamav2.quant.gguf_blocks import LATTICE_TYPES  # noqa: E402
from test_gguf_support import write_tiny_gguf  # noqa: E402

TYPES = ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "IQ4_NL", "IQ4_XS",
         # the lattice types, re-encoded as 4-bit table blocks by the CPU kernels (GgufWeight.device_blocks)
         "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M"]
F16 = torch.float16
UP = "model.layers.0.mlp.up_proj.weight"        # (ffn, hidden)
DOWN = "model.layers.0.mlp.down_proj.weight"    # (hidden, ffn)


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One tiny one-layer model per block type: hidden 256, ffn 512, q/k/v 256/128/128 rows."""
    root = tmp_path_factory.mktemp("gguf_triton")
    return {t: GGUFFile(write_tiny_gguf(str(root / f"{t}.gguf"), qtype=t, hidden=256, heads=4, kv_heads=2,
                                        ffn=512, layers=1, seed=TYPES.index(t)))
            for t in TYPES}


def weight(src, *names, dtype=F16):
    parts = [(src, n, src.shape(n)[0]) for n in names]
    k = src.shape(names[0])[1]
    return GgufWeight("+".join(n.split(".")[-2] for n in names), parts, k, sum(p[2] for p in parts), dtype, "cpu",
                      fast_path=False)


def kernels_for(q, dtype=F16):
    with ops.use_backend("triton"):
        fast = ops.prepare_linear(None, None, q, "cpu", dtype)
    with ops.use_backend("torch"):
        ref = ops.prepare_linear(None, None, q, "cpu", dtype)
    assert fast.backend == "triton" and ref.backend == "torch"
    return fast, ref


def inputs(rows, k, seed=0, dtype=F16):
    return torch.randn(rows, k, generator=torch.Generator().manual_seed(seed)).to(dtype)


def assert_close(got, ref, rel=2e-3):
    """fp16 outputs of the same fp16-rounded weights, summed in different orders."""
    got, ref = got.float(), ref.float()
    assert got.shape == ref.shape
    assert torch.isfinite(got).all()
    assert (got - ref).abs().max().item() <= rel * ref.abs().max().item(), (got - ref).abs().max().item()


@pytest.mark.parametrize("qtype", TYPES)
def test_blocks_decode_as_gguf_dequantize(files, qtype):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    src = files[qtype]
    if qtype in LATTICE_TYPES and not cpu_kernels.ready():
        pytest.skip("the lattice types reach the Triton kernels through the CPU kernels, which cannot build here")
    fast, _ = kernels_for(weight(src, DOWN))
    assert fast.qtype == qtype and src.ggml_type(DOWN) == qtype
    # the (in, out) matrix the many-row path multiplies by, in fp32: no rounding after gguf-py's own arithmetic
    w = torch.empty(fast.in_features, fast.out_features, dtype=torch.float32)
    fast._launch_dequant(w)
    _, raw, shape = src.raw(DOWN)
    expected = torch.from_numpy(np.ascontiguousarray(dequantize(raw, GGMLQuantizationType[qtype]))).reshape(shape)
    assert torch.equal(w.t(), expected)
    # the reader (the torch reference and a dense load read through it) dequantises the same
    assert torch.equal(src.get_tensor(DOWN, dtype=torch.float32), expected)


@pytest.mark.parametrize("qtype", TYPES)
def test_matmul_equals_dequantise_then_matmul(files, qtype):
    if qtype in LATTICE_TYPES and not cpu_kernels.ready():
        pytest.skip("the lattice types reach the Triton kernels through the CPU kernels, which cannot build here")
    # down: K = 512 split in two parts (4 column tiles); up: 8 column tiles, one part
    for name, rows in ((DOWN, (1, 17)), (UP, (3, 40))):
        fast, ref = kernels_for(weight(files[qtype], name))
        if name == DOWN:
            assert fast.splits == 2
        for m in rows:  # 40 > DENSE_ROWS: dequantised into the scratch matrix, then one matmul
            x = inputs(m, fast.in_features, seed=m)
            assert_close(fast(x), ref(x))


def test_kernel_tile_shapes_up_to_1024(tmp_path):
    src = GGUFFile(write_tiny_gguf(str(tmp_path / "wide.gguf"), qtype="Q4_K", hidden=256, heads=4, kv_heads=2,
                                   ffn=1024, layers=1))
    fast, ref = kernels_for(weight(src, DOWN))
    assert (fast.in_features, fast.out_features, fast.splits) == (1024, 256, 4)
    x = inputs(2, 1024)
    assert_close(fast(x), ref(x))


def test_ragged_shapes_mask_the_last_tiles(tmp_path):
    # K = 224 (3.5 tiles of 64), N = 160 (2.5 tiles): the masked tails must add nothing
    src = GGUFFile(write_tiny_gguf(str(tmp_path / "ragged.gguf"), qtype="Q4_1", hidden=160, heads=5, kv_heads=1,
                                   ffn=224, layers=1))
    fast, ref = kernels_for(weight(src, DOWN))
    assert (fast.in_features, fast.out_features) == (224, 160)
    for m in (5, 36):
        x = inputs(m, 224, seed=m)
        assert_close(fast(x), ref(x))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q5_K"])
def test_fused_parts_share_one_kernel(files, qtype):
    src = files[qtype]
    names = [f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"]
    parts = [weight(src, n) for n in names]
    fused = GgufWeight.concat("qkv", parts, F16, "cpu")
    fast, ref = kernels_for(fused)
    assert fast.out_features == 512 and fast.nbytes() == fused.file_bytes() == sum(p.file_bytes() for p in parts)
    x = inputs(4, 256)
    y = fast(x)
    assert_close(y, ref(x))
    # each part's rows are its own: the fused output is the parts' outputs side by side
    own = torch.cat([kernels_for(p)[1](x) for p in parts], dim=1)
    assert_close(y, own)


def test_fused_parts_of_different_types(files):
    # a Q4_K_M file's q/k in Q4_K beside v in Q6_K: one kernel per run of one type, the outputs side by side
    parts = [weight(files[t], f"model.layers.0.self_attn.{p}_proj.weight")
             for t, p in (("Q4_K", "q"), ("Q4_K", "k"), ("Q6_K", "v"))]
    fused = GgufWeight.concat("qkv", parts, F16, "cpu")
    assert [r.types for r in fused.runs_by_type()] == [["Q4_K", "Q4_K"], ["Q6_K"]]
    fast, ref = kernels_for(fused)
    assert [k.qtype for k in fast.runs] == ["Q4_K", "Q6_K"] and fast.nbytes() == fused.file_bytes()
    x = inputs(2, 256)
    assert_close(fast(x), ref(x))
    # mixes of 32-weight block types stay apart (each keeps its own CPU kernel)
    for a, b in (("Q4_0", "Q8_0"), ("Q5_0", "Q8_0"), ("Q5_1", "Q4_1"), ("IQ4_NL", "Q4_0")):
        assert GgufWeight.concat("qk", [weight(files[a], DOWN), weight(files[b], DOWN)], F16, "cpu") is None
    # one beside a 256-weight block type is fused (the CPU runs it dense, triton one kernel per type)
    for a, b in (("Q5_0", "Q4_K"), ("IQ4_NL", "Q3_K"), ("Q8_0", "IQ4_XS")):
        mixed = GgufWeight.concat("qk", [weight(files[a], DOWN), weight(files[b], DOWN)], F16, "cpu")
        assert mixed is not None and mixed.types == [a, b] and mixed.dense_on_cpu
    fast, ref = kernels_for(mixed)
    assert [k.qtype for k in fast.runs] == ["Q8_0", "IQ4_XS"]
    x = inputs(2, 512)
    assert_close(fast(x), ref(x))


@pytest.mark.parametrize("qtype", ["Q4_0", "Q6_K"])
def test_rows_do_not_depend_on_the_batch(files, qtype):
    fast, _ = kernels_for(weight(files[qtype], DOWN))
    assert fast.splits > 1
    x = inputs(20, fast.in_features, seed=7)
    assert fast.dense_rows >= 20    # every call below takes the fused path
    together = fast(x)
    for i in (0, 15, 16, 19):   # first and last rows of the 16-row tiles
        assert torch.equal(fast(x[i:i + 1]), together[i:i + 1])
    assert torch.equal(fast(x[3:9]), together[3:9])


def test_bf16_activations(files):
    fast, ref = kernels_for(weight(files["Q4_K"], UP, dtype=torch.bfloat16), torch.bfloat16)
    x = inputs(3, 256, dtype=torch.bfloat16)
    # the interpreter truncates fp32 -> bf16 where a GPU rounds: the weights differ in their last bit
    assert_close(fast(x), ref(x), rel=2e-2)


def test_resident_weight_is_the_file_blocks(files):
    q = weight(files["Q4_K"], UP)
    fast, _ = kernels_for(q)
    fast(inputs(1, 256))
    assert fast.blocks.dtype == torch.uint8 and tuple(fast.blocks.shape) == (512, 256 // 256 * 144)
    assert fast.nbytes() == q.file_bytes() == 512 * 144
    assert sum(t.numel() * t.element_size() for t in fast.resident_tensors()) == q.file_bytes()
    assert q._dense is None  # the reference's dense copy was never made


def test_bad_input_is_named(files):
    q = weight(files["Q6_K"], UP)
    fast, _ = kernels_for(q)
    with pytest.raises(ValueError, match=r"up_proj: input of shape \[2, 100\], expected \(rows, 256\)"):
        fast(torch.zeros(2, 100, dtype=F16))
    with pytest.raises(ValueError, match="prepared for torch.float16"):
        fast(torch.zeros(2, 256, dtype=torch.float32))
    from exllamav2.ops.triton import kernels
    why = kernels("gguf_linear").prepare(q, None, torch.device("cpu"), torch.float32)
    assert isinstance(why, str) and "float16 or bfloat16" in why


class _CutBlocks:
    """A GGUF source whose tensor `name` holds two bytes per row less than its shape needs (in its byte count
    too, unless `honest_count` is False)."""

    def __init__(self, src, name, honest_count=True):
        self.src, self.name, self.honest_count = src, name, honest_count

    def __getattr__(self, attr):
        return getattr(self.src, attr)

    def nbytes(self, key):
        cut = key == self.name and self.honest_count
        return self.src.nbytes(key) - (2 * self.src.shape(key)[0] if cut else 0)

    def raw(self, key):
        t, data, shape = self.src.raw(key)
        return (t, data[:, :-2], shape) if key == self.name else (t, data, shape)


@pytest.mark.parametrize("qtype", ["Q5_0", "Q2_K", "Q3_K", "IQ4_NL", "IQ4_XS"])
def test_block_bytes_that_do_not_match_the_shape_are_refused(files, qtype):
    from exllamav2.quant.gguf_blocks import BLOCK_GEOMETRY
    src = files[qtype]
    block, block_bytes = BLOCK_GEOMETRY[qtype]
    row = 256 // block * block_bytes
    with pytest.raises(ValueError, match=rf"up: tensor '{UP}' \({qtype}, 512 x 256\) holds {512 * (row - 2)} "
                                         rf"bytes, expected {512 * row}"):
        GgufWeight("up", [(_CutBlocks(src, UP), UP, 512)], 256, 512, F16, "cpu")
    # a byte count that matches but blocks that do not are refused where the blocks are read
    q = GgufWeight("up", [(_CutBlocks(src, UP, honest_count=False), UP, 512)], 256, 512, F16, "cpu")
    with pytest.raises(ValueError, match=rf"tensor '{UP}' \({qtype}, shape \[512, 256\]\) holds "
                                         rf"\[512, {row - 2}\] bytes"):
        kernels_for(q)
