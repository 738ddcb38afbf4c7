"""The Triton attention kernels (exllamav2/ops/triton/attention.py) under Triton's interpreter, against the torch
reference (ops/torch_ref/attention.py): contiguous and paged, GQA/MQA/MHA, softcap, sliding window, masks, mixed
prefill/decode batches, several page sizes and head dims, split-KV decode, batch invariance, and a tiny model's
greedy generation through the dynamic generator with the triton backend pinned.

fp16 throughout the kernel checks: the interpreter's tl.dot is wrong on bf16 inputs (the kernels upcast then)."""

from __future__ import annotations

import sys

import pytest
import torch

from exllamav2 import ops
from exllamav2.attn_params import PagedParams
from exllamav2.ops.torch_ref import attention as ref
from triton_devices import kdev  # noqa: F401  (the fixture)

pytest.importorskip("triton")

F16 = torch.float16
from triton_devices import ATTN_KERNELS as KERNELS


@pytest.fixture
def interp(monkeypatch):
    """TRITON_INTERPRET=1 for this test only; the kernel module is re-imported under it (@triton.jit decides at
    decoration time whether a kernel is interpreted) and dropped afterwards."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    sys.modules.pop(KERNELS, None)
    ops.set_backend(None)
    yield
    sys.modules.pop(KERNELS, None)
    ops.set_backend(None)


def _triton(op, *args):
    with ops.use_backend("triton"):
        assert op.choose(*args).backend == "triton"
        return op(*args)


def _torch(op, *args):
    with ops.use_backend("torch"):
        return op(*args)


# ---------------------------------------------------------------------------------------------- contiguous

CONTIG = [
    # b, hq, hk, s, t, d, softcap, causal
    (2, 4, 2, 1, 37, 64, 0.0, False),      # GQA decode
    (2, 8, 1, 1, 700, 128, 0.0, False),    # MQA decode over three KV splits
    (1, 8, 2, 20, 50, 128, 30.0, True),    # prompt continuing a prefix, softcap
    (2, 4, 4, 70, 70, 64, 0.0, True),      # MHA prompt, several query tiles
    (1, 2, 1, 3, 40, 256, 0.0, True),      # Gemma's head dim, speculative-decode length
    (1, 4, 2, 1, 300, 80, 50.0, False),    # head dim that is not a power of two
]


@pytest.mark.parametrize("b,hq,hk,s,t,d,softcap,causal", CONTIG)
def test_contiguous_equals_reference(kdev, b, hq, hk, s, t, d, softcap, causal):
    g = torch.Generator().manual_seed(b * 1000 + s * 10 + d)
    q, k, v = (torch.randn(b, h, n, d, generator=g, dtype=F16).to(kdev) for h, n in ((hq, s), (hk, t), (hk, t)))
    args = (q, k, v, None, d ** -0.5, softcap, causal)
    got = _triton(ops.attention, *args)
    expect = ref.attention(q.float(), k.float(), v.float(), None, d ** -0.5, softcap, causal)
    assert got.dtype == F16 and got.shape == q.shape
    torch.testing.assert_close(got.float(), expect, atol=2e-3, rtol=2e-3)


def test_contiguous_mask_and_fp32(kdev):
    """A bool mask (left padding, window) broadcast or per row; fp32 inputs agree to fp32 rounding."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, h, n, 16, generator=g).to(kdev) for h, n in ((4, 5), (2, 9), (2, 9)))
    mask = torch.rand(2, 1, 5, 9, generator=g) > 0.3
    mask[..., 0] = True
    mask = mask.to(kdev)
    for m in (mask, mask[:1]):
        for cap in (0.0, 20.0):
            args = (q, k, v, m, 0.25, cap, False)
            torch.testing.assert_close(_triton(ops.attention, *args), _torch(ops.attention, *args),
                                       atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match=r"mask of shape \(2, 1, 5, 8\)"):
        _triton(ops.attention, q, k, v, mask[..., :8], 0.25, 0.0, False)


