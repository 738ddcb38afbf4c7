"""Quantized paged KV caches (cache_q.py through the `quant_paged_attention` op): the reference
(ops/torch_ref/attention_quant.py) against attention over the dequantised cache, the Triton kernel
(ops/triton/attention_quant.py, K_FMT / V_FMT in attn_kernels.py) under the interpreter against the reference for
each format pair (Q4, Q6 = K8/V4, Q8, FP8) with GQA, softcap, sliding windows, several sequences of different
lengths on scattered pages, and the decode-only path; then the dynamic generator with quantized caches on a tiny
random model (head dim 32): each job's greedy tokens alone equal the batch's, and the Q8 cache stays close to the
fp cache.

fp16 in the kernel checks: the interpreter's tl.dot is wrong on bf16 inputs (the kernels upcast then)."""

from __future__ import annotations


import pytest
import torch

from exllamav2 import ops
from exllamav2.attn_params import PagedParams
from exllamav2.ops.torch_ref import attention as ref
from exllamav2.ops.torch_ref import attention_quant as refq
from exllamav2.ops.torch_ref.kv_quant import QuantPages, format_named, hadamard_rotate
from triton_devices import kdev  # noqa: F401  (the fixture)

F16 = torch.float16
# (key format, value format) of ExLlamaV2Cache_Q4, _Q6, _Q8 and _8bit
FORMAT_PAIRS = [("q4", "q4"), ("q8", "q4"), ("q8", "q8"), ("fp8", "fp8")]


def _case(seed, formats, past_lens, q_lens, page, hq, hk, d, dtype=F16, device="cpu", spare_pages=3):
    """Random packed q/k/v, a quantized cache of scattered pages with random old contents (block tables are a random
    permutation of the pages), and the PagedParams."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-(p + q) // page) for p, q in zip(past_lens, q_lens)]
    n_pages = sum(need) + spare_pages
    perm = torch.randperm(n_pages, generator=g).tolist()
    tables, at = [], 0
    for n in need:
        tables.append(perm[at:at + n])
        at += n
    T = sum(q_lens)
    q, k, v = (torch.randn(1, T, h, d, generator=g, dtype=dtype).to(device) for h in (hq, hk, hk))
    kf, vf = format_named(formats[0]), format_named(formats[1])
    old = torch.randn(2, n_pages * page, hk, d, generator=g)  # page-major (slots, kv_heads, head_dim)
    old[0, :, :, 3] *= 10  # an outlier channel in the keys, as real keys have
    kc, ks = kf.quantize(old[0].to(dtype), dtype)
    vc, vs = vf.quantize(old[1].to(dtype), dtype)
    mv = lambda t: None if t is None else t.to(device)  # noqa: E731
    pages = QuantPages(mv(kc), mv(ks), mv(vc), mv(vs), kf, vf, dtype)
    return q, k, v, pages, PagedParams(tables, past_lens, q_lens, page, device=device)


def _clone(p: QuantPages) -> QuantPages:
    c = lambda t: None if t is None else t.clone()  # noqa: E731
    return QuantPages(c(p.k_codes), c(p.k_scales), c(p.v_codes), c(p.v_scales), p.k_format, p.v_format, p.dtype)


def _same_codes(a: QuantPages, b: QuantPages) -> bool:
    return all((x is None and y is None) or torch.equal(x, y)
               for x, y in ((a.k_codes, b.k_codes), (a.k_scales, b.k_scales), (a.v_codes, b.v_codes),
                            (a.v_scales, b.v_scales)))


# ---------------------------------------------------------------------------------------------- the reference


def test_hadamard_rotation_is_the_sylvester_matrix():
    h = torch.ones(1, 1)
    for _ in range(5):
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    x = torch.randn(7, 96, dtype=torch.float64)
    torch.testing.assert_close(hadamard_rotate(x), (x.view(7, 3, 32) @ h.double()).view(7, 96))
    torch.testing.assert_close(hadamard_rotate(hadamard_rotate(x)) / 32, x)


@pytest.mark.parametrize("formats", FORMAT_PAIRS, ids=lambda f: f"{f[0]}-{f[1]}")
def test_reference_equals_attention_over_the_dequantised_cache(formats):
    """The reference writes the new tokens' codes into exactly their slots (the same codes as quantising them
    alone) and each sequence reads exactly its pages: the result equals the plain paged reference over the whole
    cache dequantised after the write."""
    q, k, v, pages, params = _case(1, formats, [0, 40, 17, 300], [21, 1, 3, 1], 16, 8, 2, 64, dtype=torch.float32)
    before = _clone(pages)
    got = refq.quant_paged_attention(q, k, v, pages, params, 24, 0.125, 30.0)
    # only the written slots changed, each to its token's codes
    slots = params.slots
    kq, ksc = pages.k_format.quantize(k[0], torch.float32)
    assert torch.equal(pages.k_codes[slots], kq)
    keep = torch.ones(pages.k_codes.shape[0], dtype=torch.bool)
    keep[slots] = False
    assert torch.equal(pages.k_codes[keep], before.k_codes[keep])
    assert torch.equal(pages.v_codes[keep], before.v_codes[keep])
    kd, vd = pages.read(slice(None), torch.float32)
    # the plain reference writes its k/v into the cache: give it the new tokens as their codes read back
    kn, vn = (t[slots].unsqueeze(0) for t in (kd, vd))
    expect = ref.paged_attention(q, kn, vn, kd.unsqueeze(0), vd.unsqueeze(0), params, 24, 0.125, 30.0)
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)


def test_reference_decode_op_equals_packed_path():
    """The decode-only custom op (PagedDecodeParams: device tensors, one token per sequence) gives the packed
    path's bits."""
    from exllamav2.paged_attn import PagedDecodeParams
    q, k, v, pages, params = _case(2, ("q8", "q4"), [40, 513, 0], [1, 1, 1], 16, 4, 2, 64)
    packed_pages = _clone(pages)
    expect = refq.quant_paged_attention(q, k, v, packed_pages, params, 0, 0.125, 0.0)
    dec = PagedDecodeParams(params.block_index, torch.tensor([40, 513, 0]), 16, 1024)
    got = refq.quant_paged_attention(q, k, v, pages, dec, 0, 0.125, 0.0)
    assert _same_codes(pages, packed_pages)
    assert torch.equal(got, expect)


