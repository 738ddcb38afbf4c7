"""The paged decode step (runtime/paged_decode.py) captured as CUDA graphs: on a GPU, decode launches one graph per
step instead of a few hundred kernels from Python.

A step over B sequences runs the graph of its bucket (the next power of two, as the compiled CPU step:
paged_decode.bucket), captured at its first use over static buffers (token ids, block tables, lengths, logits);
every later step copies its inputs into those buffers, the spare rows copying the first sequence (they write the
same values to the same cache slots), and replays the graph. A row's result does not depend on the rows beside it
(the Triton paged attention and linears compute each row alone), so a sequence gets the same logits in every bucket.
The graphs share one memory pool, so holding one per bucket costs about the activations of the largest. Capture
needs a step with no host sync: the `triton` backend's paged attention, linears and MoE experts (ops/triton/) give
that (MoE experts the device-routed kernels cannot read run masked over every expert: moe_mlp.forward_static). When
capture fails (an op that syncs with the host, or no Triton), the caller falls back to the eager step and one line
says why.

The seed API's decode over a plain cache runs the same step: a plain cache of B rows, (B, max_seq_len, kv_heads, d)
and contiguous, is one paged cache of B * max_seq_len slots (`FlatCache`) in which row i's block table is i * P, i *
P + 1, ... for P pages a row (`contiguous_table`). A quantized cache's codes and scales are seen the same way
(`FlatQuantCache`), so its decode reads the codes inside attention (runtime/decode.py routes it here on a GPU and
to the compiled paged step on the CPU).
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from .graph_step import graph_step
from .guards import process_state
from .paged_decode import bucket, load_rows, paged_decode_step


def contiguous_table(cache, device, rows: int = 1) -> tuple[torch.Tensor, int]:
    """The first `rows` rows of a plain cache as sequences of one paged cache (FlatCache): (block tables (rows,
    pages a row), page size)."""
    n = cache.max_seq_len
    page = 256 if n % 256 == 0 else n
    pages = n // page
    return torch.arange(rows * pages, device=device).view(rows, pages), page


class FlatCache:
    """A plain cache's tensors (B, max_seq_len, kv_heads, d) seen as one paged cache (1, B * max_seq_len, kv_heads,
    d): views, no copy. `max_seq_len` stays the row's (the block tables' width and the positions' bound)."""

    batch_size = 1

    def __init__(self, cache):
        self.cache = cache
        self.max_seq_len = cache.max_seq_len
        self.key_states = [k.view(1, -1, *k.shape[2:]) for k in cache.key_states]
        self.value_states = [v.view(1, -1, *v.shape[2:]) for v in cache.value_states]

    def get_kv_state(self, layer_idx: int, *args, **kwargs):
        return self.key_states[layer_idx], self.value_states[layer_idx]

    def store_kv_state(self, *args, **kwargs):
        pass


class FlatQuantCache(FlatCache):
    """A quantized cache's codes and scales (cache_q.py), (B, max_seq_len, kv_heads, w) each, seen as one paged
    cache of B * max_seq_len slots, as FlatCache does for a plain cache: attention reads it through `paged_layer`
    (ops.quant_paged_attention), never through get_kv_state."""

    def __init__(self, cache):
        super().__init__(cache)
        self.k_format, self.v_format, self.dtype = cache.k_format, cache.v_format, cache.dtype
        flat = lambda ts: [None if t is None else t.view(1, -1, *t.shape[2:]) for t in ts]  # noqa: E731
        self.key_scales, self.value_scales = flat(cache.key_scales), flat(cache.value_scales)

    def paged_layer(self, layer_idx: int):
        from ..cache_q import QuantPages
        ks, vs = self.key_scales[layer_idx], self.value_scales[layer_idx]
        return QuantPages(self.key_states[layer_idx][0], None if ks is None else ks[0], self.value_states[layer_idx][0],
                          None if vs is None else vs[0], self.k_format, self.v_format, self.dtype)

    def get_kv_state(self, layer_idx: int, *args, **kwargs):
        raise RuntimeError("FlatQuantCache: attention reads a quantized cache through paged_layer()")