def test_contiguous_rows_are_batch_invariant(kdev):
    """A batch row's decode output is bit-identical alone and in a batch."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(3, h, n, 64, generator=g, dtype=F16).to(kdev) for h, n in ((4, 1), (2, 520), (2, 520)))
    both = _triton(ops.attention, q, k, v, None, 0.125, 0.0, False)
    for i in range(3):
        alone = _triton(ops.attention, q[i:i + 1], k[i:i + 1], v[i:i + 1], None, 0.125, 0.0, False)
        assert torch.equal(alone[0], both[i])


# ---------------------------------------------------------------------------------------------- paged

def _paged_case(seed, past_lens, q_lens, page, hq, hk, d, spare_pages=3, dtype=F16, device="cpu"):
    """Random q/k/v for the packed tokens, a cache of scattered pages with random old contents, and the
    PagedParams (block tables are a random permutation of the pages, so most sequences are gathered)."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-(p + q) // page) for p, q in zip(past_lens, q_lens)]
    n_pages = sum(need) + spare_pages
    perm = torch.randperm(n_pages, generator=g).tolist()
    tables, at = [], 0
    for n in need:
        tables.append(perm[at:at + n])
        at += n
    T = sum(q_lens)
    q = torch.randn(1, T, hq, d, generator=g, dtype=dtype)
    k = torch.randn(1, T, hk, d, generator=g, dtype=dtype)
    v = torch.randn(1, T, hk, d, generator=g, dtype=dtype)
    kp = torch.randn(1, n_pages * page, hk, d, generator=g, dtype=dtype)  # page-major, as cache.py
    vp = torch.randn(1, n_pages * page, hk, d, generator=g, dtype=dtype)
    return (*(t.to(device) for t in (q, k, v, kp, vp)), PagedParams(tables, past_lens, q_lens, page, device=device))


def _check_paged(q, k, v, kp, vp, params, window, softcap, atol=2e-3):
    kr, vr, kt, vt = kp.clone(), vp.clone(), kp.clone(), vp.clone()
    scale = q.shape[-1] ** -0.5
    expect = ref.paged_attention(q.float(), k.float(), v.float(), kr, vr, params, window, scale, softcap)
    got = _triton(ops.paged_attention, q, k, v, kt, vt, params, window, scale, softcap)
    assert torch.equal(kt, kr) and torch.equal(vt, vr), "the K/V write differs from the reference"
    assert got.shape == (1, params.seq_len, q.shape[2] * q.shape[3]) and got.dtype == q.dtype
    torch.testing.assert_close(got.float(), expect, atol=atol, rtol=atol)
    return got


PAGED = [
    # page, hq, hk, d, window, softcap, past_lens, q_lens
    (16, 8, 2, 64, 0, 0.0, [0, 40, 17, 300], [21, 1, 3, 1]),       # prefill + decode + spec decode, mixed
    (16, 4, 4, 128, 0, 0.0, [5, 600], [1, 1]),                     # MHA decode, three splits
    (32, 8, 1, 64, 24, 0.0, [0, 70, 9], [40, 1, 2]),               # MQA, sliding window cuts the prefix
    (256, 4, 2, 128, 0, 30.0, [100, 0], [1, 18]),                  # big pages (one page, sliced), softcap
    (64, 4, 2, 256, 0, 50.0, [130, 3], [1, 20]),                   # Gemma-like: head dim 256, softcap
    (16, 6, 2, 96, 40, 20.0, [290, 20], [1, 30]),                  # head dim 96, window + softcap together
]


@pytest.mark.parametrize("page,hq,hk,d,window,softcap,past,qlen", PAGED)
def test_paged_equals_reference(kdev, page, hq, hk, d, window, softcap, past, qlen):
    case = _paged_case(page + d + len(past), past, qlen, page, hq, hk, d, device=kdev)
    _check_paged(*case, window, softcap)


def test_paged_bf16(kdev):
    """bf16 (the CPU default): the interpreter runs the dots in fp32 (its bf16 tl.dot is wrong), the probabilities
    are rounded to bf16 before P @ V as on a GPU."""
    case = _paged_case(9, [30, 0, 290], [1, 20, 2], 16, 4, 2, 64, dtype=torch.bfloat16, device=kdev)
    _check_paged(*case, 0, 0.0, atol=2e-2)


def test_prefill_switch_to_sdpa(interp, monkeypatch):
    """EXLLAMAV2_TRITON_PREFILL=sdpa: prompts go to torch SDPA / the reference's per-sequence path, decode rows
    stay on the kernel; both ops still equal the reference. A wrong value is an error naming the variable."""
    monkeypatch.setenv("EXLLAMAV2_TRITON_PREFILL", "sdpa")
    _check_paged(*_paged_case(21, [0, 40, 300], [30, 1, 2], 16, 4, 2, 64), 0, 0.0)
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, h, 24, 32, generator=g, dtype=F16) for h in (4, 2, 2))
    torch.testing.assert_close(_triton(ops.attention, q, k, v, None, 0.2, 0.0, True),
                               ref.attention(q, k, v, None, 0.2, 0.0, True), atol=0, rtol=0)
    monkeypatch.setenv("EXLLAMAV2_TRITON_PREFILL", "flash")
    with pytest.raises(ValueError, match="EXLLAMAV2_TRITON_PREFILL='flash'"):
        _triton(ops.attention, q, k, v, None, 0.2, 0.0, True)