# ---------------------------------------------------------------------------------------------- the kernel


def _check(q, k, v, pages, params, window, softcap, atol=2e-3):
    """The Triton op against the reference (run in fp32 on the same codes): the same codes written, outputs within
    `atol`. fp16 K/V and q' = H q / 32 are rounded to fp16 before the kernel's dots, where the reference rounds the
    dequantised K/V once."""
    pr, pt = _clone(pages), _clone(pages)
    scale = q.shape[-1] ** -0.5
    expect = refq.quant_paged_attention(q.float(), k, v, pr, params, window, scale, softcap)
    with ops.use_backend("triton"):
        assert ops.quant_paged_attention.choose(q, k, v, pt, params, window, scale, softcap).backend == "triton"
        got = ops.quant_paged_attention(q, k, v, pt, params, window, scale, softcap)
    assert _same_codes(pt, pr), "the K/V write differs from the reference"
    assert got.shape == (1, params.seq_len, q.shape[2] * q.shape[3]) and got.dtype == q.dtype
    torch.testing.assert_close(got.float(), expect.to(got.device), atol=atol, rtol=atol)
    return got, pt


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_write_kernel_gives_the_reference_codes(kdev, dtype):
    """attn_kv_quant.kv_quant_write: the reference's codes and scales bit for bit, for 4 and 8 bits, head dim 96
    (three groups), 37 rows (not a multiple of a program's rows), outliers, an all-zero group, values at the
    dtype's range, slots out of order."""
    from exllamav2.ops.triton.attention_quant import write
    g = torch.Generator().manual_seed(3)
    T, hk, d, n = 37, 3, 96, 64
    x = torch.randn(T, hk, d, generator=g) * 2
    x[:, :, 7] *= 40
    x[5, 1, 32:64] = 0.0
    x[6, 0, :32] = torch.finfo(dtype).max / 64 if dtype != torch.float32 else 1e30
    slots = torch.randperm(n, generator=g)[:T].to(kdev)
    x = x.to(dtype).to(kdev)
    for kf, vf in (("q4", "q8"), ("q8", "q4")):
        pages = _case(0, (kf, vf), [0], [n], n, 1, hk, d, dtype=dtype, device=kdev, spare_pages=0)[3]
        expect = _clone(pages)
        expect.write(x, x.flip(0), slots)
        write(pages, x, x.flip(0), slots)
        assert _same_codes(pages, expect), (kf, vf)


