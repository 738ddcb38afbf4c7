"""The seed API's decode over quantized caches (cache_q.py): the cache's rows seen as one paged cache
(runtime/cuda_graphs.py: FlatQuantCache), decoded by the paged step that reads the codes inside attention. On a GPU
that step is captured (here: the same step eagerly on its static buffers, GraphedDecode without a capture); on the
CPU it is the compiled paged step (runtime/decode.py: _quantized), and the eager seed step's decode reads the codes
through the same CPU kernel (attn.py: _attend_quant_decode). Each attends a step's own token as stored, as the
dynamic generator does. The plumbing is compared bit for bit with the packed forward over the same view; the CPU
kernel, which reads the codes in fp32 where the reference's attention reads them rounded to the activation dtype,
stays close to that reference; eager and graphed decode agree; compiled, the paged step gives its uncompiled tokens."""

from __future__ import annotations

import pytest
import torch

from exllamav2 import ExLlamaV2Cache_8bit, ExLlamaV2Cache_Q4, ExLlamaV2Cache_Q6
from exllamav2.runtime.cuda_graphs import FlatQuantCache, GraphedDecode, flat_view
from exllamav2.runtime.decode import DecodeRunner, decode_step
from exllamav2.runtime.paged_decode import PagedDecode


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama (head dim 32, as the group caches need) in bf16, whose GEMV computes each row alone."""
    from test_dynamic_tiny import build_tiny_dir, load_tiny
    return load_tiny(build_tiny_dir(tmp_path_factory.mktemp("tiny_q"), head_dim=32), "bfloat16")[0]


def test_flat_view_of_a_quantized_cache(tiny):
    cache = ExLlamaV2Cache_Q4(tiny, 3, 512)
    flat = flat_view(cache)
    assert isinstance(flat, FlatQuantCache) and flat_view(cache) is flat and flat.batch_size == 1
    for mine, theirs in ((flat.key_states, cache.key_states), (flat.value_scales, cache.value_scales)):
        assert mine[0].shape == (1, 3 * 512, *theirs[0].shape[2:])
        assert mine[0].data_ptr() == theirs[0].data_ptr()  # views, no copy
    pages = flat.paged_layer(1)
    assert pages.k_codes.shape == (3 * 512, *cache.key_states[1].shape[2:])
    assert pages.k_format is cache.k_format and pages.dtype == cache.dtype
    with pytest.raises(RuntimeError, match="paged_layer"):
        flat.get_kv_state(0, 1, 0, 1)


def _graphed_runner(model):
    runner = DecodeRunner(model, compile=False)
    runner.graphs = GraphedDecode(model, progress=False)
    runner.paged = PagedDecode(runner)
    return runner


def _decode_both(tiny, cache_cls, rows, steps=(5, 9, 11, 13), paged_reference=False):
    """(graphed logits, reference logits) per step, and the two caches, after the same 7-token prompt. The
    reference: the eager seed step, or (paged_reference) the dynamic generator's packed forward over the other
    cache's rows seen as pages, which attends a step's own token as stored, as the paged step does."""
    from exllamav2.attn_params import PagedParams
    from exllamav2.generator.dynamic_draft import _eager
    from exllamav2.runtime.cuda_graphs import contiguous_table
    cache, ref_cache = cache_cls(tiny, rows, 512), cache_cls(tiny, rows, 512)
    prompt = torch.randint(0, 1000, (rows, 7), generator=torch.Generator().manual_seed(rows))
    tiny.forward(prompt, cache)
    tiny.forward(prompt, ref_cache)
    runner = _graphed_runner(tiny)
    out = []
    with torch.inference_mode():
        for t in steps:
            ids = torch.arange(t, t + rows).view(rows, 1)
            got = runner._graphed(ids, cache)
            past = ref_cache.current_seq_len
            if paged_reference:
                table, page = contiguous_table(ref_cache, "cpu", rows)
                params = PagedParams(table.tolist(), [past] * rows, [1] * rows, page)
                paged = ref_cache if rows == 1 else flat_view(ref_cache)
                want = _eager(tiny, paged, ids.view(1, rows), params, torch.arange(rows), None).view(rows, 1, -1)
            else:
                want = decode_step(tiny, ids, ref_cache, past)
            ref_cache.current_seq_len += 1
            assert got.shape == want.shape == (rows, 1, tiny.config.vocab_size)
            out.append((got, want))
    assert cache.current_seq_len == ref_cache.current_seq_len == 7 + len(steps)
    assert len(runner.graphs.graphs) == 1 and runner.paged.failed is None
    return out, cache, ref_cache


@pytest.mark.parametrize("cache_cls", [ExLlamaV2Cache_Q4, ExLlamaV2Cache_Q6, ExLlamaV2Cache_8bit])
@pytest.mark.parametrize("rows", [1, 3])
def test_graphed_path_over_a_quantized_cache_gives_the_packed_forward(tiny, cache_cls, rows):
    """The plumbing: the graphed step over the cache's rows seen as pages (static buffers, spare rows) gives the
    dynamic generator's packed forward over the same view, and writes the same codes where the plain layout keeps
    each row's positions."""
    steps, cache, ref_cache = _decode_both(tiny, cache_cls, rows, paged_reference=True)
    for got, want in steps:
        assert torch.equal(got, want)
    for mine, theirs in zip(cache.all_tensors(), ref_cache.all_tensors()):
        assert torch.equal(mine, theirs)
        assert mine[:, 7:11].any()  # the new positions were written, in each row