def test_paged_consecutive_pages_and_fp32(kdev):
    """Pages in order (the reference reads a slice) and fp32 throughout: fp32 rounding only."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 4, h, 32, generator=g).to(kdev) for h in (4, 2, 2))
    kp, vp = (torch.randn(1, 8 * 16, 2, 32, generator=g).to(kdev) for _ in range(2))
    params = PagedParams([[2, 3, 4], [6]], [37, 0], [1, 3], 16, device=kdev)
    assert params.sequences[0].slot_start == 32
    _check_paged(q, k, v, kp, vp, params, 0, 0.0, atol=2e-5)


def test_paged_sequence_is_batch_invariant(kdev):
    """Each sequence's rows are bit-identical alone and packed with others (decode, spec decode and prefill)."""
    past, qlen, page = [300, 0, 45, 9], [1, 19, 1, 4], 16
    q, k, v, kp, vp, params = _paged_case(7, past, qlen, page, 8, 2, 64, device=kdev)
    together = _triton(ops.paged_attention, q, k, v, kp.clone(), vp.clone(), params, 0, 0.125, 0.0)
    tables = [params.block_index[i, :int(params.num_pages[i])].tolist() for i in range(len(past))]
    start = 0
    for i, (p, n) in enumerate(zip(past, qlen)):
        alone_params = PagedParams([tables[i]], [p], [n], page, device=kdev)
        sl = slice(start, start + n)
        alone = _triton(ops.paged_attention, q[:, sl], k[:, sl], v[:, sl], kp.clone(), vp.clone(), alone_params, 0,
                        0.125, 0.0)
        assert torch.equal(alone, together[:, sl]), f"sequence {i} changed when batched"
        start += n


def test_multi_token_rows_equal_single_token_decode(kdev):
    """A 4-token block (speculative verification) gives each row the bits that row gets decoded alone: keys past
    a row's position are masked to exact zeros and the split boundaries depend on the length bucket only."""
    past, page = 290, 16
    q, k, v, kp, vp, params = _paged_case(13, [past], [4], page, 8, 2, 64, device=kdev)
    block = _triton(ops.paged_attention, q, k, v, kp, vp, params, 0, 0.125, 0.0)
    table = params.block_index[0].tolist()
    for i in range(4):
        one = PagedParams([table], [past + i], [1], page, device=kdev)
        row = _triton(ops.paged_attention, q[:, i:i + 1], k[:, i:i + 1], v[:, i:i + 1], kp, vp, one, 0, 0.125, 0.0)
        assert torch.equal(row, block[:, i:i + 1]), f"row {i}"


def test_paged_decode_params_from_device_tensors(kdev):
    """Decode-only params built from device tensors (paged_attn.PagedDecodeParams)."""
    from exllamav2 import paged_attn
    q, k, v, kp, vp, params = _paged_case(11, [40, 513, 0], [1, 1, 1], 16, 4, 2, 64, device=kdev)
    dec = paged_attn.PagedDecodeParams(params.block_index, torch.tensor([40, 513, 0], device=kdev), 16, 1024)
    kr, vr = kp.clone(), vp.clone()
    expect = ref.paged_attention(q.float(), k.float(), v.float(), kr, vr, params, 0, 0.125, 0.0)
    got = _triton(ops.paged_attention, q, k, v, kp, vp, dec, 0, 0.125, 0.0)
    assert torch.equal(kp, kr)
    torch.testing.assert_close(got.float(), expect, atol=2e-3, rtol=2e-3)