KERNEL_CASES = [
    # page, hq, hk, d, window, softcap, past_lens, q_lens
    (16, 8, 2, 64, 0, 0.0, [0, 40, 17, 300], [21, 1, 3, 1]),      # prefill + decode + spec decode, GQA
    (32, 8, 1, 64, 24, 0.0, [0, 70, 9], [40, 1, 2]),              # MQA, sliding window cuts the prefix
    (64, 4, 2, 128, 0, 30.0, [600, 3], [1, 20]),                  # three KV splits, softcap
    (16, 6, 2, 96, 40, 20.0, [290, 20], [1, 30]),                 # head dim 96 (three groups), window + softcap
]


@pytest.mark.parametrize("formats", FORMAT_PAIRS, ids=lambda f: f"{f[0]}-{f[1]}")
@pytest.mark.parametrize("page,hq,hk,d,window,softcap,past,qlen", KERNEL_CASES)
def test_kernel_equals_reference(kdev, formats, page, hq, hk, d, window, softcap, past, qlen):
    case = _case(page + d + len(past), formats, past, qlen, page, hq, hk, d, device=kdev)
    _check(*case, window, softcap)


def test_kernel_bf16(kdev):
    """bf16 activations and scales (the CPU default): the interpreter runs the dots in fp32."""
    case = _case(9, ("q4", "q4"), [30, 0, 290], [1, 20, 2], 16, 4, 2, 64, dtype=torch.bfloat16, device=kdev)
    _check(*case, 0, 0.0, atol=2e-2)


def test_kernel_decode_only_path(kdev):
    """PagedDecodeParams (the compiled / graph-captured step): the custom op equals the reference."""
    from exllamav2.paged_attn import PagedDecodeParams
    q, k, v, pages, params = _case(11, ("q8", "q8"), [40, 513, 0], [1, 1, 1], 16, 4, 2, 64, device=kdev)
    pr, pt = _clone(pages), _clone(pages)
    expect = refq.quant_paged_attention(q.float(), k, v, pr, params, 0, 0.125, 0.0)
    dec = PagedDecodeParams(params.block_index, torch.tensor([40, 513, 0], device=kdev), 16, 1024)
    with ops.use_backend("triton"):
        got = ops.quant_paged_attention(q, k, v, pt, dec, 0, 0.125, 0.0)
    assert _same_codes(pt, pr)
    torch.testing.assert_close(got.float(), expect, atol=2e-3, rtol=2e-3)


def test_kernel_sequence_is_batch_invariant(kdev):
    """Each sequence's rows are bit-identical alone and packed with others."""
    past, qlen, page = [300, 0, 45], [1, 19, 1], 16
    q, k, v, pages, params = _case(7, ("q4", "q4"), past, qlen, page, 8, 2, 64, device=kdev)
    with ops.use_backend("triton"):
        together = ops.quant_paged_attention(q, k, v, _clone(pages), params, 0, 0.125, 0.0)
        tables = [params.block_index[i, :int(params.num_pages[i])].tolist() for i in range(len(past))]
        start = 0
        for i, (p, n) in enumerate(zip(past, qlen)):
            sl = slice(start, start + n)
            alone = ops.quant_paged_attention(q[:, sl], k[:, sl], v[:, sl], _clone(pages),
                                              PagedParams([tables[i]], [p], [n], page, device=kdev), 0, 0.125, 0.0)
            assert torch.equal(alone, together[:, sl]), f"sequence {i} changed when batched"
            start += n


# ---------------------------------------------------------------------------------------------- the generator


@pytest.fixture(scope="module")
def tiny32(tmp_path_factory):
    """A tiny random Llama (GQA 4/2, head dim 32, fp32) with SmolLM2's tokenizer."""
    from test_dynamic_tiny import build_tiny_dir, load_tiny
    return load_tiny(build_tiny_dir(tmp_path_factory.mktemp("tiny_llama_hd32"), head_dim=32))


PROMPTS = ["The capital of France is", "1, 2",
           "Once upon a time, in a land far away, there lived a dragon who loved old books and tea"]


def _generate(model, tok, cache_cls, prompts, max_new=10):
    from exllamav2.generator.dynamic import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob
    from exllamav2.generator.sampler import ExLlamaV2Sampler
    gen = ExLlamaV2DynamicGenerator(model, cache_cls(model, 1, 16 * 16), tok, page_size=16, max_chunk_size=32)
    jobs = [ExLlamaV2DynamicJob(tok.encode(p), max_new, gen_settings=ExLlamaV2Sampler.Settings.greedy())
            for p in prompts]
    gen.enqueue(jobs)
    while gen.num_remaining_jobs():
        gen.iterate()
    return [j.new_token_ids for j in jobs]


