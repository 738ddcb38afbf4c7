"""The dynamic generator's decode step through the decode runner: one new token for each of B sequences over
the paged cache, compiled once per bucket of sequence counts (1, 2, 4, 8, ...).

The packed forward (generator/dynamic.py) describes its sequences with Python lists, which a compiled graph
would have to guard on and rebuild every step. A decode-only step instead takes its block tables and lengths as
device tensors of fixed shape (paged_attn.PagedDecodeParams): the block table is padded to the cache's page
count, positions and write slots are computed on the device, and attention runs each sequence alone (on the CPU
one C++ call for all of them, `exllamav2_cpu::paged_decode_attention`; elsewhere the
`exllamav2::paged_decode_attention` custom op, ops/torch_ref/attention.py), so a sequence's result stays
independent of its neighbours. In a mixed step the one-token sequences still run here and the prompts being read
run the packed forward eagerly beside them (`PagedDecode.forward`), so a request's decode tokens come from the same
graph whatever shares its steps.
"""

from __future__ import annotations

import torch

from ..paged_attn import PagedDecodeParams, PagedParams
from .compile import Ticker, bind_model
from .guards import cache_kind


def paged_decode_step(model, ids: torch.Tensor, cache, block_index: torch.Tensor, past: torch.Tensor,
                      page_size: int, max_positions: int) -> torch.Tensor:
    """The module forwards for ids (1, B), one token per sequence: fp32 logits (B, vocab)."""
    params = PagedDecodeParams(block_index, past, page_size, max_positions)
    x = ids
    for module in model.modules:
        x = module.forward(x, cache=cache, attn_params=params, past_len=0)
    return model.final_logits(x[0])


class PagedDecode:
    """Owned by a compiled DecodeRunner (runtime/decode.py); generator/dynamic.py asks it first for every step."""

    def __init__(self, runner):
        self.runner = runner
        self._steps: dict = {}    # per bucket of sequence counts (`bucket`), the compiled step
        self._dynamic_rope: bool | None = None
        self._buffers: dict = {}  # per (B, pages) -> (ids, block_index, past), inference tensors
        self.failed: str | None = None  # why the step could not be compiled or captured (eager then runs)

    def usable(self, model, cache, loras) -> bool:
        """Whether this runner can take this model's decode steps on this cache now."""
        from ..cache import ExLlamaV2Cache
        from ..cache_q import has_quant_pages  # quantized pages: ops.quant_paged_attention's decode op
        paged = type(cache) is ExLlamaV2Cache or has_quant_pages(cache)
        if self.failed or loras or not paged or cache.key_states[0] is None:
            return False
        if (cache.key_states[0].device.type != "cpu") != (self.runner.graphs is not None):
            return False  # CPU steps are compiled, GPU steps captured: a runner does one or the other
        if self._dynamic_rope is None:
            self._dynamic_rope = any(getattr(r, "dynamic", False) for r in _ropes(model))
        if self._dynamic_rope:
            return False  # dynamic RoPE scales by the longest position: the eager path tracks it exactly
        return self.runner.applies_to_model()

    def forward(self, ids: torch.Tensor, cache, params: PagedParams, rows: torch.Tensor, eager) -> torch.Tensor | None:
        """Logits (len(rows), vocab) for a packed step: the one-token sequences that want logits through the compiled
        (or captured) step, the rest through `eager(ids, params, rows)`, so a sequence's decode tokens come from the
        same graph whatever else shares its step (a prompt being read beside it, say). None when the step cannot
        run here (the caller then runs the whole step eagerly)."""
        want = set(rows.tolist())
        starts = [0]
        for q in params.q_lens[:-1]:
            starts.append(starts[-1] + q)
        dec = [i for i, (q, st) in enumerate(zip(params.q_lens, starts)) if q == 1 and st in want]
        if not dec:
            return None
        if len(dec) == params.num_sequences and len(want) == len(dec):
            return self(ids, cache, params)
        tables = params.block_tables
        rest = [i for i in range(params.num_sequences) if i not in set(dec)]
        sub = PagedParams([tables[i] for i in dec], [params.past_lens[i] for i in dec], [1] * len(dec),
                          params.page_size)
        dec_logits = self(ids[:, [starts[i] for i in dec]], cache, sub)
        if dec_logits is None:
            return None
        # the other sequences, packed alone; the rows they want, renumbered in that packing
        token_map, idx = {}, []
        for i in rest:
            for t in range(params.q_lens[i]):
                token_map[starts[i] + t] = len(idx)
                idx.append(starts[i] + t)
        rest_rows = [r for r in rows.tolist() if r in token_map]
        rest_params = PagedParams([tables[i] for i in rest], [params.past_lens[i] for i in rest],
                                  [params.q_lens[i] for i in rest], params.page_size)
        rest_logits = eager(ids[:, idx], rest_params, torch.tensor([token_map[r] for r in rest_rows], dtype=torch.long))
        if rest_logits is None:  # the other sequences only wrote their K/V
            return dec_logits
        where = {starts[i]: n for n, i in enumerate(dec)}
        out, k = [], 0
        for r in rows.tolist():
            if r in where:
                out.append(dec_logits[where[r]])
            else:
                out.append(rest_logits[k])
                k += 1
        return torch.stack(out)

    def __call__(self, ids: torch.Tensor, cache, params: PagedParams) -> torch.Tensor | None:
        """Logits (B, vocab), or None when the step failed to compile (the caller runs the eager forward)."""
        if self.runner.graphs is not None:
            dev = cache.key_states[0].device
            return self.graphed(cache, ids.to(dev), params.block_index.to(dev), params.cache_seqlens.to(dev),
                                params.page_size)
        # one static graph per bucket of sequence counts (1, 2, 4, 8, ...): the rows past the sequences are copies of
        # the first, which write the same values to the same cache slots. Inductor's settings (runtime/compile.py:
        # casts rounded as eager rounds them, no split reductions) make a row's result the same in every bucket,
        # so a request's tokens do not depend on how many others share its steps (tests/test_decode_runner.py)
        b = params.num_sequences
        n = bucket(b)
        pages = cache.max_seq_len // params.page_size
        bufs = self._buffers.get((n, pages))
        if bufs is None:
            with torch.inference_mode():
                bufs = self._buffers[(n, pages)] = (torch.zeros(1, n, dtype=torch.long),
                                                    torch.zeros(n, pages, dtype=torch.long),
                                                    torch.zeros(n, dtype=torch.long))
        ids_buf, table, past = bufs
        load_rows(bufs, ids, params.block_index, params.cache_seqlens)
        step = self._steps.get(n)
        if step is None:
            step = self._steps[n] = self._compile(n)
        args = (ids_buf, cache, table, past, params.page_size, cache.max_seq_len)
        try:
            out = self.runner.trusted.call(step, (n, pages, params.page_size, cache_kind(cache)), *args)
        except Exception as e:  # a failed compile must not end the user's jobs: the eager forward computes the same
            if step.done:
                raise
            self._fail("compiled", e)
            return None
        return out[:b]

    def graphed(self, cache, ids, table, past, page_size) -> torch.Tensor | None:
        """The step through the runner's CUDA graphs; None (and one line) when capture fails."""
        try:
            return self.runner.graphs(cache, ids, table, past, page_size)
        except Exception as e:
            self._fail("captured", e)
            return None

    def _fail(self, what: str, e: Exception) -> None:
        import sys
        self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        print(f"exllamav2: the paged decode step could not be {what} ({self.failed[:200]}); decoding runs "
              "eagerly", file=sys.stderr)

    def _compile(self, n: int):
        """The step for `n` sequences: its own copy of the code, so dynamo keeps the count static per graph."""
        fn = bind_model(paged_decode_step, self.runner.model, f"paged_decode_step_b{n}")
        return _Lazy(self.runner.compile_fn(fn), f"Compiling the paged decode step for {n} sequence(s)",
                     self.runner.progress)