@pytest.mark.slow
def test_paged_decode_compiles_as_one_graph(interp):
    """The decode-only path is one custom op: torch.compile(fullgraph=True) traces a step through it without a
    graph break, and a new step (other lengths, same shapes) runs without recompiling."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from exllamav2 import paged_attn
    q, k, v, kp, vp, params = _paged_case(12, [40, 300], [1, 1], 16, 4, 2, 32, spare_pages=4)

    def step(q, k, v, kp, vp, block_index, past):
        dec = paged_attn.PagedDecodeParams(block_index, past, 16, 1024)
        return ops.paged_attention(q, k, v, kp, vp, dec, 0, 0.125, 0.0)

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    with ops.use_backend("triton"):
        for past in ([40, 300], [41, 301]):  # the second step's pages are the first's (the tables have room)
            kr, vr = kp.clone(), vp.clone()
            ps = PagedParams([params.block_index[i, :int(params.num_pages[i])].tolist() for i in range(2)], past,
                             [1, 1], 16)
            expect = ref.paged_attention(q.float(), k.float(), v.float(), kr, vr, ps, 0, 0.125, 0.0)
            got = compiled(q, k, v, kp, vp, params.block_index, torch.tensor(past))
            assert torch.equal(kp, kr) and torch.equal(vp, vr)
            torch.testing.assert_close(got.float(), expect, atol=2e-3, rtol=2e-3)
    assert counter.frame_count == 1


def test_quantized_cache_is_declined(interp):
    q, k, v, kp, vp, params = _paged_case(3, [4], [1], 16, 4, 2, 64)
    why = ops.paged_attention.impls["triton"].declines(q, k, v, kp.to(torch.uint8), vp, params, 0, 0.1)
    assert "uint8" in why and "quantized" in why
    with ops.use_backend("triton"):
        with pytest.raises(ops.NoBackendError, match="paged_attention.*uint8"):
            ops.paged_attention(q, k, v, kp.to(torch.uint8), vp.to(torch.uint8), params, 0, 0.1)


def test_cpu_tensors_declined_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.zeros(1, 2, 1, 16)
    assert "TRITON_INTERPRET" in ops.attention.impls["triton"].declines(q, q, q, None, 1.0)


# ---------------------------------------------------------------------------------------------- a model

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from test_dynamic_tiny import build_tiny_dir, load_tiny
    return load_tiny(build_tiny_dir(tmp_path_factory.mktemp("tiny_triton_attn")))


def _with_triton_attention(monkeypatch, on: bool):
    """The Triton attention kernels on or off, everything else as it was: the other ops have no Triton kernel on
    the CPU, so the backend order is left as it is and the interpreter switched on and off (pinning triton would
    refuse the norms)."""
    if on:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET")
    ops.set_backend(None)  # forget the cached choices


def test_dynamic_generator_greedy_equals_torch_backend(interp, monkeypatch, tiny_model):
    """A tiny Llama (GQA, head dim 16, fp32) through the dynamic generator, three prompts batched: the same greedy
    tokens with the Triton attention kernels as without them."""
    from exllamav2 import ExLlamaV2Cache
    from exllamav2.generator.dynamic import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob
    from exllamav2.generator.sampler import ExLlamaV2Sampler
    from test_dynamic_tiny import PAGE

    model, tok = tiny_model
    # the first forward packs all three prompts: the long one (21 tokens) runs as a whole-sequence prefill, the
    # short ones as split sequences (at most attn_meta.DECODE_MAX_Q tokens), as the decode steps after it
    prompts = ["The capital of France is", "1, 2",
               "Once upon a time, in a land far away, there lived a dragon who loved old books and tea"]

    def generate(triton_on: bool):
        _with_triton_attention(monkeypatch, triton_on)
        gen = ExLlamaV2DynamicGenerator(model, ExLlamaV2Cache(model, 1, 16 * PAGE), tok, page_size=PAGE,
                                        max_chunk_size=32)
        jobs = [ExLlamaV2DynamicJob(tok.encode(p), 6, gen_settings=ExLlamaV2Sampler.Settings.greedy())
                for p in prompts]
        gen.enqueue(jobs)
        while gen.num_remaining_jobs():
            gen.iterate()
        used = {impl.backend for impl in ops.paged_attention.cache.values()}
        assert used == ({"triton"} if triton_on else {"cpu"})
        return [j.new_token_ids for j in jobs]

    expect = generate(False)
    assert generate(True) == expect


def test_contiguous_cache_forward_with_padding_equals_torch_backend(interp, monkeypatch, tiny_model):
    """model.forward over a contiguous cache, batch 2 with a left-padded row (bool mask), a 20-token prompt then
    two decode steps: the attention op's Triton kernel gives the same logits as the reference, to fp32 rounding."""
    from exllamav2 import ExLlamaV2Cache

    model, _ = tiny_model
    ids = torch.randint(0, 49152, (2, 22), generator=torch.Generator().manual_seed(4))
    offsets = torch.tensor([[0], [-3]])
    mask = torch.arange(22).unsqueeze(0) >= (-offsets)

    def run(triton_on: bool):
        _with_triton_attention(monkeypatch, triton_on)
        cache = ExLlamaV2Cache(model, batch_size=2, max_seq_len=32)
        kw = dict(input_mask=mask, position_offsets=offsets)
        out = [model.forward(ids[:, :20], cache, **kw)]
        out += [model.forward(ids[:, i:i + 1], cache, **kw) for i in (20, 21)]
        assert {impl.backend for impl in ops.attention.cache.values()} == ({"triton"} if triton_on else {"cpu"})
        return torch.cat(out, 1)

    expect = run(False)
    torch.testing.assert_close(run(True), expect, atol=1e-4, rtol=1e-4)