@pytest.mark.parametrize("cache_cls", [ExLlamaV2Cache_Q4, ExLlamaV2Cache_8bit])
def test_graphed_path_with_the_cpu_kernel_stays_close_to_the_reference(tiny, cache_cls, monkeypatch):
    """The CPU kernel (csrc/attention_quant.cpp) reads the codes in fp32 where the reference's attention reads them
    rounded to bf16: against the packed forward with the reference's attention, close (this random model amplifies
    that rounding to a few % of its logits) and the same greedy token at most steps; the kernel's own precision is
    tests/test_cpu_quant_attention.py's."""
    from exllamav2.ops.cpu import attention as cpu_attention
    real = cpu_attention.takes_quant_paged_decode
    graphed = []
    # the graphed step with the kernel, the packed reference without: the reference's rows are the second of each pair
    monkeypatch.setattr(cpu_attention, "takes_quant_paged_decode", lambda *a: graphed[-1] if graphed else real(*a))
    from exllamav2.generator import dynamic_draft
    eager = dynamic_draft._eager

    def reference(*a):
        graphed.append(False)
        try:
            return eager(*a)
        finally:
            graphed.pop()

    monkeypatch.setattr(dynamic_draft, "_eager", reference)
    steps, _, _ = _decode_both(tiny, cache_cls, 3, paged_reference=True)
    agree = []
    for got, want in steps:
        assert (got - want).norm() <= 0.08 * want.norm()
        agree += (got.argmax(-1) == want.argmax(-1)).flatten().tolist()
    assert sum(agree) >= 0.75 * len(agree)


def test_the_runner_takes_quantized_caches_only_where_it_can(tiny):
    runner = DecodeRunner(tiny, compile=False)  # no compiled steps: nothing to route a quantized cache to
    cache = ExLlamaV2Cache_Q4(tiny, 1, 256)
    ids = torch.zeros(1, 1, dtype=torch.long)
    assert runner.paged is None
    assert not runner.applies(ids, cache, None, None, None, False, False, None, {})


