"""The cpu backend's paged decode attention (exllamav2/ops/cpu/csrc/attention.cpp: `paged_decode_attention`), one new
token per sequence over a page-major cache in one C++ call, against what the decode-only paged path computed before
it: `attend_sequence` (exllamav2/ops/torch_ref/attention.py) per sequence, i.e. the decode-attention kernel over the
sequence's (1, hk, kv_len, d) slot view (consecutive pages) or gathered slots (other pages), with the sliding window
as a bool mask. Bit for bit: the compiled paged step and the eager packed forward must give the same tokens
(tests/test_decode_runner.py). Also checked against the same math in fp64, so that equality is not only to itself."""

from __future__ import annotations

import pytest
import torch

from exllamav2 import ops
from exllamav2.ops.cpu import attention as cpu_attention
from exllamav2.ops.cpu import kernels
from exllamav2.ops.torch_ref import attention as ref_attention
from exllamav2.ops.torch_ref.attention import attend_sequence, window_mask
from exllamav2.paged_attn import PagedDecodeParams

if not (kernels.ready() and kernels.isa() == "avx512"):
    pytest.skip("the paged decode kernel needs the CPU kernels built and AVX-512", allow_module_level=True)

from test_cpu_attention import close  # noqa: E402  (its tolerance: exact output and weighted mean of |v|)

op = torch.ops.exllamav2_cpu.paged_decode_attention