def bucket(b: int) -> int:
    """The graph size that serves b sequences: the next power of two."""
    return 1 << (b - 1).bit_length()


def load_rows(bufs, ids: torch.Tensor, table: torch.Tensor, past: torch.Tensor) -> None:
    """A step's inputs for b sequences into a bucket's static buffers (ids (1, n), block tables (n, pages), lengths
    (n,)): table columns past the given width zeroed, and the spare rows past b copies of the first sequence (they
    write the same values to the same cache slot where a row's result does not depend on the rows beside it)."""
    ids_buf, table_buf, past_buf = bufs
    b, width = ids.shape[1], table.shape[1]
    if width < table_buf.shape[1]:
        table_buf[:, width:].zero_()
    ids_buf[:, :b].copy_(ids)
    table_buf[:b, :width].copy_(table)
    past_buf[:b].copy_(past)
    if b < past_buf.shape[0]:
        ids_buf[:, b:].copy_(ids[:, :1])
        table_buf[b:, :width].copy_(table[:1])
        past_buf[b:].copy_(past[:1])


class _Lazy:
    """A compiled step whose first call (where torch.compile does its work) shows progress."""

    def __init__(self, step, what: str, progress: bool):
        self.step, self.what, self.progress, self.done = step, what, progress, False

    @property
    def compiled(self):
        return self.step  # the torch.compile'd function (runtime/guards.py: direct_frame)

    def __call__(self, *args):
        if self.done:
            return self.step(*args)
        with Ticker(self.what + " (cached on disk after the first time)", self.progress):
            out = self.step(*args)
        self.done = True
        return out


def _ropes(model):
    for m in model.modules:
        if hasattr(m, "uses_rope") and m.uses_rope():
            yield m.rope()