@pytest.mark.parametrize("cache_name", ["ExLlamaV2Cache_Q8", "ExLlamaV2Cache_Q4"])
def test_dynamic_generator_jobs_alone_equal_batched(tiny32, cache_name):
    """Three prompts (one long enough to be read as a prefill beside the others' decode) batched give each job the
    tokens it gets alone."""
    from exllamav2 import cache as cache_mod
    model, tok = tiny32
    cls = getattr(cache_mod, cache_name)
    together = _generate(model, tok, cls, PROMPTS)
    for i, p in enumerate(PROMPTS):
        assert _generate(model, tok, cls, [p])[0] == together[i], f"job {i} changed when batched"


def test_dynamic_generator_q8_close_to_fp_cache(tiny32):
    """A packed forward (three sequences: a prompt chunk beside decode rows, scattered pages) with the Q8 cache
    against the fp cache: logits within 3.5% (relative norm; test_cache_q.py measured the seed path's Q8 at
    1.5-2.2%) and the same argmax on every row; greedy generation gives the fp cache's tokens."""
    from exllamav2 import ExLlamaV2Cache
    from exllamav2.cache import ExLlamaV2Cache_Q8
    from exllamav2.generator.dynamic import ExLlamaV2DynamicGenerator
    model, tok = tiny32
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 49152, (1, n), generator=g) for n in (37, 5, 20)]
    tables, feed = [[5, 0, 7], [3], [1, 6]], [1, 1, 3]
    past = [s.shape[1] - f for s, f in zip(seqs, feed)]

    def logits(cache):
        gen = ExLlamaV2DynamicGenerator(model, cache, None, page_size=16)
        for s, t, p in zip(seqs, tables, past):
            gen._forward(s[:, :p], PagedParams([t], [0], [p], 16), torch.tensor([p - 1]))
        ids = torch.cat([s[:, p:] for s, p in zip(seqs, past)], 1)
        return gen._forward(ids, PagedParams(tables, past, feed, 16), torch.arange(ids.shape[1]))

    fp, q8 = logits(ExLlamaV2Cache(model, 1, 8 * 16)), logits(ExLlamaV2Cache_Q8(model, 1, 8 * 16))
    assert float((q8 - fp).norm() / fp.norm()) < 0.035
    assert torch.equal(q8.argmax(-1), fp.argmax(-1))
    assert _generate(model, tok, ExLlamaV2Cache_Q8, PROMPTS, 8) == _generate(model, tok, ExLlamaV2Cache, PROMPTS, 8)


def test_dynamic_generator_triton_equals_torch_backend(kdev, tiny32, monkeypatch):
    """The same three jobs with the Q6 cache (K8/V4) through the Triton kernel and through the reference: the same
    greedy tokens."""
    from exllamav2.cache import ExLlamaV2Cache_Q6
    if kdev != "cpu":
        pytest.skip("the tiny model is on the CPU")
    model, tok = tiny32

    def run(on: bool):
        monkeypatch.setenv("TRITON_INTERPRET", "1" if on else "0")
        ops.set_backend(None)
        out = _generate(model, tok, ExLlamaV2Cache_Q6, PROMPTS, 6)
        used = {impl.backend for impl in ops.quant_paged_attention.cache.values()}
        assert used == ({"triton"} if on else {"cpu"})
        return out

    assert run(True) == run(False)


# ---------------------------------------------------------------------------------------------- the decode step


def _random_quant_cache(model, cls, seed: int, n: int = 256):
    cache = cls(model, 1, n)
    g = torch.Generator().manual_seed(seed)
    for t in cache.all_tensors():
        if t.dtype == torch.uint8:
            # FP8 bytes 0x7c-0x7f / 0xfc-0xff are inf / nan: keep the exponent below the top
            t.copy_(torch.randint(0, 256, t.shape, generator=g).to(torch.uint8) & (0xBF if cls.k_format.name == "fp8"
                                                                                    else 0xFF))
        else:
            t.copy_(torch.rand(t.shape, generator=g) * 0.05)
    return cache