class Paged:
    """A random page-major cache and the block tables of sequences of the given lengths: consecutive pages per
    sequence, or every page at a random place; the table rows padded past each sequence's pages with -1 (never
    read)."""

    def __init__(self, lens, page_size, hq, hk, d, dtype, scattered, seed=0, spare_pages=3):
        g = torch.Generator().manual_seed(seed)
        self.lens, self.page_size = lens, page_size
        need = [-(-n // page_size) for n in lens]
        total = sum(need) + spare_pages
        order = torch.randperm(total, generator=g).tolist() if scattered else list(range(total))
        width = max(need) + 2
        self.block_index = torch.full((len(lens), width), -1, dtype=torch.long)
        at = 0
        for i, n in enumerate(need):
            self.block_index[i, :n] = torch.tensor(order[at:at + n])
            at += n
        self.kflat = torch.randn(total * page_size, hk, d, generator=g).to(dtype)
        self.vflat = torch.randn(total * page_size, hk, d, generator=g).to(dtype)
        self.q = torch.randn(len(lens), hq, d, generator=g).to(dtype)
        self.kv_lens = torch.tensor(lens, dtype=torch.long)

    def slots(self, i):
        pos = torch.arange(self.lens[i])
        return self.block_index[i][pos // self.page_size] * self.page_size + pos % self.page_size

    def kernel(self, window=0, scale=0.125, softcap=0.0, rows=None):
        rows = range(len(self.lens)) if rows is None else rows
        rows = torch.tensor(list(rows))
        return op(self.q[rows], self.kflat, self.vflat, self.block_index[rows], self.kv_lens[rows], self.page_size,
                  window, scale, softcap)

    def attend_sequence(self, i, window=0, scale=0.125, softcap=0.0):
        """Sequence i as the decode-only path attended before: a slot view when its pages are consecutive."""
        n, slots = self.lens[i], self.slots(i)
        consecutive = torch.equal(slots, torch.arange(n) + slots[0])
        out = attend_sequence(self.q[i:i + 1].unsqueeze(2), self.kflat, self.vflat, n,
                              int(slots[0]) if consecutive else None, None if consecutive else slots,
                              window_mask(n, 1, window, "cpu"), scale, softcap)
        return out[0, 0]

    def exact(self, i, window=0, scale=0.125, softcap=0.0):
        slots = self.slots(i)
        q, k, v = self.q[i].double(), self.kflat[slots].double(), self.vflat[slots].double()
        rep = q.shape[0] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)   # (n, hq, d)
        scores = torch.einsum("hd,nhd->hn", q, k) * scale
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        if window and self.lens[i] > window:
            scores[:, :self.lens[i] - window] = float("-inf")
        p = scores.softmax(-1)
        return torch.einsum("hn,nhd->hd", p, v), torch.einsum("hn,nhd->hd", p, v.abs())


LENS = [1, 17, 128, 129, 300, 700]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("page_size", [16, 256])
@pytest.mark.parametrize("scattered", [False, True])
@pytest.mark.parametrize("hq,hk,d", [(9, 3, 64), (8, 8, 128), (4, 1, 256), (16, 2, 48)])
def test_each_sequence_equals_attend_sequence_bit_for_bit(dtype, page_size, scattered, hq, hk, d):
    p = Paged(LENS, page_size, hq, hk, d, dtype, scattered, seed=page_size + hq)
    for window, softcap in ((0, 0.0), (100, 0.0), (0, 30.0), (250, 30.0)):
        got = p.kernel(window, 0.1, softcap)
        assert got.dtype == dtype and got.shape == p.q.shape
        for i in range(len(LENS)):
            want = p.attend_sequence(i, window, 0.1, softcap)
            assert torch.equal(got[i], want), (i, LENS[i], window, softcap, (got[i].float() - want.float()).abs().max())
            exact = p.exact(i, window, 0.1, softcap)
            assert close(got[i], exact, dtype), (i, window, softcap, (got[i].double() - exact[0]).abs().max())


@pytest.mark.parametrize("page_size", [1, 48, 100, 384])
def test_page_sizes_that_do_not_divide_the_splits(page_size):
    """A 128-key split across page boundaries anywhere (and pages longer than a split)."""
    for scattered in (False, True):
        p = Paged([3, 130, 385, 999], page_size, 9, 3, 64, torch.bfloat16, scattered, seed=page_size)
        got = p.kernel(window=300)
        for i in range(4):
            assert torch.equal(got[i], p.attend_sequence(i, window=300)), (scattered, i)


def test_the_python_op_and_the_kernel_agree():
    """The decode-only custom op (the path without the kernels) and the kernel, on one call."""
    p = Paged([5, 260, 1000, 33], 16, 9, 3, 64, torch.bfloat16, True, seed=7)
    want = torch.ops.exllamav2.paged_decode_attention(p.q, p.kflat, p.vflat, p.block_index, p.kv_lens, 16, 200,
                                                      0.125, 0.0)
    assert torch.equal(p.kernel(200), want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_sequence_gives_the_same_bits_alone_among_others_and_on_any_thread_count(dtype):
    lens = [37, 300, 1000, 2100, 129, 1]
    p = Paged(lens, 16, 9, 3, 64, dtype, True, seed=11)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            together = p.kernel(window=500)
            for i in range(len(lens)):
                assert torch.equal(p.kernel(window=500, rows=[i])[0], together[i]), (n, i)
                others = [j for j in range(len(lens)) if j != i][:2]
                assert torch.equal(p.kernel(window=500, rows=[*others, i])[2], together[i]), (n, i)
            results.append(together)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])


def test_a_page_shared_by_two_sequences():
    """Two sequences reading the same prefix pages (the generator's prefix reuse) and their own last page."""
    p = Paged([40, 40], 16, 4, 2, 32, torch.bfloat16, False, seed=2)
    p.block_index[1, :2] = p.block_index[0, :2]
    got = p.kernel()
    for i in range(2):
        assert torch.equal(got[i], p.attend_sequence(i))


def test_paged_attention_decode_branch_calls_the_kernel_in_one_graph():
    """ops.paged_attention with PagedDecodeParams (the compiled paged step's call) takes the kernel on CPU tensors,
    traced by dynamo with no graph break, and gives the Python op's result."""
    p = Paged([3, 90, 40], 16, 9, 3, 64, torch.bfloat16, True, seed=3)
    past = p.kv_lens - 1
    k_pages, v_pages = p.kflat.unsqueeze(0), p.vflat.unsqueeze(0)
    seen = []

    def backend(gm, example_inputs):
        seen.append(str(gm.graph))
        return gm.forward

    def step(q, block_index, past):
        params = PagedDecodeParams(block_index, past, 16, 4096)
        return ref_attention.paged_attention(q, None, None, k_pages, v_pages, params, 64, 0.125, 0.0)

    q = p.q.unsqueeze(0)
    with torch.inference_mode():
        want = torch.ops.exllamav2.paged_decode_attention(p.q, p.kflat, p.vflat, p.block_index, p.kv_lens, 16, 64,
                                                          0.125, 0.0).reshape(1, 3, -1)
        assert torch.equal(step(q, p.block_index, past), want)
        got = torch.compile(step, backend=backend, fullgraph=True, dynamic=False)(q, p.block_index, past)
    assert torch.equal(got, want)
    assert len(seen) == 1 and "exllamav2_cpu.paged_decode_attention" in seen[0]
    assert "exllamav2.paged_decode_attention" not in seen[0].replace("exllamav2_cpu.", "")
    # without the cpu backend, the Python op runs (attend_sequence then takes torch's SDPA: close, not equal)
    with ops.use_backend("torch"), torch.inference_mode():
        ref = step(q, p.block_index, past)
        assert torch.equal(ref, torch.ops.exllamav2.paged_decode_attention(
            p.q, p.kflat, p.vflat, p.block_index, p.kv_lens, 16, 64, 0.125, 0.0).reshape(1, 3, -1))
    assert (ref.float() - want.float()).norm() <= 1e-2 * want.float().norm()


def test_the_kernel_declines_what_attend_sequence_would_not_send_it():
    q = torch.randn(2, 4, 64)
    kf = torch.randn(32, 2, 64)
    bi, lens = torch.zeros(2, 2, dtype=torch.long), torch.ones(2, dtype=torch.long)
    assert cpu_attention.takes_paged_decode(q, kf, kf, bi, lens)
    assert not cpu_attention.takes_paged_decode(q, kf.bfloat16(), kf.bfloat16(), bi, lens)  # a conversion first
    assert not cpu_attention.takes_paged_decode(q[..., :40], kf[..., :40], kf[..., :40], bi, lens)
    assert not cpu_attention.takes_paged_decode(q.double(), kf.double(), kf.double(), bi, lens)
    qg = q.clone().requires_grad_()
    assert not cpu_attention.takes_paged_decode(qg, kf, kf, bi, lens)


def test_bad_inputs_are_refused_naming_the_argument():
    p = Paged([20, 40], 16, 4, 2, 32, torch.float32, False, seed=1)
    args = dict(q=p.q, kflat=p.kflat, vflat=p.vflat, block_index=p.block_index, kv_lens=p.kv_lens)

    def call(**kw):
        a = {**args, **kw}
        return op(a["q"], a["kflat"], a["vflat"], a["block_index"], a["kv_lens"], kw.get("page_size", 16),
                  kw.get("sliding_window", 0), 0.1, 0.0)

    call()
    with pytest.raises(RuntimeError, match=r"block_index has 5 pages per sequence; sequence 1 needs 7"):
        call(kv_lens=torch.tensor([20, 100]))
    bad = p.block_index.clone()
    bad[1, 2] = p.kflat.shape[0] // 16
    with pytest.raises(RuntimeError, match=r"block_index\[1, 2\] = 8 reads slots past the cache's 128"):
        call(block_index=bad)
    bad[1, 2] = -1
    with pytest.raises(RuntimeError, match=r"block_index\[1, 2\] = -1"):
        call(block_index=bad)
    # the last page only needs the slots its positions use: a partial last page may end at the cache's end
    short = p.kflat[:p.kflat.shape[0] - 8]
    ok = p.block_index.clone()
    ok[1, 2] = short.shape[0] // 16  # 40 keys: page 2 holds positions 32..39, slots up to its start + 7
    call(kflat=short, vflat=p.vflat[:short.shape[0]], block_index=ok)
    with pytest.raises(RuntimeError, match=r"kflat and vflat must have q's dtype Float, got BFloat16"):
        call(kflat=p.kflat.bfloat16(), vflat=p.vflat.bfloat16())
    with pytest.raises(RuntimeError, match=r"q must be float32, bfloat16 or float16, got Double"):
        call(q=p.q.double(), kflat=p.kflat.double(), vflat=p.vflat.double())
    with pytest.raises(RuntimeError, match=r"block_index must be int64 \(2, pages\), got Int"):
        call(block_index=p.block_index.int())
    with pytest.raises(RuntimeError, match=r"kv_lens must be int64 \(2\), got Long \[3\]"):
        call(kv_lens=torch.tensor([1, 2, 3]))
    with pytest.raises(RuntimeError, match=r"kv_lens\[0\] = 0, expected >= 1"):
        call(kv_lens=torch.tensor([0, 40]))
    with pytest.raises(RuntimeError, match=r"q must be \(sequences, q heads, head_dim\)"):
        call(q=p.q.unsqueeze(2))
    with pytest.raises(RuntimeError, match=r"kflat and vflat must be \(slots, kv heads, head_dim\) of one shape"):
        call(vflat=p.vflat[:-1])
    with pytest.raises(RuntimeError, match=r"4 query heads are not a multiple of 3 kv heads"):
        call(kflat=p.kflat.repeat(1, 2, 1)[:, :3], vflat=p.vflat.repeat(1, 2, 1)[:, :3])
    with pytest.raises(RuntimeError, match=r"page_size must be positive, got 0"):
        call(page_size=0)
    with pytest.raises(RuntimeError, match=r"sliding_window must be >= 0"):
        call(sliding_window=-1)


def test_the_compiled_decode_write_goes_straight_into_the_cache():
    """paged_attention writes k/v into the (1, slots, hk, d) caches themselves: traced through a [0] view, the
    functionalized graph wrote the view back with select_scatter, which inductor ran as a copy of the layer's whole
    cache and back every step (~1 ms of a ~7 ms SmolLM2 step at 512 positions)."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified
    graphs = []

    def backend(gm, example_inputs):
        def forward_compiler(g, inputs):
            graphs.append(str(g.graph))
            return make_boxed_func(g.forward)
        return aot_module_simplified(gm, example_inputs, fw_compiler=forward_compiler)

    g = torch.Generator().manual_seed(4)
    k_pages, v_pages = torch.randn(2, 1, 64, 2, 32, generator=g).bfloat16()
    eager_k, eager_v = k_pages.clone(), v_pages.clone()

    def step(q, k, v, block_index, past, k_pages, v_pages):
        params = PagedDecodeParams(block_index, past, 16, 4096)
        return ref_attention.paged_attention(q, k, v, k_pages, v_pages, params, 0, 0.125, 0.0)

    q = torch.randn(1, 2, 4, 32, generator=g).bfloat16()
    k, v = torch.randn(2, 1, 2, 2, 32, generator=g).bfloat16()
    block_index, past = torch.tensor([[0, 1], [3, 2]]), torch.tensor([5, 20])
    with torch.inference_mode():
        want = step(q, k, v, block_index, past, eager_k, eager_v)
        got = torch.compile(step, backend=backend, fullgraph=True)(q, k, v, block_index, past, k_pages, v_pages)
    assert torch.equal(got, want) and torch.equal(k_pages, eager_k) and torch.equal(v_pages, eager_v)
    assert torch.equal(k_pages[0, 2 * 16 + 4], k[0, 1]) and torch.equal(v_pages[0, 5], v[0, 0])  # past 20, 5
    assert len(graphs) == 1 and graphs[0].count("aten.index_copy.default") == 2
    assert "scatter" not in graphs[0] and "exllamav2_cpu.paged_decode_attention" in graphs[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scattered", [False, True])
@pytest.mark.parametrize("window", [0, 20])
def test_a_packed_step_of_single_tokens_takes_the_kernel_bit_for_bit(dtype, scattered, window):
    """The dynamic generator's eager packed forward (paged_attn.PagedParams) with one new token per sequence runs
    all sequences in the one C++ call, giving exactly the per-sequence path's bits."""
    from exllamav2.paged_attn import PagedParams
    lens, page_size, hq, hk, d = [1, 17, 40, 64, 33], 16, 6, 2, 64
    p = Paged(lens, page_size, hq, hk, d, dtype, scattered, seed=5)
    tables = [p.block_index[i, :-(-n // page_size)].tolist() for i, n in enumerate(lens)]
    params = PagedParams(tables, [n - 1 for n in lens], [1] * len(lens), page_size)
    assert params.decode_only and params.kv_lens.tolist() == lens
    q = p.q.unsqueeze(0)  # (1, B, hq, d): the packed tokens
    kp, vp = p.kflat.unsqueeze(0), p.vflat.unsqueeze(0)
    calls = []
    real = cpu_attention.paged_decode
    cpu_attention.paged_decode = lambda *a: calls.append(1) or real(*a)
    try:
        fast = ref_attention.paged_attention(q, None, None, kp, vp, params, window, 0.125)
        params.decode_only = False
        slow = ref_attention.paged_attention(q, None, None, kp, vp, params, window, 0.125)
    finally:
        cpu_attention.paged_decode = real
    assert calls == [1], "the single-token packed step must take the one-call kernel"
    assert fast.shape == slow.shape == (1, len(lens), hq * d)
    assert torch.equal(fast, slow)
    qs = [1] + [2] * (len(lens) - 1)
    mixed = PagedParams(tables, [n - q for n, q in zip(lens, qs)], qs, page_size)
    assert not mixed.decode_only