@pytest.mark.slow
@pytest.mark.parametrize("rows", [1, 2])
def test_compiled_decode_over_a_quantized_cache_gives_the_paged_steps_tokens(tiny, rows):
    """model.compile_decode(): the seed API's decode over a Q4 cache runs the compiled paged step (one graph per
    bucket) and gives the tokens of the same paged step run eagerly (~30 s compile)."""
    prompt = torch.randint(0, 1000, (rows, 9), generator=torch.Generator().manual_seed(7))

    def greedy(step=None, n=8):
        cache = ExLlamaV2Cache_Q4(tiny, rows, 256)
        logits = tiny.forward(prompt, cache, last_id_only=True)
        out = []
        for _ in range(n):
            tok = logits[:, -1].argmax(-1, keepdim=True)
            out.append(tok)
            logits = tiny.forward(tok, cache) if step is None else step(tok, cache)
        return torch.cat(out, 1)

    runner = _graphed_runner(tiny)
    with torch.inference_mode():
        uncompiled = greedy(runner._graphed)
    compiled_runner = tiny.compile_decode(max_seq_len=256, progress=False)
    try:
        cache = ExLlamaV2Cache_Q4(tiny, rows, 256)
        assert compiled_runner.applies(prompt[:, :1], cache, None, None, None, False, False, None, {})
        assert torch.equal(greedy(), uncompiled)
        assert compiled_runner.paged.failed is None and compiled_runner.paged._steps
        assert all(s.done for s in compiled_runner.paged._steps.values())
        # after its first step of a kind the compiled step runs without dynamo (runtime/guards.py: its guards
        # still accept the arguments, nothing the trace read changed)
        assert compiled_runner.trusted.direct > 0
    finally:
        tiny.decode_runner = None


def test_eager_decode_reads_the_codes_through_the_kernel(tiny, monkeypatch):
    """An eager seed-API decode step over a quantized cache never dequantises the prefix (get_kv_state is for
    prompts), and gives the graphed paged step's logits."""
    rows = 3
    cache, graphed_cache = ExLlamaV2Cache_Q4(tiny, rows, 512), ExLlamaV2Cache_Q4(tiny, rows, 512)
    prompt = torch.randint(0, 1000, (rows, 7), generator=torch.Generator().manual_seed(4))
    tiny.forward(prompt, cache)
    tiny.forward(prompt, graphed_cache)

    def refuse(*a, **k):
        raise AssertionError("a decode step dequantised the prefix")

    monkeypatch.setattr(cache, "get_kv_state", refuse)
    runner = _graphed_runner(tiny)
    with torch.inference_mode():
        for t in (5, 9, 11):
            ids = torch.arange(t, t + rows).view(rows, 1)
            eager = tiny.forward(ids, cache)
            graphed = runner._graphed(ids, graphed_cache)
            assert torch.allclose(eager, graphed, atol=1e-2 * graphed.abs().max().item(), rtol=0)
            assert torch.equal(eager.argmax(-1), graphed.argmax(-1))
    assert cache.current_seq_len == graphed_cache.current_seq_len == 10
    for mine, theirs in zip(cache.all_tensors(), graphed_cache.all_tensors()):
        assert torch.equal(mine[:, :7], theirs[:, :7]) and mine[:, 7:10].any()


@pytest.mark.parametrize("cache_cls", [ExLlamaV2Cache_Q4, ExLlamaV2Cache_Q6, ExLlamaV2Cache_8bit])
def test_a_prompt_is_stored_by_the_kernel_with_the_reference_codes(tiny, cache_cls, monkeypatch):
    """A seed-API prompt's rows go into a quantized cache through the CPU write kernel (cache_q.py:
    _write_with_kernel), giving the codes and scales the formats' own quantize gives."""
    from exllamav2.ops.cpu import attention as cpu_attention
    prompt = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(1))
    real = cpu_attention.quant_write
    calls = []
    monkeypatch.setattr(cpu_attention, "quant_write", lambda *a: calls.append(1) or real(*a))
    with_kernel = cache_cls(tiny, 2, 256)
    tiny.forward(prompt, with_kernel)
    assert len(calls) == tiny.config.num_hidden_layers
    monkeypatch.setattr(cpu_attention, "quant_write", lambda *a: False)  # the reference's quantize
    reference = cache_cls(tiny, 2, 256)
    tiny.forward(prompt, reference)
    for a, b in zip(with_kernel.all_tensors(), reference.all_tensors()):
        assert torch.equal(a, b)
    assert with_kernel.key_states[0][:, :40].any()