def flat_view(cache) -> "FlatCache":
    """The cache's FlatCache (FlatQuantCache for a quantized cache), made once per cache (graphs are keyed by the
    object they were captured over)."""
    from ..cache_q import has_quant_pages
    flat = getattr(cache, "_flat_view", None)
    if flat is None or flat.key_states[0].data_ptr() != cache.key_states[0].data_ptr():
        flat = cache._flat_view = (FlatQuantCache if has_quant_pages(cache) else FlatCache)(cache)
    return flat


class _Graph:
    """One captured step: its static buffers and the graph (or, with `capture=None`, the step run eagerly on the same
    buffers: how the CPU tests check everything around the capture). The buffers hold the first call's inputs while
    the capture warms up, so the warm-up steps rewrite that step's own cache slots with the same values."""

    def __init__(self, model, cache, ids, table, past, rows: int, pages: int, page_size: int,
                 capture: Callable | None):
        b, device = rows, ids.device
        self.ids = torch.zeros(1, b, dtype=torch.long, device=device)
        self.table = torch.zeros(b, pages, dtype=torch.long, device=device)
        self.past = torch.zeros(b, dtype=torch.long, device=device)
        self.args = (model, self.ids, cache, self.table, self.past, page_size, cache.max_seq_len)
        self.graph = self.out = None
        self._load(ids, table, past)
        if capture is not None:
            self.graph, self.out = capture(self.args)

    def _load(self, ids, table, past) -> None:
        load_rows((self.ids, self.table, self.past), ids, table, past)

    def run(self, ids: torch.Tensor, table: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        b = ids.shape[1]
        self._load(ids, table, past)
        if self.graph is None:
            return paged_decode_step(*self.args)[:b]
        self.graph.replay()
        return self.out[:b].clone()  # the graph's output buffer is rewritten by the next replay


def cuda_capture(args, pool=None):
    """Warm up on a side stream (Triton compiles its kernels, tables are built), then capture one step."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with graph_step():  # the warm-up takes the capture's paths (runtime/graph_step.py)
        with torch.cuda.stream(side):
            for _ in range(2):
                paged_decode_step(*args)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = paged_decode_step(*args)
    return graph, out


class GraphedDecode:
    """Per number of sequences, the paged decode step captured over static buffers."""

    def __init__(self, model, progress: bool = True, capture: Callable | None = None):
        self.model = model
        self.progress = progress
        self._capture = capture
        self._pool = None
        self.graphs: dict = {}  # (id(cache), bucket of B, pages, page_size) -> _Graph
        self._state = None  # guards.process_state() the graphs were captured under
        self.capture_seconds = 0.0

    def _capture_fn(self):
        if self._capture is not None:
            return self._capture
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        pool = self._pool
        return lambda args: cuda_capture(args, pool)

    def __call__(self, cache, ids: torch.Tensor, table: torch.Tensor, past: torch.Tensor,
                 page_size: int) -> torch.Tensor:
        """Logits (B, vocab) for ids (1, B) at lengths `past` (B,) through block tables `table` (B, <= pages)."""
        n = bucket(ids.shape[1])
        pages = cache.max_seq_len // page_size
        state = process_state()
        if state != self._state:
            # a backend pin, batch invariance, ...: the kernels a graph captured may be gone; capture anew
            self.graphs.clear()
            self._state = state
        key = (id(cache), n, pages, page_size)
        g = self.graphs.get(key)
        if g is None:
            t0 = time.time()
            capture = self._capture_fn() if ids.device.type == "cuda" else self._capture
            g = _Graph(self.model, cache, ids, table, past, n, pages, page_size, capture)
            dt = time.time() - t0
            self.capture_seconds += dt
            if self.progress:
                import sys
                print(f"exllamav2: captured the decode step for up to {n} sequence{'s' if n > 1 else ''} in "
                      f"{dt:.2f} s", file=sys.stderr)
            self.graphs[key] = g
        return g.run(ids, table, past)
