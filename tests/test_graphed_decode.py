"""The GPU decode path's plumbing (runtime/cuda_graphs.py), run on the CPU: the static buffers a captured graph
replays over, one per bucket of sequence counts, fed step after step with other lengths and pages; and the seed API's
batch-1 decode over a plain cache seen as consecutive pages. Capture itself needs a GPU (bench/gpu/ runs it there);
here each "graph" runs the same step eagerly on its static buffers, which must give the uncaptured step's logits."""

from __future__ import annotations

import torch

from exllamav2 import ExLlamaV2Cache
from exllamav2.runtime.cuda_graphs import GraphedDecode, contiguous_table
from exllamav2.runtime.decode import DecodeRunner, decode_step
from exllamav2.runtime.paged_decode import PagedDecode, paged_decode_step


def _model(tmp_path):
    from test_dynamic_tiny import build_tiny_dir, load_tiny
    return load_tiny(build_tiny_dir(tmp_path), "bfloat16")[0]


def test_static_buffers_per_batch_size_give_the_plain_step(tmp_path):
    model = _model(tmp_path)
    ps, pages = 8, 16
    cache = ExLlamaV2Cache(model, 1, ps * pages)
    graphs = GraphedDecode(model, progress=False)
    g = torch.Generator().manual_seed(0)
    seen = {}
    with torch.inference_mode():
        for step, b in enumerate([2, 3, 2, 1, 3]):
            past = torch.randint(0, 40, (b,), generator=g)
            table = torch.randperm(pages, generator=g)[:b * 5].view(b, 5)  # narrower than the cache's page count
            ids = torch.randint(0, 1000, (1, b), generator=g)
            got = graphs(cache, ids, table, past, ps)
            want = paged_decode_step(model, ids, cache, torch.cat((table, torch.zeros(b, pages - 5, dtype=torch.long)),
                                                                  1), past, ps, cache.max_seq_len)
            # B=3 runs the graph of 4 rows (the spare row copies the first): each row as in the plain step
            assert torch.equal(got, want), f"step {step} (B={b})"
            n = 1 << (b - 1).bit_length()
            buf = graphs.graphs[(id(cache), n, pages, ps)]
            assert buf.ids.shape == (1, n)
            assert torch.equal(buf.ids[0, b:], ids[0, :1].expand(n - b))
            assert seen.setdefault(n, buf.ids.data_ptr()) == buf.ids.data_ptr()  # the same buffers, reused
    assert sorted(k[1] for k in graphs.graphs) == [1, 2, 4]


def test_seed_api_batch1_decode_through_the_graphed_path(tmp_path):
    model = _model(tmp_path)
    for max_len in (512, 200):  # pages of 256, and one page when the length is not a multiple of it
        cache = ExLlamaV2Cache(model, 1, max_len)
        table, page = contiguous_table(cache, "cpu")
        assert table.shape[1] * page == max_len
        prompt = torch.randint(0, 1000, (1, 7), generator=torch.Generator().manual_seed(1))
        model.forward(prompt, cache)
        runner = DecodeRunner(model, compile=False)
        runner.graphs, runner.paged = GraphedDecode(model, progress=False), None
        runner.paged = PagedDecode(runner)
        ref_cache = ExLlamaV2Cache(model, 1, max_len)
        model.forward(prompt, ref_cache)
        with torch.inference_mode():
            for t in (5, 9, 11):
                ids = torch.tensor([[t]])
                got = runner._graphed(ids, cache)
                want = decode_step(model, ids, ref_cache, ref_cache.current_seq_len)
                ref_cache.current_seq_len += 1
                assert got.shape == want.shape == (1, 1, model.config.vocab_size)
                assert torch.allclose(got, want, atol=2e-2 * want.abs().max().item(), rtol=0)
                assert got.argmax() == want.argmax()
        assert cache.current_seq_len == ref_cache.current_seq_len == 10


def test_seed_api_batched_decode_through_the_graphed_path(tmp_path):
    """A plain cache of 3 rows as one paged cache (FlatCache): the base and streaming generators' batched decode
    on a GPU replays the 4-row graph; each row as the plain batched step gives it."""
    from exllamav2.runtime.cuda_graphs import FlatCache, flat_view
    model = _model(tmp_path)
    cache, ref_cache = ExLlamaV2Cache(model, 3, 512), ExLlamaV2Cache(model, 3, 512)
    flat = flat_view(cache)
    assert isinstance(flat, FlatCache) and flat_view(cache) is flat
    assert flat.key_states[0].shape == (1, 3 * 512, *cache.key_states[0].shape[2:])
    assert flat.key_states[0].data_ptr() == cache.key_states[0].data_ptr()  # a view, no copy
    table, page = contiguous_table(cache, "cpu", 3)
    assert table.tolist() == [[0, 1], [2, 3], [4, 5]] and page == 256
    prompt = torch.randint(0, 1000, (3, 6), generator=torch.Generator().manual_seed(2))
    model.forward(prompt, cache)
    model.forward(prompt, ref_cache)
    runner = DecodeRunner(model, compile=False)
    runner.graphs = GraphedDecode(model, progress=False)
    runner.paged = PagedDecode(runner)
    with torch.inference_mode():
        for t in (5, 9, 11):
            ids = torch.tensor([[t], [t + 1], [t + 2]])
            got = runner._graphed(ids, cache)
            want = decode_step(model, ids, ref_cache, ref_cache.current_seq_len)
            ref_cache.current_seq_len += 1
            assert got.shape == want.shape == (3, 1, model.config.vocab_size)
            assert torch.allclose(got, want, atol=2e-2 * want.abs().max().item(), rtol=0)
            assert torch.equal(got.argmax(-1), want.argmax(-1))
    # the k/v the graphed steps wrote sit where the plain steps wrote them
    assert torch.allclose(cache.key_states[0][:, :9].float(), ref_cache.key_states[0][:, :9].float(), atol=2e-2)
    assert [k[1] for k in runner.graphs.graphs] == [4]


def test_graphs_are_captured_anew_when_the_backend_choice_changes(tmp_path):
    """A graph holds the kernels it captured; pinning another backend (or any process state a step reads) drops
    the graphs, so none replays kernels that were replaced."""
    from exllamav2 import ops
    model = _model(tmp_path)
    ps, pages = 8, 4
    cache = ExLlamaV2Cache(model, 1, ps * pages)
    graphs = GraphedDecode(model, progress=False)
    ids, table, past = torch.tensor([[3]]), torch.tensor([[0, 1]]), torch.tensor([5])
    with torch.inference_mode():
        graphs(cache, ids, table, past, ps)
        first = next(iter(graphs.graphs.values()))
        graphs(cache, ids, table, past, ps)
        assert next(iter(graphs.graphs.values())) is first
        with ops.use_backend("torch"):
            graphs(cache, ids, table, past, ps)
        assert len(graphs.graphs) == 1 and next(iter(graphs.graphs.values())) is not first