@pytest.mark.parametrize("cache_name", ["ExLlamaV2Cache_Q4", "ExLlamaV2Cache_8bit"])
def test_static_decode_step_equals_packed_forward(tiny32, cache_name):
    """The decode-only step the compiled / CUDA-graph runner replays (runtime/cuda_graphs.py, here on its static
    buffers without a capture) over a quantized cache gives the packed forward's logits and writes the same codes,
    for several numbers of sequences and scattered pages."""
    from exllamav2 import cache as cache_mod
    from exllamav2.generator.dynamic_draft import _eager
    from exllamav2.runtime.cuda_graphs import GraphedDecode
    model, _ = tiny32
    cls = getattr(cache_mod, cache_name)
    ps, pages = 16, 16
    a, b = _random_quant_cache(model, cls, 1), _random_quant_cache(model, cls, 1)
    graphs = GraphedDecode(model, progress=False)
    g = torch.Generator().manual_seed(0)
    # counts that fill their bucket (1, 2, 4): a count of 3 runs the 4-row graph whose spare row rewrites the first
    # sequence's slot, and this fp32 model's dense CPU linears (MKL) may give that copy other last bits than the
    # row itself, so its codes are compared to tolerance only (on a GPU the Triton linears compute each row alone)
    with torch.inference_mode():
        for n in (2, 4, 1, 3):
            past = torch.randint(0, 60, (n,), generator=g)
            table = torch.randperm(pages, generator=g)[:n * 4].view(n, 4)
            ids = torch.randint(0, 1000, (1, n), generator=g)
            got = graphs(a, ids, table, past, ps)
            params = PagedParams(table.tolist(), past.tolist(), [1] * n, ps)
            want = _eager(model, b, ids, params, torch.arange(n), None)
            if n != 3:
                assert torch.equal(got, want), f"{n} sequences"
            else:  # the spare row's k/v may differ in the last bits and flip a code at a rounding boundary
                torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            assert torch.equal(got.argmax(-1), want.argmax(-1))
            if n != 3:
                assert all(torch.equal(x, y) for x, y in zip(a.all_tensors(), b.all_tensors())), f"{n} sequences"
    assert sum(not torch.equal(x, y) for x, y in zip(a.all_tensors(), b.all_tensors())) <= \
        2 * model.config.num_hidden_layers  # at most the first sequence's k/v codes of the last step


@pytest.mark.slow
def test_compiled_paged_step_with_a_quantized_cache(tiny32):
    """model.compile_decode(paged=True): the dynamic generator's decode steps over a Q4 cache run the compiled step
    (one graph, the reference's decode op inside) and give the eager generator's greedy tokens (~30 s compile)."""
    from exllamav2.cache import ExLlamaV2Cache_Q4
    model, tok = tiny32
    eager = _generate(model, tok, ExLlamaV2Cache_Q4, PROMPTS, 10)
    runner = model.compile_decode(max_seq_len=256, progress=False, paged=True)
    try:
        assert _generate(model, tok, ExLlamaV2Cache_Q4, PROMPTS, 10) == eager
        steps = runner.paged._steps
        assert runner.paged.failed is None and steps and all(s.done for s in steps.values())
    finally:
        model.decode_runner = None


@pytest.mark.slow
def test_triton_decode_op_compiles_as_one_graph(kdev):
    """The Triton decode-only path over quantized pages traces without a graph break (the write is plain torch
    ops, the launch one custom op), and a second step with other lengths runs without recompiling."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from exllamav2.paged_attn import PagedDecodeParams
    q, k, v, pages, params = _case(12, ("q8", "q4"), [40, 300], [1, 1], 16, 4, 2, 64, device=kdev, spare_pages=4)

    def step(q, k, v, pages, block_index, past):
        return ops.quant_paged_attention(q, k, v, pages, PagedDecodeParams(block_index, past, 16, 1024), 0, 0.125)

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    with ops.use_backend("triton"):
        for past in ([40, 300], [41, 301]):
            pr = _clone(pages)
            ps = PagedParams([params.block_index[i, :int(params.num_pages[i])].tolist() for i in range(2)], past,
                             [1, 1], 16, device=kdev)
            expect = refq.quant_paged_attention(q.float(), k, v, pr, ps, 0, 0.125, 0.0)
            got = compiled(q, k, v, pages, params.block_index, torch.tensor(past, device=kdev))
            assert _same_codes(pages, pr)
            torch.testing.assert_close(got.float(), expect, atol=2e-3, rtol=2e-3)
    assert counter.frame_count == 1
