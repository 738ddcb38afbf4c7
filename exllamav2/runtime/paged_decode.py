"""The dynamic generator's decode step through the decode runner: one new token for each of B sequences over
the paged cache, compiled once for one sequence and once for any larger number of them.

The packed forward (generator/dynamic.py) describes its sequences with Python lists, which a compiled graph
would have to guard on and rebuild every step. A decode-only step instead takes its block tables and lengths as
device tensors of fixed shape (paged_attn.PagedDecodeParams): the block table is padded to the cache's page
count, positions and write slots are computed on the device, and attention runs each sequence alone through the
`exllamav2::paged_decode_attention` custom op (ops/torch_ref/attention.py), so a sequence's result stays
independent of its neighbours. Prefill and mixed steps keep running the packed forward eagerly.
"""

from __future__ import annotations

import types

import torch

from ..paged_attn import PagedDecodeParams, PagedParams
from .compile import Ticker


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
        self._steps: dict = {}    # "one" / "many" -> compiled step
        self._buffers: dict = {}  # per (B, pages) -> (ids, block_index, past), inference tensors
        self.failed: str | None = None  # why the step could not be compiled or captured (eager then runs)

    def applies(self, model, cache, params: PagedParams, rows: torch.Tensor, loras) -> bool:
        from ..cache import ExLlamaV2Cache
        if self.failed or loras or type(cache) is not ExLlamaV2Cache or max(params.q_lens) != 1:
            return False
        if len(rows) != params.num_sequences or cache.key_states[0] is None:
            return False
        if (cache.key_states[0].device.type != "cpu") != (self.runner.graphs is not None):
            return False  # CPU steps are compiled, GPU steps captured: a runner does one or the other
        if any(getattr(r, "dynamic", False) for r in _ropes(model)):
            return False  # dynamic RoPE scales by the longest position: the eager path tracks it exactly
        return self.runner.applies_to_model()

    def __call__(self, ids: torch.Tensor, cache, params: PagedParams) -> torch.Tensor | None:
        """Logits (B, vocab), or None when the step failed to compile (the caller runs the eager forward)."""
        if self.runner.graphs is not None:
            dev = cache.key_states[0].device
            return self.graphed(cache, ids.to(dev), params.block_index.to(dev), params.cache_seqlens.to(dev),
                                params.page_size)
        b = params.num_sequences
        pages = cache.max_seq_len // params.page_size
        bufs = self._buffers.get((b, pages))
        if bufs is None:
            with torch.inference_mode():
                bufs = self._buffers[(b, pages)] = (torch.zeros(1, b, dtype=torch.long),
                                                    torch.zeros(b, pages, dtype=torch.long),
                                                    torch.zeros(b, dtype=torch.long))
        ids_buf, table, past = bufs
        ids_buf.copy_(ids)
        table.zero_()
        table[:, :params.block_index.shape[1]].copy_(params.block_index)
        past.copy_(params.cache_seqlens)
        key = "one" if b == 1 else "many"
        step = self._steps.get(key)
        if step is None:
            step = self._steps[key] = self._compile(key, ids_buf, table, past)
        args = (self.runner.model, ids_buf, cache, table, past, params.page_size, cache.max_seq_len)
        if step.done:
            return step(*args)
        try:
            return step(*args)
        except Exception as e:  # a failed compile must not end the user's jobs: the eager forward computes the same
            self._fail("compiled", e)
            return None

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

    def _compile(self, key: str, *inputs):
        fn = types.FunctionType(paged_decode_step.__code__.replace(), paged_decode_step.__globals__,
                                f"paged_decode_step_{key}")
        if key == "many":
            # one graph for every batch of two or more sequences: the sequence count is symbolic from the start
            for t in inputs:
                torch._dynamo.mark_dynamic(t, 1 if t.dim() == 2 and t.shape[0] == 1 else 0)
        what = "Compiling the paged decode step for " + ("one sequence" if key == "one" else "several sequences")
        return _Lazy(self.runner.compile_fn(fn), what, self.runner.progress)


class _Lazy:
    """A compiled step whose first call (where torch.compile does its work) shows progress."""

    def __init__(self, step, what: str, progress: bool):
        self.step, self.what, self.progress, self.done = step, what, progress, False

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
